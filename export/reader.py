"""Read a run lazily from a folder, a URL or uploaded bytes, with a bounded LRU cache.

    run = open_run("datasets/default")             # folder (CPython)
    run = open_run("https://host/datasets/default")  # URL (CPython: urllib; Pyodide: sync XHR)
    run = open_run("datasets/default")             # under Pyodide: a URL relative to the page/worker
    run = open_run({"run/metadata.json": b"...", ...})  # uploaded files, with or without the folder prefix

    run.metadata, run.metrics, run.pca      # read up front
    run.cross(layer, step)                  # float32 [T, h, w], always the head-mean; read on first use, then cached
    run.cross_heads(layer, step)            # float32 [heads, T, h, w] (per-head runs only)
    run.self_attention(layer, step)         # float32 [sh*sw, sh*sw]
    run.image(step)                         # uint8 [H, W, 3]
    run.final_image()                       # uint8 [H, W, 3], the pipeline's own output, or None (schema 1)
    run.latents()                           # (latents [N+1, C, h, w], noise [N, C, h, w]) float32, or None
    run.schema_version, run.family, run.per_head, run.num_heads(layer), run.self_grid(layer),
    run.cross_grid(layer), run.image_size   # schema 1 runs get schema-2 answers (family: contract.V1_FAMILY)

Each source only implements ``read_bytes(relpath, limit) -> bytes`` (whole files: HTTP range requests are
never assumed), refusing more than ``limit`` bytes. Every read is bounded before it starts
(``export.bounded``: regular files only, the manifest's byte count, the contract's caps); maps with NaN/Inf
are refused when read. Arrays handed out are read-only, because the cache shares them. Every problem
with the data raises :class:`export.contract.DatasetError` with one line naming it.
"""
from __future__ import annotations

import copy
import io
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import quote, urljoin, urlsplit

import numpy as np

from . import bounded, contract
from .contract import DatasetError


def in_pyodide() -> bool:
    return sys.platform == "emscripten"


# ============================================================================ sources
class Source(Protocol):
    name: str

    def read_bytes(self, relpath: str, limit: int) -> bytes: ...


class FolderSource:
    """Files of a run folder on disk; refuses paths that leave the folder (``..``, symlinks)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{root}: no such folder" if not self.root.exists() else f"{root}: not a folder")
        self.name = self.root.resolve().name
        self.description = str(self.root)

    def read_bytes(self, relpath: str, limit: int) -> bytes:
        try:
            return bounded.read_file(self.root, relpath, limit=limit)
        except bounded.MissingFile:
            raise DatasetError(f"{relpath}: missing from {bounded.folder_name(self.root)}") from None


def fetch_urllib(url: str, limit: int, timeout: float = 30.0) -> bytes:
    """GET a whole file with urllib (CPython), refusing a body over ``limit`` bytes before reading it."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise DatasetError(f"{url}: {length} bytes, over the cap of {limit}")
            data = resp.read(limit + 1)
            if len(data) > limit:
                raise DatasetError(f"{url}: more than {limit} bytes, over the cap")
            return data
    except urllib.error.HTTPError as exc:
        raise DatasetError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DatasetError(f"{url}: cannot fetch: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{url}: cannot fetch: {exc}") from None


def fetch_pyodide(url: str, limit: int) -> bytes:
    """GET a whole file inside a Pyodide web worker.

    The same synchronous ``XMLHttpRequest`` as ``panel.io.pyodide.fetch_binary`` (which needs a
    worker too), plus the HTTP status check it lacks: without it a 404 page would come back as data.
    A synchronous XHR cannot stop early, so the cap is checked once the browser has the body.
    """
    try:
        from js import XMLHttpRequest  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - only reachable outside a browser
        raise DatasetError(f"{url}: no XMLHttpRequest in this Python") from None
    xhr = XMLHttpRequest.new()
    try:
        xhr.open("GET", url, False)
        xhr.responseType = "arraybuffer"
        xhr.send()
    except Exception as exc:
        raise DatasetError(f"{url}: cannot fetch: {exc}; URL datasets need the pyodide-worker build") from None
    status = int(xhr.status)
    if status == 0 and xhr.response is None:
        raise DatasetError(f"{url}: cannot fetch (network error or blocked by CORS)")
    if status != 0 and not 200 <= status < 300:
        raise DatasetError(f"{url}: HTTP {status} {xhr.statusText}")
    data = bytes(xhr.response.to_py())
    if len(data) > limit:
        raise DatasetError(f"{url}: {len(data)} bytes, over the cap of {limit}")
    return data


