"""FLUX.2 (``Flux2Pipeline``): an MM-DiT over ``[text; image]`` with double-stream blocks (``joint``), then parallel
single-stream blocks (``single``), and a Mistral-Small text encoder whose hidden states 10, 20 and 30 are stacked.

* **Tokens.** The prompt is sent as a chat: the system message, then the user turn ``[INST] prompt [/INST]``,
  padded (and cut) to ``max_sequence_length`` = 512 slots. The prompt's tokens are the positions strictly between
  ``[INST]`` and ``[/INST]``, found in the token ids (the tokenizer's padding side is not assumed); everything else is
  template or padding, never a row. The token set's ``offset`` is the first prompt position.
* **No text mask** reaches the transformer: every image query attends to all 512 text keys, the system message's and
  the padding's included, so a stored image→text row (the prompt's tokens) sums to well below 1 (CONTRACT.md).
* **Guidance-distilled**: ``--cfg-scale`` is the embedded guidance; one transformer call per step, no CFG batch, no
  negative prompt (refused in one line).
* **Latents.** VAE latents are patchified 2×2 (channel ``c·4 + dy·2 + dx``) and packed row-major into tokens; the
  stored latents are unpacked and unpatchified to the VAE's ``[channels, h, w]``. Previews un-normalise the
  patchified latents with the VAE's batch-norm statistics, as the pipeline does. x̂0 = x_t − σ·v (flow matching).
"""
from __future__ import annotations

from typing import Any

import torch

from capture.config import ConfigError
from capture.families.base import ModelLoadError, Peek, TokenInfo
from capture.families.mmdit import PackedMMDiTFamily
from capture.families.templated import piece_tokens, token_set


class Flux2(PackedMMDiTFamily):
    name = "flux2"
    pipeline_class = "Flux2Pipeline"
    title = "FLUX.2"
    kinds = ("joint", "single")
    transformer_class = "Flux2Transformer2DModel"
    encoders = (("text_encoder", "tokenizer"),)
    image_first = False
    #: the pipeline's ``max_sequence_length`` default: the text sequence always has this many slots
    max_length = 512

    def context(self, tokenizers: dict[str, Any]) -> int:
        return self.max_length

    def pipeline_kwargs(self, config, peek: Peek | None = None) -> dict[str, Any]:
        if config.negative_prompt:
            raise ConfigError("negative_prompt", "FLUX.2 is guidance-distilled and takes no negative prompt; "
                                                 "drop --negative-prompt")
        return {"guidance_scale": config.cfg_scale, "max_sequence_length": self.max_length}

    def tokens(self, tokenizers: dict[str, Any], prompt: str) -> TokenInfo:
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        chat = tokenizers["tokenizer"]
        encoded = chat.apply_chat_template(format_input([prompt], system_message=SYSTEM_MESSAGE),
                                           add_generation_prompt=False, tokenize=True, return_dict=True,
                                           padding="max_length", truncation=True, max_length=self.max_length)
        ids, mask = list(encoded["input_ids"][0]), list(encoded["attention_mask"][0])
        tokenizer = getattr(chat, "tokenizer", chat)   # a processor (the real PixtralProcessor) wraps its tokenizer
        open_, close = (tokenizer.convert_tokens_to_ids(tag) for tag in ("[INST]", "[/INST]"))
        if open_ not in ids:
            raise ModelLoadError(f"FLUX.2's tokenizer gave no [INST] token in its {self.max_length} slots: its chat "
                                 f"template is not Mistral's")
        start = ids.index(open_) + 1
        stop = ids.index(close, start) if close in ids[start:] else start + sum(mask[start:])   # cut at max_length
        words: list[str] = []
        tokens = piece_tokens(tokenizer, [(i, ids[i]) for i in range(start, stop)], encoder="text_encoder",
                              words=words)
        return TokenInfo(tokens, words, "tokenizer",
                         [token_set(tokens, encoder="text_encoder", tokenizer="tokenizer", sequence_end=len(ids))])

    def activation_bytes(self, peek: Peek, latent_shape, element: int) -> int:
        """~18 ``[tokens, width]`` tensors of one block for the one (guidance-distilled) sample: 2×2-packed image
        tokens plus the 512 text slots."""
        config = peek.denoiser.config
        width = int(config.num_attention_heads) * int(config.attention_head_dim)
        tokens = (int(latent_shape[1]) // self.pack) * (int(latent_shape[2]) // self.pack) + int(peek.context_length)
        return 18 * tokens * width * element

    def unpack(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[batch, tokens, channels*4] -> [batch, channels, h, w]: tokens are row-major over the patch grid."""
        h, w = height // (pipe.vae_scale_factor * self.pack), width // (pipe.vae_scale_factor * self.pack)
        grid = latents.reshape(latents.shape[0], h, w, latents.shape[-1]).permute(0, 3, 1, 2)
        return pipe._unpatchify_latents(grid)

    def decode_preview(self, pipe, x0: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        z = pipe._patchify_latents(x0[-1:]).to(vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z)
        image = vae.decode(pipe._unpatchify_latents(z * std + mean), return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="pt")[0]
        return (image.permute(1, 2, 0) * 255).round().to(torch.uint8)


FAMILY = Flux2()
