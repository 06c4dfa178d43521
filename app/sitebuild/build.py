"""The whole build: inputs checked, the browser wheel built, the app converted, the site swapped into place."""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from .base import APP_NAME, DEFAULT_DATASET, MARKER, VENDOR, SiteError, project_root
from .convert import convert
from .download import first_visit, summary_line
from .inputs import Inputs, SelfHosted, check_inputs
from .page import (drop_external_stylesheets, external_references, foreign_hosts, index_html, point_bokeh_js,
                   self_hosted_references)
from .resolve import LOCK_NAME, Resolution, Wheel, load_lock, resolve, wheel_from_file
from .wheel import build_wheel, wheel_requirements
from .worker import parse_worker_requirements

#: The site's entry point (``app/main.py``, converted under the name ``app``: app.html, app.js).
ENTRY = Path(__file__).resolve().parents[1] / "main.py"
#: Where ``make test`` puts the npm Pyodide core and the micropip wheel it lacks.
NPM_PYODIDE = Path("node_modules") / "pyodide"
NPM_WHEELS = Path("node_modules") / ".diffviz-wheels"


def _not_plain(folder: str, names: list[str]) -> set[str]:
    """For ``copytree``: skip what is neither a regular file nor a folder (a FIFO would block the copy)."""
    skip = set()
    for name in names:
        try:
            mode = os.stat(os.path.join(folder, name)).st_mode
        except OSError:
            skip.add(name)
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            skip.add(name)
    return skip


def pyodide_folder(hosted: SelfHosted | None, pyodide_url: str) -> Path | None:
    """A local Pyodide folder with a lock file for the version the site loads, or None.

    The self-hosted folder's when there is one (it is what the site loads); else the npm core that
    ``make test`` installs, when its version is the one in the site's Pyodide URL.
    """
    if hosted is not None:
        folder = hosted.folder / "pyodide" if hosted.folder else None
        return folder if folder is not None and (folder / LOCK_NAME).is_file() else None
    try:
        npm = project_root() / NPM_PYODIDE
        version = json.loads((npm / "package.json").read_text(encoding="utf-8"))["version"]
    except (SiteError, OSError, ValueError, KeyError):
        return None
    return npm if f"/v{version}/" in pyodide_url and (npm / LOCK_NAME).is_file() else None


def check_install_plan(site: Path, own: Wheel, own_file: str, pyodide_dir: Path) -> Resolution:
    """Resolve the built worker's requirements against ``pyodide_dir``'s lock and pure-Python wheels."""
    requirements = parse_worker_requirements((site / f"{APP_NAME}.js").read_text(encoding="utf-8"))
    return resolve(requirements, load_lock(pyodide_dir / LOCK_NAME), wheel_files={own_file: own},
                   no_deps=lambda req: req.split("/")[-1] == own_file)


