"""Checking build-site's inputs (--out, --dataset, --self-hosted) before anything is written."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .base import (DEFAULT_DATASET, MARKER, MAX_SITE_DATA_BYTES, MAX_SITE_DATA_FILES, MAX_SITE_FILE_BYTES, VENDOR,
                   SiteError, project_root)


@dataclass
class SelfHosted:
    """Where Pyodide, the Panel/Bokeh wheels and Bokeh's JS come from instead of the CDNs."""

    base: str                      # URL prefix ending in "/", relative to the site or absolute
    folder: Path | None = None     # a local folder copied to site/vendor/, or None for a URL

    @property
    def pyodide_url(self) -> str:
        return f"{self.base}pyodide/pyodide.js"

    @property
    def panel_cdn_root(self) -> str:
        return f"{self.base}panel/"

    @property
    def bokeh_base(self) -> str:
        return f"{self.base}bokeh/"

    @property
    def index_url(self) -> str:
        """A PEP 503 simple index (BASE/pypi/<project>/) of the pure-Python wheels micropip needs."""
        return f"{self.base}pypi"


@dataclass
class Inputs:
    out: Path
    datasets: list[tuple[str, Path]]
    self_hosted: SelfHosted | None = None
    #: the sweeps among the datasets: name -> its finished runs (only they are copied, with its sweep.json)
    sweeps: dict[str, list[str]] = field(default_factory=dict)


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def parse_self_hosted(text: str) -> SelfHosted:
    if _is_url(text):
        return SelfHosted(base=text if text.endswith("/") else text + "/")
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise SiteError(f"--self-hosted {text}: neither an existing folder nor an http(s) URL", usage=True)
    if not (folder / "pyodide" / "pyodide.js").is_file():
        raise SiteError(f"--self-hosted {text}: no pyodide/pyodide.js in it (put a Pyodide distribution in {folder / 'pyodide'})", usage=True)
    return SelfHosted(base=f"./{VENDOR}/", folder=folder.resolve())


def check_dataset(path: Path) -> list[str] | None:
    """Refuse a folder that is not a valid run (``export.validate``), with its first problem. A sweep (a folder
    with a sweep.json and no metadata.json) is checked by :func:`check_sweep`: its finished runs are returned."""
    from export.sweep import is_sweep
    from export.validate import validate_run

    if not path.is_dir():
        raise SiteError(f"--dataset {path}: no such folder", usage=True)
    if not (path / "metadata.json").is_file():
        if is_sweep(path):
            return check_sweep(path)
        raise SiteError(f"--dataset {path}: not a run folder (no metadata.json) nor a sweep (no sweep.json)", usage=True)
    problems = validate_run(path)
    if problems:
        more = f" (and {len(problems) - 1} more; run diffviz validate {path})" if len(problems) > 1 else ""
        raise SiteError(f"--dataset {path}: invalid run: {problems[0]}{more}", usage=True)
    return None


def check_sweep(path: Path) -> list[str]:
    """The names of a sweep's finished runs, once the sweep passes ``diffviz validate``'s checks of a sweep
    (``export.validate_sweep``: the bounded index; each finished run a real folder inside the sweep, valid, and
    agreeing with its index entry); a sweep with none is refused. Pending and failed runs are not shipped."""
    from export.contract import DatasetError
    from export.sweep import STATUS_DONE, by_status, read_index
    from export.validate_sweep import check_finished_run

    try:
        doc = read_index(path)
    except DatasetError as exc:
        raise SiteError(f"--dataset {path}: invalid sweep: {exc}", usage=True) from None
    done = by_status(doc, STATUS_DONE)
    if not done:
        raise SiteError(f"--dataset {path}: the sweep has no finished run to publish", usage=True)
    for entry in done:
        problems = check_finished_run(path, entry, strict=False)
        if problems:
            more = f" (and {len(problems) - 1} more; run diffviz validate {path})" if len(problems) > 1 else ""
            raise SiteError(f"--dataset {path}: invalid run {problems[0]}{more}", usage=True)
    return [str(entry["name"]) for entry in done]


def shipped_files(path: Path, runs: list[str] | None) -> Iterator[Path]:
    """The files a dataset puts into the site: a run's folder, or a sweep's index and finished runs."""
    folders = [path] if runs is None else [path / name for name in runs]
    if runs is not None:
        yield path / "sweep.json"
    for folder in folders:
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                yield Path(dirpath) / name


def check_size(datasets: list[tuple[str, Path]], sweeps: dict[str, list[str]]) -> None:
    """Refuse datasets over the site's caps (``MAX_SITE_*``: files, bytes, one file's bytes), counting no further."""
    count = total = 0
    for name, path in datasets:
        for file in shipped_files(path, sweeps.get(name)):
            try:
                size = os.stat(file).st_size  # what the copy writes (it follows links inside the run)
            except OSError:
                continue  # the copy skips it too
            count, total = count + 1, total + size
            if size > MAX_SITE_FILE_BYTES:
                raise SiteError(f"--dataset {path}: {file.relative_to(path)} is {size} bytes, over the "
                                f"{MAX_SITE_FILE_BYTES} a static host takes for one file", usage=True)
            if count > MAX_SITE_DATA_FILES or total > MAX_SITE_DATA_BYTES:
                raise SiteError(f"the datasets hold more than {MAX_SITE_DATA_FILES} files or {MAX_SITE_DATA_BYTES} bytes, "
                                f"over the site's cap (at {path}); ship fewer runs", usage=True)


def check_out(out: Path, inputs: Sequence[Path], project: Path | None = None) -> None:
    """Refuse an output folder that is not empty and not a previous build, or that overlaps our inputs."""
    if out.exists() and not out.is_dir():
        raise SiteError(f"--out {out}: exists and is not a folder", usage=True)
    resolved = out.resolve()
    for path in inputs:
        path = path.resolve()
        if resolved == path or resolved in path.parents or path in resolved.parents:
            raise SiteError(f"--out {out}: overlaps an input ({path}); choose another folder", usage=True)
    if project is not None and (resolved == project.resolve() or resolved in project.resolve().parents):
        raise SiteError(f"--out {out}: would replace the checkout ({project}); choose a folder inside it, such as site", usage=True)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SiteError(f"--out {out}: not empty and not a site built by diffviz (no {MARKER}); refusing to replace it", usage=True)


def check_inputs(out: str | os.PathLike, datasets: Sequence[str | os.PathLike] | None = None,
                 self_hosted: str | None = None) -> Inputs:
    """Check every input before anything is written."""
    paths = [Path(d) for d in datasets] if datasets else []
    if not paths:
        if not DEFAULT_DATASET.is_dir():
            raise SiteError(f"no --dataset given and no {DEFAULT_DATASET}/ here; pass --dataset PATH (a run folder)", usage=True)
        paths = [DEFAULT_DATASET]
    named: list[tuple[str, Path]] = []
    sweeps: dict[str, list[str]] = {}
    for path in paths:
        name = path.resolve().name
        if any(name == other for other, _ in named):
            raise SiteError(f"--dataset {path}: two datasets named {name!r}; each is copied to datasets/<folder name>", usage=True)
        runs = check_dataset(path)
        if runs is not None:
            sweeps[name] = runs
        named.append((name, path))
    check_size(named, sweeps)
    hosted = parse_self_hosted(self_hosted) if self_hosted else None
    out_path = Path(out)
    check_out(out_path, [p for _, p in named] + ([hosted.folder] if hosted and hosted.folder else []), project_root())
    return Inputs(out=out_path, datasets=named, self_hosted=hosted, sweeps=sweeps)
