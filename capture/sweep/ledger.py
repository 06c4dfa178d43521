"""The sweep's bookkeeping: what an existing OUT holds, which runs are finished, and ``sweep.json``.

A run counts as finished when its folder validates under the strict rules and records the run's own
prompt, seed, guidance and step count; anything else is redone (a broken or foreign folder is replaced
only when the new run lands: ``RunWriter`` writes beside it and renames). A finished run is never written.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from capture.sweep.grid import Grid, RunSpec
from export import bounded, contract
from export import sweep as sweep_index
from export.contract import DatasetError
from export.validate import validate_run


class SweepRefused(ValueError):
    """OUT holds something this sweep must not write over; ``str()`` is one line."""


class IndexWriteError(RuntimeError):
    """``sweep.json`` could not be written (a full disk, the index's caps); ``str()`` is one line. The index on
    disk is the last one written, whole (``export.sweep.write_index``), and the finished runs are kept."""


def difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first way two indexes describe different sweeps (template, axes, shared settings), or None."""
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731
    if old["template"] != new["template"]:
        return f"the prompt was {old['template']!r}"
    old_axes = [a["name"] for a in old["grid"]]
    new_axes = [a["name"] for a in new["grid"]]
    if old_axes != new_axes:
        return f"its axes were {', '.join(old_axes)}"
    for a, b in zip(old["grid"], new["grid"]):
        if not same(a["values"], b["values"]):
            return f"axis {a['name']} was {', '.join(map(str, a['values']))[:120]}"
    for key in sorted(set(old["base"]) | set(new["base"])):
        if not same(old["base"].get(key), new["base"].get(key)):
            return f"--{key.replace('_', '-')} was {old['base'].get(key)!r}"
    return None


def finished(folder: Path, spec: RunSpec) -> bool:
    """True when ``folder`` is a complete, strictly valid run of exactly this spec."""
    if not folder.is_dir() or folder.is_symlink() or validate_run(folder, strict=True):
        return False
    try:
        run = bounded.read_json(folder, contract.METADATA_FILE).get("run", {})
    except (DatasetError, AttributeError):
        return False
    c = spec.config
    return (run.get("prompt"), run.get("seed"), run.get("cfg_scale"), run.get("num_steps")) == \
        (c.prompt, c.seed, c.cfg_scale, c.num_steps)


class Ledger:
    """The runs of one sweep with their status, written to ``OUT/sweep.json``.

    ``min_interval`` spaces out rewrites of a large index (a rewrite costs O(runs)); :meth:`flush` writes
    whatever is pending. The folders on disk, not the index, decide what a resume redoes. The caller holds the
    sweep's lock (``capture.sweep.lock``) from :meth:`plan` on.
    """

    def __init__(self, out: Path, grid: Grid, specs: Sequence[RunSpec], *, min_interval: float | None = None):
        self.out, self.grid = out, grid
        self.specs = {s.name: s for s in specs}
        self.entries: dict[str, dict[str, Any]] = {
            s.name: {"name": s.name, "params": s.params, "prompt": s.prompt, "status": sweep_index.STATUS_PENDING,
                     "error": None, "headline": None, "thumbnail": None} for s in specs}
        self.min_interval = (0.0 if len(specs) <= 1000 else 2.0) if min_interval is None else min_interval
        self._written = 0.0
        self._dirty = False
        #: distinct words of the headlines (the index keeps at most MAX_SWEEP_WORDS); whether some were left out
        self._words: set[str] = set()
        self.words_left_out = False

    def document(self) -> dict[str, Any]:
        return sweep_index.index_document(self.grid.template, self.grid.index_grid(), self.grid.index_base(),
                                          list(self.entries.values()))

    def check(self) -> None:
        """Refuse (:class:`SweepRefused`, one line) a sweep whose index could not be written: one the index's
        checks refuse, or one whose index, with a headline per run, would pass the index's byte cap."""
        try:
            text = sweep_index.index_text(self.document())
        except DatasetError as exc:
            raise SweepRefused(f"the sweep's index would be refused: {exc}") from None
        # a headline: the norm, and one share per content word of the prompt (at most MAX_HEADLINE_WORDS)
        allowance = sum(80 + sum(len(w) + 24 for w in sorted(set(s.prompt.split()), key=len)[-sweep_index.MAX_HEADLINE_WORDS:])
                        for s in self.specs.values())
        if len(text.encode()) + allowance > sweep_index.MAX_INDEX_BYTES:
            raise SweepRefused(f"the index of these {len(self.specs)} runs would pass {sweep_index.SWEEP_FILE}'s cap of "
                               f"{sweep_index.MAX_INDEX_BYTES} bytes; split the sweep, or shorten the prompt and values")

    # ------------------------------------------------------------------ deciding
    def plan(self, *, overwrite: bool, log=None) -> list[RunSpec]:
        """Compare with what OUT holds; mark finished runs done and return the specs to run (in grid order).

        Raises :class:`SweepRefused` for an OUT that holds another sweep or other files, unless ``overwrite``.
        A missing or broken sweep.json is rebuilt from the runs found, when OUT holds nothing but this sweep's
        run folders (none of them a finished run of other settings)."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise SweepRefused(f"--out: {out} exists and is not a folder")
        previous, broken = None, None
        if os.path.lexists(out / sweep_index.SWEEP_FILE):
            try:
                previous = sweep_index.read_index(out)
            except DatasetError as exc:
                broken = str(exc)
        same = previous is not None and difference(previous, self.document()) is None
        if previous is not None and not same and not overwrite:
            raise SweepRefused(f"--out: {out} holds a different sweep ({difference(previous, self.document())}); "
                               "pass --overwrite-output to replace its runs, or choose another --out")
        rebuild = previous is None and not overwrite and self._rebuildable(broken)
        if rebuild and log is not None and (broken or self._present()):
            what = f"was unreadable ({broken})" if broken else "was missing"
            log(f"{sweep_index.SWEEP_FILE} {what}; it is rebuilt from the finished runs found")
        old = {r["name"]: r for r in previous["runs"]} if same else {}
        todo = []
        for name, spec in self.specs.items():
            folder = out / name
            if (same or rebuild) and finished(folder, spec):
                entry = self.entries[name]
                before = old.get(name, {})
                entry["status"] = sweep_index.STATUS_DONE
                headline = before.get("headline") if before.get("status") == "done" else None
                entry["headline"] = self._kept_words(headline if headline is not None else sweep_index.headline(folder))
                entry["thumbnail"] = f"{name}/{contract.FINAL_IMAGE}"
                continue
            if folder.exists() or folder.is_symlink():
                if log is not None and (same or rebuild):
                    log(f"{name}: the folder there is not a finished run; it is redone and replaced when done")
                spec = replace(spec, config=replace(spec.config, overwrite_output=True))
                self.specs[name] = spec
            todo.append(spec)
        return todo

    def _present(self) -> list[str]:
        from capture.sweep.lock import LOCK_FILE

        try:
            return sorted(e.name for e in os.scandir(self.out) if e.name not in (LOCK_FILE, sweep_index.SWEEP_FILE))
        except OSError:
            return []

    def _rebuildable(self, broken: str | None) -> bool:
        """Whether OUT, without a readable index, holds only this sweep's run folders; else SweepRefused."""
        out = self.out
        present = self._present()
        foreign = [n for n in present if n not in self.specs]
        if foreign:
            if broken:
                raise SweepRefused(f"--out: {out}: {broken}; it also holds {foreign[0]!r}, not a run of this sweep; "
                                   "pass --overwrite-output to start a new sweep there")
            raise SweepRefused(f"--out: {out} is not empty and holds no {sweep_index.SWEEP_FILE} ({foreign[0]!r} is not "
                               "a run of this sweep); pass --overwrite-output to write the sweep there")
        for name in present:
            folder = out / name
            if not finished(folder, self.specs[name]) and folder.is_dir() and not folder.is_symlink() \
                    and not validate_run(folder, strict=True):
                raise SweepRefused(f"--out: {out} holds {name}, a finished run of other settings, and no readable "
                                   f"{sweep_index.SWEEP_FILE}; pass --overwrite-output to replace it")
        return True

    # ------------------------------------------------------------------ recording
    def _kept_words(self, headline: dict[str, Any] | None) -> dict[str, Any] | None:
        """``headline`` with the words past the index's distinct-word cap left out (the runs keep them all)."""
        if not headline or not headline.get("word_share"):
            return headline
        share = {}
        for word, value in headline["word_share"].items():
            if word not in self._words and len(self._words) >= sweep_index.MAX_SWEEP_WORDS:
                self.words_left_out = True
                continue
            self._words.add(word)
            share[word] = value
        return {**headline, "word_share": share}

    def record(self, result: dict[str, Any]) -> None:
        entry = self.entries[result["name"]]
        entry["status"] = result["status"]
        entry["error"] = result.get("error")
        entry["headline"] = self._kept_words(result.get("headline"))
        done = result["status"] == sweep_index.STATUS_DONE
        entry["thumbnail"] = f"{entry['name']}/{contract.FINAL_IMAGE}" if done else None
        self._dirty = True
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        """Write the index now (or, unless ``force``, if the last write is ``min_interval`` old); raises
        :class:`IndexWriteError` (one line) when it cannot be written."""
        if not force and time.monotonic() - self._written < self.min_interval:
            return
        target = self.out / sweep_index.SWEEP_FILE
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            sweep_index.write_index(self.out, self.document())
        except OSError as exc:
            raise IndexWriteError(f"cannot write {target} ({exc.strerror or type(exc).__name__})") from None
        except DatasetError as exc:
            raise IndexWriteError(f"cannot write {target}: {exc}") from None
        self._written = time.monotonic()
        self._dirty = False

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in sweep_index.STATUSES}
        for e in self.entries.values():
            out[e["status"]] += 1
        return out
