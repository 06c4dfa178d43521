"""Benchmark: what a first visit to the static site downloads, in MB, and what holoviews would add.

    python tests/bench/bench_site.py

Builds the site (CDN build, datasets/default) into a temporary folder as ``make site`` does, then
prints build-site's own first-visit line (Pyodide core, the install plan's wheels, Bokeh/Panel JS,
the site's files; see app/sitebuild/download.py for where each size comes from). Then it resolves
the same plan with holoviews added and prints the extra MB that would cost. Needs the npm Pyodide
core (``make test`` installs node_modules/pyodide); no browser, no network.
"""
from __future__ import annotations

import sys
import tempfile
import time
from importlib import metadata as md
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.sitebuild import download, resolve  # noqa: E402
from app.sitebuild.build import build_site  # noqa: E402


def main() -> int:
    dataset = ROOT / "datasets" / "default"
    if not (ROOT / "node_modules" / "pyodide" / resolve.LOCK_NAME).is_file():
        print("bench_site: node_modules/pyodide is missing (make test installs it); nothing measured")
        return 1
    with tempfile.TemporaryDirectory(prefix="diffviz-bench-site-") as tmp:
        start = time.perf_counter()
        report = build_site(Path(tmp) / "site", [dataset], log=lambda _msg: None)
        took = time.perf_counter() - start
    visit = report["first_visit"]
    print(download.summary_line(visit))
    print(f"  ({len(report['install_plan']['resolved'])} packages in the install plan, "
          f"{len(report['install_plan']['missing'])} unresolved; build took {took:.1f} s)")
    lock = resolve.load_lock(Path(report["install_plan"]["lock"]))
    try:
        version = md.version("holoviews")
    except md.PackageNotFoundError:
        print("holoviews: not installed here (pip install -e '.[holoviews]'), so not sized")
        return 0
    base = resolve.resolve(report["requirements"], lock)
    more = resolve.resolve(report["requirements"] + [f"holoviews=={version}"], lock)
    added = [r for key, r in sorted(more.resolved.items()) if key not in base.resolved]
    sizes = {r.name: download.rebuilt_wheel_size(r.name, r.version) for r in added}
    total = sum(v or 0 for v in sizes.values()) / 1e6
    names = ", ".join(f"{r.name} {r.version}" + ("" if sizes[r.name] else " (no size)") for r in added)
    print(f"holoviews would add ≈ {total:.1f} MB to the first visit: {names}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
