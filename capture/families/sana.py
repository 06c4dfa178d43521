"""SANA (``SanaPipeline``): a linear-attention diffusion transformer, layer kind ``linear``. Each block attends to
the image tokens with a ReLU-kernel linear attention (``attn1``: no softmax; ``capture.linear`` stores the attention
the kernel implies) and then to a Gemma-2 text sequence with softmax cross-attention (``attn2``, padding masked).

* **Tokens.** The prompt is lower-cased and stripped, and by default prefixed with the pipeline's long
  ``complex_human_instruction``; of that tokenization the pipeline keeps ``<bos>`` and the last 299 positions, so the
  300-slot text sequence is ``<bos>``, the prompt's tokens, then padding (masked). The instruction's trailing space
  merges into the first prompt word (``▁word``). ``metadata.tokens`` are ``<bos>`` and the prompt's tokens.
* **CFG** is a batch ``[negative, prompt]`` in one call; the maps are the prompt's (the last sample).
* **Sizes.** Height and width must be multiples of 32. With resolution binning (the default) the pipeline generates
  at the nearest aspect-ratio bin of its ``sample_size`` and resizes the output back: the run records the size
  generated (``run.height``/``run.width``) and the output's (``run.output_size``), as for PixArt-Σ.
* **x̂0** = x_t − σ·v with the pipeline's own (flow DPM-Solver or flow-matching Euler) sigma; previews decode
  ``x̂0 / scaling_factor`` with the DC-AE at the generated size.
"""
from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path
from typing import Any

from capture.families.base import Family, Peek, TokenInfo
from capture.families.mmdit import MMDiTFamily
from capture.families.pixart import PixArtSigma
from capture.families.templated import overlapping, piece_tokens, token_set

#: transformer ``sample_size`` -> the aspect-ratio bins the pipeline generates at (SanaPipeline.__call__'s table)
_BINS = {128: "ASPECT_RATIO_4096_BIN", 64: "ASPECT_RATIO_2048_BIN", 32: "ASPECT_RATIO_1024_BIN",
         16: "ASPECT_RATIO_512_BIN"}


@functools.lru_cache(maxsize=1)
def _instruction() -> str:
    """The pipeline's default ``complex_human_instruction``, joined as it joins it."""
    from diffusers import SanaPipeline

    return "\n".join(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default or [])


class Sana(PixArtSigma):
    """PixArt-Σ's transformer-denoiser plumbing (size, binning, grid) with SANA's own text side, kinds and call."""

    name = "sana"
    pipeline_class = "SanaPipeline"
    title = "SANA"
    kinds = ("linear",)
    #: the pipeline's ``max_sequence_length``: the text sequence always has this many slots
    max_length = 300
    bins = _BINS

    # ------------------------------------------------------------------ architecture
    def peek(self, folder: Path) -> Peek:
        from diffusers import AutoencoderDC, SanaTransformer2DModel

        peek = self.peek_folder(folder, "transformer", SanaTransformer2DModel)
        vae = AutoencoderDC.load_config(str(folder / "vae"), local_files_only=True)
        peek.vae_scale_factor = 2 ** (len(vae.get("encoder_block_out_channels") or [0]) - 1)   # the pipeline's rule
        return peek

    def context(self, tokenizers: dict[str, Any]) -> int:
        return self.max_length

    def size_multiple(self, peek: Peek) -> int:
        return math.lcm(32, peek.vae_scale_factor * int(peek.denoiser.config.patch_size))   # check_inputs: 32

    def bin_table(self, name: str) -> dict:
        from diffusers.pipelines.sana import pipeline_sana

        return getattr(pipeline_sana, name)

    def plan(self, peek: Peek, latent_hw: tuple[int, int], config) -> tuple[list, list[str]]:
        from capture.recorder import CROSS, ROLE_LINEAR, ROLE_SELF, SELF, choose_layers, layer_names, plan_blocks

        grid = self.token_grid(peek, latent_hw)
        names = choose_layers(layer_names(peek.denoiser), (SELF, CROSS), config.layers, config.max_layers)
        plans, problems = plan_blocks(peek.denoiser, names, lambda name: grid, kind="linear",
                                      cross=config.include_cross_attention, self_=config.include_self_attention,
                                      resolution=config.attention_resolution,
                                      self_resolution=config.self_attention_resolution, per_head=config.per_head,
                                      block=lambda name: name.split(".")[0])
        for plan in plans:   # attn1 is the linear (ReLU-kernel) self-attention
            plan.sites = tuple((module, ROLE_LINEAR if role == ROLE_SELF else role) for module, role in plan.sites)
        return plans, problems

    def recorder(self, pipe, plans, tokens: TokenInfo, *, context_length: int, fail_on_shape_error: bool = False,
                 on_step=None):
        from capture.linear import LinearSlot
        from capture.recorder import ROLE_LINEAR, AttentionRecorder

        return AttentionRecorder(self.denoiser(pipe), plans, context_length=context_length,
                                 fail_on_shape_error=fail_on_shape_error, on_step=on_step,
                                 slot_types={ROLE_LINEAR: LinearSlot})

    def attention_extent(self, plan, role: str, context: int) -> tuple[int, int]:
        image = plan.native[0] * plan.native[1]
        return (image, context) if role == "cross" else (image, image)

    # ------------------------------------------------------------------ the call
    def pipeline_kwargs(self, config, peek: Peek | None = None) -> dict[str, Any]:
        return {"negative_prompt": config.negative_prompt or "", "guidance_scale": config.cfg_scale,
                "max_sequence_length": self.max_length, "clean_caption": False}

    #: SANA calls back through ``callback_on_step_end`` (PixArt-Σ only has the older ``callback``)
    callback_kwargs = Family.callback_kwargs

    # ------------------------------------------------------------------ tokens
    def tokens(self, tokenizers: dict[str, Any], prompt: str) -> TokenInfo:
        """``<bos>`` and the prompt's tokens, where the pipeline puts them (see the module's docstring)."""
        tokenizer = tokenizers["tokenizer"]
        instruction, text = _instruction(), prompt.lower().strip()
        total = len(tokenizer.encode(instruction)) + self.max_length - 2 if instruction else self.max_length
        encoded = tokenizer(instruction + text, padding="max_length", max_length=total, truncation=True,
                            add_special_tokens=True, return_offsets_mapping=True, padding_side="right")   # as set there
        ids, offsets, mask = encoded["input_ids"], encoded["offset_mapping"], encoded["attention_mask"]
        kept = [0] + list(range(total - self.max_length + 1, total))   # the pipeline's select_index
        inside = set(overlapping(offsets, len(instruction), len(instruction) + len(text)))
        picked = [(slot, ids[i]) for slot, i in enumerate(kept) if mask[i] and (slot == 0 or i in inside)]
        words: list[str] = []
        tokens = piece_tokens(tokenizer, picked, encoder="text_encoder", words=words)
        return TokenInfo(tokens, words, "tokenizer",
                         [token_set(tokens, encoder="text_encoder", tokenizer="tokenizer", sequence_end=self.max_length)])

    # ------------------------------------------------------------------ latents
    #: x̂0 = x_t − σ·v, σ the scheduler's sigma of the step just taken (flow DPM-Solver's ``flow_prediction`` too)
    x0 = MMDiTFamily.x0


FAMILY = Sana()
