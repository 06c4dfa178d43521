"""Recording MM-DiT joint attention (SD3, Flux) without changing the transformer's output.

In an MM-DiT block text and image tokens share one softmax over one concatenated sequence: SD3 orders it
``[image; text]``, Flux ``[text; image]`` (its single-stream blocks too, with no separate text stream).
For the conditional (last) sample, beside the very same attention call the default processor makes, a
recording processor stores per layer and step:

* ``cross`` ``[T, h, w]``: image→text, each image cell's attention to the prompt's T tokens. These rows
  sum to less than 1: the rest of each row's mass went to image keys.
* ``self`` ``[n, n]``: image→image, pooled to the self grid (rows sum to less than 1 for the same reason).
* ``text`` ``[T, h, w]``: text→image, where each token's query looks over the image grid.
* ``concept`` ``[T, h, w]`` (optional): ConceptAttention-style output-space maps: each image token's
  attention output dotted with each content-word token's attention output, softmax over those tokens.

Nothing [S, S] is materialised: each part is one ``scaled_dot_product_attention(q, k, V)`` whose value
``V`` is a one-hot [keys, columns] selector (a text key to its token's column, an image key to its cell's
column), so ``softmax(q kᵀ/√d) @ V`` is exactly the probabilities summed per column. Heads and query
cells are then averaged with one matmul, into a slice of the recorder's flat step buffer, which moves to
the CPU once per step (``AttentionRecorder.start_copy``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from capture.recorder import DENSE_MAX, AttentionRecorder, LayerPlan, StepMaps, choose_layers, pooled_grid, pooling_matrix

ATTN = "attn"
#: block prefix -> layer kind (Flux's single-stream blocks have no separate text processor)
KINDS = {"transformer_blocks": "joint", "single_transformer_blocks": "single"}


def joint_layer_names(transformer) -> list[str]:
    """The transformer's blocks with an ``attn`` processor, double-stream first (data-flow order)."""
    names = []
    for proc in transformer.attn_processors:
        parts = proc.split(".")
        if len(parts) == 4 and parts[0] in KINDS and parts[2] == ATTN and parts[3] == "processor":
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
                         kind=KINDS[block], text=text and cross, concept=concept and cross)
        if cross:  # text and concept maps share the cross grid, and need it
            plan.cross_grid = pooled_grid(grid, resolution)
        if self_:
            plan.self_grid = pooled_grid(grid, self_resolution)
        for what, g in (("cross", plan.cross_grid), ("self", plan.self_grid)):
            if g is not None and (grid[0] % g[0] or grid[1] % g[1]):
                problems.append(f"layer {name}: image-token grid {grid[0]}x{grid[1]} does not divide into "
                                f"{g[0]}x{g[1]} for {what} maps (uneven pooling windows)")
        plans.append(plan)
    return plans, problems


# --------------------------------------------------------------------------- one layer's recording


