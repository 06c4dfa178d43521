"""The Sweep tab's data: one opened sweep and what the view draws from it, and no UI.

* :func:`open_sweep` reads a sweep's index (``export.sweep.read_index``: every count, length and name bounded
  and checked before anything else looks at it) from a folder or a URL.
* :class:`Sweep` lays the runs out along two of the swept axes (:meth:`Sweep.layout`: which run sits at
  which grid cell, a page of a long axis at a time, the other axes held at one value each), gives the headline
  figures of the index per parameter (:meth:`Sweep.series`), and reads, lazily and only for the cells shown,
  each run's ``metadata.json`` (:meth:`Sweep.check`: does it agree with its entry), thumbnail (bounded read, PNG
  header checked before decoding) and one word's DAAM map (the run opened through ``app.store``, its existing
  aggregate over all layers and steps).
* :class:`SweepStore` holds the sweep of a session (a param the view watches).

Plain numpy (and PIL for the thumbnails, as the reader), so it runs in the Pyodide worker too.
"""
from __future__ import annotations

import gc
import io
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import param

from analysis import maps as _maps
from app.store import UPLOAD_PREFIX, RunData, Store, is_url, resolve_source
from export import bounded, contract
from export import reader as _reader
from export import sweep as _sweep
from export import words as _words
from export.contract import DatasetError

#: Largest thumbnail file read (an SDXL 1024² PNG is a few MB).
THUMB_MAX_BYTES = 16 * contract.MiB
#: Decoded thumbnails are reduced to this long side (PIL's box filter): about a grid cell on screen.
THUMB_SIDE = 256
#: Thumbnails and opened runs kept per sweep (least recently used go first).
THUMB_CACHE_ITEMS = 256
RUN_CACHE_ITEMS = 8
#: Cache of each run opened for its word map (the session's runs have their own, larger one).
RUN_CACHE_MB = 16
#: Word maps kept (one small ``[h, w]`` array each).
WORD_MAP_ITEMS = 512
#: The most rows and columns of small multiples drawn at once: a page (the layout's note names the rest).
MAX_ROWS = MAX_COLS = 12
#: Finished runs checked for the one the other tabs open with (a sweep of mislabelled runs opens its first).
FIRST_TRIES = 16
#: The most values of one parameter on a headline plot's x axis (the first ones; the title says so).
MAX_PLOT_VALUES = 100
#: ``rows`` / ``cols`` value meaning "no axis" (a single row or column).
NO_AXIS = ""
METRICS = ("final_latent_norm", "word_share")


def _key(value: Any) -> str:
    """Axis values compare as their JSON text (the index's own rule: 3 and 3.0 are different values)."""
    return json.dumps(value)


#: An axis value as a label: ``7.5``, ``3``, ``red`` (the index refuses two values of one axis that read the same,
#: which Bokeh would refuse as duplicate factors).
value_text = _sweep.value_label


def run_text(sweep_text: str, name: str) -> str:
    """What the state holds for run ``name`` of the sweep opened as ``sweep_text`` (folder or URL, relative
    stays relative): the sweep's location joined with the run's folder name."""
    _sweep.check_run_name(name)
    base = sweep_text.strip().rstrip("/")
    if base.endswith("/" + _sweep.SWEEP_FILE) or base == _sweep.SWEEP_FILE:
        base = base[: -len(_sweep.SWEEP_FILE)].rstrip("/")
    return f"{base}/{name}" if base else name


@dataclass(frozen=True)
class Cell:
    """One small multiple: grid cell ``(row, col)`` shows ``run`` (the index's entry, ``runs[index]``)."""

    row: int
    col: int
    index: int
    run: dict = field(compare=False)

    @property
    def name(self) -> str:
        return str(self.run["name"])

    @property
    def done(self) -> bool:
        return self.run["status"] == _sweep.STATUS_DONE


@dataclass(frozen=True)
class Layout:
    """The small multiples: ``rows`` / ``cols`` are axis names (or :data:`NO_AXIS`), their values the row and
    column labels, ``fixed`` the value each other axis is held at; ``clipped`` names what is not drawn."""

    rows: str
    cols: str
    row_values: list
    col_values: list
    fixed: dict
    cells: list[Cell]
    clipped: str = ""
    #: the page shown along each axis (``MAX_ROWS`` / ``MAX_COLS`` values each) and how many pages it has
    row_page: int = 0
    col_page: int = 0
    row_pages: int = 1
    col_pages: int = 1

    def cell(self, row: int, col: int) -> Cell | None:
        return next((c for c in self.cells if c.row == row and c.col == col), None)


