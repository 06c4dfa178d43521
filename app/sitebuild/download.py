"""What a first visit to the site downloads: Pyodide, the install plan's wheels, Bokeh/Panel JS, the site.

Each item's size comes from the best source at hand, and says which:

* ``file``: the very file (the site's own files, Pyodide's core in the Pyodide folder used, a wheel
  that folder or ``node_modules/.diffviz-wheels`` holds, Bokeh's and Panel's JS/CSS from the installed
  packages, which are the versions the CDN serves);
* ``rebuilt``: a pure-Python wheel of the same name and version re-zipped here from its installed
  files (deflate, as wheels are), with Panel's own trimming for its CDN builds of Bokeh and Panel;
* ``estimated``: the same, from the version installed here when Pyodide's lock pins another one;
* ``unknown``: none of these (Pyodide's compiled packages when the folder lacks them: the lock gives
  no sizes, and a CPython build says nothing about a wasm one).

The total counts all but the unknown ones, which are named beside it.
"""
from __future__ import annotations

import io
import re
import zipfile
from dataclasses import asdict, dataclass
from importlib import metadata as md
from pathlib import Path
from typing import Iterable

from packaging.utils import canonicalize_name

from .base import APP_NAME
from .resolve import Resolution, is_pure

#: What ``loadPyodide`` fetches before any package: the worker's importScripts, then the runtime.
PYODIDE_CORE = ("pyodide.js", "pyodide.asm.js", "pyodide.asm.wasm", "python_stdlib.zip", "pyodide-lock.json")
#: The reader's first requests when the app opens a run (export.reader), before any map or image.
DATASET_UP_FRONT = ("metadata.json", "metrics.json", "latent_pca.json")
CATEGORIES = ("pyodide", "wheels", "js", "site")
_SKIP_DIST_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
_rebuilt_cache: dict[tuple, int | None] = {}


@dataclass(frozen=True)
class Item:
    category: str
    name: str
    bytes: int | None
    how: str                     # "file", "rebuilt" or "unknown"


def _cdn_trim(name: str, path: str) -> bool:
    """Whether Panel's CDN build of ``name`` leaves ``path`` out (its scripts/build_pyodide_wheels.py rules)."""
    key = canonicalize_name(name)
    if key == "bokeh":  # Bokeh's JS is served separately
        return not path.startswith("bokeh/core/_templates") and (
            path.endswith("bokeh.json") or path.endswith((".js", ".d.ts", ".tsbuildinfo")))
    if key == "panel":  # built with PANEL_LITE: the bundled third-party resources are not in it
        return path.startswith("panel/dist/bundled/")
    return False


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def rebuilt_wheel_size(name: str, version: str, path: list[str] | None = None) -> int | None:
    """Bytes of a wheel of ``name`` ``version`` re-zipped from the files installed here (or in ``path``), or None."""
    key = (canonicalize_name(name), version, tuple(path or ()))
    if key in _rebuilt_cache:
        return _rebuilt_cache[key]
    size = None
    dist = next(iter(md.distributions(name=name, path=path) if path else ()), None)
    if dist is None and path is None:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            pass
    if dist is not None and dist.version == version and dist.files and is_pure(dist):
        root = Path(dist.locate_file(""))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in dist.files:
                rel = file.as_posix()
                parts = file.parts
                if (parts[0] == ".." or "__pycache__" in parts or rel.endswith(".pyc")
                        or (parts[0].endswith(".dist-info") and parts[-1] in _SKIP_DIST_INFO)
                        or _cdn_trim(name, rel)):
                    continue
                path = root / file
                if path.is_file():
                    zf.write(path, rel)
        size = buffer.tell()
    _rebuilt_cache[key] = size
    return size


def _local_js(url: str) -> Path | None:
    """The installed file that a Bokeh/Panel JS or CSS URL serves (same versions as the CDN's)."""
    import bokeh
    import panel

    path = url.split("?")[0]
    name = path.rsplit("/", 1)[-1]
    if re.fullmatch(r"bokeh(-[a-z]+)?-\d[^/]*\.js", name):
        plain = re.sub(r"-\d[\w.]*?(\.min)?\.js$", r"\1.js", name)
        candidate = Path(bokeh.__file__).parent / "server" / "static" / "js" / plain
        return candidate if candidate.is_file() else None
    if "/dist/" in path:
        candidate = Path(panel.__file__).parent / "dist" / path.split("/dist/", 1)[1]
        return candidate if candidate.is_file() else None
    return None


def page_resources(html: str) -> list[str]:
    """The script and stylesheet URLs app.html loads (not inline ones)."""
    scripts = re.findall(r'<script\b[^>]*\bsrc="([^"]+)"', html)
    links = re.findall(r'<link\b(?=[^>]*\brel="stylesheet")[^>]*\bhref="([^"]+)"', html)
    return scripts + links


