"""Recording a linear (softmax-free) self-attention: SANA's ReLU-kernel ``attn1``, layer kind ``linear``.

SANA's ``SanaLinearAttnProcessor2_0`` forms no probabilities: with ``φ = relu`` it computes, per head,
``out_i = Σ_j φ(q_i)·φ(k_j) v_j / (Σ_j φ(q_i)·φ(k_j) + 1e-15)`` in float32, summing over keys before it meets the
query, so there is no scaled_dot_product_attention call to observe. The attention that output implies is

    A[i, j] = φ(q_i)·φ(k_j) / (Σ_j' φ(q_i)·φ(k_j') + 1e-15)

(no 1/√d; a row sums to 1, or is 0 where the query's features meet no key's, and then the output is 0 too). A
:class:`LinearSlot` sees the processor's two ``torch.nn.functional.relu`` calls (``φ(q)`` as ``[batch, heads, d,
N]``, then ``φ(k)`` as ``[batch, heads, N, d]``) and stores that A for the conditional (last) sample, as a self map:
head mean, query cells averaged, key cells summed (CONTRACT.md "Pooling"). The [N, N] map is never materialised
below the native grid: ``A @ P = (φ(q_i)ᵀ (φ(K)ᵀ P)) / den_i`` with ``P`` the one-hot [keys, cells] matrix, and the
head mean folds into the same matmul over ``heads · d``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capture.recorder import CROSS, ROLE_LINEAR, LayerPlan, _Slot, pooling_matrix, pooling_operators

#: the processor's own guard against an empty denominator
EPSILON = 1e-15


class LinearSlot(_Slot):
    """One linear self-attention module (``attn1`` of a SANA block): its part of the step buffer."""

    watches = (F.relu,)

    def __init__(self, plan: LayerPlan, module: str, *, heads: int, layout: list[int], device: torch.device,
                 dtype: torch.dtype):
        super().__init__(plan, module, ROLE_LINEAR)
        native, grid = tuple(plan.native), tuple(plan.self_grid)
        self.heads = heads
        self.queries = self.keys = math.prod(native)
        cells = grid[0] * grid[1]
        self.take(layout, "self", (cells, cells))
        # [cells, queries]: each cell's query mean (None at the native grid); [keys, cells]: each cell's keys summed
        self.cell_mean = pooling_operators(native, grid, heads, CROSS, device, torch.float32, True)[0]
        self.key_sum = None if grid == native else \
            torch.as_tensor(pooling_matrix(native, grid).T, dtype=torch.float32, device=device)
        self.features: list[torch.Tensor] = []

    def observe(self, args: tuple, kwargs: dict, output) -> None:
        self.fail("calls scaled_dot_product_attention in a layer planned as linear attention (SANA's ReLU kernel); "
                  "diffviz records SanaLinearAttnProcessor2_0 there")

    def see(self, func, args: tuple, kwargs: dict, output) -> None:
        """``relu(q)`` and then ``relu(k)``, as the processor made them; the map is formed at the second."""
        self.features.append(output)
        n = len(self.features)
        if n > 2:
            self.fail("calls relu more than twice per call; diffviz records SANA's linear attention, which applies "
                      "it once to the query and once to the key")
            return
        if n < 2:
            return
        q, k = self.features
        if q.dim() != 4 or k.dim() != 4 or q.shape[1] != self.heads or q.shape[-1] != self.queries \
                or k.shape[-2] != self.keys or q.shape[-2] != k.shape[-1]:
            self.mismatch = (f"relu(q) {list(q.shape)} and relu(k) {list(k.shape)}, planned [batch, {self.heads}, "
                             f"d, {self.queries}] and [batch, {self.heads}, {self.keys}, d]")
            return
        self.seen = 1
        if self.error is None:
            self.record(q, k)

    def leave(self) -> None:
        self.features = []
        if self.seen == 0 and self.error is None:
            if self.mismatch:
                self.error = f"layer {self.plan.name} ({self.role}): {self.mismatch}"
            else:
                self.fail("made no relu(q), relu(k) pair that diffviz can observe (it was written for SANA's "
                          "SanaLinearAttnProcessor2_0); use that processor, or leave the layer out with --layers")

    def record(self, query, key, output=None, mask=None, scale=None) -> None:
        """``query`` = relu(q) ``[batch, heads, d, N]``, ``key`` = relu(k) ``[batch, heads, N, d]``."""
        q, k = query[-1].float(), key[-1].float()                     # the processor's own float32
        heads, d, n = q.shape
        den = torch.einsum("hdn,hd->hn", q, k.sum(dim=1)) + EPSILON   # Σ_j φ(q_i)·φ(k_j), [heads, N]
        keys = k.transpose(1, 2)                                      # [heads, d, N]
        if self.key_sum is not None:
            keys = keys @ self.key_sum                                # [heads, d, key cells]
        scaled = (q / den[:, None, :]).reshape(heads * d, n)          # each query's features over its denominator
        rows = scaled.T @ keys.reshape(heads * d, -1) / heads         # head mean of A (key cells summed), [N, cells]
        if self.cell_mean is not None:
            rows = self.cell_mean @ rows
        self.views["self"].copy_(rows)

    def unpack(self, flat: np.ndarray, maps, key_positions: Sequence[int]) -> None:
        (_what, offset, shape), = self.parts
        maps.self_[self.plan.index] = flat[offset:offset + math.prod(shape)].reshape(shape)
