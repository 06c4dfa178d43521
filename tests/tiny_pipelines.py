"""Tiny random-weight pipelines of other families, built from configs and saved as folders.

They load through the same ``from_pretrained`` path as real checkpoints. The toy model's CLIP tokenizer
serves every CLIP tokenizer (with the 77-token context real CLIP models have).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from capture.pipeline import DEFAULT_MODEL_DIR


def toy_clip_tokenizer() -> CLIPTokenizer:
    tokenizer = CLIPTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR / "tokenizer"), local_files_only=True)
    tokenizer.model_max_length = 77
    return tokenizer


def _clip_config(vocab: int) -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                          layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                          vocab_size=vocab, hidden_act="gelu", projection_dim=32, max_position_embeddings=77)


def build_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline with 12 transformer blocks (down 4, mid 2, up 6) at heads 4, saved to ``folder``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the 32-wide pooled text embedding
        cross_attention_dim=64, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    tokenizer = toy_clip_tokenizer()
    config = _clip_config(len(tokenizer))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer, tokenizer_2=toy_clip_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    folder = Path(folder)
    pipe.save_pretrained(str(folder))
    return folder


def tiny_t5_tokenizer(max_length: int = 16):
    """A T5 tokenizer built in code (a Unigram model over the toy world's words, as NOTES.md says it must be)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    from capture.toyworld.world import VOCABULARY

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in VOCABULARY]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def _tiny_t5(vocab: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _flow_vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, shift_factor=0.0609, scaling_factor=1.5035,
                         use_quant_conv=False, use_post_quant_conv=False)


def build_sd3(folder: str | Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline: 2 joint blocks (the last one context_pre_only), CLIP-L/G + T5 (16 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4)
    tokenizer = toy_clip_tokenizer()
    config = _clip_config(len(tokenizer))
    t5_tokenizer = tiny_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(4),
        text_encoder=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=toy_clip_tokenizer(),
        text_encoder_3=_tiny_t5(len(t5_tokenizer)), tokenizer_3=t5_tokenizer)
    folder = Path(folder)
    pipe.save_pretrained(str(folder))
    return folder


def build_flux(folder: str | Path, seed: int = 0) -> Path:
    """A FluxPipeline: 1 double-stream and 2 single-stream blocks, CLIP (pooled) + T5 (16 tokens), rotary axes 4+4+8."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    tokenizer = toy_clip_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer()
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(4),
                        text_encoder=CLIPTextModel(_clip_config(len(tokenizer))), tokenizer=tokenizer,
                        text_encoder_2=_tiny_t5(len(t5_tokenizer)), tokenizer_2=t5_tokenizer)
    folder = Path(folder)
    pipe.save_pretrained(str(folder))
    return folder


def build_pixart(folder: str | Path, seed: int = 0) -> Path:
    """A PixArtSigmaPipeline: 2 cross-DiT blocks (2 heads of 8, patch 2, learned sigma), a tiny T5 (16 tokens) and a
    4-block VAE (scale 8). ``sample_size`` 32 makes it bin sizes as PixArt's 256 px models do (48x84 -> 192x336)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(sample_size=32, num_layers=2, patch_size=2, in_channels=4, out_channels=8,
                                           attention_head_dim=8, num_attention_heads=2, cross_attention_dim=16,
                                           caption_channels=32, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=256, scaling_factor=0.13025)
    t5_tokenizer = tiny_t5_tokenizer()
    pipe = PixArtSigmaPipeline(tokenizer=t5_tokenizer, text_encoder=_tiny_t5(len(t5_tokenizer)), vae=vae,
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    folder = Path(folder)
    pipe.save_pretrained(str(folder))
    return folder