class Sweep:
    """One opened sweep: its checked index and where it lives. Thumbnails and word maps are read on demand."""

    def __init__(self, doc: dict, text: str, source: Any, opener: Callable[[str], RunData] | None = None):
        self.doc = doc
        self.text = text.strip()
        self.source = source
        self.template = str(doc.get("template", ""))
        self.axes: list[tuple[str, list]] = [(str(a["name"]), list(a["values"])) for a in doc["grid"]]
        self.runs: list[dict] = list(doc["runs"])
        self._position = {name: {_key(v): k for k, v in enumerate(values)} for name, values in self.axes}
        self._sizes = [len(values) for _name, values in self.axes]
        self._open = opener or Store(cache_mb=RUN_CACHE_MB).open
        self._thumbs: OrderedDict = OrderedDict()
        self._opened: OrderedDict = OrderedDict()
        self._word_maps: OrderedDict = OrderedDict()
        #: run name -> what is wrong with it against the index (None: it agrees); see :meth:`check`
        self._checked: dict[str, str | None] = {}

    # ---- names ---------------------------------------------------------------------------

    @property
    def axis_names(self) -> list[str]:
        return [name for name, _values in self.axes]

    def values(self, axis: str) -> list:
        for name, values in self.axes:
            if name == axis:
                return values
        raise DatasetError(f"the sweep has no axis {axis!r} (it has {', '.join(self.axis_names)})")

    def varying(self) -> list[str]:
        """The axes with more than one value, in grid order."""
        return [name for name, values in self.axes if len(values) > 1]

    def run_text(self, run: dict) -> str:
        return run_text(self.text, str(run["name"]))

    def done(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == _sweep.STATUS_DONE]

    def first_done(self) -> dict | None:
        """The first finished run that agrees with the index (:meth:`check`; the first few are tried), else the
        first finished run: the run the other tabs show when the sweep opens."""
        done = self.done()
        for run in done[:FIRST_TRIES]:
            try:
                self.check(run)
                return run
            except DatasetError:
                continue
        return next(iter(done), None)

    def counts(self) -> dict[str, int]:
        return {s: sum(r["status"] == s for r in self.runs) for s in _sweep.STATUSES}

    def find(self, text: str) -> dict | None:
        """The run whose state text is ``text`` (a run of this sweep opened elsewhere), or None."""
        text = (text or "").strip().rstrip("/")
        return next((r for r in self.runs if self.run_text(r) == text), None)

    def params_text(self, run: dict, skip: tuple[str, ...] = ()) -> str:
        return " · ".join(f"{k}={value_text(v)}" for k, v in run["params"].items() if k not in skip)

    # ---- the grid ------------------------------------------------------------------------

    def default_axes(self) -> tuple[str, str]:
        """``(rows, cols)``: the first two axes with several values (one of them alone: the columns)."""
        varying = self.varying()
        if len(varying) >= 2:
            return varying[0], varying[1]
        return NO_AXIS, (varying[0] if varying else self.axis_names[0])

    def fit(self, rows: str, cols: str, fixed: dict | None) -> tuple[str, str, dict]:
        """``(rows, cols, fixed)`` inside this sweep: unknown axes back to the defaults, the same axis not on
        both, every other axis held at a value it has (its first, unless ``fixed`` names one)."""
        names = self.axis_names
        default_rows, default_cols = self.default_axes()
        if cols not in names:
            cols = default_cols if default_cols != rows else NO_AXIS
        if rows not in names and rows != NO_AXIS:
            rows = default_rows if default_rows != cols else NO_AXIS
        if rows == cols:
            rows = NO_AXIS
        if cols == NO_AXIS and rows != NO_AXIS:
            rows, cols = NO_AXIS, rows
        fixed = dict(fixed or {})
        held = {}
        for name, values in self.axes:
            if name in (rows, cols):
                continue
            value = fixed.get(name)
            held[name] = value if value is not None and _key(value) in self._position[name] else values[0]
        return rows, cols, held

    def run_at(self, coords: dict) -> tuple[int, dict]:
        """The run whose params are ``coords`` (every axis given): ``(index, entry)``, from the grid order."""
        index = 0
        for (name, _values), size in zip(self.axes, self._sizes):
            k = self._position[name].get(_key(coords.get(name)))
            if k is None:
                raise DatasetError(f"axis {name}: {contract.shown(coords.get(name), 40)} is not one of its values")
            index = index * size + k
        return index, self.runs[index]

    def layout(self, rows: str, cols: str, fixed: dict | None = None, row_page: int = 0, col_page: int = 0) -> Layout:
        """Which run sits at which cell: row ``r`` holds the ``r``-th value of ``rows`` on page ``row_page``,
        column ``c`` the ``c``-th of ``cols`` on ``col_page``; pages of :data:`MAX_ROWS` x :data:`MAX_COLS` cells
        (a page past the last is the last; the note names what is shown)."""
        rows, cols, held = self.fit(rows, cols, fixed)
        row_values = self.values(rows) if rows != NO_AXIS else [None]
        col_values = self.values(cols) if cols != NO_AXIS else [None]
        clipped, pages = [], []
        for axis, values, cap, page in ((rows, row_values, MAX_ROWS, row_page), (cols, col_values, MAX_COLS, col_page)):
            count = -(-len(values) // cap)
            page = min(max(int(page), 0), count - 1)
            pages.append((page, count))
            if count > 1:
                first = page * cap
                clipped.append(f"values {first + 1}–{min(first + cap, len(values))} of {len(values)} of {axis}")
        (row_page, row_pages), (col_page, col_pages) = pages
        row_values = row_values[row_page * MAX_ROWS:(row_page + 1) * MAX_ROWS]
        col_values = col_values[col_page * MAX_COLS:(col_page + 1) * MAX_COLS]
        cells = []
        for r, rv in enumerate(row_values):
            for c, cv in enumerate(col_values):
                coords = dict(held)
                if rows != NO_AXIS:
                    coords[rows] = rv
                if cols != NO_AXIS:
                    coords[cols] = cv
                index, run = self.run_at(coords)
                cells.append(Cell(r, c, index, run))
        return Layout(rows=rows, cols=cols, row_values=row_values if rows != NO_AXIS else [],
                      col_values=col_values if cols != NO_AXIS else [], fixed=held, cells=cells,
                      clipped=" and ".join(clipped), row_page=row_page, col_page=col_page, row_pages=row_pages,
                      col_pages=col_pages)

    # ---- headline figures -------------------------------------------------------------------

    def words(self) -> list[str]:
        """Every word with a share in some run's headline, in order of first appearance."""
        out: dict[str, None] = {}
        for run in self.done():
            out.update(dict.fromkeys(((run.get("headline") or {}).get("word_share") or {})))
        return list(out)

    def default_word(self) -> str:
        """The first word every finished run has a share for (a word the prompt template does not vary), else
        the first word. One pass over the shares (runs x words), not words x runs."""
        counts: dict[str, int] = {}
        done = self.done()
        for run in done:
            for word in ((run.get("headline") or {}).get("word_share") or {}):
                counts[word] = counts.get(word, 0) + 1
        common = [w for w, n in counts.items() if n == len(done)]
        return (common or list(counts) or [""])[0]

    def plot_values(self, axis: str) -> list:
        """The values of ``axis`` a headline plot shows: its first :data:`MAX_PLOT_VALUES`."""
        return self.values(axis)[:MAX_PLOT_VALUES]

    def series(self, axis: str, metric: str, word: str = "") -> dict[str, list]:
        """The index's headline figure ``metric`` of every finished run against ``axis``: ``{x: [value label],
        y: [figure], run: [name], params: [the other axes]}``; runs without that figure, and runs at a value past
        :meth:`plot_values`, are left out."""
        if metric not in METRICS:
            raise DatasetError(f"unknown headline figure {metric!r} (known: {', '.join(METRICS)})")
        shown = {_key(v) for v in self.plot_values(axis)}
        out: dict[str, list] = {"x": [], "y": [], "run": [], "params": []}
        for run in self.done():
            if _key(run["params"][axis]) not in shown:
                continue
            headline = run.get("headline") or {}
            value = headline.get("final_latent_norm") if metric == "final_latent_norm" else (headline.get("word_share") or {}).get(word)
            if value is None:
                continue
            out["x"].append(value_text(run["params"][axis]))
            out["y"].append(float(value))
            out["run"].append(str(run["name"]))
            out["params"].append(self.params_text(run, skip=(axis,)))
        return out

    def means(self, axis: str, series: dict[str, list]) -> dict[str, list]:
        """The mean of ``series`` at each value of ``axis`` that has one: ``{x, y}`` in the axis's order."""
        out: dict[str, list] = {"x": [], "y": []}
        for value in map(value_text, self.plot_values(axis)):
            ys = [y for x, y in zip(series["x"], series["y"]) if x == value]
            if ys:
                out["x"].append(value)
                out["y"].append(float(np.mean(ys)))
        return out

    # ---- what the cells show ------------------------------------------------------------------

    def check(self, run: dict) -> None:
        """Raise :class:`DatasetError` (one line naming the run) unless the run's own ``metadata.json`` agrees with
        its index entry (``export.sweep.disagreement``: prompt, seed, swept settings), the check ``diffviz validate``
        and ``build-site`` make of a sweep: a swapped folder, or a run another job wrote over, is never drawn under
        the index's labels. Read once per run, bounded (a run folder linked from outside the sweep is refused)."""
        name = str(run["name"])
        if name not in self._checked:
            rel = f"{name}/{contract.METADATA_FILE}"
            try:
                data = self.source.read_bytes(rel, contract.MAX_JSON_BYTES[contract.METADATA_FILE])
                meta = bounded.parse_json(rel, data)
                problem = _sweep.disagreement(run, meta)
                self._checked[name] = f"{name}: {problem}" if problem else None
            except DatasetError as exc:
                self._checked[name] = str(exc) if str(exc).startswith(name) else f"{name}: {exc}"
        if self._checked[name]:
            raise DatasetError(self._checked[name])

    def thumbnail(self, run: dict) -> np.ndarray | None:
        """The run's thumbnail (its ``images/final.png``), uint8 ``[h, w, 3]`` with a long side of at most
        :data:`THUMB_SIDE`; None when the index names none. Read once, bounded: the file's size, then the PNG
        header's sides, before a pixel is decoded."""
        rel = run.get("thumbnail")
        if not rel:
            return None
        if rel in self._thumbs:
            self._thumbs.move_to_end(rel)
            return self._thumbs[rel]
        data = self.source.read_bytes(rel, THUMB_MAX_BYTES)
        bounded.png_size(rel, data)
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                if max(im.size) > THUMB_SIDE:
                    scale = THUMB_SIDE / max(im.size)
                    im = im.resize((max(round(im.size[0] * scale), 1), max(round(im.size[1] * scale), 1)),
                                   Image.Resampling.BOX)
                image = np.asarray(im, dtype=np.uint8).copy()
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's problem
            raise DatasetError(f"{rel}: does not decode as an image ({type(exc).__name__})") from None
        image.flags.writeable = False
        self._thumbs[rel] = image
        while len(self._thumbs) > THUMB_CACHE_ITEMS:
            self._thumbs.popitem(last=False)
        return image

    def open_run(self, run: dict) -> RunData:
        """The run opened (its three JSON files read and checked), kept for the last few runs."""
        name = str(run["name"])
        if name in self._opened:
            self._opened.move_to_end(name)
            return self._opened[name]
        self.check(run)
        data = self._opened[name] = self._open(self.run_text(run))
        while len(self._opened) > RUN_CACHE_ITEMS:
            self._opened.popitem(last=False)
        return data

    def word_map(self, run: dict, word: str) -> np.ndarray | None:
        """DAAM's map of ``word`` in this run: the store's aggregate over all cross layers and every step, the
        word's tokens summed (``[h, w]`` float32); None when the run's prompt lacks the word."""
        key = (str(run["name"]), word)
        if key in self._word_maps:
            self._word_maps.move_to_end(key)
            return self._word_maps[key]
        data = self.open_run(run)
        found = [w for w in _words.words(data.tokens, data.words) if w.label == word]
        if not found:
            value = None
        elif not data.cross_layers:
            raise DatasetError(f"{run['name']}: the run recorded no cross-attention maps")
        else:
            stack = data.aggregate_all(0, data.n_steps - 1)
            value = np.asarray(_maps.word_map(stack, found[0].rows), np.float32)
            value.flags.writeable = False
        self._word_maps[key] = value
        while len(self._word_maps) > WORD_MAP_ITEMS:
            self._word_maps.popitem(last=False)
        return value


def _location(text: str) -> str:
    """The sweep's location as the reader takes it: ``sweep.json`` itself stands for its folder; a URL as typed;
    a folder found as the store finds a run's (the working directory, then the project checkout)."""
    base = text.rstrip("/")
    if base == _sweep.SWEEP_FILE or base.endswith("/" + _sweep.SWEEP_FILE):
        text = base[: -len(_sweep.SWEEP_FILE)] or "."
    if is_url(text) or _reader.in_pyodide():
        return text
    return resolve_source(text)


def open_sweep(text: str, opener: Callable[[str], RunData] | None = None) -> Sweep:
    """The sweep at ``text`` (a folder or URL holding ``sweep.json``, or that file itself); raises
    :class:`DatasetError` (one line). Nothing but ``sweep.json`` is read here."""
    text = (text or "").strip()
    if not text:
        raise DatasetError("no sweep given")
    if text.startswith(UPLOAD_PREFIX):
        raise DatasetError("a picked folder opens as one run; open a sweep by its folder or URL")
    source = _reader.as_source(_location(text))
    return Sweep(_read_index(source), text, source, opener)


def _read_index(source: Any) -> dict:
    """The checked index. Whether it is refused or read, what reading it took (up to the index's caps: the bytes,
    their text, a refused parse) is handed back to the system before this returns, so that a server's memory goes
    back to rest (:func:`release_memory`); a refusal is raised again without the frames that held that data."""
    doc = problem = None
    try:
        doc = _sweep.parse_index(source.read_bytes(_sweep.SWEEP_FILE, _sweep.MAX_INDEX_BYTES))
    except DatasetError as exc:
        problem = str(exc)
    release_memory()  # here: the refusal's traceback, and the data its frames held, are gone
    if problem is not None:
        raise DatasetError(problem)
    return doc


def _libc() -> Any:
    """glibc's functions, or None (macOS, Pyodide)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except (ImportError, OSError):
        return None


#: glibc's M_MMAP_THRESHOLD: blocks from 1 MiB up are mapped on their own and unmapped when freed. By default
#: glibc raises the threshold to the largest block freed so far (up to 32 MiB), after which an index's bytes and
#: text come from a heap that keeps them: a server that read a refused 19 MB index stayed 70 MB above rest.
_M_MMAP_THRESHOLD = -3
_LIBC = _libc()
if _LIBC is not None:
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def release_memory() -> None:
    """Collect garbage, then ask glibc to return the freed heap memory to the system (a no-op without glibc)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def is_sweep_folder(text: str) -> bool:
    """Whether ``text`` names a folder (not a URL) with a ``sweep.json`` and no ``metadata.json``."""
    text = (text or "").strip()
    if not text or text.startswith(UPLOAD_PREFIX) or is_url(text) or _reader.in_pyodide():
        return False
    try:
        folder = resolve_source(text)
    except DatasetError:
        return False
    return _sweep.is_sweep(folder) and not (Path(folder) / contract.METADATA_FILE).exists()


def open_dataset(open_run: Callable[[str], Any], text: str) -> Any:
    """What the run box's ``text`` opens: a :class:`Sweep` for a folder with a sweep.json (and no metadata.json),
    or for a URL whose run does not open but whose sweep.json does; else ``open_run(text)``'s run. A URL that is
    neither fails with the run's error, unless its sweep.json was found and is what is wrong."""
    if is_sweep_folder(text):
        return open_sweep(text)
    try:
        return open_run(text)
    except DatasetError as exc:
        if not (is_url((text or "").strip()) or _reader.in_pyodide()):
            raise
        try:
            return open_sweep(text)
        except DatasetError as sweep_exc:
            if str(sweep_exc).startswith(_sweep.SWEEP_FILE + ":"):
                raise
            raise exc from None


class SweepStore(param.Parameterized):
    """The sweep of one dashboard session."""

    sweep = param.Parameter(default=None, doc="the open Sweep, or None")

    def open(self, text: str) -> Sweep:
        return open_sweep(text)

    def set_sweep(self, sweep: Sweep | None) -> None:
        self.sweep = sweep