class URLSource:
    """Files under a base URL. Under CPython ``urllib``; under Pyodide (``sys.platform ==
    "emscripten"``) a synchronous XHR, where a relative base resolves against the worker's URL."""

    def __init__(self, base: str, fetch: Callable[[str, int], bytes] | None = None):
        if not base:
            raise DatasetError("empty dataset URL")
        self.base = base if base.endswith("/") else base + "/"
        self.fetch = fetch or (fetch_pyodide if in_pyodide() else fetch_urllib)
        self.name = urlsplit(self.base).path.rstrip("/").rsplit("/", 1)[-1] or self.base
        self.description = base

    def url(self, relpath: str) -> str:
        return urljoin(self.base, quote(contract.check_relative_path(relpath)))

    def read_bytes(self, relpath: str, limit: int) -> bytes:
        return self.fetch(self.url(relpath), limit)


class BytesSource:
    """Uploaded files ``{relative_path: bytes}``.

    Paths may carry the run folder's name (``FileInput(directory=True)`` gives
    ``run/metadata.json``) or not; the prefix is taken from the shallowest ``metadata.json``.
    """

    def __init__(self, files: Mapping[str, Any], name: str = "uploaded"):
        norm = {str(k).replace("\\", "/").lstrip("/"): v for k, v in files.items()}
        norm = {(k[2:] if k.startswith("./") else k): v for k, v in norm.items()}
        metas = [k for k in norm if k == contract.METADATA_FILE or k.endswith("/" + contract.METADATA_FILE)]
        if not metas:
            raise DatasetError(f"the uploaded files hold no {contract.METADATA_FILE}; upload a run folder")
        depth = min(k.count("/") for k in metas)
        top = sorted(k for k in metas if k.count("/") == depth)
        if len(top) > 1:
            runs = ", ".join(k[: -len(contract.METADATA_FILE)] or "." for k in top)
            raise DatasetError(f"the uploaded files hold several runs ({runs}); upload one run folder")
        prefix = top[0][: -len(contract.METADATA_FILE)]
        self.files = {k[len(prefix):]: v for k, v in norm.items() if k.startswith(prefix)}
        self.name = prefix.rstrip("/").rsplit("/", 1)[-1] or name
        self.description = f"uploaded files ({self.name})"

    def read_bytes(self, relpath: str, limit: int) -> bytes:
        contract.check_relative_path(relpath)
        try:
            data = self.files[relpath]
        except KeyError:
            raise DatasetError(f"{relpath}: not among the uploaded files") from None
        if len(data) > limit:
            raise DatasetError(f"{relpath}: {len(data)} bytes, over the cap of {limit}")
        return bytes(data)


def as_source(source: Any) -> Source:
    """A :class:`Source` for a folder path, an http(s)/file or (under Pyodide) relative URL, a mapping, or a Source."""
    if hasattr(source, "read_bytes") and not isinstance(source, (str, os.PathLike, Mapping)):
        return source
    if isinstance(source, Mapping):
        return BytesSource(source)
    if isinstance(source, os.PathLike):
        return FolderSource(source)
    if isinstance(source, str):
        scheme = urlsplit(source).scheme.lower()
        if scheme == "file" and not in_pyodide():
            return FolderSource(file_url_path(source))
        if scheme in ("http", "https", "file") or (in_pyodide() and len(scheme) != 1):
            return URLSource(source)
        return FolderSource(source)
    raise DatasetError(f"cannot open a run from {type(source).__name__}")


