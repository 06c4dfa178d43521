"""The dataset contract in code: file names, shapes, path rules and size accounting.

This is the only module that spells the run layout; the writer, the reader, the
validator and the generator all call it. ``CONTRACT.md`` beside it is the prose
version and must stay in step with it.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

#: The layout version this code writes.
SCHEMA_VERSION = 2
#: Every schema_version this code can read (schema 1 runs stay valid and readable).
KNOWN_SCHEMA_VERSIONS = frozenset({1, 2})

METADATA_FILE = "metadata.json"
METRICS_FILE = "metrics.json"
PCA_FILE = "latent_pca.json"
VALIDATION_FILE = "validation.json"
LATENTS_FILE = "latents_noise_fp16.npz"
#: The pipeline's own output image (schema 2; required there).
FINAL_IMAGE = "images/final.png"
#: Files that live in a run but are not listed in its manifest.
UNLISTED_FILES = frozenset({METADATA_FILE, VALIDATION_FILE})
#: JSON files listed in the manifest (written by ``RunWriter.finish``).
JSON_FILES = (METRICS_FILE, PCA_FILE)

#: dtype of every ``.bin`` map: float16, little-endian, C order.
BIN_DTYPE = "<f2"
BIN_ITEMSIZE = 2

#: Manifest ``kind`` values.
KIND_CROSS, KIND_SELF, KIND_IMAGE, KIND_LATENTS, KIND_JSON = "cross", "self", "image", "latents", "json"
#: Joint-attention files (schema 2): text->image maps, and output-space concept maps (``--concept-maps``).
KIND_TEXT, KIND_CONCEPT = "text", "concept"
KINDS = (KIND_CROSS, KIND_SELF, KIND_IMAGE, KIND_LATENTS, KIND_JSON, KIND_TEXT, KIND_CONCEPT)
#: The map kinds, each with its ``layers[]`` shape key and folder under ``attention/``.
MAP_KINDS = (KIND_CROSS, KIND_SELF, KIND_TEXT, KIND_CONCEPT)

#: Tolerance for the attention sum rules, sized for float16 storage
#: (each value carries a relative error up to 2**-11).
SUM_TOLERANCE = 1e-2
CROSS_SUM_RULE = "stored maps sum to <= 1 over tokens; == 1 only if full_distribution"
SELF_SUM_RULE = "each row sums to 1"
#: In an MM-DiT the softmax runs over [image; text] keys, so neither part of an image query's row sums to 1.
JOINT_CROSS_SUM_RULE = ("image->text: each image cell's attention to the stored tokens sums to < 1 (the softmax "
                        "also covers the image keys)")
JOINT_SELF_SUM_RULE = "image->image: each row sums to < 1 (the softmax also covers the text keys)"
TEXT_SUM_RULE = "text->image: each token's attention to the image cells sums to <= 1 (the softmax also covers text keys)"
#: SANA's linear self-attention: A = relu(q)·relu(k)ᵀ normalised per query, whose row is 0 where the query's features
#: meet no key's; stored rows are means of such rows over heads and cells.
LINEAR_SELF_SUM_RULE = ("linear attention relu(q)·relu(k)ᵀ normalised per query: each row sums to 1, or to less "
                        "where some head's query meets no key (that head's row is 0, as its output is)")
CONCEPT_SUM_RULE = ("each image cell is a softmax over the content-word tokens' output vectors: those rows sum to 1, "
                    "other tokens' rows are 0")

#: ``attention.heads``: cross maps averaged over heads, or kept per head (schema 2 only).
HEADS_MEAN, HEADS_PER_HEAD = "mean", "per_head"


class LayerKind:
    """One ``layers[].kind``: what such a layer is, and the sum rule of each map kind it may store."""

    def __init__(self, what: str, rules: Mapping[str, str]):
        self.what = what
        self.rules = dict(rules)

    def to_metadata(self) -> dict[str, Any]:
        """``metadata.attention.kinds[kind]``: the rules as a run states them."""
        return {"what": self.what, "sum_rules": dict(self.rules)}


_CROSS_ATTENTION = {KIND_CROSS: CROSS_SUM_RULE, KIND_SELF: SELF_SUM_RULE}
_JOINT_ATTENTION = {KIND_CROSS: JOINT_CROSS_SUM_RULE, KIND_SELF: JOINT_SELF_SUM_RULE, KIND_TEXT: TEXT_SUM_RULE,
                    KIND_CONCEPT: CONCEPT_SUM_RULE}
#: The one registry of layer kinds (schema 2 ``layers[].kind``) and their sum rules: the generator states them in
#: ``metadata.attention.kinds``, the validator checks each map by its layer's kind, the app reads kinds from the run.
#: A new kind is one entry here (and its rules' checks in ``export.validate.RULE_CHECKS``).
LAYER_KINDS: dict[str, LayerKind] = {
    "unet": LayerKind("a UNet transformer block: attn1 self-attention over the image, attn2 cross-attention to "
                      "the text", _CROSS_ATTENTION),
    "cross-dit": LayerKind("a diffusion-transformer block (PixArt): attn1 self-attention over the image tokens, "
                           "attn2 cross-attention to the text", _CROSS_ATTENTION),
    "joint": LayerKind("an MM-DiT double-stream block: one softmax over the joint [image; text] sequence",
                       _JOINT_ATTENTION),
    "single": LayerKind("an MM-DiT single-stream block: one softmax over the joint [text; image] stream",
                        _JOINT_ATTENTION),
    "linear": LayerKind("a linear-attention DiT block (SANA): attn1 self-attention with a ReLU kernel (no softmax) "
                        "over the image tokens, attn2 softmax cross-attention to the text",
                        {KIND_CROSS: CROSS_SUM_RULE, KIND_SELF: LINEAR_SELF_SUM_RULE}),
}


def layer_kind(meta_layer: Mapping[str, Any]) -> str:
    """A ``metadata.layers[]`` entry's kind (schema 1 layers have none: they are UNet blocks)."""
    return str(meta_layer.get("kind") or "unet")
