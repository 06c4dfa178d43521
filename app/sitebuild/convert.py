"""``panel convert``'s machinery, run in a child Python: PANEL_CDN_ROOT must be set before panel is imported."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .base import ERROR_TAG, SiteError
from .inputs import SelfHosted
from .worker import worker_template_source


def worker_requirements(entry: Path, requirements: list[str]) -> list[str]:
    """What the worker will install for ``requirements``, as panel convert lists it (before ``emfs:`` paths).

    Panel adds its own pinned Bokeh and Panel wheels and pyodide-http; ``convert_app`` then rewrites
    local wheel paths to ``emfs:packed_wheels/<file>``.
    """
    import panel.io.convert as convert

    return convert.collect_python_requirements(str(entry), requirements, http_patch=True)


def _convert_child(spec: dict[str, Any]) -> int:
    """Runs in a fresh Python (see the module docstring)."""
    if spec.get("panel_cdn_root"):
        os.environ["PANEL_CDN_ROOT"] = spec["panel_cdn_root"]
    import traceback

    import jinja2
    import panel.io.convert as convert
    from bokeh.resources import CDN

    if spec.get("pyodide_url"):
        convert.PYODIDE_URL = spec["pyodide_url"]
    loader = convert.WEB_WORKER_TEMPLATE.environment.loader
    source = loader.get_source(convert.WEB_WORKER_TEMPLATE.environment, "pyodide_worker.js")[0]
    try:
        template = worker_template_source(source, spec.get("panel_cdn_root"), spec.get("index_url"))
    except SiteError as exc:
        print(f"{ERROR_TAG}{exc}", file=sys.stderr)
        return 1
    convert.WEB_WORKER_TEMPLATE = jinja2.Environment(autoescape=False).from_string(template)

    original = convert.script_to_html

    def script_to_html(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except Exception:
            traceback.print_exc()
            raise

    convert.script_to_html = script_to_html
    built: list[Any] = []
    original_build = convert.build_single_handler_application

    def build_single_handler_application(*args: Any, **kwargs: Any) -> Any:
        built.append(original_build(*args, **kwargs))
        return built[-1]

    convert.build_single_handler_application = build_single_handler_application
    os.chdir(spec["cwd"])  # the app's prerender opens datasets/default from the new site
    result = convert.convert_app(
        spec["entry"], spec["out"], requirements=spec["requirements"], runtime="pyodide-worker",
        prerender=True, manifest=None, http_patch=True, inline=False, compiled=False, verbose=False,
    )
    if result is not None:
        favicon = Path(convert.DIST_DIR) / "images" / "favicon.ico"  # the page links ./favicon.ico
        if favicon.is_file():
            shutil.copy2(favicon, Path(spec["out"]) / "favicon.ico")
    if result is None:
        handler = built[-1]._handlers[0] if built and built[-1]._handlers else None
        if handler is not None and getattr(handler, "failed", False):  # the app itself raised: say what
            lines = str(handler.error).splitlines() or ["an error"]
            where = next((ln.strip().rstrip(":") for ln in lines[1:] if ln.strip().startswith("File ")), "")
            where = where.replace(repr(Path(spec["entry"]).name), repr(spec["name"]))
            print(f"{ERROR_TAG}{spec['name']} raised: {lines[0]}" + (f" ({where})" if where else ""), file=sys.stderr)
        return 1
    print(json.dumps({
        "pyodide_url": convert.PYODIDE_URL,
        "bokeh_cdn_js": list(CDN.js_files),
        "cdn_dist": convert.CDN_DIST,
    }))
    return 0


def convert(entry: Path, out: Path, requirements: list[str], hosted: SelfHosted | None,
            verbose: bool = False, name: str = "app/main.py") -> dict[str, Any]:
    """Convert ``entry`` into ``out`` in a child Python; returns what the child reports (URLs used)."""
    spec = {
        "entry": str(entry), "name": name, "out": str(out), "cwd": str(out), "requirements": requirements,
        "pyodide_url": hosted.pyodide_url if hosted else None,
        "panel_cdn_root": hosted.panel_cdn_root if hosted else None,
        "index_url": hosted.index_url if hosted else None,
    }
    env = dict(os.environ)
    env.pop("PANEL_CDN_ROOT", None)
    checkout = str(Path(__file__).resolve().parents[2])  # so that the child imports this very package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
    code = ("import json, sys; from app.sitebuild.convert import _convert_child; "
            "sys.exit(_convert_child(json.loads(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if verbose and proc.stderr.strip():
        print(proc.stderr.rstrip(), file=sys.stderr)
    if proc.returncode != 0:
        tagged = [ln[len(ERROR_TAG):] for ln in proc.stderr.splitlines() if ln.startswith(ERROR_TAG)]
        lines = tagged or [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        raise SiteError(f"converting {name} failed: {lines[-1] if lines else 'no output'}"
                        + ("" if verbose else " (--verbose shows the traceback)"))
    return json.loads(proc.stdout.strip().splitlines()[-1])
