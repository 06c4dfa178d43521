"""VAE stage: train the toy ``AutoencoderKL``, harden its decoder on noisy latents, measure its latents."""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import world
from .common import Logger, WorldStream, batches, lr_at, to_pixels


def train_vae(vae, *, steps: int, batch: int, lr: float, seed: int, device: str, log: Logger,
              kl_weight: float = 1e-5, workers: int = 0) -> None:
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()
    stream = WorldStream(seed + 1000, batch, {}, 0, 0, 16, p_empty=0.0)
    it = batches(stream, workers)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=100)
        x = to_pixels(next(it)["images"], device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=device)
        rec = vae.decode(z).sample
        mse = torch.mean((rec - x) ** 2)
        kl = post.kl().mean() / z[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(stage="vae", step=step, mse=round(mse.item(), 5), kl=round(kl.item(), 4), elapsed=round(time.time() - t0, 1))
    vae.eval()


def _tune_decoder(vae, *, steps: int, lr: float, device: str, log: Logger, stage: str, batch_at) -> None:
    """Fine-tune the decoder alone to MSE, the encoder (so every latent the UNet learns) fixed.

    ``batch_at(step)`` gives (latents, target images in [-1, 1]).
    """
    vae.to(device).train().requires_grad_(True)
    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=20)
        z, x = batch_at(step)
        mse = torch.mean((vae.decode(z).sample - x) ** 2)
        opt.zero_grad(set_to_none=True)
        mse.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(stage=stage, step=step, mse=round(mse.item(), 5), elapsed=round(time.time() - t0, 1))
    vae.requires_grad_(True)
    vae.eval()


def _jitter(z: torch.Tensor, noise: float, std, gen: torch.Generator) -> torch.Tensor:
    """``z`` plus Gaussian noise whose std, per item, is drawn from U(0, ``noise``) times ``std``."""
    sigma = torch.rand((z.shape[0], 1, 1, 1), generator=gen, device=z.device) * noise * std
    return z + sigma * torch.randn(z.shape, generator=gen, device=z.device)


def harden_decoder(vae, *, steps: int, batch: int, lr: float, seed: int, device: str, log: Logger,
                   noise: float = 0.3) -> None:
    """Fine-tune the decoder alone on noisy latents, so that it decodes *near* latents to clean shapes.

    The encoder (so every latent the UNet will learn) stays fixed. Each image's latent gets
    Gaussian noise of a standard deviation drawn from U(0, ``noise``) in units of the latent's
    own std: the UNet's samples are never exact, and a decoder that has only seen exact
    latents draws their small errors as dents in a square's sides.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    it = iter(WorldStream(seed + 3000, batch, {}, 0, 0, 16, p_empty=0.0))
    std = None

    def batch_at(step):
        nonlocal std
        x = to_pixels(next(it)["images"], device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        std = z.std().item() if std is None else std
        return _jitter(z, noise, std, gen), x

    _tune_decoder(vae, steps=steps, lr=lr, device=device, log=log, stage="vae-harden", batch_at=batch_at)



def measure_vae(vae, *, seed: int, device: str, n: int = 256) -> dict:
    """Latent std (-> scaling factor) and how well reconstructions segment back to the true masks."""
    rng = np.random.default_rng(seed)
    b = world.make_batch(rng, n)
    with torch.no_grad():
        x = to_pixels(b.images, device)
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
    img = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    ious = []
    for i in range(n):
        seg = world.segment(img[i])
        for s in range(int(b.scenes.count[i])):
            m = seg.get(world.COLOUR_NAMES[b.scenes.colour[i, s]])
            gt = b.masks[i, s]
            ious.append(0.0 if m is None else float((m & gt).sum() / (m | gt).sum()))
    return {"latent_std": float(z.std().item()), "latent_mean": float(z.mean().item()),
            "recon_mse": float(torch.mean((rec - x) ** 2).item()), "recon_mask_iou": float(np.mean(ious))}