def first_visit(site: Path, resolution: Resolution, *, pyodide_dir: Path | None = None,
                wheel_dirs: Iterable[Path] = (), own_wheel: str | None = None,
                dataset: str | None = None, sweep: str | None = None) -> dict:
    """Every item a first visit fetches, with its size; totals per category in MB (10^6 bytes). ``sweep``: the
    site opens that sweep too (its sweep.json and the thumbnails its Sweep tab shows first)."""
    items: list[Item] = []
    for name in PYODIDE_CORE:
        path = pyodide_dir / name if pyodide_dir else None
        items.append(Item("pyodide", name, path.stat().st_size, "file") if path and path.is_file()
                     else Item("pyodide", name, None, "unknown"))
    folders = [d for d in ([pyodide_dir] if pyodide_dir else []) + list(wheel_dirs) if d and d.is_dir()]
    for key, res in sorted(resolution.resolved.items()):
        label = f"{res.name} {res.version}"
        if own_wheel and canonicalize_name(res.name) == canonicalize_name(own_wheel):
            zipped = site / f"{APP_NAME}.resources.zip"  # our wheel travels inside it
            items.append(Item("wheels", label, zipped.stat().st_size if zipped.is_file() else None,
                              "file" if zipped.is_file() else "unknown"))
            continue
        file_name = res.file if res.source == "pyodide" else None
        local = next((d / file_name for d in folders if file_name and (d / file_name).is_file()), None)
        if local is not None:
            items.append(Item("wheels", label, local.stat().st_size, "file"))
            continue
        pure = res.source == "wheel" or bool(file_name and re.search(r"-none-any\.whl$", file_name))
        size = rebuilt_wheel_size(res.name, res.version) if pure else None
        if size is not None:
            items.append(Item("wheels", label, size, "rebuilt"))
            continue
        local_version = installed_version(res.name) if pure else None
        size = rebuilt_wheel_size(res.name, local_version) if local_version else None
        items.append(Item("wheels", f"{label} (as {local_version})" if size is not None else label, size,
                          "estimated" if size is not None else "unknown"))
    html_path = site / f"{APP_NAME}.html"
    html = html_path.read_text(encoding="utf-8") if html_path.is_file() else ""
    for url in dict.fromkeys(page_resources(html)):  # a URL named twice is fetched once
        in_site = site / url.split("?")[0] if not re.match(r"(?:[a-z]+:)?//", url) else None
        path = in_site if in_site is not None and in_site.is_file() else _local_js(url)
        label = url.rsplit("/", 1)[-1].split("?")[0]
        items.append(Item("js", label, path.stat().st_size, "file") if path else Item("js", label, None, "unknown"))
    own = ["index.html", f"{APP_NAME}.html", f"{APP_NAME}.js", "favicon.ico"]
    if dataset:
        own += [f"{dataset}/{name}" for name in DATASET_UP_FRONT]
    if sweep:
        own += [f"{sweep}/{rel}" for rel in sweep_up_front(site / sweep)]
    for rel in own:
        path = site / rel
        if path.is_file():
            items.append(Item("site", rel, path.stat().st_size, "file"))
    totals = {c: sum(i.bytes or 0 for i in items if i.category == c) / 1e6 for c in CATEGORIES}
    return {
        "total_mb": round(sum(totals.values()), 2),
        "mb": {c: round(v, 2) for c, v in totals.items()},
        "unknown": [f"{i.category}: {i.name}" for i in items if i.bytes is None],
        "estimated_mb": round(sum(i.bytes for i in items if i.how == "estimated") / 1e6, 2),
        "items": [asdict(i) for i in items],
    }


def sweep_up_front(folder: Path) -> list[str]:
    """What the Sweep tab reads when it opens: sweep.json and the thumbnails of its first layout (relative paths)."""
    from app.sweepstore import open_sweep

    sweep = open_sweep(str(folder))
    layout = sweep.layout(*sweep.default_axes())
    return ["sweep.json"] + [c.run["thumbnail"] for c in layout.cells if c.done and c.run.get("thumbnail")]


def summary_line(report: dict) -> str:
    """One line: 'first visit downloads ≈ N MB: pyodide X, wheels Y, js Z, site W' (+ what is not sized)."""
    mb = report["mb"]
    line = (f"first visit downloads ≈ {report['total_mb']:.1f} MB: pyodide {mb['pyodide']:.1f}, "
            f"wheels {mb['wheels']:.1f}, js {mb['js']:.1f}, site {mb['site']:.2f}")
    notes = []
    if report["estimated_mb"]:
        notes.append(f"{report['estimated_mb']:.1f} MB of it sized from other versions of the same pure-Python packages")
    unknown = [u.split(": ", 1)[1] for u in report["unknown"]]
    if unknown:
        notes.append("not counted, no size offline: " + ", ".join(unknown[:8])
                     + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    if notes:
        line += f" ({'; '.join(notes)})"
    return line
