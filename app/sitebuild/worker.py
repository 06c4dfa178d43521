"""The site's Pyodide worker: Panel's ``pyodide_worker.js`` template with our start (``worker_start.js``)."""
from __future__ import annotations

import ast
import json
import re

from .base import SiteError, asset

WORKER_START_FILE = "worker_start.js"
PROTOCOL_MARKER = "// Panel's message protocol (pyodide_worker.js), unchanged:"


def worker_template_source(panel_source: str, panel_cdn_root: str | None = None, index_url: str | None = None) -> str:
    """Panel's worker template with our start; fails loudly if Panel's template changed shape.

    Our start replaces Panel's ``importScripts`` line and ``startApplication``; Panel's ``sendPatch``
    and its message protocol (``self.onmessage``) are kept verbatim.
    """
    imports = re.findall(r"(?m)^importScripts\(.*\);?[ \t]*\n", panel_source)
    starts = panel_source.count("async function startApplication()")
    handlers = panel_source.count("self.onmessage")
    if len(imports) != 1 or starts != 1 or handlers != 1:
        raise SiteError("Panel's pyodide_worker.js template is not the shape app/sitebuild/worker.py knows "
                        f"(one importScripts, one startApplication, one self.onmessage); update {WORKER_START_FILE}")
    head, rest = panel_source.split("async function startApplication()", 1)
    head = head.replace(imports[0], "", 1)
    handlers_part = rest[rest.index("self.onmessage"):]
    start = (asset(WORKER_START_FILE).replace("__PANEL_CDN_ROOT__", json.dumps(panel_cdn_root))
             .replace("__INDEX_URL__", json.dumps(index_url)))
    return start + head.strip() + "\n\n" + PROTOCOL_MARKER + "\n" + handlers_part


def parse_worker_requirements(worker_js: str) -> list[str]:
    """The requirement list a generated ``app.js`` installs (``const requirements = [...]``)."""
    found = re.findall(r"(?m)^\s*const requirements = (\[.*\]);\s*$", worker_js)
    if len(found) != 1:
        raise SiteError("app.js: no single 'const requirements = [...]' line")
    value = ast.literal_eval(found[0])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SiteError("app.js: the requirements are not a list of strings")
    return value
