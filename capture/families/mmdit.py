"""What the MM-DiT families (SD3, Flux) share: a transformer denoiser over image tokens, flow matching,
a text sequence made of several token sets, and joint attention recorded by ``capture.joint``.

Flow matching predicts a velocity ``v`` with ``x_t = (1 - σ) x0 + σ ε``, so ``x̂0 = x_t - σ v``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from capture.families.base import Family, ModelLoadError, Peek, TokenInfo, clip_tokens
from export.words import is_content

SPACE = "\u2581"  # SentencePiece's word-start mark


def t5_tokens(tokenizer, prompt: str, *, max_length: int, offset: int, encoder: str, words: list[str]) -> list[dict]:
    """The prompt's T5 tokens (no padding) at ``offset`` in the text sequence. A piece that starts with ``▁``
    starts a word; each word takes the index of the same word in ``words`` (appended when it is new there)."""
    ids = tokenizer(prompt, max_length=max_length, truncation=True).input_ids
    texts = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    tokens, current, seen = [], None, 0
    for i, (token_id, text) in enumerate(zip(ids, texts)):
        is_special = token_id in special
        if is_special:
            current = None
        elif text.startswith(SPACE) or current is None:
            word = tokenizer.decode([ids[j] for j in _word_pieces(ids, texts, i, special)]).strip()
            if seen < len(words) and words[seen].lower() == word.lower():
                current = seen
            else:
                words.append(word)
                current = len(words) - 1
            seen = current + 1
        tokens.append({"index": offset + i, "id": int(token_id), "text": text,
                       "word": None if is_special else current, "special": is_special, "set": encoder})
    return tokens


def _word_pieces(ids, texts, start: int, special: set) -> list[int]:
    """Indices of the pieces of the word starting at ``start`` (up to the next ``▁`` piece or special token)."""
    end = start + 1
    while end < len(ids) and ids[end] not in special and not texts[end].startswith(SPACE):
        end += 1
    return list(range(start, end))


class MMDiTFamily(Family):
    """The shared part; subclasses say which components, token sets and sequence order they have."""

    transformer_class = ""
    #: (text encoder, tokenizer) components, in the pipeline's order
    encoders: tuple[tuple[str, str], ...] = ()
    #: the sequence order of joint attention: SD3 ``[image; text]``, Flux ``[text; image]``
    image_first = True
    #: the pipeline's default ``max_sequence_length`` for T5, and T5's tokenizer component
    t5_default = 256
    t5_tokenizer = ""

    def token_patch(self, peek: Peek) -> int:
        """Latent pixels per image token along a side (SD3: the patch size; Flux: 2, its 2x2 packing)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ architecture
    def peek(self, folder: Path) -> Peek:
        import diffusers

        cls = getattr(diffusers, self.transformer_class, None)
        if cls is None:   # an older diffusers than the family needs (FLUX.2 came after the lower bound)
            raise ModelLoadError(f"diffusers {diffusers.__version__} has no {self.transformer_class}: "
                                 f"{self.pipeline_class} needs a newer diffusers")
        return self.peek_folder(folder, "transformer", cls)

    def peek_pipe(self, pipe) -> Peek:
        tokenizers = {t: getattr(pipe, t) for _, t in self.encoders if getattr(pipe, t, None) is not None}
        encoders = [{"name": e, "class": type(getattr(pipe, e)).__name__, "tokenizer": t}
                    for e, t in self.encoders if getattr(pipe, e, None) is not None]
        return Peek(pipe.transformer, int(pipe.vae_scale_factor), tokenizers, encoders, self.context(tokenizers))

    def max_sequence_length(self, tokenizers: dict[str, Any]) -> int:
        """T5's length in the sequence: the pipeline's default, or less where the tokenizer is shorter."""
        t5 = tokenizers.get(self.t5_tokenizer)
        limit = int(getattr(t5, "model_max_length", self.t5_default) or self.t5_default)
        return min(self.t5_default, limit)

    def use_scheduler(self, pipe) -> None:
        """The pipeline's own flow-matching scheduler: x̂0 comes from its sigmas (:meth:`x0`)."""

    def denoiser(self, pipe):
        return pipe.transformer

    def token_grid(self, peek: Peek, latent_hw: tuple[int, int]) -> tuple[int, int]:
        p = self.token_patch(peek)
        return latent_hw[0] // p, latent_hw[1] // p

    def size_multiple(self, peek: Peek) -> int:
        return peek.vae_scale_factor * self.token_patch(peek)

    def plan(self, peek: Peek, latent_hw: tuple[int, int], config) -> tuple[list, list[str]]:
        from capture.joint import plan_joint_layers

        return plan_joint_layers(peek.denoiser, self.token_grid(peek, latent_hw), patterns=config.layers,
                                 max_layers=config.max_layers, cross=config.include_cross_attention,
                                 self_=config.include_self_attention, text=config.include_cross_attention,
                                 concept=bool(getattr(config, "concept_maps", False)),
                                 resolution=config.attention_resolution,
                                 self_resolution=config.self_attention_resolution, per_head=config.per_head)

    def recorder(self, pipe, plans, tokens: TokenInfo, *, context_length: int, fail_on_shape_error: bool = False,
                 on_step=None):
        from capture.recorder import AttentionRecorder

        content = [is_content(tokens.tokens, [i]) for i in range(len(tokens.tokens))]
        return AttentionRecorder(self.denoiser(pipe), plans, context_length=self.text_length(tokens, context_length),
                                 positions=[t["index"] for t in tokens.tokens], image_first=self.image_first,
                                 content=content, fail_on_shape_error=fail_on_shape_error, on_step=on_step,
                                 denoiser_call=self.denoiser_call)

    #: ``AttentionRecorder(denoiser_call=)``: which denoiser call of a step carries the conditional sample (None: one
    #: call per step)
    denoiser_call: int | None = None

    def text_length(self, tokens: TokenInfo, context_length: int) -> int:
        """The text sequence's length in this run (the peek's, unless it depends on the prompt)."""
        return context_length

    # ------------------------------------------------------------------ latents
    def x0(self, scheduler, sample: torch.Tensor, model_output: torch.Tensor, out) -> torch.Tensor:
        """x̂0 = x_t - σ v, with σ the sigma of the step just taken (``step_index`` has moved past it)."""
        sigma = scheduler.sigmas[scheduler.step_index - 1].to(device=sample.device, dtype=torch.float32)
        return (sample.float() - sigma * model_output.float()).to(sample.dtype)

    def decode_preview(self, pipe, x0: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = x0[-1:].to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(z, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="pt")[0]
        return (image.permute(1, 2, 0) * 255).round().to(torch.uint8)

    def _clip_set(self, tokenizer, prompt: str, encoder: str, name: str) -> tuple[list[dict], list[str], dict]:
        tokens, words = clip_tokens(tokenizer, prompt)
        for tok in tokens:
            tok["set"] = encoder
        return tokens, words, {"encoder": encoder, "tokenizer": name, "offset": 0, "length": len(tokens),
                               "sequence_length": int(tokenizer.model_max_length), "agrees": True}

    def _t5_set(self, tokenizers, prompt: str, words: list[str], offset: int, encoder: str) -> tuple[list[dict], dict]:
        tokenizer = tokenizers[self.t5_tokenizer]
        tokens = t5_tokens(tokenizer, prompt, max_length=self.max_sequence_length(tokenizers), offset=offset,
                           encoder=encoder, words=words)
        return tokens, {"encoder": encoder, "tokenizer": self.t5_tokenizer, "offset": offset, "length": len(tokens),
                        "sequence_length": self.max_sequence_length(tokenizers), "agrees": True}

    def native_size(self, peek: Peek) -> tuple[int, int]:
        side = int(peek.denoiser.config.sample_size) * peek.vae_scale_factor
        return side, side

    def latent_channels(self, peek: Peek) -> int:
        return int(peek.denoiser.config.in_channels)



class PackedMMDiTFamily(MMDiTFamily):
    """An MM-DiT pipeline that packs 2×2 latent pixels into one image token and generates at 128 latent pixels a side
    by default (``default_sample_size``): Flux, Qwen-Image, FLUX.2."""

    pack = 2

    def token_patch(self, peek: Peek) -> int:
        return self.pack

    def native_size(self, peek: Peek) -> tuple[int, int]:
        side = 128 * peek.vae_scale_factor   # the pipeline's default_sample_size
        return side, side

    def latent_channels(self, peek: Peek) -> int:
        return int(peek.denoiser.config.in_channels) // (self.pack * self.pack)
