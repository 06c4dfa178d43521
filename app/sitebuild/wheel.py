"""The browser wheel: app, analysis and export (and diffviz.py) as one pure-Python wheel, built offline.

Left out: ``capture/`` (torch) and this package, ``app/sitebuild/`` (it builds the site, the browser never
runs it). ``verify_wheel`` checks both, and that no module imports torch or the capture package.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

from .base import SiteError, project_root

#: What the browser wheel may hold at its top level, and what none of its modules may import.
WHEEL_TOP_LEVEL = {"app", "analysis", "export", "diffviz.py"}
WHEEL_FORBIDDEN_IMPORTS = {"capture", "torch", "diffusers", "transformers", "safetensors", "accelerate"}
#: Folders of the packages above that stay out of the wheel (``/``-separated, relative to the checkout).
WHEEL_EXCLUDED = ("app/sitebuild",)
#: Pure-Python dependencies that micropip fetches from the package index: pinned to the versions
#: installed here, the ones Panel's pinned wheel was tested with (numpy, pillow, jsonschema come
#: from Pyodide's own distribution, whose versions are Pyodide's).
PIN_TO_LOCAL = ("param",)


def _ignore_for(root: Path) -> Callable[[str, list[str]], set[str]]:
    """For ``copytree``: caches, build leftovers and the excluded folders."""
    caches = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    excluded = {(root / rel).resolve() for rel in WHEEL_EXCLUDED}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = set(caches(folder, names))
        skip.update(n for n in names if (Path(folder) / n).resolve() in excluded)
        return skip

    return ignore


def stage_sources(root: Path, stage: Path) -> None:
    """Copy what the browser wheel is built from: pyproject.toml as it is, and only the browser's packages.

    ``[tool.setuptools.packages.find]`` includes ``capture*``; it finds nothing here because
    ``capture/`` is not copied. That is the filter: one pyproject, no second wheel config.
    """
    stage.mkdir(parents=True)
    shutil.copy2(root / "pyproject.toml", stage / "pyproject.toml")
    readme = root / "README.md"
    if readme.is_file():
        shutil.copy2(readme, stage / "README.md")
    else:  # pyproject names it; a checkout without one still builds
        (stage / "README.md").write_text("# diffviz\n", encoding="utf-8")
    ignore = _ignore_for(root)
    for name in sorted(WHEEL_TOP_LEVEL):
        src = root / name
        if src.is_dir():
            shutil.copytree(src, stage / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, stage / name)
        else:
            raise SiteError(f"{src}: missing from the checkout")


def _can_build_offline() -> bool:
    """True when this Python's setuptools builds wheels by itself (70.1+ has bdist_wheel built in)."""
    from importlib import metadata

    try:
        version = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    return (major, minor) >= (70, 1)


def build_wheel(dest: Path, work: Path, log: Callable[[str], None] = print) -> Path:
    """Build the browser wheel (``pip wheel --no-deps``) into ``dest`` and return its path."""
    stage = work / "wheel-src"
    stage_sources(project_root(), stage)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(dest)]
    if _can_build_offline():
        cmd += ["--no-build-isolation", "--no-index"]
    else:
        log("note: this Python's setuptools is older than 70.1; pip builds the wheel in an isolated "
            "environment, which needs the package index")
    proc = subprocess.run(cmd + [str(stage)], capture_output=True, text=True)
    wheels = sorted(dest.glob("diffviz-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise SiteError(f"building the browser wheel failed: {tail[0]}")
    verify_wheel(wheels[0])
    return wheels[0]


def _imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of the modules that ``source`` (module ``module``) imports, anywhere in it."""
    names: set[str] = set()
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return names


def verify_wheel(wheel: Path) -> dict[str, Any]:
    """Check the browser wheel: only app/analysis/export (+ diffviz.py), app/main.py present, no torch imports."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tops = {n.split("/")[0] for n in names}
        stray = sorted(t for t in tops if t not in WHEEL_TOP_LEVEL and not t.endswith(".dist-info"))
        if stray:
            raise SiteError(f"{wheel.name}: holds {', '.join(stray)}; the browser wheel may hold only {', '.join(sorted(WHEEL_TOP_LEVEL))}")
        for folder in WHEEL_EXCLUDED:
            if any(n.startswith(folder + "/") for n in names):
                raise SiteError(f"{wheel.name}: holds {folder}/, which builds the site and must stay out of the browser wheel")
        for required in ("app/main.py", "analysis/__init__.py", "export/__init__.py"):
            if required not in names:
                raise SiteError(f"{wheel.name}: {required} is missing")
        for name in names:
            if not name.endswith(".py"):
                continue
            module = name[:-3].replace("/", ".").removesuffix(".__init__")
            imported = _imports(zf.read(name).decode("utf-8"), module, is_package=name.endswith("/__init__.py"))
            bad = {m for m in imported if m.split(".")[0] in WHEEL_FORBIDDEN_IMPORTS}
            if bad:
                raise SiteError(f"{wheel.name}: {name} imports {', '.join(sorted(bad))}, which the browser cannot have")
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta_name).decode("utf-8")
    return {"files": names, "metadata": metadata}


def wheel_requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional ``Requires-Dist`` (no extras), the local pins applied."""
    from importlib import metadata as md

    from packaging.requirements import Requirement

    text = verify_wheel(wheel)["metadata"]
    out = []
    for line in re.findall(r"(?m)^Requires-Dist:\s*(.+?)\s*$", text):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (capture, test): not for the browser
        if req.name.lower() in PIN_TO_LOCAL:
            try:
                local = md.version(req.name)
            except md.PackageNotFoundError:
                local = None
            if local and req.specifier.contains(local, prereleases=True):
                out.append(f"{req.name}=={local}")
                continue
        out.append(str(req))
    return out
