"""Qwen-Image (``QwenImagePipeline``): an MM-DiT whose every block is double-stream joint attention over
``[text; image]``, with a Qwen2.5-VL text encoder.

* **Tokens.** The pipeline formats the prompt into its chat template (``prompt_template_encode``), encodes it and
  drops the first ``prompt_template_encode_start_idx`` (34) positions, the system turn through ``user\\n``. The text
  sequence is then the prompt's n tokens followed by the template's closing tokens (``<|im_end|>``, ``\\n``,
  ``<|im_start|>``, ``assistant``, ``\\n``): n + 5 slots, so its length depends on the prompt
  (``metadata.context_length``). Only the prompt's tokens are ``metadata.tokens`` (offset 0); the closing template
  tokens are keys like any other (their share of an image row is part of what the stored rows do not sum to), never
  rows. A single prompt is not padded, so the pipeline passes no text mask.
* **True CFG** is two transformer calls per step, the prompt's first, then the negative prompt's with its own
  length; the recorder observes the first call only (``denoiser_call=0``). Without ``--cfg-scale`` > 1 there is one
  call. diffviz's empty negative prompt is sent as ``" "`` (the pipeline needs one to run CFG at all).
* **Latents.** 2×2 latent patches are packed into tokens (row-major); the stored latents are unpacked to
  ``[channels, h, w]`` (the VAE's single frame dropped). Previews un-normalise with the VAE's per-channel
  ``latents_mean``/``latents_std`` and decode frame 0, as the pipeline does. x̂0 = x_t − σ·v (flow matching).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from capture.families.base import Peek, TokenInfo
from capture.families.mmdit import PackedMMDiTFamily
from capture.families.templated import overlapping, piece_tokens, token_set


@functools.lru_cache(maxsize=1)
def _template() -> tuple[str, int, int]:
    """The pipeline's own chat template, the positions it drops and its tokenizer's length cap."""
    from diffusers import QwenImagePipeline

    empty = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return empty.prompt_template_encode, empty.prompt_template_encode_start_idx, empty.tokenizer_max_length


class QwenImage(PackedMMDiTFamily):
    name = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    title = "Qwen-Image"
    kinds = ("joint",)
    transformer_class = "QwenImageTransformer2DModel"
    encoders = (("text_encoder", "tokenizer"),)
    image_first = False
    #: the pipeline's ``max_sequence_length`` default (passed explicitly, so tokens and call agree)
    max_length = 512

    def peek(self, folder: Path) -> Peek:
        from diffusers import AutoencoderKLQwenImage

        peek = super().peek(folder)
        vae = AutoencoderKLQwenImage.load_config(str(folder / "vae"), local_files_only=True)
        peek.vae_scale_factor = 2 ** len(vae.get("temperal_downsample") or ())   # as the pipeline computes it
        return peek

    def context(self, tokenizers: dict[str, Any]) -> int:
        """The longest text sequence (a run's own is its prompt's length + 5, from :meth:`tokens`)."""
        return self.max_length

    def pipeline_kwargs(self, config, peek: Peek | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"true_cfg_scale": config.cfg_scale, "max_sequence_length": self.max_length}
        if config.cfg_scale > 1:
            kwargs["negative_prompt"] = config.negative_prompt or " "
        return kwargs

    def cfg_half(self, pipe) -> str:
        return "conditional"   # the prompt's own transformer call, with or without the negative prompt's

    def tokens(self, tokenizers: dict[str, Any], prompt: str) -> TokenInfo:
        tokenizer = tokenizers["tokenizer"]
        template, drop, cap = _template()
        start = template.index("{}")
        encoded = tokenizer(template.format(prompt), max_length=cap + drop, truncation=True,
                            return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        length = min(len(ids) - drop, self.max_length)   # the pipeline drops ``drop``, then cuts at max_length
        inside = [i for i in overlapping(offsets, start, start + len(prompt)) if drop <= i < drop + length]
        words: list[str] = []
        tokens = piece_tokens(tokenizer, [(i - drop, ids[i]) for i in inside], encoder="text_encoder", words=words)
        return TokenInfo(tokens, words, "tokenizer",
                         [token_set(tokens, encoder="text_encoder", tokenizer="tokenizer", sequence_end=length)])

    #: true CFG calls the transformer twice a step: the prompt's call first, then the negative prompt's
    denoiser_call = 0

    def text_length(self, tokens: TokenInfo, context_length: int) -> int:
        if not tokens.token_sets:
            raise ValueError("Qwen-Image's text length depends on the prompt: record it with prompt=")
        return tokens.token_sets[0]["offset"] + tokens.token_sets[0]["sequence_length"]

    def activation_bytes(self, peek: Peek, latent_shape, element: int) -> int:
        """One transformer call at a time (true CFG runs the two prompts one after the other): ~18 ``[tokens, width]``
        tensors of one block, for a batch of 1."""
        return super().activation_bytes(peek, latent_shape, element) // 2

    def unpack(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[batch, tokens, channels*4] -> [batch, channels, h, w] (the pipeline's unpacking, frame 0)."""
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)[:, :, 0]

    def decode_preview(self, pipe, x0: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = x0[-1:, :, None].to(vae.dtype)                                   # [1, C, 1, h, w]: one frame
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
        image = vae.decode(z / inverse_std + mean, return_dict=False)[0][:, :, 0]   # as the pipeline un-normalises
        image = pipe.image_processor.postprocess(image, output_type="pt")[0]
        return (image.permute(1, 2, 0) * 255).round().to(torch.uint8)


FAMILY = QwenImage()
