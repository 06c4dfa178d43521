"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): one CLIP text encoder, a UNet.

The reference family: the UNet parts here (peek, plan, size rules) serve every UNet family.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from capture.families.base import Family, Peek, TokenInfo, clip_tokens


class StableDiffusion(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    title = "Stable Diffusion 1.x / 2.x (and the embedded toy model)"
    kinds = ("unet",)
    #: (text encoder, its tokenizer) components, in the order the pipeline concatenates them
    encoders: tuple[tuple[str, str], ...] = (("text_encoder", "tokenizer"),)

    # ------------------------------------------------------------------ architecture
    def peek(self, folder: Path) -> Peek:
        from diffusers import UNet2DConditionModel

        return self.peek_folder(folder, "unet", UNet2DConditionModel)

    def peek_pipe(self, pipe) -> Peek:
        tokenizers = {t: getattr(pipe, t) for _, t in self.encoders}
        encoders = [{"name": e, "class": type(getattr(pipe, e)).__name__, "tokenizer": t} for e, t in self.encoders]
        return Peek(pipe.unet, int(pipe.vae_scale_factor), tokenizers, encoders, self.context(tokenizers))

    def context(self, tokenizers: dict[str, Any]) -> int:
        # Every CLIP tokenizer pads to its model_max_length; the UNet sees that many keys.
        return int(next(iter(tokenizers.values())).model_max_length)

    def native_size(self, peek: Peek) -> tuple[int, int]:
        side = int(peek.denoiser.config.sample_size) * peek.vae_scale_factor
        return side, side

    def size_multiple(self, peek: Peek) -> int:
        # The UNet pipelines' own check_inputs asks for multiples of 8; a VAE that downsamples more needs its factor.
        return math.lcm(8, peek.vae_scale_factor)

    def plan(self, peek: Peek, latent_hw: tuple[int, int], config) -> tuple[list, list[str]]:
        from capture.recorder import plan_layers

        return plan_layers(peek.denoiser, latent_hw, patterns=config.layers, max_layers=config.max_layers,
                           cross=config.include_cross_attention, self_=config.include_self_attention,
                           resolution=config.attention_resolution,
                           self_resolution=config.self_attention_resolution, per_head=config.per_head)

    def activation_bytes(self, peek: Peek, latent_shape, element: int) -> int:
        """The UNet's feature maps at its largest attention, for the CFG batch of 2: the skip connections
        (``(layers_per_block + 1) x C_i x cells_i`` per down block) and ~18 live ``[q0, C0]`` tensors of the
        transformer block at the largest grid (residual, norm, q/k/v, attention output, the feed-forward's 8C GEGLU
        projection and its two 4C halves)."""
        from capture.recorder import native_grids

        cfg = peek.denoiser.config
        channels = list(getattr(cfg, "block_out_channels", None) or [])
        if not channels:
            return 0
        per_block = getattr(cfg, "layers_per_block", 1)
        per_block = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * len(channels)
        grids = native_grids(peek.denoiser, (latent_shape[1], latent_shape[2]))
        cells0 = math.prod(grids["down_blocks.0"])
        skips = channels[0] * cells0 + sum((int(per_block[i]) + 1) * int(c) * math.prod(grids[f"down_blocks.{i}"])
                                           for i, c in enumerate(channels))
        return 2 * (skips + 18 * int(channels[0]) * cells0) * element

    # ------------------------------------------------------------------ tokens
    def tokens(self, tokenizers: dict[str, Any], prompt: str) -> TokenInfo:
        """Every tokenizer sees the same prompt; metadata records the first one's tokens, and
        ``token_sets`` says whether each other tokenizer splits the prompt the same way."""
        names = [t for _, t in self.encoders]
        tokens, words = clip_tokens(tokenizers[names[0]], prompt)
        texts = [t["text"] for t in tokens]
        sets = []
        for encoder, name in self.encoders:
            other = tokens if name == names[0] else clip_tokens(tokenizers[name], prompt)[0]
            # every CLIP set fills the same slots (SDXL concatenates its encoders on the feature axis)
            sets.append({"encoder": encoder, "tokenizer": name, "offset": 0, "length": len(other),
                         "sequence_length": int(tokenizers[name].model_max_length),
                         "agrees": [t["text"] for t in other] == texts})
        return TokenInfo(tokens, words, names[0], sets)


FAMILY = StableDiffusion()
