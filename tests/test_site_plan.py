"""The static site's whole install plan, resolved offline and transitively against the pinned Pyodide's
lock file (``node_modules/pyodide/pyodide-lock.json``, installed by ``make test``) plus pure-Python
wheels; and what a first visit downloads.

The resolver is checked on small made-up locks too, so that a requirement nothing provides, at any
depth, is reported by name.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.sitebuild import download, resolve
from app.sitebuild.convert import worker_requirements
from app.sitebuild.resolve import Wheel
from app.sitebuild.wheel import build_wheel, wheel_requirements

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "node_modules" / "pyodide" / "pyodide-lock.json"


@pytest.fixture(scope="module")
def lock() -> dict:
    import panel.io.convert as convert

    if not LOCK.is_file():
        pytest.fail("node_modules/pyodide is missing: `make test` installs it (npm install, see package.json)")
    version = json.loads((LOCK.parent / "package.json").read_text())["version"]
    assert f"v{version}" == convert.PYODIDE_VERSION, (
        f"package.json pins pyodide {version}, Panel converts for {convert.PYODIDE_VERSION}: update package.json")
    return resolve.load_lock(LOCK)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("plan-wheel")
    return build_wheel(work / "dist", work, log=lambda _msg: None)


@pytest.fixture(scope="module")
def plan(wheel: Path) -> list[str]:
    """What the worker installs: panel convert's own list for our requirements (as build-site passes them)."""
    return worker_requirements(ROOT / "app" / "main.py", [str(wheel), *wheel_requirements(wheel)])


def test_the_sites_whole_install_plan_resolves_against_the_pinned_pyodide(lock: dict, wheel: Path,
                                                                          plan: list[str]) -> None:
    import panel.io.convert as convert

    res = resolve.resolve(plan, lock, wheel_files={wheel.name: resolve.wheel_from_file(wheel)},
                          no_deps=lambda req: req.endswith("/" + wheel.name))
    assert [str(m) for m in res.missing] == []
    got = {k: (r.source, r.version) for k, r in res.resolved.items()}
    # Panel's pinned wheels, ours, and Pyodide's own builds of the compiled packages
    assert got["panel"] == ("wheel", convert.PY_VERSION) and got["bokeh"] == ("wheel", convert.BOKEH_VERSION)
    assert got["diffviz"][0] == "wheel"
    for compiled in ("numpy", "pillow", "pandas", "micropip"):
        entry = lock["packages"][compiled]
        assert got[compiled] == ("pyodide", entry["version"]), compiled
    # every lock package taken is really in the lock, under the lock's file name
    files = {e["file_name"] for e in lock["packages"].values()}
    assert all(r.file in files for r in res.resolved.values() if r.source == "pyodide")
    # the plan is closed: each lock package's depends are in it too
    for r in res.resolved.values():
        if r.source == "pyodide":
            entry = next(e for e in lock["packages"].values() if e["file_name"] == r.file)
            assert {resolve.canonicalize_name(d) for d in entry["depends"]} <= set(res.resolved), r.name
    # holoviews is not in the browser install (nothing imports it), nor is torch or anything of capture
    assert not {"holoviews", "torch", "diffusers", "transformers"} & set(res.resolved)


# ============================================================================ the resolver on made-up locks
def fake_lock(**packages: tuple[str, list[str]]) -> dict:
    return {"info": {"python": "3.13.2", "platform": "emscripten_4_0_9"},
            "packages": {name: {"name": name, "version": v, "depends": deps, "file_name": f"{name}-{v}-py3-none-any.whl"}
                         for name, (v, deps) in packages.items()}}


def wheels(*found: Wheel):
    table = {resolve.canonicalize_name(w.name): w for w in found}
    return lambda name: table.get(resolve.canonicalize_name(name))


def missing_names(res: resolve.Resolution) -> list[str]:
    return [re.match(r"[A-Za-z0-9._-]+", m.requirement).group(0) for m in res.missing]


def test_a_requirement_nothing_provides_is_reported_by_name() -> None:
    lock = fake_lock(micropip=("0.11.0", []), numpy=("2.2.5", []))
    res = resolve.resolve(["numpy>=1.24", "diffviz-no-such-package>=1"], lock, find_wheel=wheels())
    assert missing_names(res) == ["diffviz-no-such-package"]
    assert res.missing[0].needed_by == "the site" and "in neither" in res.missing[0].reason
    assert res.names() == ["micropip", "numpy"]


def test_a_missing_requirement_deep_in_the_plan_names_it_and_who_needs_it() -> None:
    lock = fake_lock(micropip=("0.11.0", []), a=("1.0", ["b"]), b=("1.0", []))
    top = Wheel("top", "1.0", requires=("a", "middle>=2"))
    middle = Wheel("middle", "2.1", requires=("deep-ghost", "b"))
    res = resolve.resolve(["https://host.invalid/wheels/top-1.0-py3-none-any.whl"], lock,
                          wheel_files={"top-1.0-py3-none-any.whl": top}, find_wheel=wheels(middle))
    assert [(n, m.needed_by) for n, m in zip(missing_names(res), res.missing)] == [("deep-ghost", "middle")]
    assert res.names() == ["a", "b", "micropip", "middle", "top"]
    # the lock's own depends are followed too
    broken = fake_lock(micropip=("0.11.0", []), a=("1.0", ["lock-ghost"]))
    res = resolve.resolve(["a"], broken, find_wheel=wheels())
    assert [(n, m.needed_by) for n, m in zip(missing_names(res), res.missing)] == [("lock-ghost", "a")]


