"""What the bridge accepts: origins, models, run names, request bodies, and what a job may cost.

Nothing here serves HTTP or runs a job; every check raises :class:`RequestError` (an HTTP status, a
one-line message, and the name of the bad setting) before anything is queued or written.

The cost of a job (:func:`job_cost`) is estimated from the layer plan that ``capture.run.prepare``
made for the request, before any weights load, and refused past ``--max-job-gb``
(:func:`check_cost`); see :func:`job_cost` for what each term counts and why.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

from export import contract
from export.contract import shown

PROG = "diffviz bridge"
#: The static site's GitHub Pages origin (``https://USER.github.io``), allowed by default when set.
PAGES_ORIGIN_ENV = "DIFFVIZ_PAGES_ORIGIN"
#: Default CORS origins: any port (``:*``) of the two loopback names.
LOCAL_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*")
#: Largest POST body accepted (the settings of one generation are well under 4 KiB).
MAX_BODY_BYTES = 64 * 1024
#: Most jobs waiting at once; more get 429.
MAX_QUEUED = 16
#: Finished jobs remembered for GET /jobs/{id}.
JOB_HISTORY = 200
#: A run name: one folder name, no hidden (``.``) folders (the writer's temporary folders start with a dot).
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Values of ``model`` in a request that mean "the embedded default model".
DEFAULT_MODEL_NAMES = ("", "default", "toyworld")
#: Settings whose strings may be longer than ``contract.MAX_STRING_CHARS`` (GenerateConfig caps them itself).
PROMPT_FIELDS = ("prompt", "negative_prompt")
#: The largest integer any setting can hold (seeds are below 2**63); past it a number is refused as such.
MAX_INT = 2 ** 64
#: Default of ``--max-job-gb``: the most a job may cost, memory at its peak plus what it writes.
DEFAULT_MAX_JOB_GB = 2.0
GB = 1e9


class RequestError(Exception):
    """An HTTP error with a one-line message; ``field`` names the bad setting of a POST /jobs."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())
        self.field = field


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# =========================================================================== origins and models


def _normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class Origins:
    """The CORS allow-list: exact origins, or ``scheme://host:*`` for any port of that host (or none)."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = [_normal_origin(p) for p in patterns if p and p.strip()]
        for p in self.patterns:
            parts = urlsplit(p.replace(":*", ""))
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
                raise ValueError(f"--allow-origin {p!r}: give scheme://host[:port] (port may be *)")

    @classmethod
    def default(cls) -> "Origins":
        pages = os.environ.get(PAGES_ORIGIN_ENV, "").strip()
        return cls([*LOCAL_ORIGINS, *([pages] if pages else [])])

    def allows(self, origin: str | None) -> bool:
        if not origin:
            return False
        origin = _normal_origin(origin)
        try:
            parts = urlsplit(origin)
            port = parts.port
        except ValueError:
            return False
        if parts.path or not parts.hostname:
            return False
        for pattern in self.patterns:
            if pattern == origin:
                return True
            if pattern.endswith(":*"):
                base = urlsplit(pattern[:-2])
                if (parts.scheme, parts.hostname) == (base.scheme, base.hostname) and (port is None or port > 0):
                    return True
        return False


def _resolved(value: str) -> str | None:
    """The absolute path ``value`` names if it exists; None if not, or if the OS refuses the name
    (too long, a NUL byte, undecodable): such a value is simply not an allowed model."""
    try:
        path = Path(os.path.expanduser(value))
        return str(path.resolve()) if path.exists() else None
    except (OSError, ValueError, RuntimeError):
        return None


class ModelAllowList:
    """Which ``model`` values a request may name: the default, and what ``--allow-model`` listed at start-up."""

    def __init__(self, models: Iterable[str] = ()):
        self.entries: list[tuple[str, str]] = []   # (as given, resolved path or hub id)
        for model in models:
            model = model.strip()
            if not model:
                continue
            self.entries.append((model, _resolved(model) or model))

    def resolve(self, value: Any) -> str | None:
        """The ``GenerateConfig.model`` for a request's ``model`` (None = default); RequestError if not allowed."""
        if value is None or (isinstance(value, str) and value.strip() in DEFAULT_MODEL_NAMES):
            return None
        if not isinstance(value, str):
            raise RequestError(400, f"model: must be a string, got {type(value).__name__}", "model")
        value = value.strip()
        from capture.pipeline import DEFAULT_MODEL_DIR

        resolved = _resolved(value)
        if resolved == str(DEFAULT_MODEL_DIR):
            return None
        for given, key in self.entries:
            if value == given or value == key or (resolved is not None and resolved == key):
                return given
        raise RequestError(403, f"model: {shown(value)} is not in this bridge's allow-list; start the bridge with "
                                f"--allow-model {value if len(value) <= 200 else 'PATH'} to allow it", "model")

    def listing(self) -> list[dict[str, Any]]:
        """The models a request may name; a toy model carries its ``vocabulary`` (the only words it takes)."""
        from capture.toyworld import vocabulary

        words = list(vocabulary.VOCABULARY)
        out: list[dict[str, Any]] = [{"value": "default", "label": "toyworld (embedded default)", "vocabulary": words}]
        for given, _ in self.entries:
            entry: dict[str, Any] = {"value": given, "label": given}
            if vocabulary.is_toy_model(given):
                entry["vocabulary"] = words
            out.append(entry)
        return out


