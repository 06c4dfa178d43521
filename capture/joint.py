"""Recording MM-DiT joint attention (SD3, Flux): what one observed joint attention call stores.

In an MM-DiT block text and image tokens share one softmax over one concatenated sequence: SD3 orders it
``[image; text]``, Flux ``[text; image]`` (its single-stream blocks too, with no separate text stream).
``capture.recorder`` observes the block's ``attn`` module's attention call (the model's own processor runs
unchanged) and hands the call's query, key, mask, scale and output to a :class:`JointSlot`, which stores per
layer and step, for the conditional (last) sample:

* ``cross`` ``[T, h, w]``: image→text, each image cell's attention to the prompt's T tokens. These rows
  sum to less than 1: the rest of each row's mass went to image keys.
* ``self`` ``[n, n]``: image→image, pooled to the self grid (rows sum to less than 1 for the same reason).
* ``text`` ``[T, h, w]``: text→image, where each token's query looks over the image grid.
* ``concept`` ``[T, h, w]`` (optional): ConceptAttention-style output-space maps (CONTRACT.md gives the
  definition): the call's output ``P·V`` at each position, heads concatenated before the output projection;
  each image position's dot product with each content-word token's, softmax over the content-word tokens.

Nothing [S, S] is materialised on the GPU path: each part is one ``scaled_dot_product_attention(q, k, V)``
whose value ``V`` is a one-hot [keys, columns] selector (a text key to its token's column, an image key to its
cell's column), so ``softmax(q kᵀ · scale) @ V`` is exactly the probabilities summed per column. Heads and query
cells are then averaged with one matmul into a slice of the recorder's flat step buffer. On the CPU, up to
``DENSE_MAX`` elements, the probabilities are materialised instead, a block of image queries at a time: head mean,
the token columns gathered, the keys summed per self cell, then the query cells' mean.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capture.recorder import (CHUNK_ELEMENTS, DENSE_MAX, JOINT, LayerPlan, _Slot, choose_layers, key_cell_index,
                              pooled_grid, pooling_matrix, uneven)

ATTN = "attn"
#: block prefix -> layer kind (Flux's single-stream blocks have no separate text processor)
KINDS = {"transformer_blocks": "joint", "single_transformer_blocks": "single"}


def joint_layer_names(transformer) -> list[str]:
    """The transformer's blocks with an ``attn`` processor, double-stream first (data-flow order). Read from the
    modules, not ``attn_processors``, which some transformers lack in older diffusers (Qwen-Image in 0.35)."""
    names = []
    for name, module in transformer.named_modules():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] in KINDS and parts[2] == ATTN and hasattr(module, "processor"):
            names.append(".".join(parts[:2]))
    order = list(KINDS)
    return sorted(names, key=lambda n: (order.index(n.split(".")[0]), int(n.split(".")[1])))


def plan_joint_layers(transformer, grid: tuple[int, int], *, patterns: Sequence[str] = (),
                      max_layers: int | None = None, cross: bool = True, self_: bool = True, text: bool = True,
                      concept: bool = False, resolution: int = 32, self_resolution: int = 16,
                      per_head: bool = False) -> tuple[list[LayerPlan], list[str]]:
    """Layer plans over the image-token ``grid`` (h, w), plus one message per grid that does not pool evenly."""
    heads = int(transformer.config.num_attention_heads)
    plans, problems = [], []
    for index, name in enumerate(choose_layers(joint_layer_names(transformer), (ATTN,), patterns, max_layers)):
        block = name.split(".")[0]
        plan = LayerPlan(index, name, block, tuple(grid), heads=heads, per_head=per_head and cross,
                         kind=KINDS[block], text=text and cross, concept=concept and cross, sites=((ATTN, JOINT),))
        if cross:  # text and concept maps share the cross grid, and need it
            plan.cross_grid = pooled_grid(grid, resolution)
        if self_:
            plan.self_grid = pooled_grid(grid, self_resolution)
        problems += uneven(name, tuple(grid), (("cross", plan.cross_grid), ("self", plan.self_grid)))
        plans.append(plan)
    return plans, problems


def _rows(mask: torch.Tensor | None, index) -> torch.Tensor | None:
    """A 4-D additive mask's rows for the queries ``index`` (a mask broadcast over queries stays as it is)."""
    return None if mask is None or mask.shape[-2] == 1 else mask[..., index, :]


