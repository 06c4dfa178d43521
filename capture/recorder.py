"""Recording attention maps by observing the model's own attention call; nothing is replaced.

Read it as a sentence::

    with record_attention(pipe, layers=["up_blocks.*"], max_layers=12) as rec:
        image = pipe(prompt, callback_on_step_end=rec.callback_on_step_end).images[0]
    rec.steps[0].cross[0]        # [context_length, h, w] of step 0, layer 0 (the model's dtype)

How it works. A *layer* is one block of the denoiser; its family (``capture.families``) says which of the
block's attention modules are recorded and what each one's query and key are (``LayerPlan.sites``): a UNet
or cross-attention DiT block has ``attn1`` (self: image queries, image keys) and ``attn2`` (cross: image
queries, text keys); an MM-DiT block has one ``attn`` over the joint [image; text] or [text; image] sequence.

Each recorded module gets a forward pre-hook and a forward hook (plain torch hooks, the second with
``always_call``). While that module runs, and only then, :class:`_Observer`, a
``torch.overrides.TorchFunctionMode``, is on torch's mode stack. It passes every torch call through
unchanged; when the call is ``torch.nn.functional.scaled_dot_product_attention`` it runs it, returns its
very output to the model, and hands the call's query, key, mask, scale and output to the layer's slot,
which computes the maps of the conditional (last) sample beside it. The model's own processor runs
unchanged, whatever its class, so the output is bit-identical to an unrecorded run by construction. A pipeline
that calls its denoiser several times per step, one sample per call (Qwen-Image's true CFG), names the call that
carries the conditional sample (``AttentionRecorder(denoiser_call=)``); the other calls are not observed. A module
whose attention is not a softmax (SANA's ReLU-kernel linear attention) gets a slot that watches the torch calls its
attention is made of instead (``capture.linear``).

Why there: every diffusers attention path that forms a softmax ends in that call. ``AttnProcessor2_0`` and
``JointAttnProcessor2_0`` call it directly; ``FluxAttnProcessor`` and the other ``AttentionModuleMixin``
processors go through ``dispatch_attention_fn``, whose native backends call it. Backends that never form the
probabilities (flash, sage, xformers, flex) are switched to ``native`` on the recorded modules for the run
(``metadata.attention.backend`` says so). The mode is scoped to the recorded modules, so the rest of the model
pays nothing (inside them each torch call takes one Python step more), and the hook names the layer. A processor
that makes no such call, or several with the planned shape per module call, is refused in one line naming it.

A module that did not run at a step (a caching hook such as diffusers' FirstBlockCache skipped its block) is
recorded as *not computed* at that step (``StepMaps.skipped``, ``metadata.layers[].computed``): never a stale map.

The maps, for the conditional sample:

    map = mean_heads( pool_queries( softmax(q kᵀ · scale + mask) @ P ) )

* Keys kept (cross attention; self maps at their native grid): the probabilities, materialised.
* Keys pooled (self maps below their native grid): ``P`` is a one-hot [keys, cells] matrix that sums each
  cell's keys (rows still sum to 1), and ``softmax(q kᵀ · scale) @ P`` is one ``scaled_dot_product_attention(q,
  k, P)`` call, so the [n, n] map is never materialised. On the CPU, up to :data:`DENSE_MAX` elements, the
  probabilities are materialised instead, a block of queries at a time (:data:`CHUNK_ELEMENTS`): head mean, keys
  summed per cell (an ``index_add_``), then the query cells' mean, which costs far less there.
* Queries pooled: the head mean and the query-cell mean are one matmul with a precomputed
  [cells, heads*queries] matrix; queries kept: one ``mean`` over heads.
* Joint attention (MM-DiT): ``capture.joint``.

Each map is written into its slice of one flat device buffer, which moves to the CPU once per step in one copy
(:meth:`AttentionRecorder.start_copy`: asynchronous into pinned memory on a GPU).

Maps are only pooled down: a grid smaller than the resolution is kept at its native size. Both sides of a grid
are divided by the same integer factor (the aspect ratio is kept), the smallest that brings the long side within
the resolution; a grid that factor does not divide is pooled with uneven windows (CONTRACT.md, "Pooling"), and a
warning says so. ``per_head`` keeps every head's cross map ([heads, T, h, w]).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SELF, CROSS = "attn1", "attn2"
#: the roles of an observed attention module (``LayerPlan.sites``); ``linear``: a softmax-free self-attention
#: (SANA's ReLU kernel, ``capture.linear``), whose slot a family supplies (``AttentionRecorder(slot_types=)``)
ROLE_SELF, ROLE_CROSS, JOINT, ROLE_LINEAR = "self", "cross", "joint", "linear"
#: On the CPU a pooled self map is cheaper from the materialised [heads, q, k] probabilities (head mean,
#: then two small matmuls) than from SDPA with the [keys, cells] pooling matrix as a wide value, up to
#: this many elements (float32: 128 MB); past it, and on GPUs, SDPA keeps the map unmaterialised.
DENSE_MAX = 1 << 25
#: the CPU path computes the probabilities of blocks of queries of about this many elements (1 MB in float32), which
#: stay in the cache through softmax, head mean and pooling
CHUNK_ELEMENTS = 1 << 18


class LayerSelectionError(ValueError):
    """A layer pattern matched nothing (the message lists the valid names)."""


class ShapeMismatchError(RuntimeError):
    """An attention map does not have the shape the plan expected (``--fail-on-shape-error``)."""


class ShapeWarning(UserWarning):
    """An attention map does not fit its planned shape; the layer is skipped or pooled unevenly."""


# --------------------------------------------------------------------------- the plan


@dataclass
class LayerPlan:
    """One recorded layer: where it sits, its native grid, and what is stored for it."""

    index: int
    name: str                                   # down_blocks.0.attentions.0.transformer_blocks.0
    block: str                                  # down_blocks.0 | mid_block | up_blocks.1
    native: tuple[int, int]                     # (h, w) of the layer's latent grid
    cross_grid: tuple[int, int] | None = None   # stored (h, w) of the cross maps; None = not recorded
    self_grid: tuple[int, int] | None = None    # stored (h, w) of the pooled self grid; None = not recorded
    heads: int = 1                              # the layer's attention heads
    per_head: bool = False                      # cross maps kept per head ([heads, T, h, w])
    kind: str = "unet"                          # metadata.layers[].kind
    text: bool = False                          # joint layers: text->image maps at the cross grid
    concept: bool = False                       # joint layers: output-space concept maps at the cross grid
    #: the block's attention modules that are observed: (submodule, role), role "self", "cross" or "joint"
    sites: tuple[tuple[str, str], ...] = ()

    def cross_shape(self, tokens: int) -> list[int] | None:
        if self.cross_grid is None:
            return None
        return [self.heads, tokens, *self.cross_grid] if self.per_head else [tokens, *self.cross_grid]

    def self_shape(self) -> list[int] | None:
        if self.self_grid is None:
            return None
        n = self.self_grid[0] * self.self_grid[1]
        return [n, n]

    def grid_shape(self, tokens: int, on: bool) -> list[int] | None:
        """``[T, h, w]`` at the cross grid (text and concept maps), or None when not recorded."""
        return [tokens, *self.cross_grid] if on and self.cross_grid is not None else None

    def to_metadata(self, tokens: int) -> dict:
        meta = {"index": self.index, "name": self.name, "block": self.block, "kind": self.kind,
                "native": list(self.native), "heads": self.heads, "cross_shape": self.cross_shape(tokens),
                "self_shape": self.self_shape(), "self_grid": None if self.self_grid is None else list(self.self_grid)}
        if any(role == JOINT for _, role in self.sites):
            meta["text_shape"] = self.grid_shape(tokens, self.text)
            meta["concept_shape"] = self.grid_shape(tokens, self.concept)
        return meta


def layer_names(unet) -> list[str]:
    """The UNet's transformer blocks that have both attn1 and attn2, in data-flow order (down, mid, up)."""
    kinds: dict[str, set[str]] = {}
    for proc in unet.attn_processors:
        parts = proc.split(".")
        if len(parts) >= 3 and parts[-1] == "processor" and parts[-2] in (SELF, CROSS):
            kinds.setdefault(".".join(parts[:-2]), set()).add(parts[-2])
    names = [n for n, k in kinds.items() if k == {SELF, CROSS}]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: (order.get(n.split(".")[0], 3), _numeric_key(n)))


