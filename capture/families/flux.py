"""Flux (``FluxPipeline``): an MM-DiT over ``[text; image]`` with double-stream blocks, then single-stream
blocks that run the same joint attention over one stream. Its text sequence is T5 alone (CLIP only gives
the pooled vector). Flux-dev is guidance-distilled: the guidance scale is an input of the transformer, and
there is no CFG batch, so the recorded "conditional half" is the whole batch."""
from __future__ import annotations

from typing import Any

import torch

from capture.config import ConfigError
from capture.families.base import Peek, TokenInfo
from capture.families.mmdit import PackedMMDiTFamily


class Flux(PackedMMDiTFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    title = "FLUX.1"
    kinds = ("joint", "single")
    transformer_class = "FluxTransformer2DModel"
    encoders = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    image_first = False
    t5_default = 512
    t5_tokenizer = "tokenizer_2"

    def context(self, tokenizers: dict[str, Any]) -> int:
        return self.max_sequence_length(tokenizers)

    def pipeline_kwargs(self, config, peek: Peek | None = None) -> dict[str, Any]:
        if config.negative_prompt:
            # True CFG runs the transformer twice, one prompt per call, so "the last sample" would be the negative one.
            raise ConfigError("negative_prompt", "Flux is guidance-distilled and diffviz records it without true CFG; "
                                                 "drop --negative-prompt")
        return {"guidance_scale": config.cfg_scale,
                "max_sequence_length": self.max_sequence_length(peek.tokenizers if peek else {})}

    def tokens(self, tokenizers: dict[str, Any], prompt: str) -> TokenInfo:
        words: list[str] = []
        tokens, t5_set = self._t5_set(tokenizers, prompt, words, 0, "text_encoder_2")
        return TokenInfo(tokens, words, "tokenizer_2", [t5_set])

    def unpack(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[batch, tokens, channels*4] -> [batch, channels, h, w], as the pipeline unpacks before decoding."""
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)


FAMILY = Flux()