class JointSlot(_Slot):
    """One joint ``attn`` module: its selectors, pooling matrices and parts of the step buffer."""

    def __init__(self, plan: LayerPlan, module: str, *, image_first: bool, n_text: int, positions: Sequence[int],
                 content: Sequence[bool] | None, layout: list[int], device: torch.device, dtype: torch.dtype):
        super().__init__(plan, module, JOINT)
        n_image = math.prod(plan.native)
        self.n_image, self.n_text = n_image, n_text
        self.queries = self.keys = n_image + n_text
        self.dense = device.type == "cpu" and plan.heads * n_image * (n_image + n_text) <= DENSE_MAX
        self.zero = torch.zeros((), dtype=dtype, device=device)  # baddbmm's ignored input
        heads, t = plan.heads, len(positions)
        self.t = t
        img0, txt0 = (0, n_image) if image_first else (n_text, 0)
        self.image = slice(img0, img0 + n_image)
        self.tokens = torch.tensor([txt0 + int(p) for p in positions], device=device, dtype=torch.long)
        keys = self.keys

        def query_mean(grid, per_head=False) -> torch.Tensor:  # [cells, (heads *) image queries]: head + cell mean
            m = torch.as_tensor(pooling_matrix(plan.native, grid), dtype=torch.float64)
            m = m / m.sum(dim=1, keepdim=True)
            return (m if per_head else m.repeat(1, heads) / heads).to(device=device, dtype=dtype)

        def image_keys(grid) -> torch.Tensor:  # [image keys, cells]: each cell's keys summed
            return torch.as_tensor(pooling_matrix(plan.native, grid).T, dtype=dtype, device=device)

        cc = plan.cross_grid
        cells = 0 if cc is None else cc[0] * cc[1]
        # Image queries: one value with the T token columns, then the self cells' columns.
        columns = []
        self.n_cross = t if cc is not None else 0
        if cc is not None:
            sel = torch.zeros(keys, t, dtype=dtype, device=device)
            sel[self.tokens, torch.arange(t, device=device)] = 1
            columns.append(sel)
            self.cross_pool = query_mean(cc, plan.per_head or self.dense)
            self.take(layout, "cross", (heads, cells, t) if plan.per_head else (cells, t))
        if plan.self_grid is not None:
            sg = plan.self_grid
            key_cells = torch.zeros(keys, sg[0] * sg[1], dtype=dtype, device=device)
            key_cells[self.image] = image_keys(sg)
            columns.append(key_cells)
            self.self_pool = query_mean(sg, self.dense)
            self.key_cell = key_cell_index(tuple(plan.native), tuple(sg), device)   # each image key's self cell
            self.take(layout, "self", (sg[0] * sg[1], sg[0] * sg[1]))
        self.image_value = None
        if columns:  # a real [1, heads, keys, columns] tensor: fused SDPA kernels want unit-stride heads
            value = torch.cat(columns, dim=1)
            self.image_value = value if self.dense else value[None, None].repeat(1, heads, 1, 1).contiguous()
        if plan.text:
            text_cells = torch.zeros(keys, cells, dtype=dtype, device=device)
            text_cells[self.image] = image_keys(cc)
            self.text_value = text_cells if self.dense else text_cells[None, None].repeat(1, heads, 1, 1).contiguous()
            self.take(layout, "text", (t, cells))
        if plan.concept:
            flags = list(content) if content is not None else [True] * t
            self.content = torch.tensor(flags, dtype=torch.bool, device=device)
            self.concept_pool = query_mean(cc, per_head=True).float()
            self.take(layout, "concept", (cells, t))

    def record(self, query, key, output, mask, scale) -> None:
        """``query``/``key`` ``[batch, heads, sequence, head_dim]`` as the attention call saw them (after norms and
        rotary embeddings); ``output`` the call's ``[batch, heads, sequence, head_dim]``."""
        q, k = query[-1:], key[-1:]
        views = self.views
        if self.dense:
            self._record_dense(q[0], k[0], mask, scale)
        elif self.image_value is not None:
            probs = F.scaled_dot_product_attention(q[:, :, self.image], k, self.image_value,
                                                   attn_mask=_rows(mask, self.image), scale=scale)[0]  # [H, Ni, cols]
            if self.n_cross:
                part = probs[..., :self.n_cross]
                if self.plan.per_head:
                    torch.matmul(self.cross_pool, part, out=views["cross"])
                else:
                    torch.matmul(self.cross_pool, part.reshape(-1, self.n_cross), out=views["cross"])
            if "self" in views:
                part = probs[..., self.n_cross:]
                torch.matmul(self.self_pool, part.reshape(-1, part.shape[-1]), out=views["self"])
        if "text" in views and not self.dense:
            looks = F.scaled_dot_product_attention(q[:, :, self.tokens], k, self.text_value,
                                                   attn_mask=_rows(mask, self.tokens), scale=scale)[0]  # [H, T, cells]
            torch.mean(looks, dim=0, out=views["text"])
        if "concept" in views:
            out = output[-1].transpose(0, 1).flatten(1).float()      # [S, heads*head_dim]: heads concatenated
            scores = out[self.image] @ out[self.tokens].T              # [Ni, T]
            scores = scores.masked_fill(~self.content, float("-inf"))
            shares = torch.softmax(scores, dim=-1).nan_to_num(0.0) if self.content.any() else torch.zeros_like(scores)
            views["concept"].copy_(self.concept_pool @ shares)

    def _record_dense(self, q: torch.Tensor, k: torch.Tensor, mask, scale) -> None:
        """The CPU path: ``softmax(q kᵀ · scale + mask)`` materialised ([heads, queries, keys]), head mean, then the
        selectors as small matmuls, which costs far less there than SDPA with a value as wide as the columns."""
        alpha = q.shape[-1] ** -0.5 if scale is None else scale
        views = self.views

        def probs(index) -> torch.Tensor:
            rows = _rows(mask, index)
            bias = self.zero if mask is None else (mask if rows is None else rows)[0]
            return torch.baddbmm(bias, q[:, index], k.transpose(1, 2), beta=0 if mask is None else 1,
                                 alpha=alpha).softmax(-1)

        if self.image_value is not None and not self.plan.per_head:
            # image queries in blocks whose [H, rows, S] probabilities stay in the CPU's cache
            rows = max(16, CHUNK_ELEMENTS // (q.shape[0] * k.shape[1]))
            # per image query: its token columns (a gather) and its keys summed per self cell (an index_add)
            tokens = q.new_empty(self.n_image, self.n_cross)
            cells = q.new_zeros(self.n_image, views["self"].shape[1]) if "self" in views else None
            for r0 in range(0, self.n_image, rows):
                r1 = min(self.n_image, r0 + rows)
                block = probs(slice(self.image.start + r0, self.image.start + r1)).mean(dim=0)   # [rows, S]
                if self.n_cross:
                    torch.index_select(block, 1, self.tokens, out=tokens[r0:r1])
                if cells is not None:
                    cells[r0:r1].index_add_(1, self.key_cell, block[:, self.image])
            if self.n_cross:
                torch.matmul(self.cross_pool, tokens, out=views["cross"])
            if cells is not None:
                torch.matmul(self.self_pool, cells, out=views["self"])
        elif self.image_value is not None:
            p = probs(self.image)                                      # [H, Ni, S]
            columns = p.mean(dim=0) @ self.image_value                 # [Ni, T + self cells]
            if self.n_cross and self.plan.per_head:
                torch.matmul(self.cross_pool, p[..., self.tokens], out=views["cross"])
            elif self.n_cross:
                torch.matmul(self.cross_pool, columns[:, :self.n_cross], out=views["cross"])
            if "self" in views:
                torch.matmul(self.self_pool, columns[:, self.n_cross:], out=views["self"])
        if "text" in views:
            torch.matmul(probs(self.tokens).mean(dim=0), self.text_value, out=views["text"])

    def unpack(self, flat: np.ndarray, maps, key_positions: Sequence[int]) -> None:
        plan, t = self.plan, self.t
        for kind, offset, shape in self.parts:
            block = flat[offset:offset + math.prod(shape)].reshape(shape)
            if kind == "self":
                maps.self_[plan.index] = block
            elif kind == "text":                               # [T, cells] -> [T, h, w]
                maps.text[plan.index] = block.reshape(t, *plan.cross_grid)
            else:                                              # [(heads,) cells, T] -> [(heads,) T, h, w]
                full = block.reshape(-1, shape[-2], t).transpose(0, 2, 1).reshape(-1, t, *plan.cross_grid)
                target = maps.cross if kind == "cross" else maps.concept
                target[plan.index] = full if (kind == "cross" and plan.per_head) else full[0]
