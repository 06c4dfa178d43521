"""The toy world's model: a complete, tiny Stable-Diffusion-format pipeline.

Everything is built from small configs in code, so the same pipeline can be
randomly initialised (a control for the attention evaluation), trained
(``capture.toyworld.train``) and saved with ``save_pretrained`` into a folder
that loads offline through ``StableDiffusionPipeline.from_pretrained`` — the
same path that real checkpoints take.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from capture.toyworld.world import VOCABULARY

IMAGE_SIZE = 32
#: The VAE downsamples by 4: 32×32 RGB images <-> 8×8×8 latents (see ``build_pipeline``).
VAE_FACTOR = 4
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR
LATENT_CHANNELS = 8
CONTEXT_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

#: Every word the toy world's caption grammar can produce (``world.VOCABULARY``).
DEFAULT_WORDS: tuple[str, ...] = VOCABULARY


def build_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is exactly ``words`` (one token per word).

    CLIP's BPE starts from characters with ``</w>`` on the last one; the merges rebuild
    each word left to right. BPE applies merges by rank, not left to right, so a pair
    learnt for one word can cut into another ("to" of *top* splits *bottom* into
    "bot" + "to" + "m"): any word that does not come out whole gets a repair merge of
    its first two pieces, until every word is a single token.
    """
    symbols: list[str] = []
    merges: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(symbol: str) -> None:
        if symbol not in seen:
            seen.add(symbol)
            symbols.append(symbol)

    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            add(piece)
        acc = pieces[0]
        for piece in pieces[1:]:
            if (acc, piece) not in merges:
                merges.append((acc, piece))
            acc = acc + piece
            add(acc)
    for _ in range(10 * len(words)):
        tokenizer = _clip_tokenizer(symbols, merges)
        broken = [w for w in words if len(tokenizer.tokenize(w)) != 1]
        if not broken:
            return tokenizer
        first, second = tokenizer.tokenize(broken[0])[:2]
        merges.append((first, second))
        add(first + second)
    raise RuntimeError(f"could not build a one-token-per-word tokenizer for {broken}")


def _clip_tokenizer(symbols: list[str], merges: list[tuple[str, str]]) -> CLIPTokenizer:
    vocab = {symbol: i for i, symbol in enumerate(symbols + [BOS, EOS])}
    # transformers 5: the tokenizers-backed CLIPTokenizer takes the vocab dict and merges as tuples.
    return CLIPTokenizer(
        vocab=vocab, merges=list(merges), bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=CONTEXT_LENGTH,
    )


def build_pipeline(words: tuple[str, ...] = DEFAULT_WORDS, *, text_layers: int = 1, seed: int = 0,
                   prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """A randomly initialised toy pipeline: 32×32 RGB images, 8×8×8 latents.

    Sized to train on a 2-core CPU in 45 minutes (``capture.toyworld.train``):

    * **VAE** (0.69 M params): factor 4 with 8 latent channels. The world's images are a few
      flat-coloured shapes on white, so a 4×4 pixel cell holds at most a colour and an edge;
      eight numbers per cell are enough to decode them with pure colours (the training record
      gives the reconstruction's mask IoU), and the UNet then works on an 8×8 grid, four times
      cheaper than 16×16.
    * **UNet** (2.4 M params): cross-attention at 8×8 (``down_blocks.0``, ``up_blocks.1``) and
      4×4 (``down_blocks.1``, the mid block, ``up_blocks.0``) — seven cross-attention layers.
    * **Text encoder**: a CLIP text model, 64 wide, with ``text_layers`` causal layers (the
      shipped model has one, trained jointly with the UNet; ``text_encoder/config.json`` records it).
    * **Scheduler**: DDIM on Stable Diffusion's beta schedule; the UNet predicts ``prediction_type``
      (``"epsilon"`` or ``"v_prediction"``), which ``scheduler/scheduler_config.json`` records.
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=text_layers, num_attention_heads=4,
        max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
        sample_size=IMAGE_SIZE, scaling_factor=1.0,
    )
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=64, attention_head_dim=8,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