def _numeric_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def block_of(name: str) -> str:
    parts = name.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def select_layers(unet, patterns: Sequence[str] = (), max_layers: int | None = None) -> list[str]:
    """Layers whose name, or one of whose processor names, matches any glob; capped by ``max_layers``.

    Every pattern must match something, else :class:`LayerSelectionError` lists the valid names.
    The cap keeps ``max_layers`` layers evenly spaced along the UNet (so down, mid and up stay represented).
    """
    return choose_layers(layer_names(unet), (SELF, CROSS), patterns, max_layers)


def choose_layers(names: Sequence[str], processors: Sequence[str], patterns: Sequence[str] = (),
                  max_layers: int | None = None) -> list[str]:
    """:func:`select_layers` over any family's layer ``names`` (in data-flow order), whose attention modules
    are ``processors`` (``attn1``/``attn2`` in a UNet block, ``attn`` in an MM-DiT block)."""
    names = list(names)
    chosen = names
    if patterns:
        hit: set[str] = set()
        for pattern in patterns:
            matched = {n for n in names
                       if fnmatch.fnmatchcase(n, pattern)
                       or any(fnmatch.fnmatchcase(f"{n}.{kind}.processor", pattern) for kind in processors)}
            if not matched:
                suffixes = " / ".join(f".{kind}.processor" for kind in processors)
                raise LayerSelectionError(
                    f"layer pattern {pattern!r} matches no layer; valid layers: {', '.join(names)} "
                    f"(processor names add {suffixes})")
            hit |= matched
        chosen = [n for n in names if n in hit]
    if max_layers is not None and len(chosen) > max_layers:
        if max_layers == 1:
            chosen = [chosen[len(chosen) // 2]]
        else:
            picks = sorted({round(i * (len(chosen) - 1) / (max_layers - 1)) for i in range(max_layers)})
            chosen = [chosen[i] for i in picks]
    return chosen


def native_grids(unet, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Each block's latent grid: down_blocks.i halves i times (stride-2 conv: ceil), mid and
    up_blocks.j sit at the resolution of down_blocks.(n-1) and down_blocks.(n-1-j)."""
    h, w = latent_hw
    sizes = []
    for _ in range(len(unet.config.down_block_types)):
        sizes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    n = len(sizes)
    grids = {f"down_blocks.{i}": sizes[i] for i in range(n)}
    grids["mid_block"] = sizes[n - 1]
    grids.update({f"up_blocks.{j}": sizes[n - 1 - j] for j in range(n)})
    return grids


def pooled_grid(native: tuple[int, int], resolution: int) -> tuple[int, int]:
    """Both sides divided by one integer factor, the smallest that brings the long side to <= ``resolution``
    (so the aspect ratio is kept, and a grid is only ever pooled down)."""
    factor = -(-max(native) // resolution)
    return max(1, native[0] // factor), max(1, native[1] // factor)


def plan_layers(unet, latent_hw: tuple[int, int], *, patterns: Sequence[str] = (), max_layers: int | None = None,
                cross: bool = True, self_: bool = True, resolution: int = 32, self_resolution: int = 16,
                per_head: bool = False) -> tuple[list[LayerPlan], list[str]]:
    """A UNet's layer plans (each block at its own grid), plus one message per grid that does not pool evenly."""
    grids = native_grids(unet, latent_hw)
    return plan_blocks(unet, select_layers(unet, patterns, max_layers), lambda name: grids[block_of(name)],
                       kind="unet", cross=cross, self_=self_, resolution=resolution, self_resolution=self_resolution,
                       per_head=per_head)


def plan_blocks(denoiser, names: Sequence[str], grid_of: Callable[[str], tuple[int, int]], *, kind: str,
                cross: bool = True, self_: bool = True, resolution: int = 32, self_resolution: int = 16,
                per_head: bool = False, block: Callable[[str], str] = block_of) -> tuple[list[LayerPlan], list[str]]:
    """Plans for blocks with ``attn1`` (self) and ``attn2`` (cross) modules (a UNet's, a cross-attention DiT's),
    plus one message per grid that does not pool evenly."""
    modules = dict(denoiser.named_modules())
    plans, problems = [], []
    for index, name in enumerate(names):
        native = tuple(grid_of(name))
        plan = LayerPlan(index, name, block(name), native, heads=int(modules[f"{name}.{CROSS}"].heads),
                         per_head=per_head and cross, kind=kind)
        if cross:
            plan.cross_grid = pooled_grid(native, resolution)
        if self_:
            plan.self_grid = pooled_grid(native, self_resolution)
        plan.sites = tuple((module, role) for module, role, grid in ((SELF, ROLE_SELF, plan.self_grid),
                                                                     (CROSS, ROLE_CROSS, plan.cross_grid))
                           if grid is not None)
        problems += uneven(name, native, (("cross", plan.cross_grid), ("self", plan.self_grid)))
        plans.append(plan)
    return plans, problems


def uneven(name: str, native: tuple[int, int], grids) -> list[str]:
    """One message per ``(what, grid)`` that ``native`` does not divide into (uneven pooling windows)."""
    return [f"layer {name}: native grid {native[0]}x{native[1]} does not divide into {g[0]}x{g[1]} for {what} maps "
            f"(uneven pooling windows)" for what, g in grids if g is not None and (native[0] % g[0] or native[1] % g[1])]


def pooling_matrix(native: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """One-hot membership ``M[cell, pixel]`` (float64) of each native pixel (row-major) in a pooled cell."""
    (h, w), (gh, gw) = native, grid
    rows = (np.arange(h) * gh // h)[:, None] * gw + (np.arange(w) * gw // w)[None, :]
    m = np.zeros((gh * gw, h * w))
    m[rows.ravel(), np.arange(h * w)] = 1.0
    return m


@functools.lru_cache(maxsize=64)
def pooling_operators(native: tuple[int, int], grid: tuple[int, int], heads: int, kind: str,
                      device: torch.device, dtype: torch.dtype, per_head: bool = False
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(query_pool, key_pool)`` on the device, built once per shape and shared by every layer and run.

    query_pool ``[cells, heads*pixels]`` averages the heads and each cell's queries (``per_head``:
    ``[cells, pixels]``, each cell's queries only, applied to every head); None when the grid is native
    (then the processor takes a plain mean over heads, or copies them). key_pool ``[1, heads, pixels, cells]``
    sums each cell's keys; None for cross attention and for native self grids.
    """
    if tuple(grid) == tuple(native):
        query_pool = None
    else:
        m = torch.as_tensor(pooling_matrix(native, grid), dtype=torch.float64, device=device)   # [cells, pixels]
        m = m / m.sum(dim=1, keepdim=True)
        query_pool = (m if per_head else m.repeat(1, heads) / heads).to(dtype).contiguous()
    if kind == CROSS or query_pool is None:
        return query_pool, None
    key_pool = torch.as_tensor(pooling_matrix(native, grid).T, dtype=dtype, device=device)
    # A real (not expanded) [1, heads, pixels, cells] tensor: fused SDPA kernels want unit-stride heads.
    return query_pool, key_pool[None, None].repeat(1, heads, 1, 1).contiguous()


@functools.lru_cache(maxsize=64)
def key_cell_index(native: tuple[int, int], grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Each native pixel's (row-major) pooled cell, as a LongTensor: the key side's sum per cell is an
    ``index_add_`` over it, a pass over the probabilities instead of a matmul with the one-hot [keys, cells]."""
    return torch.as_tensor(pooling_matrix(native, grid).argmax(axis=0), dtype=torch.long, device=device)


# --------------------------------------------------------------------------- the slots


def last_sample_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An SDPA ``attn_mask`` (broadcastable to [batch, heads, queries, keys]) for the last sample only, as a 4-D
    additive mask ``[1, heads | 1, queries | 1, keys]`` (a boolean mask is True where attention is allowed)."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask[None]
    mask = mask[-1:]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def same_heads(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``key`` with its heads repeated to the query's (grouped-query attention, SDPA's ``enable_gqa``)."""
    if key.shape[1] == query.shape[1]:
        return key
    return key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)


class _Slot:
    """One observed attention module: its per-step bookkeeping and its parts of the flat step buffer.

    Subclasses set ``queries``/``keys`` (the planned sequence lengths), take their parts in ``__init__`` and
    implement :meth:`record` (from the call's ``[batch, heads, sequence, head_dim]`` query and key) and
    :meth:`unpack` (into a :class:`StepMaps`). A slot that forms its maps from other torch calls than
    ``scaled_dot_product_attention`` names them in ``watches`` and overrides :meth:`see` and :meth:`leave`."""

    #: the torch functions whose calls, made while the module runs, are handed to :meth:`see`
    watches: tuple = ()

    def __init__(self, plan: LayerPlan, module: str, role: str):
        self.plan, self.module, self.role = plan, module, role
        self.queries = self.keys = 0
        self.processor = "?"
        self.parts: list[tuple[str, int, tuple[int, ...]]] = []   # (what, offset, shape) in the flat buffer
        self.entered = 0             # module calls this step
        self.seen = 0                # calls of this module call that matched the plan
        self.error: str | None = None
        self.fatal = False           # an error that no plan change fixes (the processor cannot be observed)
        self.mismatch: str | None = None
        self.path = f"{plan.name}.{module}"
        #: None, or ``edit(plan, role, call) -> call``: rewrites the attention call's keywords before it runs
        self.edit = None
        #: whether the module call now running is the one recorded (see ``AttentionRecorder(denoiser_call=)``)
        self.recording = False

    def take(self, layout: list[int], what: str, shape: tuple[int, ...]) -> None:
        self.parts.append((what, layout[0], tuple(shape)))
        layout[0] += math.prod(shape)

    def bind(self, buffer: torch.Tensor) -> None:
        self.views = {what: buffer[offset:offset + math.prod(shape)].view(shape) for what, offset, shape in self.parts}

    def observe(self, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        """One ``scaled_dot_product_attention`` call made while this module ran."""
        call = dict(zip(_SDPA_ARGS, args), **kwargs)
        query, key = call["query"], call["key"]
        if query.dim() != 4 or query.shape[2] != self.queries or key.shape[2] != self.keys:
            self.mismatch = f"got {query.shape[-2]} queries x {key.shape[-2]} keys, planned {self.queries} queries x {self.keys} keys"
            return
        if call.get("is_causal") or float(call.get("dropout_p") or 0.0) > 0.0:
            self.fail("calls attention with is_causal or dropout, whose probabilities diffviz does not rebuild")
            return
        self.seen += 1
        if self.seen > 1:
            self.fail("makes more than one attention call of the planned shape per call; diffviz records one")
            return
        if self.error is None:
            self.record(query, same_heads(query, key), output, last_sample_mask(call.get("attn_mask"), query.dtype),
                        call.get("scale"))

    def see(self, func, args: tuple, kwargs: dict, output) -> None:
        """A call of one of :attr:`watches` made while this module ran."""

    def leave(self) -> None:
        """The module call ended: one that made no observable attention call is refused (or, when its calls had
        another shape than planned, reported as a shape mismatch)."""
        if self.seen == 0 and self.error is None:
            if self.mismatch:
                self.error = f"layer {self.plan.name} ({self.role}): {self.mismatch}"
            else:
                self.fail("made no torch scaled_dot_product_attention call that diffviz can observe "
                          "(its attention is computed another way); use a processor that calls it, or leave "
                          "the layer out with --layers")

    def fail(self, why: str) -> None:
        if self.error is None or not self.fatal:
            self.error = f"layer {self.plan.name}: {self.module}'s processor {self.processor} {why}"
            self.fatal = True

    def record(self, query, key, output, mask, scale) -> None:
        raise NotImplementedError

    def unpack(self, flat: np.ndarray, maps: "StepMaps", key_positions: Sequence[int]) -> None:
        raise NotImplementedError


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _MapSlot(_Slot):
    """An ``attn1`` (self) or ``attn2`` (cross) module: image queries, and image or text keys."""

    def __init__(self, plan: LayerPlan, module: str, role: str, *, heads: int, context_length: int, layout: list[int],
                 device: torch.device, dtype: torch.dtype):
        super().__init__(plan, module, role)
        cross = role == ROLE_CROSS
        grid = plan.cross_grid if cross else plan.self_grid
        cells = grid[0] * grid[1]
        self.grid = grid
        self.queries = plan.native[0] * plan.native[1]
        self.keys = context_length if cross else self.queries
        self.per_head = cross and plan.per_head
        shape = (cells, self.keys if cross else cells)
        self.take(layout, role, (heads, *shape) if self.per_head else shape)
        kind = CROSS if cross else SELF
        self.query_pool, self.key_pool = pooling_operators(tuple(plan.native), tuple(grid), heads, kind, device, dtype,
                                                           self.per_head)
        self.dense = None   # ([cells, queries] cell mean, [keys] each key's cell): see DENSE_MAX
        if self.key_pool is not None and device.type == "cpu" and heads * self.queries * self.keys <= DENSE_MAX:
            cell_mean = pooling_operators(tuple(plan.native), tuple(grid), heads, CROSS, device, dtype, True)[0]
            self.dense = (cell_mean, key_cell_index(tuple(plan.native), tuple(grid), device))
        self.zero = torch.zeros((), dtype=dtype, device=device)  # baddbmm's ignored input

    def record(self, query, key, output, mask, scale) -> None:
        out = self.views[self.role]
        alpha = query.shape[-1] ** -0.5 if scale is None else scale
        q, k = query[-1], key[-1].transpose(1, 2)

        def probs_of(rows=slice(None)) -> torch.Tensor:   # softmax(q kᵀ · scale + mask) of those queries
            bias = self.zero if mask is None else (mask[0] if mask.shape[-2] == 1 else mask[0][:, rows])
            return torch.baddbmm(bias, q[:, rows], k, beta=0 if mask is None else 1, alpha=alpha).softmax(-1)

        if self.dense is not None:
            # queries in blocks that stay in the CPU's cache: head mean, keys summed per cell; then the cells' mean
            cell_mean, cell_of = self.dense
            summed = q.new_zeros(self.queries, out.shape[1])
            step = max(16, CHUNK_ELEMENTS // (q.shape[0] * self.keys))
            for r0 in range(0, self.queries, step):
                rows = slice(r0, min(self.queries, r0 + step))
                summed[rows].index_add_(1, cell_of, probs_of(rows).mean(dim=0))
            torch.matmul(cell_mean, summed, out=out)
            return
        if self.key_pool is None:
            probs = probs_of()
        else:  # 4-D, so that the fused kernels (not the math fallback) run on a GPU
            probs = F.scaled_dot_product_attention(query[-1:], key[-1:], self.key_pool, attn_mask=mask, scale=scale)
        if self.per_head:  # [heads, queries, keys] -> [heads, cells, keys]
            if self.query_pool is None:
                out.copy_(probs.view(out.shape))
            else:
                torch.matmul(self.query_pool, probs.view(-1, *probs.shape[-2:]), out=out)
        elif self.query_pool is None:
            torch.mean(probs.view(-1, *probs.shape[-2:]), dim=0, out=out)
        else:
            torch.matmul(self.query_pool, probs.reshape(-1, probs.shape[-1]), out=out)

    def unpack(self, flat: np.ndarray, maps: "StepMaps", key_positions: Sequence[int]) -> None:
        (what, offset, shape), = self.parts
        block = flat[offset:offset + math.prod(shape)]
        if self.role == ROLE_CROSS:  # [(heads,) cells, K] -> [(heads,) K, h, w]
            k = shape[-1]
            full = block.reshape(-1, shape[-2], k).transpose(0, 2, 1).reshape(-1, k, *self.grid)
            maps.cross[self.plan.index] = full if self.per_head else full[0]
        else:
            maps.self_[self.plan.index] = block.reshape(shape)


# --------------------------------------------------------------------------- the observer


_SDPA = F.scaled_dot_product_attention


class _Observer(TorchFunctionMode):
    """On the mode stack only while a recorded attention module runs (the hooks push and pop it)."""

    def __init__(self):
        super().__init__()
        self.slots: list[_Slot] = []
        #: None, or ``() -> bool``: whether the denoiser call now running is the recorded one
        self.recorded_call = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA and self.slots and self.slots[-1].edit is not None:
            # the one place an intervention changes attention: the call as the model made it, rewritten
            slot = self.slots[-1]
            kwargs = slot.edit(slot.plan, slot.role, dict(zip(_SDPA_ARGS, args), **kwargs))
            args = ()
        output = func(*args, **kwargs)   # the model's own call (this mode is off inside the handler)
        if self.slots and self.slots[-1].recording and (func is _SDPA or func in self.slots[-1].watches):
            slot = self.slots[-1]
            try:
                if func is _SDPA:
                    slot.observe(args, kwargs, output)
                else:
                    slot.see(func, args, kwargs, output)
            except Exception as exc:  # noqa: BLE001 - the model's call never fails because of the recording
                slot.fail(f"could not be recorded: {type(exc).__name__}: {exc}")
        return output

    def hooks(self, slot: _Slot):
        def before(module, args):
            slot.recording = self.recorded_call is None or self.recorded_call()
            if not slot.recording and slot.edit is None:
                return   # another sample's call (true CFG's negative prompt): not observed, not counted
            if slot.recording:
                slot.entered += 1
                slot.seen = 0
                slot.mismatch = None
            self.slots.append(slot)
            if len(self.slots) == 1:
                self.__enter__()

        def after(module, args, output):
            if self.slots and self.slots[-1] is slot:
                self.slots.pop()
                if not self.slots:
                    self.__exit__(None, None, None)
            if slot.recording:
                slot.recording = False
                slot.leave()
        return before, after


#: diffusers attention backends that end in torch's scaled_dot_product_attention (the observed call)
OBSERVABLE_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


class BackendError(RuntimeError):
    """A recorded module's attention cannot be switched to an observable backend (one line naming it)."""


# --------------------------------------------------------------------------- the recorder


@dataclass
class StepMaps:
    """One step's maps on the CPU, keyed by layer index, in the model's dtype (float32 for bfloat16).

    ``cross[L]``: ``[context_length, h, w]`` (the full distribution over every key), or
    ``[heads, context_length, h, w]`` for a per-head plan; joint layers store the prompt tokens' rows only;
    ``self_[L]``: ``[h*w, h*w]`` (rows: pooled queries; columns: pooled keys);
    ``skipped``: the layers that were not computed at this step (a caching hook skipped their block).
    """

    step: int
    cross: dict[int, np.ndarray] = field(default_factory=dict)
    self_: dict[int, np.ndarray] = field(default_factory=dict)
    text: dict[int, np.ndarray] = field(default_factory=dict)      # joint layers: [T, h, w] text->image
    concept: dict[int, np.ndarray] = field(default_factory=dict)   # joint layers: [T, h, w] concept maps
    skipped: list[int] = field(default_factory=list)


class PendingMaps:
    """One step's maps on their way to the CPU; :meth:`result` waits for the copy (if still running)."""

    def __init__(self, recorder: "AttentionRecorder", step: int, host: torch.Tensor, event, skipped: list[int]):
        self.recorder, self.step, self.host, self.event, self.skipped = recorder, step, host, event, skipped

    def result(self) -> StepMaps:
        if self.event is not None:
            self.event.synchronize()
        return self.recorder._unpack(self.step, self.host, self.skipped)


class AttentionRecorder:
    """Observes the planned layers' attention modules of ``denoiser`` and hands back one :class:`StepMaps` per step.

    ``context_length``: the text keys of a cross module (and of the text part of a joint sequence);
    ``positions``: the text-sequence positions of the tokens whose joint maps are stored (default: every slot);
    ``image_first``: the joint sequence order (SD3 ``[image; text]``, Flux ``[text; image]``); ``content``: which
    stored tokens are content words (the concept maps' softmax runs over those).

    ``edit`` (interventions): ``edit(plan, role, call) -> call`` receives each recorded module's attention call as
    keywords (``query``, ``key``, ``value``, ``attn_mask``, ``scale``, …) and returns the call to make instead, in
    the one place the call is made; the maps describe the call as made. Without it nothing is changed.

    ``denoiser_call``: which call of the denoiser within a step carries the conditional sample, for a pipeline that
    calls it more than once per step (Qwen-Image's true CFG: the prompt's call, then the negative prompt's, each
    with its own text length); only that call's modules are observed. None: the pipeline calls it once per step
    (a CFG batch is one call). ``slot_types``: ``{role: slot class}`` for roles this module does not know
    (``capture.linear.LinearSlot`` for ``linear``).
    """

    def __init__(self, denoiser, plans: list[LayerPlan], *, context_length: int, positions: Sequence[int] | None = None,
                 image_first: bool = True, content: Sequence[bool] | None = None, fail_on_shape_error: bool = False,
                 on_step: Callable[[StepMaps], None] | None = None,
                 edit: Callable[[LayerPlan, str, dict], dict] | None = None, denoiser_call: int | None = None,
                 slot_types: dict[str, type] | None = None):
        self.denoiser = denoiser
        self.denoiser_call = denoiser_call
        self._calls = 0   # denoiser calls so far in this step (counted only with ``denoiser_call``)
        self.layers = list(plans)
        self.context_length = int(context_length)
        #: the text-sequence position of each stored joint row (cross modules store every context slot)
        self.key_positions = list(range(self.context_length)) if positions is None else [int(p) for p in positions]
        self.fail_on_shape_error = fail_on_shape_error
        self.on_step = on_step
        self.steps: list[StepMaps] = []         # kept only when there is no on_step handler
        self.warnings: list[str] = []
        #: per step, per layer index (as first planned): whether the layer was computed
        self.computed: list[list[bool]] = []
        #: ``metadata.attention.backend``: {"used", "requested"} when a recorded module dispatches attention
        self.backend: dict | None = None
        self._step = 0
        self._waiting: PendingMaps | None = None
        self._handles: list = []
        self._restore: list[tuple[object, object]] = []
        self._observer = _Observer()
        self._alive = {id(plan) for plan in self.layers}   # the planned layers not dropped at step 0
        param = next(denoiser.parameters())
        self.device, self.dtype = param.device, param.dtype
        modules = dict(denoiser.named_modules())
        layout = [0]
        self._slots: list[_Slot] = []
        for plan in self.layers:
            for module, role in plan.sites:
                path = f"{plan.name}.{module}"
                if path not in modules:
                    raise LayerSelectionError(f"layer {plan.name} has no attention module {module}")
                if role in (slot_types or {}):
                    slot = slot_types[role](plan, module, heads=int(modules[path].heads), layout=layout,
                                            device=self.device, dtype=self.dtype)
                elif role == JOINT:
                    from capture.joint import JointSlot

                    slot = JointSlot(plan, module, image_first=image_first, n_text=self.context_length,
                                     positions=self.key_positions, content=content, layout=layout,
                                     device=self.device, dtype=self.dtype)
                else:
                    slot = _MapSlot(plan, module, role, heads=int(modules[path].heads),
                                    context_length=self.context_length, layout=layout, device=self.device,
                                    dtype=self.dtype)
                slot.edit = edit
                self._slots.append(slot)
        self.buffer = torch.zeros(layout[0], device=self.device, dtype=self.dtype)
        for slot in self._slots:
            slot.bind(self.buffer)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> "AttentionRecorder":
        """Hook the recorded modules (their processors stay as they are)."""
        modules = dict(self.denoiser.named_modules())
        try:
            if self.denoiser_call is not None:
                self._observer.recorded_call = lambda: self._calls - 1 == self.denoiser_call
                self._handles.append(self.denoiser.register_forward_pre_hook(self._count_call))
            for slot in self._slots:
                module = modules[slot.path]
                processor = getattr(module, "processor", None)
                slot.processor = type(processor).__name__ if processor is not None else type(module).__name__
                self._observable_backend(slot, processor)
                before, after = self._observer.hooks(slot)
                self._handles.append(module.register_forward_pre_hook(before))
                self._handles.append(module.register_forward_hook(after, always_call=True))
        except BaseException:
            self.remove()
            raise
        return self

    def _count_call(self, module, args) -> None:
        self._calls += 1

    def _observable_backend(self, slot: _Slot, processor) -> None:
        """A processor that dispatches attention (``dispatch_attention_fn``) gets an observable backend for the run:
        its own, or ``native`` in place of one that never forms the probabilities."""
        if processor is None or not hasattr(processor, "_attention_backend"):
            return
        if getattr(processor, "_parallel_config", None) is not None:
            raise BackendError(f"layer {slot.plan.name}: {slot.module} runs context-parallel attention, which diffviz "
                               f"does not observe; record without a parallel config")
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        requested = processor._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
        requested = AttentionBackendName(requested).value
        used = requested if requested in OBSERVABLE_BACKENDS else "native"
        if self.backend is None:
            self.backend = {"used": used, "requested": requested}
        elif self.backend["requested"] != requested:
            self.backend["requested"] = "mixed"
        if all(p is not processor for p, _ in self._restore):
            self._restore.append((processor, processor._attention_backend))
            processor._attention_backend = AttentionBackendName(used)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for processor, backend in self._restore:
            processor._attention_backend = backend
        self._restore.clear()
        while self._observer.slots:  # an exception escaped a recorded module before its forward hook
            self._observer.slots.pop()
        self._observer.recorded_call = None

    # ------------------------------------------------------------------ per step
    def start_copy(self) -> PendingMaps:
        """Start moving this step's maps to the CPU: one copy of the flat buffer, asynchronous on a GPU
        (into pinned memory, with an event), so the host does not wait for the device mid-run.
        Call once per denoiser step; :meth:`PendingMaps.result` gives the maps."""
        skipped = self._check_slots()
        for slot in self._slots:
            slot.entered = 0
        self._calls = 0
        step, self._step = self._step, self._step + 1
        source = self.buffer if self.dtype in (torch.float16, torch.float32) else self.buffer.float()  # numpy: no bf16
        if source.is_cuda:
            host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)  # from torch's pinned cache
            host.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = source.to(device="cpu", copy=True), None  # never a view of the live buffer
        return PendingMaps(self, step, host, event, skipped)

    def _unpack(self, step: int, host: torch.Tensor, skipped: list[int]) -> StepMaps:
        flat = host.numpy()
        maps = StepMaps(step, skipped=list(skipped))
        for slot in self._slots:
            if slot.error is None and id(slot.plan) in self._alive and slot.plan.index not in skipped:
                slot.unpack(flat, maps, self.key_positions)
        return maps

    def _deliver(self, maps: StepMaps) -> None:
        if self.on_step is not None:
            self.on_step(maps)
        else:
            self.steps.append(maps)

    def collect(self) -> StepMaps:
        """This step's maps on the CPU now (waits for the device), delivered to ``on_step`` / ``steps``."""
        maps = self.start_copy().result()
        self._deliver(maps)
        return maps

    def callback_on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """Use as the pipeline's ``callback_on_step_end``. Each step's maps are delivered one step later
        (so the host never waits for the device); :meth:`flush` (``record_attention`` calls it) delivers the last."""
        pending = self.start_copy()
        self.flush()
        self._waiting = pending
        return {}

    def flush(self) -> None:
        """Deliver the maps still waiting from ``callback_on_step_end``."""
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._deliver(waiting.result())

    def _check_slots(self) -> list[int]:
        """The layers not computed at this step. Raises for a processor that cannot be observed, and for a shape
        that does not fit the plan (or, in step 0, warns and drops that layer)."""
        step = self._step
        by_layer: dict[int, list[_Slot]] = {}
        for slot in self._slots:
            if id(slot.plan) in self._alive:
                by_layer.setdefault(id(slot.plan), []).append(slot)
        fatal = [slot.error for slots in by_layer.values() for slot in slots if slot.fatal]
        if fatal:
            raise ShapeMismatchError(fatal[0])
        skipped, bad = [], []
        for slots in by_layer.values():
            ran = [slot.entered > 0 for slot in slots]
            errors = [slot.error for slot in slots if slot.error is not None]
            if not any(ran) and not errors:
                if step == 0:
                    errors = [f"layer {slots[0].plan.name} was not called in step 0"]
                else:
                    skipped.append(slots[0].plan.index)
                    continue
            elif not all(ran):
                raise ShapeMismatchError(f"layer {slots[0].plan.name}: some of its attention modules ran at step {step} "
                                         f"and others did not; diffviz records whole blocks")
            if errors:
                bad.append((slots, errors))
        self.computed.append([plan.index not in skipped for plan in self.layers])
        if not bad:
            return skipped
        message = "; ".join(e for _, errors in bad for e in errors)
        if self.fail_on_shape_error or step > 0:
            raise ShapeMismatchError(f"attention shape mismatch: {message}")
        # Step 0: nothing is written yet, so drop those layers and renumber the rest.
        warnings.warn(f"skipping layers whose attention does not fit the plan: {message}", ShapeWarning, stacklevel=3)
        self.warnings.append(message)
        dropped = {id(slots[0].plan) for slots, _ in bad}
        self.layers = [plan for plan in self.layers if id(plan) not in dropped]
        self._alive = {id(plan) for plan in self.layers}
        for position, plan in enumerate(self.layers):
            plan.index = position
        self.computed[-1] = [True] * len(self.layers)
        return skipped

    def computed_masks(self) -> dict[int, list[bool]]:
        """``{layer index: [computed at step s]}`` for the layers some step skipped (``metadata.layers[].computed``)."""
        return {plan.index: [row[plan.index] for row in self.computed] for plan in self.layers
                if not all(row[plan.index] for row in self.computed)}

    def layer_metadata_for(self, tokens: int) -> list[dict]:
        """``metadata.layers`` for maps stored with ``tokens`` prompt tokens."""
        masks = self.computed_masks()
        layers = [plan.to_metadata(tokens) for plan in self.layers]
        for meta in layers:
            if meta["index"] in masks:
                meta["computed"] = masks[meta["index"]]
        return layers

    def cross_rows(self) -> int:
        """Rows of a stored cross map: the stored tokens of a joint layer, every context slot of a cross module."""
        joint = any(role == JOINT for plan in self.layers for _, role in plan.sites)
        return len(self.key_positions) if joint else self.context_length

    def processors(self) -> list[str]:
        """The processor classes of the recorded modules (``metadata.attention.processors``)."""
        return sorted({slot.processor for slot in self._slots if id(slot.plan) in self._alive})


@contextmanager
def record_attention(pipe, *, layers: Sequence[str] = (), max_layers: int | None = None, cross: bool = True,
                     self_: bool = True, resolution: int = 32, self_resolution: int = 16,
                     height: int | None = None, width: int | None = None, fail_on_shape_error: bool = False,
                     per_head: bool = False, on_step: Callable[[StepMaps], None] | None = None,
                     prompt: str | None = None, concept: bool = False) -> Iterator[AttentionRecorder]:
    """Record the chosen layers of the pipeline's denoiser (UNet or transformer) while the block runs;
    the hooks come off after.

    ``height``/``width`` are the image size in pixels (default: the model's native size). Grids that do
    not pool evenly warn (:class:`ShapeWarning`) or, with ``fail_on_shape_error``, raise before anything runs.
    MM-DiT families store the rows of ``prompt``'s tokens (``rec.key_positions``: their places in the text
    sequence); without a prompt, every text slot.
    """
    recorder = build_recorder(pipe, layers=layers, max_layers=max_layers, cross=cross, self_=self_,
                              resolution=resolution, self_resolution=self_resolution, height=height, width=width,
                              fail_on_shape_error=fail_on_shape_error, per_head=per_head, on_step=on_step,
                              prompt=prompt, concept=concept)
    recorder.install()
    try:
        yield recorder
        recorder.flush()
    finally:
        recorder.remove()


def build_recorder(pipe, *, layers: Sequence[str] = (), max_layers: int | None = None, cross: bool = True,
                   self_: bool = True, resolution: int = 32, self_resolution: int = 16, height: int | None = None,
                   width: int | None = None, fail_on_shape_error: bool = False, per_head: bool = False,
                   on_step: Callable[[StepMaps], None] | None = None, prompt: str | None = None,
                   concept: bool = False) -> AttentionRecorder:
    """A recorder for ``pipe`` (not installed yet), planned by its model family; see :func:`record_attention`."""
    from types import SimpleNamespace

    from capture import families
    from capture.families import TokenInfo

    family = families.for_pipeline(pipe)
    peek = family.peek_pipe(pipe)
    native_h, native_w = family.native_size(peek)
    latent_hw = family.latent_grid(peek, height or native_h, width or native_w)
    flags = SimpleNamespace(layers=tuple(layers), max_layers=max_layers, include_cross_attention=cross,
                            include_self_attention=self_, attention_resolution=resolution,
                            self_attention_resolution=self_resolution, per_head=per_head, concept_maps=concept)
    plans, problems = family.plan(peek, latent_hw, flags)
    settle(problems, fail_on_shape_error)
    if prompt is not None:
        tokens = family.tokens(peek.tokenizers, prompt)
    else:  # every slot of the text sequence, as a cross-attention block sees them
        slots = [{"index": i, "special": True, "text": "", "word": None} for i in range(peek.context_length)]
        tokens = TokenInfo(slots, [], "")
    return family.recorder(pipe, plans, tokens, context_length=peek.context_length,
                           fail_on_shape_error=fail_on_shape_error, on_step=on_step)


def settle(problems: Sequence[str], fail_on_shape_error: bool) -> None:
    """A plan's uneven-pooling problems: raise them all under ``--fail-on-shape-error``, else warn each."""
    if problems and fail_on_shape_error:
        raise ShapeMismatchError("; ".join(problems))
    for problem in problems:
        warnings.warn(problem, ShapeWarning, stacklevel=3)