def check_run_name(value: Any, key: str = "name") -> str:
    """``value`` if it is one folder name inside the datasets folder, else RequestError 400 naming ``key``."""
    if not isinstance(value, str) or not RUN_NAME.match(value) or value in (".", ".."):
        raise RequestError(400, f"{key}: {shown(value)} is not a run name (one folder name inside the datasets "
                                "folder: letters, digits, '.', '_', '-'; no '/', no leading dot)", key)
    return value


# =========================================================================== request bodies


def parse_body(raw: bytes, content_type: str) -> Any:
    """A POST body as JSON, within the size and nesting caps; RequestError (field ``body``) if not."""
    from export import bounded

    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(413, f"body: larger than {MAX_BODY_BYTES} bytes", "body")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, "body: send the settings as JSON (Content-Type: application/json)", "body")
    try:
        return bounded.parse_json("body", raw or b"null")
    except contract.DatasetError as exc:
        raise RequestError(400, one_line(exc), "body") from None


def _bad_text(text: str) -> str | None:
    """Why ``text`` cannot be a setting (a lone surrogate cannot be encoded; NUL ends C strings), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (half of a UTF-16 pair); send valid Unicode text"
    if "\x00" in text:
        return "contains a NUL character"
    return None


def check_values(body: dict) -> None:
    """Every value of a POST /jobs body, walked without recursion: strings must be valid Unicode without
    NUL and (except the prompts) at most ``contract.MAX_STRING_CHARS`` long, numbers finite and within
    ``MAX_INT``. RequestError 400 naming the setting; run before any rule or any file system call sees them."""
    for raw_key, value in body.items():
        key = str(raw_key)
        if _bad_text(key) or len(key) > 64:
            raise RequestError(400, f"body: the setting name {shown(key, 40)} is not one of the settings", "body")
        name = key.replace("-", "_")
        stack = [value]
        while stack:
            node = stack.pop()
            if isinstance(node, str):
                problem = _bad_text(node)
                if problem is None and name not in PROMPT_FIELDS and len(node) > contract.MAX_STRING_CHARS:
                    problem = f"is {len(node)} characters, over the cap of {contract.MAX_STRING_CHARS}"
                if problem:
                    raise RequestError(400, f"{name}: {problem}", name)
            elif isinstance(node, bool) or node is None:
                continue
            elif isinstance(node, int):
                if not -MAX_INT < node < MAX_INT:
                    raise RequestError(400, f"{name}: a {len(str(abs(node)))}-digit number is out of range", name)
            elif isinstance(node, float):
                if not math.isfinite(node):
                    raise RequestError(400, f"{name}: the number overflows", name)
            elif isinstance(node, dict):
                for k, v in node.items():
                    stack.extend((k, v))
            elif isinstance(node, list):
                stack.extend(node)


# =========================================================================== job cost


@dataclass(frozen=True)
class Term:
    """One part of a job's cost: what it is, its bytes, and the settings that size it (most effective first)."""

    what: str
    bytes: int
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Cost:
    """A job's projected cost. ``map_bytes``: the run on disk (maps, previews, latents file, JSON: what
    ``contract.projected_bytes`` counts); ``peak_bytes``: the most host plus device memory it holds at
    once; ``limiting``: the settings behind the largest terms, largest first."""

    map_bytes: int
    peak_bytes: int
    limiting: tuple[str, ...]
    terms: tuple[Term, ...] = field(default=())

    @property
    def total(self) -> int:
        return self.map_bytes + self.peak_bytes

    def largest(self, n: int = 3) -> str:
        terms = sorted(self.terms, key=lambda t: -t.bytes)[:n]
        return ", ".join(f"{t.what} {_gb(t.bytes)}" for t in terms)


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB" if n < 10 * GB else f"{n / GB:.0f} GB"