def test_markers_are_evaluated_for_pyodide_and_extras_followed() -> None:
    lock = fake_lock(micropip=("0.11.0", []))
    pkg = Wheel("pkg", "1.0", requires=('tornado>=6; sys_platform != "emscripten"',  # Bokeh's: not in the browser
                                        'wasm-only; platform_machine == "wasm32"',
                                        'old-python; python_version < "3.12"',
                                        "plot-extra; extra == 'plots'", "test-extra; extra == 'tests'"))
    res = resolve.resolve(["pkg[plots]"], lock, find_wheel=wheels(pkg))
    assert sorted(missing_names(res)) == ["plot-extra", "wasm-only"]


@pytest.mark.parametrize("found, requirement, reason", [
    (Wheel("fast", "1.0", pure=False, origin="fast-1.0-cp313-cp313-manylinux.whl"), "fast", "only a compiled wheel"),
    (Wheel("numpy", "2.4.6", pure=False), "numpy>=99", "Pyodide's lock has 2.2.5"),
    (Wheel("slow", "1.0"), "slow>=2", "does not satisfy >=2"),
    (Wheel("new", "1.0", requires_python=">=3.14"), "new", "requires Python >=3.14; Pyodide has 3.13.2"),
])
def test_a_wheel_pyodide_cannot_use_is_no_answer(found: Wheel, requirement: str, reason: str) -> None:
    lock = fake_lock(micropip=("0.11.0", []), numpy=("2.2.5", []))
    res = resolve.resolve([requirement], lock, find_wheel=wheels(found))
    assert missing_names(res) == [found.name] and reason in res.missing[0].reason, res.missing


def test_a_version_conflict_inside_the_plan_is_reported() -> None:
    lock = fake_lock(micropip=("0.11.0", []), numpy=("2.2.5", []))
    res = resolve.resolve(["numpy", "needs-old"], lock,
                          find_wheel=wheels(Wheel("needs-old", "1.0", requires=("numpy<2",))))
    assert missing_names(res) == ["numpy"] and res.missing[0].needed_by == "needs-old"
    assert "the plan has numpy 2.2.5" in res.missing[0].reason


# ============================================================================ the first visit
def test_rebuilt_wheel_size_matches_a_real_wheel(wheel: Path, tmp_path: Path) -> None:
    """Re-zipping installed files is how pure-Python wheels are sized offline: check it on our own wheel."""
    target = tmp_path / "target"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                           "--disable-pip-version-check", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    name, version = wheel.name.split("-")[:2]
    size = download.rebuilt_wheel_size(name, version, path=[str(target)])
    assert size is not None and abs(size - wheel.stat().st_size) <= 0.05 * wheel.stat().st_size, (size, wheel.stat())
    assert download.rebuilt_wheel_size(name, "0.0.0-other", path=[str(target)]) is None


def test_first_visit_adds_up_what_the_page_fetches(tmp_path: Path) -> None:
    site, pyodide = tmp_path / "site", tmp_path / "pyodide"
    (site / "datasets" / "default").mkdir(parents=True)
    pyodide.mkdir()
    sizes = {"pyodide.js": 1000, "pyodide.asm.wasm": 3_000_000, "pyodide.asm.js": 500_000,
             "python_stdlib.zip": 200_000, "pyodide-lock.json": 7000, "numpy-2.2.5-cp313-wasm32.whl": 40_000}
    for name, n in sizes.items():
        (pyodide / name).write_bytes(b"x" * n)
    (site / "app.html").write_text('<script src="./vendor/bokeh/bokeh-3.9.2.min.js"></script>'
                                   '<script src="./vendor/bokeh/bokeh-3.9.2.min.js"></script>')  # once
    (site / "vendor" / "bokeh").mkdir(parents=True)
    (site / "vendor" / "bokeh" / "bokeh-3.9.2.min.js").write_bytes(b"j" * 12_345)
    for rel, n in {"index.html": 100, "app.js": 2000, "app.resources.zip": 9000,
                   "datasets/default/metadata.json": 300, "datasets/default/metrics.json": 40,
                   "datasets/default/latent_pca.json": 5, "datasets/default/big.bin": 10**6}.items():
        (site / rel).write_bytes(b"s" * n)
    res = resolve.Resolution(resolved={
        "numpy": resolve.Resolved("numpy", "2.2.5", "pyodide", "numpy-2.2.5-cp313-wasm32.whl", "the site"),
        "ghostlib": resolve.Resolved("ghostlib", "1.0", "pyodide", "ghostlib-1.0-cp313-wasm32.whl", "the site"),
        "diffviz": resolve.Resolved("diffviz", "0.1.0", "wheel", "ours", "the site"),
    })
    report = download.first_visit(site, res, pyodide_dir=pyodide, own_wheel="diffviz", dataset="datasets/default")
    html_size = (site / "app.html").stat().st_size
    assert report["mb"] == {"pyodide": round(3_708_000 / 1e6, 2), "wheels": round(49_000 / 1e6, 2),
                            "js": round(12_345 / 1e6, 2), "site": round((100 + 2000 + html_size + 345) / 1e6, 2)}
    assert report["unknown"] == ["wheels: ghostlib 1.0"]  # a compiled package the folder lacks: not guessed
    line = download.summary_line(report)
    mb = report["mb"]
    assert line.startswith(f"first visit downloads ≈ {report['total_mb']:.1f} MB: pyodide {mb['pyodide']:.1f}, "
                           f"wheels {mb['wheels']:.1f}, js {mb['js']:.1f}, site {mb['site']:.2f} (")
    assert line.endswith("(not counted, no size offline: ghostlib 1.0)")
