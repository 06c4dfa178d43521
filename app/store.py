"""The dashboard's data: the ``export`` reader plus derived data, and no UI.

* :func:`resolve_source` turns what a user typed (folder, URL, ``upload:NAME``) into a reader source.
* :class:`RunData` wraps one opened run: layer groups, token/word labels, token maps (one layer or
  all layers brought to one resolution; the mean over heads or, in per-head runs, one head), the
  DAAM aggregate, the self-attention probe, and the per-step metrics the views plot. Grids are
  ``(h, w)`` pairs throughout: schema-2 runs may be non-square. Joint-attention runs (SD3, Flux) add
  layer kinds (``joint``, ``single``), token sets (CLIP, T5: a word is merged within its set) and the
  text->image maps of "where does this word look" (:meth:`RunData.text_heat`).
* :class:`Comparison` holds two runs: the reader's compatibility verdict, the JS divergence per
  step x layer and per token (``analysis.divergence``), both PCA trajectories on a shared basis
  (``analysis.trajectory``) and the per-step latent deltas.
* :class:`Store` owns the open runs (``run``, ``other``, ``comparison`` are params the views watch),
  the uploaded folders, and the cache size.

Decoding lives in ``export.reader`` and the math in ``analysis``; this module only selects,
sums, averages and resamples arrays. Everything here is plain numpy, so it runs unchanged in
the Pyodide worker of the static site.
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import param

from analysis import divergence as _divergence
from analysis import maps as _maps
from analysis import metrics as _metrics
from analysis import trajectory as _trajectory
from app.state import ALL_LAYERS, MEAN_HEAD
from export import reader as _reader
from export import validate as _validate
from export import words as _words
from export.contract import DatasetError

#: Default bound of each run's LRU cache of decoded maps and images, in MB.
DEFAULT_CACHE_MB = 256
#: The project checkout (``datasets/`` lives here when running from a clone).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
UPLOAD_PREFIX = "upload:"

IN_BROWSER = sys.platform == "emscripten"


def cache_mb_from_env(default: int = DEFAULT_CACHE_MB) -> int:
    """``DIFFVIZ_CACHE_MB`` if set to a positive integer, else ``default``."""
    raw = os.environ.get("DIFFVIZ_CACHE_MB", "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        return default
    return value if value > 0 else default


def one_line(exc: BaseException) -> str:
    """A one-line message for the banner: never a traceback."""
    text = " ".join(str(exc).split())
    if isinstance(exc, DatasetError):
        return text or "invalid dataset"
    if isinstance(exc, FileNotFoundError) and getattr(exc, "filename", None):
        return f"file not found: {exc.filename}"
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


# --------------------------------------------------------------------------- sources


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def resolve_source(text: str, uploads: Mapping[str, Mapping[str, bytes]] | None = None) -> Any:
    """The reader source for what the user typed.

    ``upload:NAME`` is a folder picked in the browser (kept in ``uploads``); ``http(s)://`` is a URL;
    in the browser build any other string is a URL relative to the page; under ``panel serve`` it is
    a folder, absolute, relative to the working directory, or relative to the project checkout.
    """
    text = (text or "").strip()
    if not text:
        raise DatasetError("no dataset given")
    if text.startswith(UPLOAD_PREFIX):
        name = text[len(UPLOAD_PREFIX):]
        if not uploads or name not in uploads:
            raise DatasetError(f"uploaded folder {name!r} is not in this session; pick the folder again")
        return uploads[name]
    if is_url(text) or IN_BROWSER:
        return text
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate)
    if any(c.exists() for c in candidates):
        raise DatasetError(f"{text}: not a folder (a run is a folder with metadata.json)")
    raise DatasetError(f"{text}: no such folder")


def files_from_upload(filenames: list[str], contents: list[bytes]) -> tuple[str, dict[str, bytes]]:
    """``(folder name, {path: bytes})`` from a ``FileInput(directory=True)`` upload.

    Browsers report each file relative to the picked folder's parent (``myrun/images/step_000.png``);
    the reader strips that prefix itself (``export.reader.BytesSource``), so the paths are kept.
    """
    if not filenames:
        raise DatasetError("the picked folder is empty")
    if len(filenames) != len(contents):
        raise DatasetError("upload is incomplete: file names and contents differ in number")
    paths = [str(name).replace("\\", "/").lstrip("/") for name in filenames]
    tops = {p.split("/")[0] for p in paths if "/" in p}
    folder = tops.pop() if len(tops) == 1 else "folder"
    return folder, {p: bytes(c) for p, c in zip(paths, contents)}


def check_schema(run: Any, label: str) -> None:
    """Raise :class:`DatasetError` naming the first place where one of the three JSON files breaks ``schema.json``
    (and how many more there are: ``schema_errors`` bounds that count)."""
    for name, document, part in (("metadata.json", run.metadata, "metadata"), ("metrics.json", run.metrics, "metrics"),
                                 ("latent_pca.json", run.pca, "latent_pca")):
        errors = _validate.schema_errors(document, part, limit=1)  # the first line, then "… and N more schema errors"
        if errors:
            more = f" ({errors[1].lstrip('… ').strip()})" if len(errors) > 1 else ""
            raise DatasetError(f"{label}: {name} fails validation: {errors[0]}{more}")


# --------------------------------------------------------------------------- one run


def _set_names(metadata: Mapping[str, Any], tokens: list[dict]) -> dict[str, str]:
    """``{encoder: short name}`` of a run's token sets when it has more than one (else ``{}``): ``T5`` or ``CLIP``
    from the encoder's class in ``family.text_encoders``, the encoder's own name when that is unknown or when two
    sets would share a short name."""
    order = [str(ts.get("encoder")) for ts in metadata.get("token_sets") or [] if isinstance(ts, Mapping)]
    order += [str(t["set"]) for t in tokens if t.get("set") and str(t["set"]) not in order]
    order = list(dict.fromkeys(order))
    if len(order) < 2:
        return {}
    family = metadata.get("family") if isinstance(metadata.get("family"), Mapping) else {}
    classes = {str(e.get("name")): str(e.get("class", "")) for e in family.get("text_encoders") or [] if isinstance(e, Mapping)}

    def short(encoder: str) -> str:
        cls = classes.get(encoder, "")
        return "T5" if "T5" in cls else "CLIP" if "CLIP" in cls else encoder

    names = {encoder: short(encoder) for encoder in order}
    shared = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {encoder: encoder if name in shared else name for encoder, name in names.items()}


@dataclass(frozen=True)
class Selection:
    """What a heat map is drawn for: the state's parameters a map depends on, read once per update."""

    step: int
    layer: str
    token: int
    head: str = MEAN_HEAD
    merge: bool = True
    kind: str = "cross"
    aggregate: bool = False
    first: int = 0
    last: int = 0
    qx: float = 0.5
    qy: float = 0.5
    shared: bool = False

    @classmethod
    def of(cls, state: Any) -> "Selection":
        first, last = sorted(int(v) for v in state.step_range)
        return cls(step=int(state.step), layer=str(state.layer), token=int(state.token or 0), head=str(state.head),
                   merge=bool(state.merge_words), kind=str(state.kind), aggregate=bool(state.aggregate),
                   first=first, last=last, qx=float(state.probe_x), qy=float(state.probe_y),
                   shared=state.color_scale == "shared")

    @property
    def daam(self) -> bool:
        """The DAAM word map: it depends on the step range, not on the step."""
        return self.aggregate and self.kind == "cross"