#: The family every schema-1 run implicitly has (schema 1 predates ``metadata.family``).
V1_FAMILY = {
    "name": "sd", "pipeline": "StableDiffusionPipeline",
    "text_encoders": [{"name": "text_encoder", "class": "CLIPTextModel", "tokenizer": "tokenizer"}],
    "tokens_from": "tokenizer",
}


# --------------------------------------------------------------------------- caps
# Every read of a run is bounded by these before any work starts (CONTRACT.md "Caps"). They sit well
# above any real run (SDXL at 50 steps has ~7,000 files; Flux ~5,700) and far below what hurts.
MiB = 1 << 20
MAX_STEPS = 1000
MAX_LAYERS = 256
MAX_TOKENS = 1024
MAX_HEADS = 128
MAX_GRID_SIDE = 256
MAX_IMAGE_SIDE = 4096
MAX_RANK = 4
MAX_FILES = 100_000
MAX_MAP_BYTES = 256 * MiB
MAX_IMAGE_BYTES = 64 * MiB
MAX_LATENTS_BYTES = 1024 * MiB
MAX_JSON_BYTES = {METADATA_FILE: 32 * MiB, METRICS_FILE: 64 * MiB, PCA_FILE: 1 * MiB, VALIDATION_FILE: 1 * MiB}
#: Cap for a JSON document not named above (e.g. a bridge request body's own cap is smaller).
MAX_OTHER_JSON_BYTES = 1 * MiB
MAX_JSON_DEPTH = 64
MAX_PROMPT_CHARS = 2000
MAX_STRING_CHARS = 4096
MAX_PATH_CHARS = 1024
MAX_NAME_CHARS = 255
#: Problem lines reported before the rest are only counted.
MAX_PROBLEMS = 20


