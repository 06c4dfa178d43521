"""Recording attention maps from a diffusers UNet without changing its output.

Read it as a sentence::

    with record_attention(pipe, layers=["up_blocks.*"], max_layers=12) as rec:
        image = pipe(prompt, callback_on_step_end=rec.callback_on_step_end).images[0]
    rec.steps[0].cross[0]        # [context_length, r, r] of step 0, layer 0 (the model's dtype)

How it works. A *layer* is one transformer block (``down_blocks.0.attentions.0.transformer_blocks.0``):
its ``attn1`` processor is self-attention, its ``attn2`` processor cross-attention. On the chosen
layers :class:`RecordingAttnProcessor` replaces the processor. It is diffusers' ``AttnProcessor2_0``
line for line, so the layer output comes from the very same ``scaled_dot_product_attention`` call
(bit-identical); beside it, for the conditional (last) sample of the CFG batch only, it computes

    map = mean_heads( pool_queries( softmax(q kᵀ / √d) @ P ) )

* Keys kept as they are (cross attention keeps every context slot; self maps at their native grid):
  ``softmax(baddbmm(q, kᵀ, alpha=1/√d))``, the same scores diffusers' classic processor computes.
* Keys pooled (self maps below their native grid): ``P`` is a one-hot [keys, cells] matrix that sums
  each cell's keys (rows still sum to 1), and ``softmax(q kᵀ/√d) @ P`` is one
  ``scaled_dot_product_attention(q, k, P)`` call, so the [n, n] map is never materialised. On the CPU,
  up to :data:`DENSE_MAX` elements, the map is materialised instead (head mean first, then the two
  poolings as matmuls), which costs far less there than SDPA with a value as wide as the cell count.
* Queries pooled: the head mean and the query-cell mean are one matmul with a precomputed
  [cells, heads*queries] matrix; queries kept: one ``mean`` over heads.

Each map is written into its slice of one flat device buffer (query-major: [cells, keys]), which
moves to the CPU once per step in one copy (:meth:`AttentionRecorder.start_copy`: asynchronous into
pinned memory on a GPU, so the host never waits for the device mid-run). Per recorded layer the host
issues three or four kernels and no sync.

Maps are only pooled down: a grid smaller than the resolution is kept at its native size. Both sides
of a grid are divided by the same integer factor (the aspect ratio is kept), the smallest that brings
the long side within the resolution. ``per_head`` keeps every head's cross map ([heads, T, h, w]).
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

SELF, CROSS = "attn1", "attn2"
#: On the CPU a pooled self map is cheaper from the materialised [heads, q, k] probabilities (head mean,
#: then two small matmuls) than from SDPA with the [keys, cells] pooling matrix as a wide value, up to
#: this many elements (float32: 128 MB); past it, and on GPUs, SDPA keeps the map unmaterialised.
DENSE_MAX = 1 << 25


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
        if self.kind != "unet":
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
    """The layer plans, plus one message per layer whose grid does not pool evenly."""
    grids = native_grids(unet, latent_hw)
    heads = {name: int(m.heads) for name, m in unet.named_modules() if name.endswith(f".{CROSS}")}
    plans, problems = [], []
    for index, name in enumerate(select_layers(unet, patterns, max_layers)):
        block = block_of(name)
        native = grids[block]
        plan = LayerPlan(index, name, block, native, heads=heads[f"{name}.{CROSS}"], per_head=per_head and cross)
        if cross:
            plan.cross_grid = pooled_grid(native, resolution)
        if self_:
            plan.self_grid = pooled_grid(native, self_resolution)
        for kind, grid in (("cross", plan.cross_grid), ("self", plan.self_grid)):
            if grid is not None and (native[0] % grid[0] or native[1] % grid[1]):
                problems.append(f"layer {name}: native grid {native[0]}x{native[1]} does not divide into "
                                f"{grid[0]}x{grid[1]} for {kind} maps (uneven pooling windows)")
        plans.append(plan)
    return plans, problems


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


# --------------------------------------------------------------------------- the processor


class _Slot:
    """What one processor records: its pooling operators and its view into the step buffer."""

    __slots__ = ("plan", "kind", "queries", "keys", "key_pool", "query_pool", "zero", "out", "offset", "calls", "error",
                 "per_head", "dense")

    def __init__(self, plan, kind, queries, keys, key_pool, query_pool, out, offset, dense=None):
        self.plan, self.kind, self.queries, self.keys = plan, kind, queries, keys
        self.key_pool = key_pool        # None (keys kept) or [1, heads, keys, cells]: sums each cell's keys
        self.query_pool = query_pool    # None (queries kept) or [cells, heads*queries]: head + cell mean
        self.dense = dense              # None, or ([cells, queries] cell mean, [keys, cells] key sum): see DENSE_MAX
        self.zero = torch.zeros((), dtype=out.dtype, device=out.device)  # baddbmm's ignored input
        self.out = out                  # view into the flat step buffer: [(heads,) query cells, keys or key cells]
        self.offset = offset
        self.per_head = out.dim() == 3
        self.calls = 0
        self.error: str | None = None


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as SDPA reads it (True = attend), in additive form."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


class RecordingAttnProcessor:
    """``AttnProcessor2_0`` plus the pooled, head-averaged map of the conditional sample."""

    def __init__(self, slot: _Slot):
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        # ---- AttnProcessor2_0, unchanged -------------------------------------------------------
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)

        # ---- the recording: the conditional (last) sample only (see the module docstring) ----------
        slot = self.slot
        slot.calls += 1
        if query.shape[2] == slot.queries and key.shape[2] == slot.keys:
            mask = None if attention_mask is None else _additive(attention_mask[-1:], query.dtype)
            if slot.key_pool is None or slot.dense is not None:
                probs = torch.baddbmm(slot.zero if mask is None else mask[0], query[-1], key[-1].transpose(1, 2),
                                      beta=0 if mask is None else 1, alpha=query.shape[-1] ** -0.5).softmax(-1)
            else:  # 4-D, so that the fused kernels (not the math fallback) run on a GPU
                probs = F.scaled_dot_product_attention(query[-1:], key[-1:], slot.key_pool, attn_mask=mask)
            if slot.dense is not None:  # [heads, q, k] -> head mean -> cells x key cells
                cell_mean, key_sum = slot.dense
                torch.matmul(torch.matmul(cell_mean, probs.mean(dim=0)), key_sum, out=slot.out)
            elif slot.per_head:  # [heads, queries, keys] -> [heads, cells, keys]
                if slot.query_pool is None:
                    slot.out.copy_(probs.view(slot.out.shape))
                else:
                    torch.matmul(slot.query_pool, probs.view(-1, *probs.shape[-2:]), out=slot.out)
            elif slot.query_pool is None:
                torch.mean(probs.view(-1, *probs.shape[-2:]), dim=0, out=slot.out)
            else:
                torch.matmul(slot.query_pool, probs.reshape(-1, probs.shape[-1]), out=slot.out)
        elif slot.error is None:
            slot.error = (f"layer {slot.plan.name} ({slot.kind}): got {query.shape[2]} queries x {key.shape[2]} keys, "
                          f"planned {slot.queries} queries x {slot.keys} keys")

        # ---- AttnProcessor2_0, unchanged -------------------------------------------------------
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


# --------------------------------------------------------------------------- the recorder


@dataclass
class StepMaps:
    """One step's maps on the CPU, keyed by layer index, in the model's dtype (float32 for bfloat16).

    ``cross[L]``: ``[context_length, h, w]`` (the full distribution over every key), or
    ``[heads, context_length, h, w]`` for a per-head plan;
    ``self_[L]``: ``[h*w, h*w]`` (rows: pooled queries; columns: pooled keys, each row sums to 1).
    """

    step: int
    cross: dict[int, np.ndarray] = field(default_factory=dict)
    self_: dict[int, np.ndarray] = field(default_factory=dict)
    text: dict[int, np.ndarray] = field(default_factory=dict)      # joint layers: [T, h, w] text->image
    concept: dict[int, np.ndarray] = field(default_factory=dict)   # joint layers: [T, h, w] concept maps


class PendingMaps:
    """One step's maps on their way to the CPU; :meth:`result` waits for the copy (if still running)."""

    def __init__(self, recorder: "AttentionRecorder", step: int, host: torch.Tensor, event):
        self.recorder, self.step, self.host, self.event = recorder, step, host, event

    def result(self) -> StepMaps:
        if self.event is not None:
            self.event.synchronize()
        return self.recorder._unpack(self.step, self.host)


