"""Stable Diffusion 3 (``StableDiffusion3Pipeline``): an MM-DiT over ``[image; text]``, whose text is CLIP-L
and CLIP-G (concatenated on the feature axis, 77 slots) followed by T5 (``max_sequence_length`` slots)."""
from __future__ import annotations

from typing import Any

from capture.families.base import Peek, TokenInfo, clip_tokens
from capture.families.mmdit import MMDiTFamily


class StableDiffusion3(MMDiTFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    title = "Stable Diffusion 3 (and the toy MM-DiT, toyworld-mmdit)"
    kinds = ("joint",)
    transformer_class = "SD3Transformer2DModel"
    encoders = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
    image_first = True
    t5_default = 256
    t5_tokenizer = "tokenizer_3"

    def token_patch(self, peek: Peek) -> int:
        return int(peek.denoiser.config.patch_size)

    def clip_length(self, tokenizers: dict[str, Any]) -> int:
        return int(tokenizers["tokenizer"].model_max_length)

    def context(self, tokenizers: dict[str, Any]) -> int:
        return self.clip_length(tokenizers) + self.max_sequence_length(tokenizers)

    def pipeline_kwargs(self, config, peek: Peek | None = None) -> dict[str, Any]:
        # All three encoders get the same prompt (prompt_2/prompt_3 None), as the token sets assume.
        return {**super().pipeline_kwargs(config, peek),
                "max_sequence_length": self.max_sequence_length(peek.tokenizers if peek else {})}

    def tokens(self, tokenizers: dict[str, Any], prompt: str) -> TokenInfo:
        tokens, words, clip_set = self._clip_set(tokenizers["tokenizer"], prompt, "text_encoder", "tokenizer")
        other = clip_tokens(tokenizers["tokenizer_2"], prompt)[0]
        clip_set["agrees"] = [t["text"] for t in other] == [t["text"] for t in tokens]
        sets = [clip_set]
        if "tokenizer_3" in tokenizers:  # SD3 also runs without T5 (zeros fill its slots)
            t5, t5_set = self._t5_set(tokenizers, prompt, words, self.clip_length(tokenizers), "text_encoder_3")
            tokens, sets = tokens + t5, sets + [t5_set]
        return TokenInfo(tokens, words, "tokenizer", sets)


FAMILY = StableDiffusion3()