@dataclass
class Heat:
    """One drawn heat map: ``map`` as computed (one layer's: the file's values), its colour range, and a
    title naming what is drawn (step, layer, token, head)."""

    map: np.ndarray
    low: float
    high: float
    title: str
    #: the step whose image the map is drawn over (the range's last step for the DAAM map)
    step: int
    #: the layer drawn: ``layer`` or, when that layer has no maps of the kind, ``mean``
    layer: str


class RunData:
    """One opened run and what the views derive from it. Reads go through the reader's LRU cache."""

    #: Derived all-layer arrays kept (each is ``T * r * r`` float32: a few kB for the shipped runs).
    MEMO_ITEMS = 8

    def __init__(self, run: Any, label: str):
        self.run = run
        self.label = label
        md = run.metadata
        self.metadata = md
        self.metrics = run.metrics or {}
        self.pca = run.pca or {}
        info = md.get("run", {})
        self.prompt: str = str(info.get("prompt", ""))
        self.height, self.width = (int(v) for v in run.image_size)
        self.timesteps: list[int] = [int(t) for t in md.get("timesteps", [])]
        self.n_steps = len(self.timesteps)
        self.layers: list[dict] = list(md.get("layers", []))
        self.tokens: list[dict] = list(md.get("tokens", []))
        self.words: list[str] = list(md.get("words") or [])
        self.cross_layers = [int(l["index"]) for l in self.layers if l.get("cross_shape")]
        self.self_layers = [int(l["index"]) for l in self.layers if l.get("self_shape")]
        #: layers with text->image maps (joint and single layers of SD3/Flux runs)
        self.text_layers = [int(l["index"]) for l in self.layers if l.get("text_shape")] if run.has_text else []
        self.text_grid: tuple[int, int] = _maps.finest([l["text_shape"][-2:] for l in self.layers
                                                        if int(l["index"]) in self.text_layers])
        #: the short name shown after a token of each set (``{encoder: "T5"}``); empty when the run has one set
        self.set_names: dict[str, str] = _set_names(md, self.tokens)
        #: the finest grid of each kind: the all-layer mean is brought to it
        self.cross_grid: tuple[int, int] = _maps.finest([self.run.cross_grid(i) for i in self.cross_layers])
        self.self_grid: tuple[int, int] = _maps.finest([self.run.self_grid(i) for i in self.self_layers])
        self.per_head = bool(run.per_head)
        #: heads of the layer with the most (0 unless the run is per head); head k means head k of each layer
        self.max_heads = max([int(run.num_heads(i) or 0) for i in self.cross_layers] + [0]) if self.per_head else 0
        self._memo: OrderedDict = OrderedDict()

    # ---- labels -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.label

    def layer_kind(self, index: int) -> str:
        """``unet``, ``joint`` (MM-DiT double stream) or ``single`` (Flux single stream)."""
        return str(self.layers[index].get("kind") or "unet")

    def layer_label(self, index: int) -> str:
        """``up_blocks.1 · 8×8 · attn 0 · block 0``: the block, the stored grid, then the rest of the name;
        a joint or single layer is ``joint · transformer_blocks.3 · 8×12``: its kind, its name, its grid."""
        layer = self.layers[index]
        name = str(layer.get("name", index))
        kind = self.layer_kind(index)
        if kind != "unet":
            h, w = self.layer_resolution(index)
            return f"{kind} · {name} · {h}×{w}"
        block = str(layer.get("block", ""))
        rest = name[len(block) + 1:] if block and name.startswith(block + ".") else name
        parts = rest.split(".")
        words = {"attentions": "attn", "transformer_blocks": "block", "single_transformer_blocks": "single block"}
        named = [f"{words.get(parts[i], parts[i])} {parts[i + 1]}" for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            named.append(parts[-1])
        h, w = self.layer_resolution(index)
        return " · ".join([block or f"L{index}", f"{h}×{w}"] + [n for n in named if n])

    def layer_resolution(self, index: int) -> tuple[int, int]:
        if index in self.cross_layers:
            return tuple(int(v) for v in self.run.cross_grid(index))
        native = self.layers[index].get("native") or [0, 0]
        return int(native[0]), int(native[1])

    def layer_groups(self) -> dict[str, dict[str, str]]:
        """Options for a grouped layer ``Select``: ``{group: {label: value}}``, grouped by block and resolution."""
        h, w = self.cross_grid
        grid = f" at {h}×{w}" if self.cross_layers else ""
        groups: dict[str, dict[str, str]] = {"All layers": {f"all layers (mean{grid})": ALL_LAYERS}}
        mapped = set(self.cross_layers) | set(self.self_layers) | set(self.text_layers)
        for layer in self.layers:
            index = int(layer["index"])
            if index not in mapped:
                continue
            rh, rw = self.layer_resolution(index)
            kind = self.layer_kind(index)
            group = f"{layer.get('block', '?')} · {rh}×{rw}" if kind == "unet" else f"{kind} layers · {rh}×{rw}"
            groups.setdefault(group, {})[f"L{index} · {self.layer_label(index)}"] = str(index)
        return groups

    def layer_values(self) -> list[str]:
        return [ALL_LAYERS] + [str(i) for i in sorted(set(self.cross_layers) | set(self.self_layers) | set(self.text_layers))]

    def layer_summary(self) -> str:
        """``7 (7 cross, 7 self)``; with joint or single layers ``3 (2 joint, 1 single; 3 cross, 3 self, 3 text)``."""
        kinds = [self.layer_kind(i) for i in range(len(self.layers))]
        maps = f"{len(self.cross_layers)} cross, {len(self.self_layers)} self"
        if set(kinds) <= {"unet"}:
            return f"{len(self.layers)} ({maps})"
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))   # the run's kinds, in layer order
        return f"{len(self.layers)} ({counts}; {maps}, {len(self.text_layers)} text)"

    def token_summary(self) -> str:
        """``9``; with several token sets ``10 (CLIP 5, T5 5)``."""
        if not self.set_names:
            return str(len(self.tokens))
        counts: dict[str, int] = {}
        for i in range(len(self.tokens)):
            counts[self.set_label(i)] = counts.get(self.set_label(i), 0) + 1
        return f"{len(self.tokens)} (" + ", ".join(f"{name} {n}" for name, n in counts.items()) + ")"

    def head_options(self) -> dict[str, str]:
        """``{label: State.head value}`` for the head selector: the mean, then each head (per-head runs only)."""
        return {"mean": MEAN_HEAD, **{f"head {k}": str(k) for k in range(self.max_heads)}}

    def head_values(self) -> list[str]:
        return list(self.head_options().values())

    def fit_head(self, head: str) -> str:
        """``head`` if this run has it, else the mean over heads."""
        return head if head in self.head_values() else MEAN_HEAD

    def head_label(self, head: str) -> str:
        return "mean of heads" if head == MEAN_HEAD else f"head {head}"

    def token_text(self, index: int) -> str:
        return _words.token_text(self.tokens[index])

    def word_of(self, index: int) -> int | None:
        return _words.word_of(self.tokens[index]) if 0 <= index < len(self.tokens) else None

    def token_set(self, index: int) -> str:
        """The encoder whose token set holds ``index`` (``""`` in runs that do not say: one set)."""
        return str(self.tokens[index].get("set") or "")

    def set_label(self, index: int) -> str:
        """The short name of ``index``'s token set (``T5``, ``CLIP``), ``""`` when the run has one set."""
        return self.set_names.get(self.token_set(index), "")

    def token_indices(self, token: int, merge: bool) -> list[int]:
        """The stored token rows shown for ``token``: its whole word when ``merge`` and it has one, within
        the token's own set (a word of the prompt may appear in several sets, each set its own rows)."""
        if not 0 <= token < len(self.tokens):
            raise DatasetError(f"token {token} is outside this run's {len(self.tokens)} tokens")
        word = self.word_of(token)
        if not merge or word is None:
            return [token]
        own = self.token_set(token)
        return [i for i in range(len(self.tokens)) if self.word_of(i) == word and self.token_set(i) == own]

    def token_label(self, token: int, merge: bool) -> str:
        """``red``; with several token sets ``red · T5``."""
        indices = self.token_indices(token, merge)
        word = self.word_of(token)
        if merge and word is not None and word < len(self.words):
            text = self.words[word]
        else:
            text = "".join(self.token_text(i) for i in indices)
        where = self.set_label(token)
        return f"{text} · {where}" if where else text

    def token_options(self, merge: bool) -> dict[str, int]:
        """``{label: token index}`` for the token selector; with ``merge`` one entry per word."""
        options: dict[str, int] = {}
        seen_words: set[tuple[str, int]] = set()
        for i, token in enumerate(self.tokens):
            word = self.word_of(i)
            if merge and word is not None:
                if (self.token_set(i), word) in seen_words:
                    continue
                seen_words.add((self.token_set(i), word))
                parts = self.token_indices(i, True)
                label = self.token_label(i, True)
                if len(parts) > 1:
                    label += "  (" + " + ".join(self.token_text(p) for p in parts) + ")"
            else:
                label = self.token_label(i, False)
            label = f"{i}: {label}"
            options[label] = i
        return options

    def default_token(self) -> int:
        """The first content word of the prompt (not a special token, not a function word), else the first word."""
        return _words.default_token(self.tokens)

    def canonical_token(self, token: int, merge: bool) -> int:
        """The index the selector uses for ``token``: the word's first token when merging."""
        return self.token_indices(token, merge)[0]

    # ---- raw reads ------------------------------------------------------------------

    def image(self, step: int) -> np.ndarray:
        return self.run.image(int(step))

    def final_image(self) -> np.ndarray | None:
        """The pipeline's own output (schema 2), or None."""
        return self.run.final_image()

    def _check_step(self, step: int) -> int:
        step = int(step)
        if not 0 <= step < self.n_steps:
            raise DatasetError(f"step {step} is outside this run's {self.n_steps} steps")
        return step

    def _layer_index(self, layer: str | int, kind: str) -> int:
        try:
            index = int(layer)
        except (TypeError, ValueError):
            raise DatasetError(f"layer {layer!r} is not a layer index or {ALL_LAYERS!r}") from None
        if index not in self._layers_of(kind):
            raise DatasetError(f"layer {index} has no {kind}-attention maps in this run")
        return index

    def _layers_of(self, kind: str) -> list[int]:
        return {"cross": self.cross_layers, "self": self.self_layers, "text": self.text_layers}[kind]

    # ---- cross attention -------------------------------------------------------------

    def layer_cross(self, layer: int, step: int, head: str = MEAN_HEAD) -> np.ndarray:
        """One layer's stored maps ``[T, h, w]`` at ``step``: the mean over heads (``reader.cross``), or
        head ``head`` of that layer (``reader.cross_heads``). Every cross map of the app comes from here."""
        step = self._check_step(step)
        if head == MEAN_HEAD:
            return np.asarray(self.run.cross(int(layer), step), np.float32)
        k = self._head_index(int(layer), head)
        return np.asarray(self.run.cross_heads(int(layer), step)[k], np.float32)

    def _head_index(self, layer: int, head: str) -> int:
        if not self.per_head:
            raise DatasetError(f"head {head!r}: this run stores only the mean over heads")
        try:
            k = int(head)
        except (TypeError, ValueError):
            raise DatasetError(f"head {head!r} is not a head number or {MEAN_HEAD!r}") from None
        n = int(self.run.num_heads(layer) or 0)
        if not 0 <= k < n:
            raise DatasetError(f"layer {layer} has {n} heads: head {k} is not one of them")
        return k

    def cross_layer_map(self, layer: int, step: int, token: int, merge: bool, head: str = MEAN_HEAD) -> np.ndarray:
        """One layer's map for a token (or its word: sub-word maps summed), float32 ``[h, w]``."""
        maps = self.layer_cross(layer, step, head)
        rows = self.token_indices(token, merge)
        return np.asarray(maps[rows].sum(axis=0), dtype=np.float32)

    def cross_map(self, layer: str | int, step: int, token: int, merge: bool, head: str = MEAN_HEAD) -> np.ndarray:
        """The map shown for ``layer``: one layer's native map, or the mean over all cross layers at ``cross_grid``."""
        if not self.cross_layers:
            raise DatasetError("this run has no cross-attention maps")
        if str(layer) == ALL_LAYERS:
            return self.cross_all_tokens(ALL_LAYERS, step, head)[self.token_indices(token, merge)].sum(axis=0)
        return self.cross_layer_map(self._layer_index(layer, "cross"), step, token, merge, head)

    def cross_all_tokens(self, layer: str | int, step: int, head: str = MEAN_HEAD) -> np.ndarray:
        """Every stored token's map, ``[T, h, w]``: one layer's, or for ``mean`` each cross layer's maps
        resampled to ``cross_grid`` (bilinear) and averaged over layers (kept for the last few steps)."""
        step = self._check_step(step)
        if str(layer) != ALL_LAYERS:
            return self.layer_cross(self._layer_index(layer, "cross"), step, head)
        return self._memoised(("mean", step, head), lambda: self._layer_mean(step, head))

    def _layer_mean(self, step: int, head: str) -> np.ndarray:
        return _maps.mean_at((self.layer_cross(i, step, head) for i in self.cross_layers), self.cross_grid)

    def aggregate_all(self, first: int, last: int, head: str = MEAN_HEAD) -> np.ndarray:
        """Every token's DAAM map ``[T, h, w]``: the all-layer mean averaged over steps ``first..last``."""
        first, last = sorted((self._check_step(first), self._check_step(last)))
        return self._memoised(("aggregate", first, last, head), lambda: self._step_mean(first, last, head))

    def _step_mean(self, first: int, last: int, head: str) -> np.ndarray:
        acc = np.zeros((len(self.tokens),) + tuple(self.cross_grid), np.float32)
        for step in range(first, last + 1):
            acc += self.cross_all_tokens(ALL_LAYERS, step, head)
        return acc / (last - first + 1)

    def aggregate_map(self, token: int, merge: bool, first: int, last: int, head: str = MEAN_HEAD) -> np.ndarray:
        """DAAM's word heat map: the token's map averaged over all cross layers (at ``cross_grid``) and steps ``first..last``."""
        if not self.cross_layers:
            raise DatasetError("this run has no cross-attention maps")
        return self.aggregate_all(first, last, head)[self.token_indices(token, merge)].sum(axis=0)

    def _memoised(self, key: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``compute()``'s result, kept for the last ``MEMO_ITEMS`` keys (least recently used goes first)."""
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        value = self._memo[key] = compute()
        while len(self._memo) > self.MEMO_ITEMS:
            self._memo.popitem(last=False)
        return value

    # ---- text -> image ("where does this word look") ------------------------------------

    def layer_text_maps(self, layer: int, step: int) -> np.ndarray:
        """One layer's stored text->image maps ``[T, h, w]`` at ``step`` (row t: where token t's query looks)."""
        return np.asarray(self.run.text(self._layer_index(layer, "text"), self._check_step(step)), np.float32)

    def text_all_tokens(self, layer: str | int, step: int) -> np.ndarray:
        """Every token's text->image map ``[T, h, w]``: one layer's, or for ``mean`` each text layer's maps
        resampled to ``text_grid`` and averaged over layers, as :meth:`cross_all_tokens` does for cross maps."""
        step = self._check_step(step)
        if str(layer) != ALL_LAYERS:
            return self.layer_text_maps(int(self._layer_index(layer, "text")), step)
        return self._memoised(("text-mean", step),
                              lambda: _maps.mean_at((self.layer_text_maps(i, step) for i in self.text_layers), self.text_grid))

    def text_aggregate_all(self, first: int, last: int) -> np.ndarray:
        """Every token's text->image map averaged over all text layers and steps ``first..last`` (as DAAM)."""
        first, last = sorted((self._check_step(first), self._check_step(last)))

        def mean() -> np.ndarray:
            acc = np.zeros((len(self.tokens),) + tuple(self.text_grid), np.float32)
            for step in range(first, last + 1):
                acc += self.text_all_tokens(ALL_LAYERS, step)
            return acc / (last - first + 1)

        return self._memoised(("text-aggregate", first, last), mean)

    def text_heat(self, sel: Selection) -> Heat:
        """Where the selected word looks: its text->image map at the drawn layer (the selected one if it has text
        maps, else the mean over text layers) and step, or with DAAM the mean over text layers and the step range:
        the same choice of step and layer as the cross map. A word of several pieces (within its set) is the mean
        of their rows, so it is still one query's kind of distribution over the image cells. Text maps are
        stored as the mean over heads only."""
        if not self.text_layers:
            raise DatasetError("this run recorded no text->image maps")
        sel = self.fit_selection(sel)
        rows = self.token_indices(sel.token, sel.merge)
        label = self.token_label(sel.token, sel.merge)
        if sel.daam:
            stack, layer, step = self.text_aggregate_all(sel.first, sel.last), ALL_LAYERS, sel.last
            title = f"word → image · '{label}' · all {len(self.text_layers)} layers · steps {sel.first}–{sel.last}"
        else:
            layer, step = self.drawn_layer("text", sel.layer), sel.step
            stack = self.text_all_tokens(layer, step)
            title = f"word → image · '{label}' · {self.layer_text(layer)} · step {step}"
        raw = stack[rows].mean(axis=0)
        low, high = (0.0, float(stack.max())) if sel.shared else (float(raw.min()), float(raw.max()))
        if not high > low:
            high = low + 1e-6
        return Heat(map=np.asarray(raw, np.float32), low=low, high=high, title=title, step=step, layer=layer)

    # ---- self attention ----------------------------------------------------------------

    def probe_layer_map(self, layer: int, step: int, qx: float, qy: float) -> np.ndarray:
        """Where the query at fractional position ``(qx, qy)`` (top-left origin) attends, ``[sh, sw]``."""
        maps = self.run.self_attention(int(layer), self._check_step(step))
        return _maps.probe_row(maps, self.run.self_grid(int(layer)), qx, qy)

    def probe_map(self, layer: str | int, step: int, qx: float, qy: float) -> np.ndarray:
        if not self.self_layers:
            raise DatasetError("this run has no self-attention maps")
        if str(layer) == ALL_LAYERS:
            return _maps.mean_at((self.probe_layer_map(i, step, qx, qy) for i in self.self_layers), self.self_grid)
        return self.probe_layer_map(self._layer_index(layer, "self"), step, qx, qy)

    # ---- metrics ------------------------------------------------------------------------

    def steps(self) -> np.ndarray:
        return np.arange(self.n_steps)

    def metric_curve(self, name: str) -> np.ndarray:
        values = self.metrics.get(name)
        return np.asarray(values if values is not None else [np.nan] * self.n_steps, dtype=np.float64)

    def _per_layer(self, section: str, layer: str | int) -> np.ndarray | None:
        block = self.metrics.get(section)
        if not block:
            return None
        if str(layer) == ALL_LAYERS:
            return np.asarray(block.get("mean", []), dtype=np.float64)
        per_layer = block.get("per_layer") or []
        index = int(layer)
        # per_layer follows metadata.layers; runs with some layers lacking cross maps list cross layers only.
        if len(per_layer) == len(self.layers):
            row = per_layer[index]
        elif index in self.cross_layers and len(per_layer) == len(self.cross_layers):
            row = per_layer[self.cross_layers.index(index)]
        else:
            return None
        return None if row is None else np.asarray(row, dtype=np.float64)

    def entropy_curve(self, layer: str | int) -> np.ndarray | None:
        return self._per_layer("entropy", layer)

    def kl_curve(self, layer: str | int) -> np.ndarray | None:
        """KL(p_s || p_{s-1}) for steps 1..N-1 (``[N-1]``)."""
        return self._per_layer("kl_consecutive", layer)

    def pca_coords(self) -> np.ndarray:
        coords = self.pca.get("coords") or []
        return np.asarray(coords, dtype=np.float64).reshape(-1, 2)

    def pca_variance(self) -> tuple[float, float]:
        evr = list(self.pca.get("explained_variance_ratio") or [np.nan, np.nan]) + [np.nan, np.nan]
        return float(evr[0]), float(evr[1])

    # ---- what the views draw -------------------------------------------------------------

    def drawn_layer(self, kind: str, layer: str) -> str:
        """``layer`` if it has maps of ``kind``, else all layers."""
        layers = self._layers_of(kind)
        return layer if layer == ALL_LAYERS or (layer.isdigit() and int(layer) in layers) else ALL_LAYERS

    def layer_text(self, layer: str) -> str:
        return "all layers (mean)" if layer == ALL_LAYERS else f"L{layer} · {self.layer_label(int(layer))}"

    def fit_selection(self, sel: Selection) -> Selection:
        """``sel`` inside this run: step and range clamped, the token canonical, the head one the run has."""
        n = self.n_steps
        clamp = lambda v: min(max(int(v), 0), n - 1)  # noqa: E731
        token = sel.token if 0 <= sel.token < len(self.tokens) else self.default_token()
        return replace(sel, step=clamp(sel.step), first=clamp(sel.first), last=clamp(sel.last),
                       token=self.canonical_token(token, sel.merge), head=self.fit_head(sel.head))

    def heat(self, sel: Selection) -> Heat:
        """The heat map for ``sel``: the token's cross map (one layer, or the layer mean), the DAAM aggregate,
        or the self-attention probe. Raises :class:`DatasetError` naming the file when one cannot be read."""
        sel = self.fit_selection(sel)
        layer = self.drawn_layer(sel.kind, sel.layer)
        if sel.kind == "self":
            if not self.self_layers:
                raise DatasetError("this run recorded no self-attention maps")
            raw = self.probe_map(layer, sel.step, sel.qx, sel.qy)
            title = f"self · {self.layer_text(layer)} · query ({sel.qx:.2f}, {sel.qy:.2f}) · step {sel.step}"
            high = self.self_max(layer, sel.step) if sel.shared else 0.0
            step = sel.step
        else:
            if not self.cross_layers:
                raise DatasetError("this run recorded no cross-attention maps")
            label = self.token_label(sel.token, sel.merge)
            head_text = f" · {self.head_label(sel.head)}" if self.per_head else ""
            if sel.daam:
                raw = self.aggregate_map(sel.token, sel.merge, sel.first, sel.last, sel.head)
                layer = ALL_LAYERS
                title = f"DAAM · '{label}' · all {len(self.cross_layers)} layers{head_text} · steps {sel.first}–{sel.last}"
                high = float(self.aggregate_all(sel.first, sel.last, sel.head).max()) if sel.shared else 0.0
                step = sel.last
            else:
                raw = self.cross_map(layer, sel.step, sel.token, sel.merge, sel.head)
                title = f"cross · '{label}' · {self.layer_text(layer)}{head_text} · step {sel.step}"
                high = float(self.cross_all_tokens(layer, sel.step, sel.head).max()) if sel.shared else 0.0
                step = sel.step
        low, high = (0.0, high) if sel.shared else (float(np.min(raw)), float(np.max(raw)))
        if not high > low:
            high = low + 1e-6
        return Heat(map=np.asarray(raw, np.float32), low=low, high=high, title=title, step=step, layer=layer)

    def short_title(self, sel: Selection, heat: Heat) -> str:
        """``'red' · L1 · step 2``: a small figure's title naming what is drawn."""
        what = "probe" if sel.kind == "self" else f"'{self.token_label(sel.token, sel.merge)}'"
        layer = "all layers" if heat.layer == ALL_LAYERS else f"L{heat.layer}"
        when = f"steps {sel.first}–{sel.last}" if sel.daam else f"step {heat.step}"
        return f"{what} · {layer} · {when}"

    def self_max(self, layer: str, step: int) -> float:
        layers = self.self_layers if layer == ALL_LAYERS else [int(layer)]
        return float(max(np.max(self.run.self_attention(i, step)) for i in layers))

    def shares(self, sel: Selection) -> tuple[np.ndarray, str]:
        """Each prompt token's share of the attention mass, from the same maps as the heat map: one step at
        the drawn layer, or (DAAM) the aggregate over the step range. ``(shares [T], where)``."""
        sel = self.fit_selection(sel)
        if sel.daam:
            stack = self.aggregate_all(sel.first, sel.last, sel.head)
            where = f"all layers · steps {sel.first}–{sel.last}"
        else:
            layer = self.drawn_layer("cross", sel.layer)
            stack = self.cross_all_tokens(layer, sel.step, sel.head)
            where = f"{'all layers' if layer == ALL_LAYERS else f'L{layer}'} · step {sel.step}"
        if self.per_head:
            where += f" · {self.head_label(sel.head)}"
        return _metrics.token_distribution(stack), where

    def entropies(self, sel: Selection) -> tuple[list[str], np.ndarray, str]:
        """Entropy of every cross layer: at the step, or (DAAM) its mean over the step range."""
        sel = self.fit_selection(sel)
        steps = range(sel.first, sel.last + 1) if sel.daam else [sel.step]
        labels, values = [], []
        for index in self.cross_layers:
            curve = self.entropy_curve(index)
            labels.append(f"L{index}")
            picked = [float(curve[s]) for s in steps if curve is not None and s < len(curve)]
            values.append(float(np.mean(picked)) if picked else np.nan)
        where = f"steps {sel.first}–{sel.last} (mean)" if sel.daam else f"step {sel.step}"
        return labels, np.asarray(values, np.float64), where

    # ---- playback ------------------------------------------------------------------------

    def prefetch(self, step: int, layer: str | int, kind: str, head: str = MEAN_HEAD) -> None:
        """Warm the reader's cache for ``step`` (image and the maps the attention view will read)."""
        if not 0 <= step < self.n_steps:
            return
        self.run.image(step)
        if kind == "self":
            layers = self.self_layers if str(layer) == ALL_LAYERS else [int(layer)]
            for index in layers:
                self.run.self_attention(index, step)
        else:
            layers = self.cross_layers if str(layer) == ALL_LAYERS else [int(layer)]
            for index in layers:
                self.layer_cross(index, step, head)
            drawn = self.drawn_layer("text", str(layer))
            for index in self.text_layers if drawn == ALL_LAYERS else [int(drawn)]:
                self.run.text(index, step)


# --------------------------------------------------------------------------- two runs


def _compatibility(a: RunData, b: RunData) -> list[str]:
    """What differs between the runs in ways the comparison cannot bridge ([] when comparable)."""
    verdict = _reader.compatible(a.run, b.run)
    if isinstance(verdict, tuple) and len(verdict) == 2 and isinstance(verdict[0], bool):
        return [] if verdict[0] else [str(v) for v in (verdict[1] if isinstance(verdict[1], (list, tuple)) else [verdict[1]])]
    if isinstance(verdict, bool):
        return [] if verdict else ["the runs are not compatible"]
    if isinstance(verdict, str):
        return [verdict] if verdict else []
    return [str(v) for v in (verdict or [])]


class Comparison:
    """Two runs side by side. All arrays are computed lazily and kept."""

    def __init__(self, a: RunData, b: RunData):
        self.a, self.b = a, b
        self.differences = _compatibility(a, b)
        self.ok = not self.differences
        #: how the two runs' settings differ (seed, cfg, steps, scheduler, model, size, prompt), one line each
        self.settings: list[str] = _reader.run_differences(a.metadata, b.metadata)
        self.pairs, self.pairing = self._pair_tokens()
        self._js: tuple[np.ndarray, np.ndarray] | None = None
        self._js_error: str | None = None
        self._traj: tuple[np.ndarray, np.ndarray, tuple[float, float], str] | None = None
        self._delta: tuple[np.ndarray, str, str] | None = None

    def _pair_tokens(self) -> tuple[list[tuple[int, int, str]], str]:
        """Which token of run A is compared with which of run B: by position when the counts match
        (the label shows both texts where they differ, e.g. ``red/blue``), else by equal text."""
        ta = [self.a.token_text(i) for i in range(len(self.a.tokens))]
        tb = [self.b.token_text(i) for i in range(len(self.b.tokens))]
        if len(ta) == len(tb):
            pairs = [(i, i, x if x == y else f"{x}/{y}") for i, (x, y) in enumerate(zip(ta, tb))]
            how = "same tokens" if ta == tb else "prompts differ: tokens paired by position"
            return pairs, how
        pairs, used = [], set()
        for i, text in enumerate(ta):
            for j, other in enumerate(tb):
                if j not in used and other == text:
                    pairs.append((i, j, text))
                    used.add(j)
                    break
        return pairs, "token counts differ: tokens paired by equal text"

    def selection_b(self, sel: Selection) -> Selection:
        """``sel`` for run B: the same step, the layer of the same name, the paired token (its word's first)."""
        b = self.b
        if sel.step >= b.n_steps:
            raise DatasetError(f"run B has {b.n_steps} steps: no step {sel.step}")
        layer = sel.layer
        if layer != ALL_LAYERS:
            layer = str(b.run.layer_index(self.a.layers[int(layer)]["name"]))
        rows = self.a.token_indices(sel.token, sel.merge) if sel.kind == "cross" else [sel.token]
        paired = [j for i, j, _text in self.pairs if i == rows[0]]
        if sel.kind == "cross" and not paired:
            raise DatasetError(f"token '{self.a.token_label(sel.token, sel.merge)}' has no counterpart in run B")
        return replace(sel, layer=layer, token=paired[0] if paired else sel.token)

    def heat_pair(self, sel: Selection, heat_a: Heat | None = None) -> tuple[Heat, Heat, Heat]:
        """A's map, B's map (same token, layer, step) on one colour scale, and A − B (B resampled to A's grid)
        on a symmetric scale; ``heat_a``: A's map for ``sel`` when already drawn. Raises :class:`DatasetError`
        when B's map cannot be drawn."""
        sel = self.a.fit_selection(sel)
        sel_b = self.selection_b(sel)
        heat_a = heat_a if heat_a is not None else self.a.heat(sel)
        heat_b = self.b.heat(sel_b)
        low, high = _maps.shared_range(heat_a.map, heat_b.map)
        low = min(low, 0.0)
        diff = _maps.difference(heat_a.map, heat_b.map)
        d_low, d_high = _maps.symmetric_range(diff)
        title_step = f"step {heat_a.step}" if not sel.daam else f"steps {sel.first}–{sel.last}"
        return (replace(heat_a, low=low, high=high, title=f"A · {self.a.short_title(sel, heat_a)}"),
                replace(heat_b, low=low, high=high, title=f"B · {self.b.short_title(sel_b, heat_b)}"),
                Heat(map=diff, low=d_low, high=d_high, title=f"A − B · {title_step}", step=heat_a.step, layer=heat_a.layer))

    def js(self) -> tuple[np.ndarray, np.ndarray]:
        """``(per_token [N, L, P], grid [N, L])``: JS divergence (base 2) of each paired token's spatial map
        (``analysis.divergence.map_js_divergence``), and its mean over the paired non-special tokens.
        ``L`` runs over ``a.cross_layers``; unpaired or non-comparable runs give NaN. A failure (an unreadable
        map) is kept too: every later call raises it again without reading the runs' maps again."""
        if self._js_error is not None:
            raise DatasetError(self._js_error)
        if self._js is None:
            try:
                self._js = self._compute_js()
            except Exception as exc:  # noqa: BLE001 - kept as one line; the caller shows it
                self._js_error = one_line(exc)
                raise DatasetError(self._js_error) from None
        return self._js

    def _compute_js(self) -> tuple[np.ndarray, np.ndarray]:
        n, layers, pairs = self.a.n_steps, self.a.cross_layers, self.pairs
        per_token = np.full((n, len(layers), len(pairs)), np.nan)
        if self.ok and pairs:
            rows_a = [p[0] for p in pairs]
            rows_b = [p[1] for p in pairs]
            # layers are matched by name (the reader's ``compatible`` checked both have them)
            layers_b = [self.b.run.layer_index(self.a.layers[layer]["name"]) for layer in layers]
            for s in range(n):
                for li, (layer, layer_b) in enumerate(zip(layers, layers_b)):
                    ma = self.a.run.cross(layer, s)[rows_a]
                    mb = self.b.run.cross(layer_b, s)[rows_b]
                    per_token[s, li] = _divergence.map_js_divergence(ma, mb)
        words = [k for k, (i, _j, _t) in enumerate(pairs) if not self.a.tokens[i].get("special")]
        cols = words or list(range(len(pairs)))
        grid = per_token[:, :, cols].mean(axis=2) if cols else np.full((n, len(layers)), np.nan)
        return per_token, grid

    def trajectories(self) -> tuple[np.ndarray, np.ndarray, tuple[float, float], str]:
        """Both runs' latent paths on one basis: ``(coords_a [N, 2], coords_b [N, 2], (evr1, evr2), how)``."""
        if self._traj is None:
            la, lb = self.a.run.latents(), self.b.run.latents()
            if la is not None and lb is not None and np.shape(la[0])[1:] == np.shape(lb[0])[1:]:
                xa = np.asarray(la[0][1:], np.float64).reshape(len(la[0]) - 1, -1)
                xb = np.asarray(lb[0][1:], np.float64).reshape(len(lb[0]) - 1, -1)
                fit = _trajectory.pca_2d(np.concatenate([xa, xb]))
                ca = np.asarray(_trajectory.project(xa, fit))
                cb = np.asarray(_trajectory.project(xb, fit))
                evr = tuple(float(v) for v in fit.explained_variance_ratio[:2])
                how = "shared basis: PCA fit on both runs' latents (after each step) together"
            else:
                missing = [r.label for r, l in ((self.a, la), (self.b, lb)) if l is None]
                ca, cb = self.a.pca_coords(), self.b.pca_coords()
                evr = (float("nan"), float("nan"))
                why = f"no {'latents_noise_fp16.npz'} in {', '.join(missing)}" if missing else "latent shapes differ"
                how = f"no shared basis ({why}): each run's own PCA from latent_pca.json, axes not comparable"
            self._traj = (ca, cb, evr, how)
        return self._traj

    def latent_delta(self) -> tuple[np.ndarray, str, str]:
        """Per-step difference of the latents: ``(values [N], y label, how)``."""
        if self._delta is None:
            la, lb = self.a.run.latents(), self.b.run.latents()
            n = min(self.a.n_steps, self.b.n_steps)
            if la is not None and lb is not None and np.shape(la[0]) [1:] == np.shape(lb[0])[1:]:
                xa = np.asarray(la[0][1 : n + 1], np.float64).reshape(n, -1)
                xb = np.asarray(lb[0][1 : n + 1], np.float64).reshape(n, -1)
                values = np.linalg.norm(xa - xb, axis=1)
                self._delta = (values, "‖x_A − x_B‖₂", "L2 norm of the latent difference after each step")
            else:
                na = self.a.metric_curve("latent_norm")[:n]
                nb = self.b.metric_curve("latent_norm")[:n]
                self._delta = (na - nb, "‖x_A‖ − ‖x_B‖", "no latents file: difference of the latent norms from metrics.json")
        return self._delta


# --------------------------------------------------------------------------- the store


class Store(param.Parameterized):
    """The open runs and uploads of one dashboard session."""

    run = param.Parameter(default=None, doc="RunData of the main run, or None")
    other = param.Parameter(default=None, doc="RunData of the comparison run, or None")
    comparison = param.Parameter(default=None, doc="Comparison of run and other, or None")

    def __init__(self, cache_mb: int | None = None, opener: Callable[..., Any] | None = None, **params):
        super().__init__(**params)
        self.cache_mb = int(cache_mb) if cache_mb else cache_mb_from_env()
        self.uploads: dict[str, dict[str, bytes]] = {}
        self._open = opener or _reader.open_run

    def add_upload(self, filenames: list[str], contents: list[bytes]) -> str:
        """Keep an uploaded folder; returns the ``upload:NAME`` source for the state."""
        folder, files = files_from_upload(filenames, contents)
        name, n = folder, 1
        while name in self.uploads and self.uploads[name] != files:
            n += 1
            name = f"{folder}-{n}"
        self.uploads[name] = files
        return UPLOAD_PREFIX + name

    def open(self, text: str) -> RunData:
        """Open ``text`` as a run (raises; nothing is replaced)."""
        source = resolve_source(text, self.uploads)
        run = self._open(source, cache_mb=self.cache_mb)
        check_schema(run, str(text).strip())
        data = RunData(run, label=str(text).strip())
        if data.n_steps == 0:
            raise DatasetError(f"{text}: the run has no steps")
        return data

    def set_run(self, data: RunData | None) -> None:
        self.param.update(run=data, comparison=self._compare(data, self.other))

    def set_other(self, data: RunData | None) -> None:
        self.param.update(other=data, comparison=self._compare(self.run, data))

    @staticmethod
    def _compare(a: RunData | None, b: RunData | None) -> Comparison | None:
        return Comparison(a, b) if a is not None and b is not None else None
