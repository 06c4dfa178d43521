"""Decoder adaptation stage: the decoder alone learns to map the trained denoiser's own latents to true images.

The denoiser's squares come out with sloped sides and cut corners (fill ratio 0.85-0.9), and
sampling does that even to true squares: world images noised to t = 300 and sampled back
(DDIM, guidance 7.5) keep their colours and places but lose 38 of 77 squares. So ``pairs``
world images (whole batches of up to 128) are noised to a strength drawn from U(``strength``)
(one per batch) and sampled back with their true captions by the family's img2img pipeline,
and the decoder learns to map those latents to the *true* image. Half of every batch is true
latents with noise, as in ``harden_decoder``, so exact latents still decode exactly. From
these low strengths the scene is still the source scene, which is why this works where
decoding samples from t in [300, 900] (the scene no longer the source) taught the decoder to blur.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import world
from .common import Logger, WorldStream, to_pixels, token_table
from .vae import _jitter, _tune_decoder


def _sampler_unet(pipe, device: str, word_ids, bos, eos, length, gen_batch):
    """(data, strength, generator, cfg) -> VAE-space latents, for the UNet family."""
    from diffusers import StableDiffusionImg2ImgPipeline
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    sf = pipe.vae.config.scaling_factor
    empty = torch.as_tensor(world.encode_words([[]] * gen_batch, word_ids, bos, eos, length), device=device)
    negative = pipe.text_encoder(empty)[0]

    def sample(data, x, strength, generator, cfg):
        embeds = pipe.text_encoder(torch.as_tensor(data["ids"], device=device))[0]
        out = img2img(prompt_embeds=embeds, negative_prompt_embeds=negative, image=(x + 1) / 2,
                      strength=strength, num_inference_steps=30, guidance_scale=cfg,
                      output_type="latent", generator=generator)
        return out.images / sf
    return sample


def _sampler_sd3(pipe, device: str, word_ids, bos, eos, length, gen_batch):
    """(data, strength, generator, cfg) -> VAE-space latents, for the MM-DiT family."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from .. import mmdit
    from .denoiser_mmdit import t5_table
    img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    sf, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor or 0.0
    t5_words, t5_eos, t5_pad = t5_table(pipe.tokenizer_3)

    def ids(words):
        return (torch.as_tensor(world.encode_words(words, word_ids, bos, eos, length), device=device),
                torch.as_tensor(mmdit.t5_ids(words, t5_words, t5_eos, t5_pad), device=device))
    neg, neg_pooled = mmdit.encode(pipe, *ids([[]] * gen_batch))

    def sample(data, x, strength, generator, cfg):
        embeds, pooled = mmdit.encode(pipe, *ids(data["words"]))
        out = img2img(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                      negative_pooled_prompt_embeds=neg_pooled, image=(x + 1) / 2, strength=strength,
                      num_inference_steps=30, guidance_scale=cfg, output_type="latent", generator=generator)
        return out.images / sf + shift
    return sample


def adapt_decoder(pipe, *, pairs: int, steps: int, batch: int, lr: float, seed: int, device: str, log: Logger,
                  strength: tuple[float, float] = (0.1, 0.4), cfg: float = 7.5, noise: float = 0.3,
                  family: str = "unet") -> dict:
    """Fine-tune ``pipe.vae``'s decoder on ``pairs`` (sampled latent, true image) pairs; returns what was done."""
    word_ids, bos, eos, length = token_table(pipe.tokenizer)
    gen_batch = min(128, pairs)
    pipe.to(device)
    stream = WorldStream(seed + 4000, gen_batch, word_ids, bos, eos, length, p_empty=0.0)
    rng = np.random.default_rng(seed + 4000)
    make = _sampler_sd3 if family == "sd3" else _sampler_unet
    t0 = time.time()
    latents, images = [], []
    with torch.no_grad():
        sample = make(pipe, device, word_ids, bos, eos, length, gen_batch)
        for k in range(-(-pairs // gen_batch)):
            data = stream.make(k)
            x = to_pixels(data["images"], device)
            latents.append(sample(data, x, float(rng.uniform(*strength)),
                                  torch.Generator(device=device).manual_seed(seed + 4000 + k), cfg))
            images.append(x)
    latents, images = torch.cat(latents), torch.cat(images)
    made = round(time.time() - t0, 1)
    log(stage="decoder-adapt", event="pairs made", pairs=len(latents), elapsed=made)
    vae = pipe.vae
    gen = torch.Generator(device=device).manual_seed(seed + 4000)
    half = batch // 2

    def batch_at(step):
        idx = torch.randint(0, len(latents), (batch,), generator=gen, device=device)
        z, x = latents[idx], images[idx]
        with torch.no_grad():
            true = vae.encode(x[:half]).latent_dist.mean
            true = _jitter(true, noise, true.std(), gen)
        return torch.cat([z[half:], true]), torch.cat([x[half:], x[:half]])

    _tune_decoder(vae, steps=steps, lr=lr, device=device, log=log, stage="decoder-adapt", batch_at=batch_at)
    return {"pairs": len(latents), "steps": steps, "batch": batch, "lr": lr, "strength": list(strength), "cfg": cfg,
            "seconds": round(time.time() - t0, 1), "pairs_seconds": made}