def build_site(out: str | os.PathLike, datasets: Sequence[str | os.PathLike] | None = None,
               self_hosted: str | None = None, *, verbose: bool = False,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the site into ``out`` (replacing a previous build only once the new one is complete)."""
    inputs = check_inputs(out, datasets, self_hosted)
    if not ENTRY.is_file():
        raise SiteError(f"{ENTRY}: the dashboard's entry point is missing")
    out_path = inputs.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.building-", dir=out_path.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the site from a web server's user
    try:
        with tempfile.TemporaryDirectory(prefix="diffviz-site-") as tmp:
            work = Path(tmp)
            log("building the browser wheel (app, analysis, export)")
            wheel = build_wheel(work / "dist", work, log=log)
            own = wheel_from_file(wheel)
            requirements = [str(wheel), *wheel_requirements(wheel)]
            for name, path in inputs.datasets:
                runs = inputs.sweeps.get(name)
                if runs is None:
                    log(f"copying dataset {path} -> datasets/{name}/")
                    shutil.copytree(path, staging / "datasets" / name, ignore=_not_plain)
                    continue
                log(f"copying sweep {path} ({len(runs)} finished runs and sweep.json) -> datasets/{name}/")
                (staging / "datasets" / name).mkdir(parents=True)
                shutil.copy2(path / "sweep.json", staging / "datasets" / name / "sweep.json")
                for run in runs:
                    shutil.copytree(path / run, staging / "datasets" / name / run, ignore=_not_plain)
            hosted = inputs.self_hosted
            if hosted and hosted.folder:
                log(f"copying {hosted.folder} -> {VENDOR}/")
                shutil.copytree(hosted.folder, staging / VENDOR)
            entry = work / f"{APP_NAME}.py"  # app/main.py, named so that the outputs are app.html / app.js
            shutil.copy2(ENTRY, entry)
            log("converting app/main.py (pyodide-worker)")
            info = convert(entry, staging, requirements, hosted, verbose=verbose,
                           name=f"{ENTRY.parent.name}/{ENTRY.name}")
        if hosted:
            point_bokeh_js(staging / f"{APP_NAME}.html", info["bokeh_cdn_js"], hosted)
            missing = [r for r in self_hosted_references(staging, hosted)
                       if hosted.folder and not (staging / VENDOR / r).is_file()]
            if missing:
                log(f"warning: the self-hosted folder lacks {len(missing)} file(s) the site asks for: {', '.join(missing)}")
            dropped = drop_external_stylesheets(staging / f"{APP_NAME}.html", hosted)
            if dropped:
                log(f"note: left out the template's external stylesheet(s) {', '.join(dropped)}; the page uses system fonts")
            elsewhere = external_references(staging, hosted)
            if elsewhere:
                raise SiteError(f"--self-hosted: the page still links {', '.join(elsewhere)}; app/sitebuild must move it too")
            named = foreign_hosts(staging, hosted)
            if named:
                where = "; ".join(f"{host} (in {', '.join(files)})" for host, files in named.items())
                raise SiteError(f"--self-hosted: the built site still names another host: {where}")
        defaults = first_query(inputs)
        (staging / "index.html").write_text(index_html(defaults), encoding="utf-8")
        (staging / ".nojekyll").write_text("", encoding="utf-8")
        report = build_report(staging, wheel.name, inputs, info, defaults)
        pyodide_dir = pyodide_folder(hosted, info["pyodide_url"])
        if pyodide_dir is None:
            log("note: no local Pyodide lock file for this Pyodide (make test installs node_modules/pyodide); "
                "the install plan is not checked and the first visit not sized")
        else:
            resolution = check_install_plan(staging, own, wheel.name, pyodide_dir)
            if resolution.missing:
                log(f"warning: {len(resolution.missing)} requirement(s) of the install plan that neither Pyodide's "
                    f"lock nor a pure-Python wheel provides: {'; '.join(map(str, resolution.missing))}")
            download = first_visit(staging, resolution, pyodide_dir=pyodide_dir,
                                   wheel_dirs=[project_root() / NPM_WHEELS], own_wheel=own.name,
                                   dataset=report["default_dataset"], sweep=report["default_sweep"])
            report["install_plan"] = {
                "lock": str(pyodide_dir / LOCK_NAME),
                "resolved": {r.name: f"{r.version} ({r.source})" for r in resolution.resolved.values()},
                "missing": [str(m) for m in resolution.missing],
            }
            report["first_visit"] = download
            log(summary_line(download))
        (staging / MARKER).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _install(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def first_query(inputs: Inputs) -> dict[str, str] | None:
    """What index.html adds to the page address when it names nothing: None when a run is named "default" (the
    app's own default); the first dataset otherwise, a sweep with its first finished run."""
    if any(n == DEFAULT_DATASET.name for n, _ in inputs.datasets):
        return None
    first = inputs.datasets[0][0]
    runs = inputs.sweeps.get(first)
    if runs is None:
        return {"dataset": f"datasets/{first}"}
    return {"sweep": f"datasets/{first}", "dataset": f"datasets/{first}/{runs[0]}"}


def build_report(site: Path, wheel_name: str, inputs: Inputs, info: dict[str, Any],
                 defaults: dict[str, str] | None) -> dict[str, Any]:
    import diffviz
    from importlib import metadata as md

    worker = (site / f"{APP_NAME}.js").read_text(encoding="utf-8")
    return {
        "generator": f"diffviz {diffviz.__version__}",
        "panel": md.version("panel"), "bokeh": md.version("bokeh"),
        "pyodide_url": info["pyodide_url"],
        "self_hosted": inputs.self_hosted.base if inputs.self_hosted else None,
        "page_links_elsewhere": external_references(site, inputs.self_hosted),
        "hosts_named": foreign_hosts(site, inputs.self_hosted),
        "wheel": wheel_name,
        "requirements": parse_worker_requirements(worker),
        "datasets": [f"datasets/{name}" for name, _ in inputs.datasets],
        "sweeps": {f"datasets/{name}": {"runs": len(runs), "first": runs[0]} for name, runs in inputs.sweeps.items()},
        "default_dataset": (defaults or {}).get("dataset") or str(DEFAULT_DATASET.as_posix()),
        "default_sweep": (defaults or {}).get("sweep"),
    }


def _install(staging: Path, out: Path) -> None:
    """Swap the finished build into place; an existing build is removed only after that succeeds."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
