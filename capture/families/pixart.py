"""PixArt-Σ (``PixArtSigmaPipeline``): a diffusion transformer whose blocks attend to the image tokens (``attn1``)
and then to a T5 text sequence (``attn2``, cross-attention with the padding masked), layer kind ``cross-dit``.

* **Tokens.** One token set, T5 at offset 0; the text sequence is ``max_sequence_length`` slots (300, or the
  tokenizer's length where shorter), padded and masked, so the cross maps are each image cell's distribution over
  those slots and the prompt's tokens carry (almost) all of it.
* **Resolution binning.** The pipeline maps a requested size to the nearest aspect-ratio bin of its
  ``sample_size`` (ASPECT_RATIO_{256,512,1024,2048}_BIN), generates there and resizes its output back. The run
  records the size generated (``run.height``/``run.width``: maps, previews, latents) and the output's size
  (``run.output_size``, ``images/final.png``).
* **x̂0.** The pipeline's own scheduler (DPM-Solver) is kept; x̂0 comes from its sigma of the step just taken.
* **Calls back** through the older ``callback(step, timestep, latents)`` (it has no ``callback_on_step_end``).
* The prompt is not cleaned (``clean_caption=False``): the recorded tokens are the prompt's own.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from capture.families.base import Family, Peek, TokenInfo
from capture.families.mmdit import t5_tokens

#: transformer ``sample_size`` -> the aspect-ratio bins the pipeline generates at (the pipeline's own table)
_BINS = {256: "ASPECT_RATIO_2048_BIN", 128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN", 32: "ASPECT_RATIO_256_BIN"}


class PixArtSigma(Family):
    name = "pixart"
    pipeline_class = "PixArtSigmaPipeline"
    title = "PixArt-Σ"
    denoiser_name = "transformer"
    encoders = (("text_encoder", "tokenizer"),)
    kinds = ("cross-dit",)
    t5_default = 300

    # ------------------------------------------------------------------ architecture
    def peek(self, folder: Path) -> Peek:
        from diffusers import PixArtTransformer2DModel

        return self.peek_folder(folder, "transformer", PixArtTransformer2DModel)

    def peek_pipe(self, pipe) -> Peek:
        tokenizers = {"tokenizer": pipe.tokenizer}
        encoders = [{"name": "text_encoder", "class": type(pipe.text_encoder).__name__, "tokenizer": "tokenizer"}]
        return Peek(pipe.transformer, int(pipe.vae_scale_factor), tokenizers, encoders, self.context(tokenizers))

    def context(self, tokenizers: dict[str, Any]) -> int:
        limit = int(getattr(tokenizers["tokenizer"], "model_max_length", self.t5_default) or self.t5_default)
        return min(self.t5_default, limit)

    def denoiser(self, pipe):
        return pipe.transformer

    def native_size(self, peek: Peek) -> tuple[int, int]:
        side = int(peek.denoiser.config.sample_size) * peek.vae_scale_factor
        return side, side

    def size_multiple(self, peek: Peek) -> int:
        return math.lcm(8, peek.vae_scale_factor * int(peek.denoiser.config.patch_size))

    #: transformer ``sample_size`` -> the name of the aspect-ratio bin table the pipeline generates at
    bins = _BINS

    def bin_table(self, name: str) -> dict:
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha, pipeline_pixart_sigma

        return getattr(pipeline_pixart_sigma, name, None) or getattr(pipeline_pixart_alpha, name)

    def generated_size(self, peek: Peek, height: int, width: int) -> tuple[int, int]:
        table = self.bins.get(int(peek.denoiser.config.sample_size))
        if table is None:  # the pipeline refuses to bin ("Invalid sample size"); it runs at the size asked
            return height, width
        from diffusers.image_processor import PixArtImageProcessor

        h, w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=self.bin_table(table))
        return int(h), int(w)

    def token_grid(self, peek: Peek, latent_hw: tuple[int, int]) -> tuple[int, int]:
        p = int(peek.denoiser.config.patch_size)
        return latent_hw[0] // p, latent_hw[1] // p

    def plan(self, peek: Peek, latent_hw: tuple[int, int], config) -> tuple[list, list[str]]:
        from capture.recorder import CROSS, SELF, choose_layers, layer_names, plan_blocks

        grid = self.token_grid(peek, latent_hw)
        names = choose_layers(layer_names(peek.denoiser), (SELF, CROSS), config.layers, config.max_layers)
        return plan_blocks(peek.denoiser, names, lambda name: grid, kind="cross-dit",
                           cross=config.include_cross_attention, self_=config.include_self_attention,
                           resolution=config.attention_resolution, self_resolution=config.self_attention_resolution,
                           per_head=config.per_head, block=lambda name: name.split(".")[0])

    def latent_channels(self, peek: Peek) -> int:
        return int(peek.denoiser.config.in_channels)

    # ------------------------------------------------------------------ the call
    def pipeline_kwargs(self, config, peek: Peek | None = None) -> dict[str, Any]:
        return {"negative_prompt": config.negative_prompt or "", "guidance_scale": config.cfg_scale,
                "max_sequence_length": self.context(peek.tokenizers) if peek else self.t5_default,
                "clean_caption": False}

    def callback_kwargs(self, callback) -> dict[str, Any]:
        def legacy(step: int, timestep, latents) -> None:
            callback(None, step, timestep, {"latents": latents})

        return {"callback": legacy, "callback_steps": 1}

    def use_scheduler(self, pipe) -> None:
        """The pipeline's own scheduler: x̂0 comes from its sigmas (:meth:`x0`)."""

    # ------------------------------------------------------------------ tokens
    def tokens(self, tokenizers: dict[str, Any], prompt: str) -> TokenInfo:
        words: list[str] = []
        length = self.context(tokenizers)
        tokens = t5_tokens(tokenizers["tokenizer"], prompt, max_length=length, offset=0, encoder="text_encoder",
                           words=words)
        sets = [{"encoder": "text_encoder", "tokenizer": "tokenizer", "offset": 0, "length": len(tokens),
                 "sequence_length": length, "agrees": True}]
        return TokenInfo(tokens, words, "tokenizer", sets)

    # ------------------------------------------------------------------ latents
    def x0(self, scheduler, sample, model_output, out):
        """x̂0 of the step just taken: the scheduler's own when it gives one, else from its sigma σ (DPM-Solver's
        parametrisation, x_t = α x0 + σ_t ε with α = 1/√(σ² + 1), σ_t = σ α), for ε or v prediction."""
        import torch

        given = getattr(out, "pred_original_sample", None)
        if given is not None:
            return given
        sigma = scheduler.sigmas[scheduler.step_index - 1].to(device=sample.device, dtype=torch.float32)
        alpha = 1.0 / torch.sqrt(sigma ** 2 + 1.0)
        x, e = sample.float(), model_output.float()
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            x0 = (x - sigma * alpha * e) / alpha
        elif kind == "v_prediction":
            x0 = alpha * x - sigma * alpha * e
        else:
            raise ValueError(f"{type(scheduler).__name__}: prediction_type {kind!r} has no x̂0 here")
        return x0.to(sample.dtype)


FAMILY = PixArtSigma()
