"""``diffviz validate SWEEP``: a sweep folder checked as a whole.

    problems = check_sweep("sweeps/colours", strict=True)    # bounded.Problems: report() gives the lines

The index first (``export.sweep.read_index``: every cap before anything else), then each run the index calls
finished: its folder is a real folder inside the sweep (a symlink to a run elsewhere is refused, as the
dashboard's bounded reader refuses it), the run validates (``export.validate``, ``strict`` as for a run), and
its own ``metadata.json`` agrees with its index entry (``export.sweep.disagreement``: prompt, seed, swept
settings). ``build-site --dataset SWEEP`` runs the same check before it copies anything.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from . import bounded, contract
from . import sweep as _sweep
from .contract import DatasetError


def looks_like_sweep(path: str | os.PathLike) -> bool:
    """A folder with a ``sweep.json`` entry (even a broken link) and no ``metadata.json``: validated as a sweep."""
    p = Path(path)
    return os.path.lexists(p / _sweep.SWEEP_FILE) and not os.path.lexists(p / contract.METADATA_FILE)


def run_folder_problem(root: Path, name: str) -> str | None:
    """Why ``root/name`` is not a run folder of the sweep (missing, a symlink, not a folder), or None."""
    try:
        st = os.lstat(root / name)
    except FileNotFoundError:
        return "its folder is missing"
    except OSError as exc:
        return f"its folder is unreadable ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return f"its folder is a symlink (to {os.readlink(root / name)[:120]}); a sweep's runs are folders inside it"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    return None


def check_finished_run(root: Path, entry: Mapping[str, Any], *, strict: bool,
                       check: Callable[[Path], Any] | None = None) -> list[str]:
    """The problems of one finished run of a sweep (its folder, its validation, its agreement with the index)."""
    from .validate import check_run

    name = str(entry["name"])
    problem = run_folder_problem(root, name)
    if problem:
        return [f"{name}: sweep.json calls it done, but {problem}"]
    report = (check or check_run)(root / name)
    lines = list(report.problems) + (list(report.warnings) if strict else [])
    if lines:
        return [f"{name}: {line}" for line in lines]
    try:
        meta = bounded.read_json(root / name, contract.METADATA_FILE)
    except DatasetError as exc:
        return [f"{name}: {exc}"]
    disagree = _sweep.disagreement(entry, meta)
    if disagree:
        return [f"{name}: {disagree}"]
    thumb = entry.get("thumbnail")
    if thumb and thumb[len(name) + 1:] not in meta.get("files", {}):
        return [f"{name}: thumbnail {thumb} is not a file of the run"]
    return []


def check_sweep(path: str | os.PathLike, *, strict: bool = False) -> tuple[bounded.Problems, dict[str, Any] | None]:
    """``(problems, index)``: every problem of the sweep at ``path`` (index None when it does not read)."""
    root = Path(path)
    problems = bounded.Problems()
    try:
        doc = _sweep.read_index(root)
    except DatasetError as exc:
        problems.add(str(exc))
        return problems, None
    for entry in _sweep.by_status(doc, _sweep.STATUS_DONE):
        for line in check_finished_run(root, entry, strict=strict):
            problems.add(line)
    return problems, doc


def main(folder: Path, shown_as: str, *, strict: bool, quiet: bool) -> int:
    """``diffviz validate SWEEP [--strict]``: one line per problem, then a count; exit 0 (valid) or 1."""
    problems, doc = check_sweep(folder, strict=strict)
    for line in problems.report():
        print(line)
    if problems:
        print(f"invalid: {len(problems)} problem(s) in sweep {shown_as}", file=sys.stderr)
        return 1
    if not quiet:
        counts = {s: len(_sweep.by_status(doc, s)) for s in _sweep.STATUSES}
        print(f"ok: sweep {shown_as} ({len(doc['runs'])} runs: {counts['done']} done and checked, "
              f"{counts['pending']} pending, {counts['failed']} failed{', strict' if strict else ''})")
    return 0
