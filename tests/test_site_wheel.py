"""The browser wheel installs into a clean venv that has no torch, and app/analysis/export import from it.

Offline and quick: the venv is made ``--without-pip`` and has no access to the main venv's
site-packages; pip (the main venv's, pointed at it with ``--python``) installs only our wheel
there. The base dependencies (numpy, panel, param, ... and what they need) are linked in one
by one from the main venv, following ``Requires-Dist`` from our wheel's metadata: torch is not
among them, so ``import torch`` fails in the clean venv, and ``pip check`` proves that what is
linked is exactly what the wheel's metadata asks for.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from app.sitebuild.wheel import build_wheel
from tests.synthetic import write_synthetic_run

FORBIDDEN = ("torch", "diffusers", "transformers", "capture")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The main venv's distributions that ``requirements`` need (markers evaluated, extras skipped)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = _norm(req.name)
        if key in found:
            continue
        dist = metadata.distribution(req.name)
        found[key] = dist
        todo.extend(Requirement(r) for r in dist.requires or [])
    return found


def link_distribution(dist: metadata.Distribution, into: Path) -> None:
    """Symlink a distribution's top-level modules and its .dist-info folder into ``into``."""
    root = Path(dist.locate_file("")).resolve()
    tops = set()
    for file in dist.files or []:
        parts = Path(file).parts
        if parts and parts[0] not in ("..", "bin") and not parts[0].startswith("__pycache__"):
            tops.add(parts[0])
    for top in sorted(tops):
        src, dst = root / top, into / top
        if src.exists() and not dst.exists():
            dst.symlink_to(src, target_is_directory=src.is_dir())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    return build_wheel(work / "dist", work, log=lambda _msg: None)


@pytest.fixture(scope="module")
def clean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "clean"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = re.findall(r"(?m)^Requires-Dist: (.+)$", meta)
    deps = venv / "deps"
    deps.mkdir()
    closure = base_closure(requires)
    assert not {_norm(f) for f in FORBIDDEN} & set(closure), "a base dependency pulls in torch"
    for dist in closure.values():
        link_distribution(dist, deps)
    (purelib / "_base_deps.pth").write_text(str(deps) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--disable-pip-version-check", "-q", str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return venv


def run_in(venv: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=cwd, env=env)


def test_wheel_metadata_is_complete_without_torch(clean_venv: Path) -> None:
    """``pip check``: every requirement of the installed wheel is met by the linked base dependencies."""
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(clean_venv / "bin" / "python"), "check",
                           "--disable-pip-version-check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_packages_import_from_the_wheel_without_torch(clean_venv: Path, wheel: Path, tmp_path: Path) -> None:
    write_synthetic_run(tmp_path / "datasets" / "default", steps=2, layers=1, tokens=3, r=4, s=2)
    with zipfile.ZipFile(wheel) as zf:
        modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in zf.namelist()
                         if n.endswith(".py") and n.split("/")[0] in ("app", "analysis", "export"))
    assert "app.main" in modules and "export.reader" in modules and "analysis.metrics" in modules
    code = f"""
import importlib, importlib.util, json, sys
missing = [m for m in {list(FORBIDDEN)!r} if importlib.util.find_spec(m) is not None]
builder = importlib.util.find_spec("app.sitebuild") is not None
try:
    import torch
    torch_import = "imported"
except ModuleNotFoundError as exc:
    torch_import = exc.name
files = {{}}
for name in {modules!r}:
    files[name] = importlib.import_module(name).__file__
print(json.dumps({{"present": missing, "builder": builder, "torch": torch_import, "files": files,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {list(FORBIDDEN)!r})}}))
"""
    proc = run_in(clean_venv, code, cwd=tmp_path)  # cwd holds datasets/default, which app.main opens
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["present"] == [] and out["torch"] == "torch" and out["loaded"] == []
    assert out["builder"] is False  # the site builder is not in the browser wheel
    # every module came from the clean venv's installed wheel, not from the checkout
    assert len(out["files"]) == len(modules)
    assert all(Path(f).resolve().is_relative_to(clean_venv.resolve()) for f in out["files"].values()), out["files"]