class AttentionRecorder:
    """Installs recording processors on a UNet and hands back one :class:`StepMaps` per step."""

    def __init__(self, unet, plans: list[LayerPlan], *, context_length: int, fail_on_shape_error: bool = False,
                 on_step: Callable[[StepMaps], None] | None = None):
        self.unet = unet
        self.layers = list(plans)
        self.context_length = int(context_length)
        #: the text-sequence position of each recorded cross row (a UNet block sees every context slot)
        self.key_positions = list(range(self.context_length))
        self.fail_on_shape_error = fail_on_shape_error
        self.on_step = on_step
        self.steps: list[StepMaps] = []         # kept only when there is no on_step handler
        self.warnings: list[str] = []
        self._step = 0
        self._waiting: PendingMaps | None = None
        self._original = None
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        heads = {name: int(m.heads) for name, m in unet.named_modules() if name.endswith((f".{SELF}", f".{CROSS}"))}
        specs, offset = [], 0
        for plan in self.layers:
            for kind, grid in ((CROSS, plan.cross_grid), (SELF, plan.self_grid)):
                if grid is not None:
                    cells = grid[0] * grid[1]
                    shape = (cells, self.context_length if kind == CROSS else cells)
                    if kind == CROSS and plan.per_head:
                        shape = (heads[f"{plan.name}.{kind}"], *shape)
                    specs.append((plan, kind, grid, shape, offset))
                    offset += math.prod(shape)
        self.buffer = torch.zeros(offset, device=self.device, dtype=self.dtype)
        self._slots: dict[str, _Slot] = {}     # processor name -> slot
        for plan, kind, grid, shape, start in specs:
            n_heads = heads[f"{plan.name}.{kind}"]
            q_pool, k_pool = pooling_operators(tuple(plan.native), tuple(grid), n_heads, kind,
                                               self.device, self.dtype, len(shape) == 3)
            out = self.buffer[start:start + math.prod(shape)].view(shape)
            queries = plan.native[0] * plan.native[1]
            keys = self.context_length if kind == CROSS else queries
            dense = None
            if k_pool is not None and self.device.type == "cpu" and n_heads * queries * keys <= DENSE_MAX:
                cell_mean = pooling_operators(tuple(plan.native), tuple(grid), n_heads, CROSS, self.device,
                                              self.dtype, True)[0]
                dense = (cell_mean, k_pool[0, 0])
            self._slots[f"{plan.name}.{kind}.processor"] = _Slot(plan, kind, queries, keys, k_pool, q_pool, out,
                                                                 start, dense)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> "AttentionRecorder":
        self._original = dict(self.unet.attn_processors)
        procs = {name: RecordingAttnProcessor(self._slots[name]) if name in self._slots else proc
                 for name, proc in self._original.items()}
        self.unet.set_attn_processor(procs)  # (it empties the dict it is given)
        return self

    def remove(self) -> None:
        if self._original is not None:
            self.unet.set_attn_processor(dict(self._original))
            self._original = None

    # ------------------------------------------------------------------ per step
    def start_copy(self) -> "PendingMaps":
        """Start moving this step's maps to the CPU: one copy of the flat buffer, asynchronous on a GPU
        (into pinned memory, with an event), so the host does not wait for the device mid-run.
        Call once per UNet forward (once per step); :meth:`PendingMaps.result` gives the maps."""
        self._check_slots()
        for slot in self._slots.values():
            slot.calls = 0
        step, self._step = self._step, self._step + 1
        source = self.buffer if self.dtype in (torch.float16, torch.float32) else self.buffer.float()  # numpy: no bf16
        if source.is_cuda:
            host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)  # from torch's pinned cache
            host.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = source.to(device="cpu", copy=True), None  # never a view of the live buffer
        return PendingMaps(self, step, host, event)

    def _unpack(self, step: int, host: torch.Tensor) -> StepMaps:
        flat = host.numpy()
        maps = StepMaps(step)
        for slot in self._slots.values():
            if slot.error is not None:
                continue
            block = flat[slot.offset:slot.offset + slot.out.numel()]
            if slot.kind == CROSS:  # [(heads,) cells, K] -> [(heads,) K, h, w]
                grid = slot.plan.cross_grid
                stacked = block.reshape(-1, grid[0] * grid[1], self.context_length).transpose(0, 2, 1)
                full = stacked.reshape(-1, self.context_length, *grid)
                maps.cross[slot.plan.index] = full if slot.per_head else full[0]
            else:
                maps.self_[slot.plan.index] = block.reshape(slot.out.shape)
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

    def _check_slots(self) -> None:
        """Raise (or, in step 0, warn and drop the layer) when a slot saw the wrong shape or was not called."""
        bad = []
        for slot in self._slots.values():
            if slot.error is None and slot.calls == 0:
                slot.error = f"layer {slot.plan.name} ({slot.kind}) was not called in step {self._step}"
            if slot.error is not None and slot.plan in self.layers:
                bad.append(slot)
        if not bad:
            return
        message = "; ".join(slot.error for slot in bad)
        if self.fail_on_shape_error or self._step > 0:
            raise ShapeMismatchError(f"attention shape mismatch: {message}")
        # Step 0: nothing is written yet, so drop those layers and renumber the rest.
        warnings.warn(f"skipping layers whose attention does not fit the plan: {message}", ShapeWarning, stacklevel=3)
        self.warnings.append(message)
        dropped = {id(slot.plan) for slot in bad}
        self.layers = [plan for plan in self.layers if id(plan) not in dropped]
        for position, plan in enumerate(self.layers):
            plan.index = position
        for slot in self._slots.values():
            if id(slot.plan) in dropped:
                slot.error = slot.error or "dropped"

    def layer_metadata_for(self, tokens: int) -> list[dict]:
        """``metadata.layers`` for maps stored with ``tokens`` prompt tokens."""
        return [plan.to_metadata(tokens) for plan in self.layers]


@contextmanager
def record_attention(pipe, *, layers: Sequence[str] = (), max_layers: int | None = None, cross: bool = True,
                     self_: bool = True, resolution: int = 32, self_resolution: int = 16,
                     height: int | None = None, width: int | None = None, fail_on_shape_error: bool = False,
                     per_head: bool = False, on_step: Callable[[StepMaps], None] | None = None,
                     prompt: str | None = None, concept: bool = False) -> Iterator[AttentionRecorder]:
    """Record the chosen layers of the pipeline's denoiser (UNet or MM-DiT transformer) while the block runs;
    the original processors come back after.

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
    vsf = peek.vae_scale_factor
    latent_hw = ((height or native_h) // vsf, (width or native_w) // vsf)
    flags = SimpleNamespace(layers=tuple(layers), max_layers=max_layers, include_cross_attention=cross,
                            include_self_attention=self_, attention_resolution=resolution,
                            self_attention_resolution=self_resolution, per_head=per_head, concept_maps=concept)
    plans, problems = family.plan(peek, latent_hw, flags)
    settle(problems, fail_on_shape_error)
    if prompt is not None:
        tokens = family.tokens(peek.tokenizers, prompt)
    else:  # every slot of the text sequence, as a UNet block sees them
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

