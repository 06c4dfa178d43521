"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders whose hidden states are
concatenated along the feature axis (one 77-key sequence), pooled text and size ids as
``added_cond_kwargs``, and a VAE that overflows in float16 (``force_upcast``)."""
from __future__ import annotations

import torch

from capture.families.sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    title = "Stable Diffusion XL"
    encoders = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))

    def pipeline_kwargs(self, config, peek=None) -> dict:
        # Both encoders get the same prompt, as `prompt_2=None` means; the tokens that cross maps index
        # are therefore checked for agreement in `tokens`.
        return {**super().pipeline_kwargs(config, peek), "prompt_2": None, "negative_prompt_2": None}

    def decode_preview(self, pipe, x0: torch.Tensor) -> torch.Tensor:
        """In float16 the SDXL VAE overflows, so the pipeline decodes its final image with the VAE in
        float32 (``force_upcast``) and casts it back; each preview takes the same path."""
        vae = pipe.vae
        if not (vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))):
            return super().decode_preview(pipe, x0)
        vae.to(dtype=torch.float32)
        try:
            return super().decode_preview(pipe, x0)
        finally:
            vae.to(dtype=torch.float16)


FAMILY = StableDiffusionXL()