def kind_byte_cap(kind: str, name: str = "") -> int:
    """The most bytes a listed file of this manifest ``kind`` may have."""
    if kind in MAP_KINDS:
        return MAX_MAP_BYTES
    if kind == KIND_IMAGE:
        return MAX_IMAGE_BYTES
    if kind == KIND_LATENTS:
        return MAX_LATENTS_BYTES
    return MAX_JSON_BYTES.get(name, MAX_OTHER_JSON_BYTES)


def generator() -> dict[str, str]:
    """``metadata.generator``: this package's name and installed version (``diffviz.__version__`` is the one source,
    which ``pyproject.toml`` reads; the installed distribution's metadata carries it here and into the browser wheel)."""
    from importlib import metadata

    try:
        version = metadata.version("diffviz")
    except metadata.PackageNotFoundError:  # a bare checkout, not installed
        version = "unknown"
    return {"name": "diffviz", "version": version}


class DatasetError(ValueError):
    """A problem with a run's data or layout. The message is one line naming the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def cross_shape(tokens: int, grid: Sequence[int], heads: int | None = None) -> list[int]:
    """A layer's stored cross shape: ``[T, h, w]``, or ``[heads, T, h, w]`` when ``heads`` is given (per-head runs)."""
    shape = [int(tokens), int(grid[0]), int(grid[1])]
    return shape if heads is None else [int(heads)] + shape


def self_shape(grid: Sequence[int]) -> list[int]:
    """A layer's stored self shape for a ``(sh, sw)`` grid: ``[sh*sw, sh*sw]`` (query cells x key cells)."""
    n = int(grid[0]) * int(grid[1])
    return [n, n]


def cross_path(layer: int, step: int) -> str:
    return f"attention/cross/layer_{int(layer)}_step_{int(step):03d}.bin"


def self_path(layer: int, step: int) -> str:
    return f"attention/self/layer_{int(layer)}_step_{int(step):03d}.bin"


def map_path(kind: str, layer: int, step: int) -> str:
    """``attention/{kind}/layer_{L}_step_{S:03d}.bin`` for any of :data:`MAP_KINDS`."""
    if kind not in MAP_KINDS:
        raise ValueError(f"not a map kind: {kind!r}")
    return f"attention/{kind}/layer_{int(layer)}_step_{int(step):03d}.bin"


def shape_key(kind: str) -> str:
    """The ``layers[]`` key of a map kind's stored shape: ``cross_shape``, ``self_shape``, ``text_shape``, ..."""
    return f"{kind}_shape"


def image_path(step: int) -> str:
    return f"images/step_{int(step):03d}.png"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about untrusted values."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 12]}…({len(text)} chars)"


def check_relative_path(path: str) -> str:
    """Return ``path`` if it is a plain relative path inside a run, else raise :class:`DatasetError`.

    Rejected: empty names, absolute paths, drive letters and URLs (anything with a
    ``scheme:`` prefix), backslashes, ``.``/``..``/empty components, control characters.
    """
    if not isinstance(path, str) or not path:
        raise DatasetError(f"path {shown(path)}: must be a non-empty string")
    if len(path) > MAX_PATH_CHARS or any(len(part) > MAX_NAME_CHARS for part in path.split("/")):
        raise DatasetError(f"path {shown(path)}: longer than {MAX_PATH_CHARS} characters or a name over {MAX_NAME_CHARS}")
    if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in path):
        raise DatasetError(f"path {shown(path)}: contains control characters or lone surrogates")
    if "\\" in path:
        raise DatasetError(f"path {path!r}: backslashes are not allowed")
    if path.startswith("/"):
        raise DatasetError(f"path {path!r}: absolute paths are not allowed")
    if _SCHEME.match(path) or "://" in path:
        raise DatasetError(f"path {path!r}: URLs and drive letters are not allowed")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise DatasetError(f"path {path!r}: '..', '.' and empty components are not allowed")
    return path


def resolve_inside(root: str | os.PathLike, relpath: str) -> Path:
    """``root/relpath`` after :func:`check_relative_path`, refusing symlinks that lead outside ``root``."""
    check_relative_path(relpath)
    base = Path(root).resolve()
    full = (base / relpath).resolve()
    if full != base and base not in full.parents:
        raise DatasetError(f"path {relpath!r}: resolves outside the run folder (symlink?)")
    return full


