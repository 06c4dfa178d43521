"""Cross-attention probabilities of the toy UNet, kept differentiable for training.

``ProbeProcessor`` computes exactly what diffusers' ``AttnProcessor2_0`` computes for a
cross-attention layer (same projections, same 1/√head_dim scale, same output
projection), but with an explicit softmax so the probabilities exist as a tensor.
It stores their head mean, ``[B, H*W, K]``, in a shared ``ProbeStore`` — with the
autograd graph attached, so a loss on the maps (the grounding loss in ``train``)
trains the very attention the model uses.

For *recording* runs (the dashboard, the evaluation) ``capture.recorder`` is the
processor to use; this one exists because training needs the graph and the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ProbeStore:
    """Maps of one UNet call: layer name -> head-mean probabilities [B, H*W, K]."""

    enabled: bool = True
    maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.maps.clear()


class ProbeProcessor:
    """An ``attn2`` processor equal to ``AttnProcessor2_0`` that keeps the head-mean probabilities."""

    def __init__(self, name: str, store: ProbeStore):
        self.name = name
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None or attn.spatial_norm is not None \
                or attn.group_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
            raise ValueError("ProbeProcessor handles plain cross-attention layers only")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        scores = torch.matmul(query, key.transpose(-1, -2)) * (head_dim ** -0.5)
        probs = scores.float().softmax(dim=-1)
        if self.store.enabled:
            self.store.maps[self.name] = probs.mean(dim=1)
        out = torch.matmul(probs.to(value.dtype), value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install(unet, store: ProbeStore) -> list[str]:
    """Put a ``ProbeProcessor`` on every cross-attention layer (self-attention keeps its processor).

    Returns the names of the probed layers in data-flow order (down, mid, up), as ``capture.recorder`` numbers them.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs, names = {}, []
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            layer = name[: -len(".attn2.processor")]
            procs[name] = ProbeProcessor(layer, store)
            names.append(layer)
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    from capture.recorder import layer_names  # data-flow order (down, mid, up), as recorded runs number layers
    order = {name: i for i, name in enumerate(layer_names(unet))}
    return sorted(names, key=lambda n: order.get(n, len(order)))


def uninstall(unet) -> None:
    """Back to diffusers' default processors."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor({name: AttnProcessor2_0() for name in unet.attn_processors})