def file_url_path(url: str) -> str:
    """The local folder a ``file://`` URL names. It is read as a folder, through the bounded reader (urllib would
    open a FIFO and wait on it, and read a file of any size)."""
    from urllib.request import url2pathname

    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DatasetError(f"{url}: a file URL on another host ({parts.netloc}) cannot be read")
    if parts.query or parts.fragment:
        raise DatasetError(f"{url}: a file URL with a query or fragment")
    return url2pathname(parts.path)


# ============================================================================ cache
class LRUCache:
    """Least-recently-used cache bounded by total ``nbytes`` (never exceeds ``max_bytes``)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> Any:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: str, value: Any, nbytes: int) -> None:
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        if nbytes > self.max_bytes:
            return  # larger than the whole cache: hand it out uncached
        while self._items and self.bytes + nbytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.bytes -= size
            self.evictions += 1
        self._items[key] = (value, nbytes)
        self.bytes += nbytes

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes, "max_bytes": self.max_bytes,
                "items": len(self._items), "evictions": self.evictions}


# ============================================================================ run
_REQUIRED = {"run": dict, "tokens": list, "timesteps": list, "layers": list, "files": dict, "attention": dict}


class Run:
    """One recorded run. See the module docstring."""

    def __init__(self, source: Source, cache_mb: float = 256):
        self.source = source
        self.name = getattr(source, "name", "run")
        self.cache = LRUCache(int(cache_mb * 2**20))
        name = contract.METADATA_FILE
        meta = bounded.parse_json(name, source.read_bytes(name, contract.MAX_JSON_BYTES[name]))
        if not isinstance(meta, dict):
            raise DatasetError(f"{contract.METADATA_FILE}: not a JSON object")
        contract.known_schema_version(meta)
        over = bounded.metadata_bounds(meta)
        if over:
            raise DatasetError(over[0] + (f" (and {len(over) - 1} more)" if len(over) > 1 else ""))
        for key, typ in _REQUIRED.items():
            if not isinstance(meta.get(key), typ):
                raise DatasetError(f"{contract.METADATA_FILE}: {key!r} is missing or not a {typ.__name__}")
        for rel, entry in meta["files"].items():
            contract.check_relative_path(rel)
            if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or isinstance(entry["bytes"], bool):
                raise DatasetError(f"{contract.METADATA_FILE}: manifest entry {contract.shown(rel)} has no byte count")
            cap = contract.kind_byte_cap(str(entry.get("kind")), rel)
            if not 0 <= entry["bytes"] <= cap:
                raise DatasetError(f"{contract.METADATA_FILE}: manifest entry {contract.shown(rel)}: {entry['bytes']} bytes, "
                                   f"over the cap of {cap}")
        self.metadata: dict[str, Any] = meta
        self.metrics: dict[str, Any] = self._json(contract.METRICS_FILE)
        self.pca: dict[str, Any] = self._json(contract.PCA_FILE)

    def __repr__(self) -> str:
        return f"<Run {self.name!r}: {self.num_steps} steps, {self.num_layers} layers, {self.num_tokens} tokens>"

    # ------------------------------------------------------------------ shape of the run
    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.metadata["files"]

    @property
    def num_steps(self) -> int:
        return len(self.metadata["timesteps"])

    @property
    def timesteps(self) -> list:
        return list(self.metadata["timesteps"])

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.metadata["layers"]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.layers]

    @property
    def tokens(self) -> list[str]:
        return [tok["text"] for tok in self.metadata["tokens"]]

    @property
    def num_tokens(self) -> int:
        return len(self.metadata["tokens"])

    @property
    def schema_version(self) -> int:
        return int(self.metadata["schema_version"])

    @property
    def family(self) -> dict[str, Any]:
        """``metadata.family``; schema 1 runs are all Stable Diffusion (``contract.V1_FAMILY``, a fresh copy)."""
        if self.schema_version == 1:
            return copy.deepcopy(contract.V1_FAMILY)
        family = self.metadata.get("family")
        if not isinstance(family, dict):
            raise DatasetError(f"{contract.METADATA_FILE}: 'family' is missing or not a dict")
        return family

    @property
    def per_head(self) -> bool:
        return self.metadata["attention"].get("heads") == contract.HEADS_PER_HEAD

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the generated image (``run.height``, ``run.width``)."""
        return int(self.metadata["run"]["height"]), int(self.metadata["run"]["width"])

    def _layer(self, layer: int) -> dict[str, Any]:
        self._check_index(layer, None)
        return self.layers[int(layer)]

    def num_heads(self, layer: int) -> int | None:
        """The layer's stored heads in a per-head run; None when maps are head-means."""
        meta = self._layer(layer)  # index checked either way
        return int(meta["heads"]) if self.per_head else None

    def cross_grid(self, layer: int) -> tuple[int, int]:
        """``(h, w)`` of the layer's stored cross maps."""
        shape = self._layer(layer)["cross_shape"]
        if not shape:
            raise DatasetError(f"layer {layer}: cross attention was not recorded")
        return int(shape[-2]), int(shape[-1])

    def self_grid(self, layer: int) -> tuple[int, int]:
        """``(sh, sw)`` of the layer's stored self maps (schema 1: square, from ``self_shape``)."""
        meta = self._layer(layer)
        if not meta["self_shape"]:
            raise DatasetError(f"layer {layer}: self attention was not recorded")
        if self.schema_version >= 2:
            grid = meta.get("self_grid")
            if not isinstance(grid, list) or len(grid) != 2:
                raise DatasetError(f"{contract.METADATA_FILE}: layers[{layer}].self_grid is missing or not [sh, sw]")
            return int(grid[0]), int(grid[1])
        side = math.isqrt(int(meta["self_shape"][0]))
        return side, side

    @property
    def has_cross(self) -> bool:
        return bool(self.metadata["attention"].get("cross", {}).get("enabled"))

    @property
    def has_self(self) -> bool:
        return bool(self.metadata["attention"].get("self", {}).get("enabled"))

    @property
    def has_text(self) -> bool:
        """Text->image maps recorded (joint layers of MM-DiT runs)."""
        return bool(self.metadata["attention"].get("text", {}).get("enabled"))

    @property
    def has_concept(self) -> bool:
        """Output-space concept maps recorded (``--concept-maps``)."""
        return bool(self.metadata["attention"].get("concept", {}).get("enabled"))

    @property
    def token_sets(self) -> list[dict[str, Any]]:
        """``metadata.token_sets`` (schema 1: none)."""
        return list(self.metadata.get("token_sets") or [])

    def layer_kind(self, layer: int) -> str:
        """One of ``contract.LAYER_KINDS`` (``unet``, ``cross-dit``, ``joint``, ``single``; schema 1 runs are UNet runs)."""
        return contract.layer_kind(self._layer(layer))

    def computed(self, layer: int, step: int) -> bool:
        """Whether ``layer`` was computed at ``step``. False where a caching hook skipped its block: that step has
        no maps for the layer (reading one raises ``DatasetError`` saying so)."""
        self._check_index(layer, step)
        flags = self._layer(layer).get("computed")
        return True if flags is None else bool(flags[int(step)])

    @property
    def output_size(self) -> tuple[int, int]:
        """``(H, W)`` of ``images/final.png``: ``run.output_size`` where the pipeline resized its output (resolution
        binning), else :attr:`image_size`."""
        size = self.metadata["run"].get("output_size")
        return (int(size[0]), int(size[1])) if size else self.image_size

    def layer_index(self, name: str) -> int:
        try:
            return self.layer_names.index(name)
        except ValueError:
            raise DatasetError(f"layer {name!r} is not in this run") from None

    # ------------------------------------------------------------------ reading
    def _json(self, name: str) -> Any:
        if name not in self.files:
            raise DatasetError(f"{name}: not in the manifest")
        doc = bounded.parse_json(name, self.read_bytes(name))
        over = bounded.list_bounds(name, doc)
        if over:
            raise DatasetError(over)
        return doc

    def read_bytes(self, relpath: str) -> bytes:
        """The raw bytes of a listed file, checked against the manifest's byte count (not cached)."""
        entry = self.files.get(relpath)
        if entry is None:
            raise DatasetError(f"{relpath}: not in this run's manifest")
        data = self.source.read_bytes(relpath, entry["bytes"])  # within its kind's cap: checked at open
        if len(data) != entry["bytes"]:
            raise DatasetError(f"{relpath}: {len(data)} bytes, the manifest says {entry['bytes']}")
        return data

    def _check_index(self, layer: int | None, step: int | None) -> None:
        if step is not None and not 0 <= int(step) < self.num_steps:
            raise IndexError(f"step {step} is out of range 0..{self.num_steps - 1}")
        if layer is not None and not 0 <= int(layer) < self.num_layers:
            raise IndexError(f"layer {layer} is out of range 0..{self.num_layers - 1}")

    def _cached(self, key: str, load: Callable[[], Any]) -> Any:
        value = self.cache.get(key)
        if value is None:
            value = load()
            nbytes = sum(a.nbytes for a in value) if isinstance(value, tuple) else value.nbytes
            self.cache.put(key, value, nbytes)
        return value

    def _map(self, relpath: str, kind: str) -> np.ndarray:
        def load() -> np.ndarray:
            entry = self.files.get(relpath)
            if entry is None:
                skipped = self._skipped_map(relpath)
                if skipped is not None:
                    raise DatasetError(f"{relpath}: layer {skipped[0]} was not computed at step {skipped[1]} "
                                       f"(a caching hook skipped its block; see Run.computed)")
                raise DatasetError(f"{relpath}: not in this run's manifest ({kind} attention not recorded?)")
            shape = entry.get("shape")
            if entry.get("dtype") != contract.BIN_DTYPE or not isinstance(shape, list) or len(shape) > contract.MAX_RANK:
                raise DatasetError(f"{relpath}: manifest lacks dtype {contract.BIN_DTYPE!r} and a shape")
            expected = contract.shape_bytes(shape)
            if expected != entry["bytes"]:
                raise DatasetError(f"{relpath}: the manifest says {entry['bytes']} bytes, shape {shape} needs {expected}")
            arr = np.frombuffer(self.read_bytes(relpath), contract.BIN_DTYPE).reshape(shape).astype(np.float32)
            bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise DatasetError(f"{relpath}: {bad} non-finite values (NaN/Inf)")
            arr.flags.writeable = False
            return arr

        return self._cached(relpath, load)

    def _skipped_map(self, relpath: str) -> tuple[int, int] | None:
        """``(layer, step)`` when ``relpath`` is a map of a step its layer did not compute."""
        for layer in self.layers:
            for step, done in enumerate(layer.get("computed") or []):
                if not done and any(relpath == contract.map_path(k, layer["index"], step) for k in contract.MAP_KINDS):
                    return int(layer["index"]), step
        return None

    def cross(self, layer: int, step: int) -> np.ndarray:
        """Cross-attention map of the prompt's tokens, float32 ``[T, h, w]`` (read-only); always the
        mean over heads, so callers need not know whether the run stored heads."""
        self._check_index(layer, step)
        rel = contract.cross_path(layer, step)
        stored = self._map(rel, contract.KIND_CROSS)
        if stored.ndim != 4:
            return stored

        def mean() -> np.ndarray:
            arr = stored.mean(axis=0, dtype=np.float32)
            arr.flags.writeable = False
            return arr

        return self._cached(rel + "#mean", mean)

    def cross_heads(self, layer: int, step: int) -> np.ndarray:
        """Per-head cross-attention maps, float32 ``[heads, T, h, w]`` (read-only); DatasetError unless per-head."""
        self._check_index(layer, step)
        if not self.per_head:
            raise DatasetError("this run stores head-mean cross maps (attention.heads is not 'per_head'); no per-head maps")
        rel = contract.cross_path(layer, step)
        stored = self._map(rel, contract.KIND_CROSS)
        if stored.ndim != 4:
            raise DatasetError(f"{rel}: shape {list(stored.shape)} is not [heads, T, h, w]")
        return stored

    def self_attention(self, layer: int, step: int) -> np.ndarray:
        """Pooled self-attention map, float32 ``[s*s, s*s]`` (query grid x key grid, read-only)."""
        self._check_index(layer, step)
        return self._map(contract.self_path(layer, step), contract.KIND_SELF)

    def text(self, layer: int, step: int) -> np.ndarray:
        """Where each token looks: its text->image map, float32 ``[T, h, w]`` (read-only; joint layers)."""
        self._check_index(layer, step)
        return self._map(contract.map_path(contract.KIND_TEXT, layer, step), contract.KIND_TEXT)

    def concept(self, layer: int, step: int) -> np.ndarray:
        """Output-space concept maps, float32 ``[T, h, w]`` (read-only; ``--concept-maps`` runs)."""
        self._check_index(layer, step)
        return self._map(contract.map_path(contract.KIND_CONCEPT, layer, step), contract.KIND_CONCEPT)

    def image(self, step: int) -> np.ndarray:
        """The decoded x̂0 preview of a step, uint8 ``[H, W, 3]`` (read-only)."""
        self._check_index(None, step)
        return self._png(contract.image_path(step))

    def final_image(self) -> np.ndarray | None:
        """The pipeline's own output, uint8 ``[H, W, 3]`` (read-only); None when the run has none (schema 1)."""
        return self._png(contract.FINAL_IMAGE) if contract.FINAL_IMAGE in self.files else None

    def _png(self, rel: str) -> np.ndarray:
        def load() -> np.ndarray:
            from PIL import Image

            data = self.read_bytes(rel)
            bounded.png_size(rel, data, self.files[rel].get("shape"))  # before a pixel is unpacked
            try:
                with Image.open(io.BytesIO(data)) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
            except Exception as exc:
                raise DatasetError(f"{rel}: does not decode as an image ({type(exc).__name__})") from None
            arr.flags.writeable = False
            return arr

        return self._cached(rel, load)

    def latents(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(latents [N+1, ...], noise [N, ...])`` as float32, or ``None`` if the run has no latents file."""
        rel = contract.LATENTS_FILE
        if rel not in self.files:
            return None

        def load() -> tuple[np.ndarray, np.ndarray]:
            shape = self.metadata.get("latent_shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
                raise DatasetError(f"{contract.METADATA_FILE}: latent_shape is missing or not a list of sizes")
            arrays = bounded.npz_arrays(rel, self.read_bytes(rel), contract.latents_members(self.num_steps, shape))
            out = tuple(arrays[k].astype(np.float32) for k in ("latents", "noise"))
            for name, a in zip(("latents", "noise"), out):
                if not np.isfinite(a).all():
                    raise DatasetError(f"{rel}: {name} has non-finite values (NaN/Inf)")
                a.flags.writeable = False
            return out

        return self._cached(rel, load)

    def cache_stats(self) -> dict[str, int]:
        return self.cache.stats()


def open_run(source: Any, cache_mb: float = 256) -> Run:
    """Open a run from a folder path, an http(s)/file URL (relative URLs under Pyodide), a
    ``{relative_path: bytes}`` mapping or a :class:`Source`. Reads the three JSON files now and
    everything else on demand."""
    return Run(as_source(source), cache_mb=cache_mb)


def compatible(run_a: Run, run_b: Run) -> list[str]:
    """What differs between two runs in ways that matter to a side-by-side comparison.

    Empty when steps, tokens, layers (by name) with their stored shapes, latent shape and
    preview size all match. Prompts, seeds and other run parameters are expected to differ and
    are not listed.
    """
    out: list[str] = []
    if run_a.num_steps != run_b.num_steps:
        out.append(f"step count differs: {run_a.num_steps} vs {run_b.num_steps}")
    elif run_a.timesteps != run_b.timesteps:
        out.append("timesteps differ (different schedulers or settings)")
    if run_a.num_tokens != run_b.num_tokens:
        out.append(f"token count differs: {run_a.num_tokens} vs {run_b.num_tokens}")
    for kind, flag in (("cross", "has_cross"), ("self", "has_self")):
        if getattr(run_a, flag) != getattr(run_b, flag):
            out.append(f"{kind} attention recorded in {'the first' if getattr(run_a, flag) else 'the second'} run only")
    names_a, names_b = run_a.layer_names, run_b.layer_names
    only_a = [n for n in names_a if n not in names_b]
    only_b = [n for n in names_b if n not in names_a]
    if only_a:
        out.append(f"layers only in the first run: {', '.join(only_a)}")
    if only_b:
        out.append(f"layers only in the second run: {', '.join(only_b)}")
    for name in names_a:
        if name not in names_b:
            continue
        la, lb = run_a.layers[run_a.layer_index(name)], run_b.layers[run_b.layer_index(name)]
        for key in ("cross_shape", "self_shape"):
            sa, sb = la.get(key), lb.get(key)
            if sa and sb and list(sa[-2:]) != list(sb[-2:]):
                out.append(f"layer {name}: {key.split('_')[0]} maps stored at {sa[-2:]} vs {sb[-2:]}")
    if list(run_a.metadata.get("latent_shape", [])) != list(run_b.metadata.get("latent_shape", [])):
        out.append(f"latent shape differs: {run_a.metadata.get('latent_shape')} vs {run_b.metadata.get('latent_shape')}")
    size_a = (run_a.metadata["run"].get("height"), run_a.metadata["run"].get("width"))
    size_b = (run_b.metadata["run"].get("height"), run_b.metadata["run"].get("width"))
    if size_a != size_b:
        out.append(f"image size differs: {size_a[0]}x{size_a[1]} vs {size_b[0]}x{size_b[1]}")
    return out


def _setting(run: Mapping[str, Any], key: str) -> Any:
    """One generation setting of a ``metadata["run"]`` block, in a form that compares and prints plainly."""
    if key == "size":
        h, w = run.get("height"), run.get("width")
        return None if h is None and w is None else f"{h}×{w}"
    if key == "model":
        model = run.get("model")
        if isinstance(model, Mapping):
            name, source = model.get("id"), model.get("source")
            return f"{name} ({source})" if source else name
        return model
    value = run.get(key)
    if key in ("prompt", "negative_prompt"):
        return f"“{value}”" if value else None
    return value


#: ``(label, metadata["run"] key)`` of the settings :func:`run_differences` compares, in the order it lists them.
RUN_SETTINGS = (("prompt", "prompt"), ("negative prompt", "negative_prompt"), ("seed", "seed"), ("cfg", "cfg_scale"),
                ("steps", "num_steps"), ("scheduler", "scheduler"), ("model", "model"), ("size", "size"),
                ("dtype", "dtype"), ("device", "device"))


def run_differences(meta_a: Mapping[str, Any], meta_b: Mapping[str, Any]) -> list[str]:
    """Every generation setting that differs between two runs' metadata, one line each: ``"seed: 0 (A) vs 7 (B)"``.

    Unlike :func:`compatible`, these do not stop a comparison; they say what a divergence between the runs mixes.
    A setting a run does not record reads "—". Empty when all of :data:`RUN_SETTINGS` agree."""
    runs = []
    for meta in (meta_a, meta_b):
        run = meta.get("run") if isinstance(meta, Mapping) else None
        runs.append(run if isinstance(run, Mapping) else {})
    out = []
    for label, key in RUN_SETTINGS:
        a, b = _setting(runs[0], key), _setting(runs[1], key)
        if a != b:
            show = lambda v: "—" if v is None or v == "" else str(v)  # noqa: E731
            out.append(f"{label}: {show(a)} (A) vs {show(b)} (B)")
    return out