def latents_members(num_steps: int, latent_shape: Sequence[int]) -> dict[str, tuple[str, list[int]]]:
    """The arrays of ``LATENTS_FILE``: ``{name: (dtype, shape)}`` (latents x_T..x_0 and the predicted noise)."""
    shape = [int(d) for d in latent_shape]
    return {"latents": (BIN_DTYPE, [int(num_steps) + 1] + shape), "noise": (BIN_DTYPE, [int(num_steps)] + shape)}


def shape_bytes(shape: Sequence[int]) -> int:
    """Bytes of a ``.bin`` map of this shape: ``prod(shape) * 2``."""
    return math.prod(int(n) for n in shape) * BIN_ITEMSIZE


def known_schema_version(metadata: Mapping[str, Any]) -> int:
    """The run's schema_version, or :class:`DatasetError` if missing or unknown."""
    version = metadata.get("schema_version") if isinstance(metadata, Mapping) else None
    if version is None:
        raise DatasetError("metadata.json: schema_version is missing")
    if isinstance(version, bool) or version not in KNOWN_SCHEMA_VERSIONS:
        known = ", ".join(map(str, sorted(KNOWN_SCHEMA_VERSIONS)))
        raise DatasetError(
            f"metadata.json: schema_version {version!r} is not known to this diffviz (it reads {known}); "
            "upgrade diffviz or regenerate the run"
        )
    return int(version)


# --------------------------------------------------------------------------- size accounting

#: Allowance for metadata.json, metrics.json, latent_pca.json and validation.json.
JSON_BASE_BYTES = 16_384
#: Per-file allowance in metadata.json's manifest (path, bytes, sha256, shape).
MANIFEST_ENTRY_BYTES = 200
#: Per-step allowance in metrics.json per layer (entropy, KL) and per token (share, ranking).
METRIC_VALUE_BYTES = 24


def projected_bytes(
    num_steps: int,
    layers: Iterable[Mapping[str, Any]],
    *,
    image_size: tuple[int, int] | None = None,
    latent_shape: Sequence[int] | None = None,
    save_latents_noise: bool = False,
) -> int:
    """Projected size of a run in bytes, before generating it.

    ``layers`` are metadata-style dicts with ``cross_shape`` / ``self_shape`` (``None`` when that
    kind is disabled; per-head cross shapes included). Maps are exact (``prod(shape) * 2`` per
    step); the N previews and the final image (``image_size`` given) are counted at their raw RGB
    size ``H * W * 3`` (PNG is usually smaller, so this is an upper estimate for them); the optional latents file is ``(2N + 1) * prod(latent_shape) * 2`` plus the npz
    framing; JSON is a fixed allowance plus a per-file and per-value allowance.
    """
    n = int(num_steps)
    total = JSON_BASE_BYTES
    files = 0
    tokens = 0
    layer_count = 0
    for layer in layers:
        layer_count += 1
        for key in map(shape_key, MAP_KINDS):
            shape = layer.get(key)
            if shape:
                total += n * shape_bytes(shape)
                files += n
        if layer.get("cross_shape"):
            tokens = max(tokens, int(layer["cross_shape"][-3]))  # [T, h, w] or [heads, T, h, w]
    if image_size is not None:
        h, w = image_size
        total += (n + 1) * (int(h) * int(w) * 3 + 1024)  # previews + FINAL_IMAGE
        files += n + 1
    if save_latents_noise and latent_shape is not None:
        total += (2 * n + 1) * math.prod(int(d) for d in latent_shape) * BIN_ITEMSIZE + 1024
        files += 1
    total += files * MANIFEST_ENTRY_BYTES
    total += n * (2 * layer_count + 2 * tokens + 4) * METRIC_VALUE_BYTES
    return total


def dataset_bytes(path: str | os.PathLike) -> int:
    """The real size of a run folder: the sum of its files' sizes (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