def _elem(dtype: str) -> int:
    return 2 if dtype in ("float16", "bfloat16") else 4


def _vae_width(config: Any) -> int:
    """Channels of the VAE decoder's full-resolution blocks (``vae/config.json``'s first
    ``block_out_channels``), 128 (Stable Diffusion's) where the config cannot be read."""
    from capture.config import model_source
    from capture.pipeline import DEFAULT_MODEL_DIR

    try:
        source, location = model_source(config.model)
        folder = DEFAULT_MODEL_DIR if source == "default" else Path(location) if source == "folder" else None
        path = folder / "vae" / "config.json" if folder is not None else None
        if path is None or not path.is_file() or path.stat().st_size > contract.MAX_OTHER_JSON_BYTES:
            return 128
        from export import bounded

        channels = bounded.parse_json("vae/config.json", path.read_bytes()).get("block_out_channels")
        return max(int(channels[0]), 1)
    except Exception:  # noqa: BLE001 - an estimate: any unreadable config gets the common width
        return 128


def job_cost(prepared: Any, config: Any, *, device: str | None = None, dtype: str | None = None) -> Cost | None:
    """The projected cost of generating ``config`` with ``prepared`` (``capture.run.Prepared``), or None
    when the plan is not known before loading (a hub id).

    Element sizes: ``e`` = the model dtype's bytes (4 for float32 on CPU/MPS, 2 for float16 on CUDA);
    host copies of bfloat16 are float32. ``N`` steps, ``L`` latent elements, ``h`` heads, ``q`` queries
    (native cells of a layer's grid), ``k`` keys (``q`` for self attention, the context length for cross).

    ``map_bytes`` = ``contract.projected_bytes``: the maps (exact), N + 1 raw RGB images, the latents file
    when saved, the JSON allowance. It is counted with memory because the bridge pays for both and
    because each step's maps pass through memory on their way there.

    ``peak_bytes`` = what lives for the whole run + the largest of the moments that come and go:

    * not the weights: the bridge loads a model once and keeps it between jobs, so they are the operator's
      choice (``--allow-model``), not the request's; the cap is about what one request adds (SD 1.5's
      UNet alone is 3.4 GB in float32, so counting it would refuse every real checkpoint at the default cap);
    * recorder buffers: the flat step buffer on the device (every recorded map, ``e`` an element), the
      two host copies alive at a step boundary (the previous step's is written while the next is copied)
      and the float16 copy the writer makes: elements x (``e`` + 2 x host ``e`` + 2);
    * pooling operators: per distinct shape, the query pool ``[cells, h*q]``, the key pool
      ``[h, q, cells]`` and, on the CPU, the dense path's ``[cells, q]`` cell mean, ``e`` an element;
    * latents and noise kept per step for the metrics and the file: ``(2N + 1) x L x 4`` (float32 numpy);
    * the largest moment, one of:

      - attention at the largest recorded layer: ``2 x h x q x k x e``: the recorder materialises the
        conditional sample's scores and their softmax (two ``[h, q, k]`` tensors; measured on the CPU:
        4.1 GB for h=8, q=k=8192 in float32), plus the dense path's head mean and pooled result
        (``(q + cells) x k x e``) or SDPA's pooled output (``h x q x cells x e``). torch's SDPA with the
        wide pooling value as its value takes the same math path on the CPU (measured: 4.6 GB for h=8,
        q=k=8192, 1024 cells), so a pooled self layer is no cheaper than a native one; other devices are
        assumed to do the same (not measured: an upper bound where a fused kernel takes that value). (The
        pipeline's own attention over the CFG batch runs in a fused kernel on the CPU, measured at 7 MB
        where its math path, ``2 x h x q x k x 4``, would be 4.3 GB, and in flash / memory-efficient
        kernels on CUDA, so it is not counted.) Each observed call's queries and keys come from the family
        (``Family.attention_extent``: a joint call attends over image + text). On top, the denoiser's feature maps
        at that moment, as its family counts them (``Family.activation_bytes``; a UNet: the skip connections and
        ~18 live tensors of the block at the largest grid; a transformer: ~18 live ``[tokens, width]`` tensors),
        for the CFG batch of 2, ``e`` an element;
      - building the pooling operators (before the run, float64): the largest one's membership matrix,
        its normalised copy and, for a head mean, two ``[cells, h*q]`` matrices;
      - the x̂0 preview decode: ~4 live ``[C_vae, H, W]`` float32 tensors in the VAE's last up block plus
        the image;
      - the end of the run: the stacked latents (and, when saved, the noise, their float16 copies and
        the ``.npz`` built in memory, twice: buffer and bytes).
    """
    if prepared is None or getattr(prepared, "plans", None) is None or prepared.peek is None:
        return None
    from capture import pipeline as pipeline_mod
    from capture.recorder import CROSS, DENSE_MAX, JOINT, ROLE_CROSS, SELF

    device = device or pipeline_mod.resolve_device(config.device)
    dtype = dtype or pipeline_mod.resolve_dtype(config.dtype, device)
    e = _elem(dtype)
    host_e = 4 if dtype == "bfloat16" else e
    peek, plans, family = prepared.peek, list(prepared.plans), prepared.family
    n = int(config.num_steps)
    height, width = int(prepared.height), int(prepared.width)
    latent_shape = [int(d) for d in prepared.latent_shape]
    latent = math.prod(latent_shape)
    tokens = len(prepared.tokens.tokens) if prepared.tokens is not None else 0
    context = int(peek.context_length)
    disk: list[Term] = []
    terms: list[Term] = []   # memory

    # ---- on disk ----------------------------------------------------------------------------------
    layers_meta = [plan.to_metadata(tokens) for plan in plans]
    map_bytes = contract.projected_bytes(n, layers_meta, image_size=(height, width), latent_shape=latent_shape,
                                         save_latents_noise=config.save_latents_noise)
    self_disk = n * sum(contract.shape_bytes(m["self_shape"]) for m in layers_meta if m["self_shape"])
    cross_disk = n * sum(contract.shape_bytes(m["cross_shape"]) for m in layers_meta if m["cross_shape"])
    disk += [Term("self maps written", self_disk, ("self_attention_resolution", "num_steps", "max_layers", "layers")),
              Term("cross maps written", cross_disk, ("attention_resolution", "per_head", "num_steps", "max_layers")),
              Term("previews, latents and JSON written", map_bytes - self_disk - cross_disk,
                   ("num_steps", "height", "width", "save_latents_noise"))]

    # ---- held for the whole run -------------------------------------------------------------------
    self_elems = cross_elems = 0
    operators: dict[tuple, int] = {}
    build = 0
    scratch, scratch_fields, scratch_what = 0, ("height", "width"), "attention"
    for plan in plans:
        for _module, role in plan.sites:
            # each observed call's queries and keys, as the family's topology says (a joint call: image + text)
            q, k = family.attention_extent(plan, role, context)
            h = int(plan.heads)
            parts = ((CROSS, plan.cross_grid), (SELF, plan.self_grid)) if role == JOINT else \
                (((CROSS, plan.cross_grid),) if role == ROLE_CROSS else ((SELF, plan.self_grid),))
            for kind, grid in parts:
                if grid is None:
                    continue
                cells = grid[0] * grid[1]
                per_head = kind == CROSS and plan.per_head
                if kind == CROSS:
                    cross_elems += cells * (tokens if role == JOINT else context) * (h if per_head else 1)
                else:
                    self_elems += cells * cells
                pooled = tuple(grid) != tuple(plan.native)
                dense = device == "cpu" and (role == JOINT or (kind == SELF and pooled)) and h * q * k <= DENSE_MAX
                key = (tuple(plan.native), tuple(grid), h, kind, per_head)
                if pooled and key not in operators:
                    size = cells * q * (1 if per_head else h)              # query pool
                    if kind == SELF:
                        size += h * q * cells                              # key pool
                        if dense:
                            size += cells * q                              # the dense path's cell mean
                    operators[key] = size * e
                    # built in float64: the membership matrix, its normalised copy, and (head mean) two of
                    # [cells, heads * q] while it is repeated over the heads and divided
                    build = max(build, (2 * cells * q + (0 if per_head else 2 * cells * h * q)) * 8)
                # scores and softmax of the conditional sample, then the head mean (dense) or the pooled output (SDPA)
                moment = 2 * h * q * k * e
                if dense:
                    moment += (q + cells) * k * e
                elif kind == SELF and pooled:
                    moment += h * q * cells * e
                if moment > scratch:
                    scratch = moment
                    scratch_what = f"{'self' if kind == SELF else 'cross'} attention of {plan.name}"
                    scratch_fields = (("height", "width", "include_self_attention", "layers", "max_layers")
                                      if kind == SELF else ("height", "width", "layers", "max_layers"))
    elems = self_elems + cross_elems
    recorder_fields = (("self_attention_resolution", "max_layers", "layers") if self_elems >= cross_elems
                       else ("attention_resolution", "per_head", "max_layers", "layers"))
    terms.append(Term("recorder step buffers", elems * (e + 2 * host_e + 2), recorder_fields))
    terms.append(Term("pooling operators", sum(operators.values()), ("self_attention_resolution", "attention_resolution",
                                                                       "height", "width")))
    terms.append(Term("latents kept per step", (2 * n + 1) * latent * 4, ("num_steps", "height", "width")))

    # ---- the largest moment -----------------------------------------------------------------------
    features = family.activation_bytes(peek, latent_shape, e)   # the denoiser's own tensors then (its family says)
    moments = [Term(scratch_what, scratch + features, scratch_fields)]
    moments.append(Term("building the pooling operators", build, ("attention_resolution", "self_attention_resolution",
                                                                  "height", "width")))
    moments.append(Term("preview decode", (4 * _vae_width(config) * 4 + 3 * 5) * height * width, ("height", "width")))
    finish = (n + 1) * latent * 4
    if config.save_latents_noise:
        finish += n * latent * 4 + (2 * n + 1) * latent * 2 * 3
    moments.append(Term("stacking the latents", finish, ("num_steps", "save_latents_noise", "height", "width")))
    terms.append(max(moments, key=lambda t: t.bytes))

    peak = sum(t.bytes for t in terms)
    limiting: list[str] = []
    for term in sorted((t for t in disk + terms if t.bytes > 0), key=lambda t: -t.bytes):
        limiting += [f for f in term.fields if f not in limiting]
    return Cost(int(map_bytes), int(peak), tuple(limiting), tuple(disk + terms))


def check_cost(cost: Cost | None, cap_bytes: float) -> None:
    """RequestError 400 naming the limiting setting when ``cost`` is over ``cap_bytes``."""
    if cost is None or cost.total <= cap_bytes:
        return
    field_name = cost.limiting[0] if cost.limiting else "body"
    lower = ", ".join(f.replace("_", "-") for f in cost.limiting[:4])
    raise RequestError(400, f"--{field_name.replace('_', '-')}: the job is estimated at {_gb(cost.total)} "
                            f"({_gb(cost.peak_bytes)} of memory at its peak, {_gb(cost.map_bytes)} written; "
                            f"largest: {cost.largest()}), over this bridge's cap of {cap_bytes / GB:g} GB "
                            f"(--max-job-gb); the settings that size it most: {lower}", field_name)


def dumps(data: Any) -> bytes:
    """``data`` as UTF-8 JSON; text that UTF-8 cannot hold (a lone surrogate) as ``\\u`` escapes, never an error."""
    try:
        return json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, ensure_ascii=True).encode("ascii")
