"""The page side of the site: index.html, and the URLs app.html and app.js ask for."""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

from .base import APP_NAME, asset
from .inputs import SelfHosted
from .worker import parse_worker_requirements

#: Absolute URLs and protocol-relative ones ("//host/…") in HTML/JS text.
_URL = re.compile(r"""(?<![\w:/])(?:https?:)?//([A-Za-z0-9][A-Za-z0-9.-]*\.[A-Za-z]{2,}|localhost|\d+\.\d+\.\d+\.\d+)(?::\d+)?[^\s"'<>`)\\]*""")


def index_html(defaults: dict[str, str] | str | None) -> str:
    """index.html, adding ``defaults`` (``{"dataset": …}``, with ``"sweep"`` for a sweep; a string is a dataset)
    to the page address when it names none of them."""
    if isinstance(defaults, str):
        defaults = {"dataset": defaults}
    return asset("index.html").replace("__DEFAULT__", json.dumps(defaults or None))


def self_hosted_references(site: Path, hosted: SelfHosted) -> list[str]:
    """Paths under the self-hosted base that the built site asks for (page tags, worker, wheels)."""
    html = (site / f"{APP_NAME}.html").read_text(encoding="utf-8")
    worker = (site / f"{APP_NAME}.js").read_text(encoding="utf-8")
    urls = re.findall(r'(?:src|href)="([^"]+)"', html) + [hosted.pyodide_url] + parse_worker_requirements(worker)
    refs = []
    for url in urls:
        if url.startswith(hosted.base):
            ref = url[len(hosted.base):].split("?")[0]
            if ref not in refs:
                refs.append(ref)
    return refs


def external_references(site: Path, hosted: SelfHosted | None) -> list[str]:
    """Absolute URLs in the page's script/link tags that are not under the self-hosted base."""
    html = (site / f"{APP_NAME}.html").read_text(encoding="utf-8")
    urls = re.findall(r'<(?:script|link)\b[^>]*?(?:src|href)="(https?://[^"]+)"', html)
    base = hosted.base if hosted else None
    return sorted({u for u in urls if not (base and u.startswith(base))})


#: XML namespace names (xmlns="http://www.w3.org/2000/svg"): identifiers, never fetched.
_XMLNS = re.compile(r"""\bxmlns(?::\w+)?=(?:\\?["'])[^"'\\]*(?:\\?["'])""")
#: The local generator bridge (app/bridge_client.py) runs on the user's own machine, by design.
LOOPBACK = {"127.0.0.1", "localhost"}


def foreign_hosts(site: Path, hosted: SelfHosted | None) -> dict[str, list[str]]:
    """Every host named by a URL in the site's own HTML/JS files (not vendor/, not datasets/) -> the files.

    Not foreign: the self-hosted base's own host (when it is an absolute URL), loopback addresses and
    XML namespace names.
    """
    allowed = set(LOOPBACK)
    if hosted and urlsplit(hosted.base).hostname:
        allowed.add(urlsplit(hosted.base).hostname)
    found: dict[str, list[str]] = {}
    for path in sorted(site.iterdir()):
        if not (path.is_file() and path.suffix in (".html", ".js")):
            continue
        text = _XMLNS.sub("", path.read_text(encoding="utf-8", errors="replace"))
        for match in _URL.finditer(text):
            host = match.group(1).lower()
            if host not in allowed and path.name not in found.setdefault(host, []):
                found[host].append(path.name)
    return {h: files for h, files in sorted(found.items()) if files}


def point_bokeh_js(html_path: Path, bokeh_js: list[str], hosted: SelfHosted) -> None:
    """Panel's PANEL_CDN_ROOT moves Panel's resources only; move Bokeh's JS (its CDN folder) to BASE/bokeh/."""
    bases = {url.rsplit("/", 1)[0] + "/" for url in bokeh_js}
    html = html_path.read_text(encoding="utf-8")
    for base in bases:
        html = html.replace(base, hosted.bokeh_base)
    html_path.write_text(html, encoding="utf-8")


def drop_external_stylesheets(html_path: Path, hosted: SelfHosted) -> list[str]:
    """Remove ``<link rel="stylesheet">`` tags for URLs outside the base (the template's web font)."""
    html = html_path.read_text(encoding="utf-8")
    dropped: list[str] = []

    def drop(match: re.Match) -> str:
        url = match.group(1)
        if url.startswith(hosted.base):
            return match.group(0)
        dropped.append(url)
        return ""

    html = re.sub(r'<link\b(?=[^>]*\brel="stylesheet")[^>]*\bhref="(https?://[^"]+)"[^>]*>\n?', drop, html)
    html_path.write_text(html, encoding="utf-8")
    return sorted(set(dropped))