class _JointSlot:
    """One layer's selectors, pooling matrices and views into the step buffer."""

    def __init__(self, plan: LayerPlan, *, image_first: bool, n_image: int, n_text: int,
                 positions: Sequence[int], content: Sequence[bool], buffer: torch.Tensor, offset: int, record_cross: bool,
                 dense: bool = False):
        self.plan, self.kind = plan, plan.kind
        self.dense = dense  # see DENSE_MAX: materialise the probabilities, then pool with small matmuls
        self.n_image, self.n_text = n_image, n_text
        self.calls, self.error = 0, None
        device, dtype = buffer.device, buffer.dtype
        self.zero = torch.zeros((), dtype=dtype, device=device)  # baddbmm's ignored input
        heads, t = plan.heads, len(positions)
        img0, txt0 = (0, n_image) if image_first else (n_text, 0)
        self.image = slice(img0, img0 + n_image)
        self.tokens = torch.tensor([txt0 + int(p) for p in positions], device=device)
        keys = n_image + n_text
        self.parts: list[tuple[str, int, tuple[int, ...]]] = []   # (kind, offset, shape) in the flat buffer

        def take(kind: str, shape: tuple[int, ...]) -> torch.Tensor:
            nonlocal offset
            self.parts.append((kind, offset, shape))
            view = buffer[offset:offset + math.prod(shape)].view(shape)
            offset += math.prod(shape)
            return view

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
        if record_cross:
            sel = torch.zeros(keys, t, dtype=dtype, device=device)
            sel[self.tokens, torch.arange(t, device=device)] = 1
            columns.append(sel)
            self.cross_pool = query_mean(cc, plan.per_head or dense)
            self.cross_out = take("cross", (heads, cells, t) if plan.per_head else (cells, t))
        self.n_cross = t if record_cross else 0
        self.self_out = None
        if plan.self_grid is not None:
            sg = plan.self_grid
            key_cells = torch.zeros(keys, sg[0] * sg[1], dtype=dtype, device=device)
            key_cells[self.image] = image_keys(sg)
            columns.append(key_cells)
            self.self_pool = query_mean(sg, dense)
            self.self_out = take("self", (sg[0] * sg[1], sg[0] * sg[1]))
        self.image_value = None
        if columns:  # a real [1, heads, keys, columns] tensor: fused SDPA kernels want unit-stride heads
            value = torch.cat(columns, dim=1)
            self.image_value = value if dense else value[None, None].repeat(1, heads, 1, 1).contiguous()
        self.text_out = None
        if plan.text:
            text_cells = torch.zeros(keys, cells, dtype=dtype, device=device)
            text_cells[self.image] = image_keys(cc)
            self.text_value = text_cells if dense else text_cells[None, None].repeat(1, heads, 1, 1).contiguous()
            self.text_out = take("text", (t, cells))
        self.concept_out = None
        if plan.concept:
            self.content = torch.tensor(list(content), dtype=torch.bool, device=device)
            self.concept_pool = query_mean(cc, per_head=True).float()
            self.concept_out = take("concept", (cells, t))
        self.end = offset

    def record(self, query: torch.Tensor, key: torch.Tensor, output: torch.Tensor) -> None:
        """``query``/``key`` ``[batch, heads, sequence, head_dim]`` as the attention saw them (after norms and
        rotary embeddings); ``output`` ``[batch, sequence, heads*head_dim]``, the attention's output."""
        self.calls += 1
        if query.shape[2] != self.n_image + self.n_text:
            if self.error is None:
                self.error = (f"layer {self.plan.name} (joint): got a sequence of {query.shape[2]}, planned "
                              f"{self.n_image} image + {self.n_text} text tokens")
            return
        q, k = query[-1:], key[-1:]
        if self.dense:
            self._record_dense(q[0], k[0])
        elif self.image_value is not None:
            probs = F.scaled_dot_product_attention(q[:, :, self.image], k, self.image_value)[0]  # [H, Ni, cols]
            if self.n_cross:
                part = probs[..., :self.n_cross]
                if self.plan.per_head:
                    torch.matmul(self.cross_pool, part, out=self.cross_out)
                else:
                    torch.matmul(self.cross_pool, part.reshape(-1, self.n_cross), out=self.cross_out)
            if self.self_out is not None:
                part = probs[..., self.n_cross:]
                torch.matmul(self.self_pool, part.reshape(-1, part.shape[-1]), out=self.self_out)
        if self.text_out is not None and not self.dense:
            looks = F.scaled_dot_product_attention(q[:, :, self.tokens], k, self.text_value)[0]  # [H, T, cells]
            torch.mean(looks, dim=0, out=self.text_out)
        if self.concept_out is not None:
            out = output[-1].float()                                   # [S, heads*head_dim]
            scores = out[self.image] @ out[self.tokens].T              # [Ni, T]
            scores = scores.masked_fill(~self.content, float("-inf"))
            shares = torch.softmax(scores, dim=-1).nan_to_num(0.0) if self.content.any() else torch.zeros_like(scores)
            self.concept_out.copy_(self.concept_pool @ shares)

    def _record_dense(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """The CPU path: ``softmax(q kᵀ/√d)`` materialised ([heads, queries, keys]), head mean, then the
        selectors as small matmuls, which costs far less there than SDPA with a value as wide as the columns."""
        scale = q.shape[-1] ** -0.5

        def probs(queries: torch.Tensor) -> torch.Tensor:
            return torch.baddbmm(self.zero, queries, k.transpose(1, 2), beta=0, alpha=scale).softmax(-1)

        if self.image_value is not None:
            p = probs(q[:, self.image])                                # [H, Ni, S]
            columns = p.mean(dim=0) @ self.image_value                 # [Ni, T + self cells]
            if self.n_cross and self.plan.per_head:
                torch.matmul(self.cross_pool, p[..., self.tokens], out=self.cross_out)
            elif self.n_cross:
                torch.matmul(self.cross_pool, columns[:, :self.n_cross], out=self.cross_out)
            if self.self_out is not None:
                torch.matmul(self.self_pool, columns[:, self.n_cross:], out=self.self_out)
        if self.text_out is not None:
            torch.matmul(probs(q[:, self.tokens]).mean(dim=0), self.text_value, out=self.text_out)


# --------------------------------------------------------------------------- the processors


class RecordingJointAttnProcessor:
    """SD3's ``JointAttnProcessor2_0`` plus the recording of the conditional sample (``[image; text]``)."""

    def __init__(self, slot: _JointSlot):
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # ---- JointAttnProcessor2_0, unchanged ---------------------------------------------------
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
            encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
            encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)
            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)
            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # ---- the recording (see the module docstring) -----------------------------------------------
        self.slot.record(query, key, hidden_states)

        # ---- JointAttnProcessor2_0, unchanged ---------------------------------------------------
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class RecordingFluxAttnProcessor:
    """Flux's ``FluxAttnProcessor`` (double- and single-stream) plus the recording (``[text; image]``),
    through the same ``dispatch_attention_fn`` call and backend."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, slot: _JointSlot, original=None):
        self.slot = slot
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        # ---- FluxAttnProcessor, unchanged -------------------------------------------------------
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        # ---- the recording: [batch, sequence, heads, dim] -> [batch, heads, sequence, dim] ------------
        self.slot.record(query.transpose(1, 2), key.transpose(1, 2), hidden_states)

        # ---- FluxAttnProcessor, unchanged -------------------------------------------------------
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


# --------------------------------------------------------------------------- the recorder


class JointRecorder(AttentionRecorder):
    """:class:`AttentionRecorder` for an MM-DiT transformer: one slot per chosen block's ``attn``.

    ``positions`` are the text-sequence positions of the stored tokens (the cross, text and concept rows);
    ``content`` marks which of them are content words (the concept maps' softmax runs over those).
    """

    def __init__(self, transformer, plans: list[LayerPlan], *, context_length: int, positions: Sequence[int],
                 image_first: bool, content: Sequence[bool] | None = None, fail_on_shape_error: bool = False,
                 on_step=None):
        self.unet = transformer  # the module whose processors are swapped (AttentionRecorder's name for it)
        self.layers = list(plans)
        self.context_length = int(context_length)
        self.key_positions = [int(p) for p in positions]
        self.fail_on_shape_error = fail_on_shape_error
        self.on_step = on_step
        self.steps: list[StepMaps] = []
        self.warnings: list[str] = []
        self._step = 0
        self._waiting = None
        self._original = None
        param = next(transformer.parameters())
        self.device, self.dtype = param.device, param.dtype
        content = list(content) if content is not None else [True] * len(self.key_positions)
        t = len(self.key_positions)
        sizes = []
        for plan in self.layers:  # the slots' parts, in the order _JointSlot takes them
            cells = math.prod(plan.cross_grid) if plan.cross_grid else 0
            self_cells = math.prod(plan.self_grid) if plan.self_grid else 0
            per_head = plan.heads if plan.per_head else 1
            sizes.append(cells * t * (per_head + int(plan.text) + int(plan.concept)) + self_cells ** 2)
        self.buffer = torch.zeros(sum(sizes), device=self.device, dtype=self.dtype)
        self._slots = {}
        offset = 0
        for plan in self.layers:
            slot = _JointSlot(plan, image_first=image_first, n_image=math.prod(plan.native),
                              n_text=self.context_length, positions=self.key_positions, content=content,
                              buffer=self.buffer, offset=offset, record_cross=plan.cross_grid is not None,
                              dense=self.device.type == "cpu"
                              and plan.heads * math.prod(plan.native) * (math.prod(plan.native) + self.context_length)
                              <= DENSE_MAX)
            offset = slot.end
            self._slots[f"{plan.name}.{ATTN}.processor"] = slot

    def install(self) -> "JointRecorder":
        self._original = dict(self.unet.attn_processors)
        flux = any(type(p).__name__.startswith("Flux") for p in self._original.values())
        procs = {}
        for name, proc in self._original.items():
            slot = self._slots.get(name)
            if slot is None:
                procs[name] = proc
            elif flux:
                procs[name] = RecordingFluxAttnProcessor(slot, proc)
            else:
                procs[name] = RecordingJointAttnProcessor(slot)
        self.unet.set_attn_processor(procs)
        return self

    def _unpack(self, step: int, host: torch.Tensor) -> StepMaps:
        flat = host.numpy()
        maps = StepMaps(step)
        t = len(self.key_positions)
        for slot in self._slots.values():
            if slot.error is not None:
                continue
            plan = slot.plan
            for kind, offset, shape in slot.parts:
                block = flat[offset:offset + math.prod(shape)].reshape(shape)
                if kind == "self":
                    maps.self_[plan.index] = block
                elif kind == "text":                               # [T, cells] -> [T, h, w]
                    maps.text[plan.index] = block.reshape(t, *plan.cross_grid)
                else:                                              # [(heads,) cells, T] -> [(heads,) T, h, w]
                    full = block.reshape(-1, shape[-2], t).transpose(0, 2, 1).reshape(-1, t, *plan.cross_grid)
                    target = maps.cross if kind == "cross" else maps.concept
                    target[plan.index] = full if (kind == "cross" and plan.per_head) else full[0]
        return maps
