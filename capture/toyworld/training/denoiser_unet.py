"""Denoiser stage of the UNet family: the UNet and its CLIP text encoder, jointly, on the frozen VAE's latents.

Epsilon prediction (or v) with min-SNR-5 weighting, empty captions for classifier-free guidance,
EMA weights that average most of the run, and with ``ground_weight`` > 0 the grounding loss on the
cross-attention maps (computed by ``probe.ProbeProcessor``, equal to ``AttnProcessor2_0``).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import probe
from .checkpoint import ema_also_path, save_checkpoint
from .common import Logger, StepBudget, WorldStream, batches, ema_decay_at, lr_at, to_pixels, token_table
from .grounding import grounding_loss


def train_unet(pipe, *, steps: int | None, time_budget: float | None, batch: int, lr: float, seed: int,
               device: str, log: Logger, ground_weight: float = 0.0, ema_decay: float = 0.999,
               ema_warmup: float = 4.0, ema_also: tuple[float, ...] = (), p_empty: float = 0.1,
               lr_floor: float = 0.1, workers: int = 0, checkpoint: str | None = None,
               checkpoint_every: float = 60.0,
               record: dict | None = None, warmup: int = 200, min_snr: float = 5.0,
               hard_stop: float | None = None, probe_steps: int = 150) -> dict:


    unet, te, vae, sched = pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler
    for m in (unet, te, vae):
        m.to(device)
    vae.eval().requires_grad_(False)
    unet.train()
    te.train()
    store = probe.ProbeStore(enabled=ground_weight > 0)
    if ground_weight > 0:
        probe.install(unet, store)
    params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    # --ema-also: more averages of the same run, with other warm-ups, to choose K after training.
    also = {k: [p.detach().clone() for p in params] for k in ema_also}
    word_ids, bos, eos, length = token_table(pipe.tokenizer)
    stream = WorldStream(seed, batch, word_ids, bos, eos, length, p_empty=p_empty)
    gen = torch.Generator(device=device).manual_seed(seed)
    alphas = sched.alphas_cumprod.to(device)
    snr_all = alphas / (1 - alphas)
    velocity = sched.config.prediction_type == "v_prediction"
    sf = vae.config.scaling_factor
    use_amp = device == "cuda"
    if device == "cpu":
        # Speed only, same function: channels-last convolutions, and the plain softmax(QK^T)V
        # kernel, which beats the CPU flash kernel at head dimension 8 (1.27 -> 1.12 s/step here).
        unet.to(memory_format=torch.channels_last)
        kernel = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
    else:
        kernel = contextlib.nullcontext
    budget = StepBudget(steps, time_budget, probe_steps, log, "unet")
    t0 = budget.t0
    last_ckpt = t0
    total = steps
    step = 0
    losses, glosses = [], []
    if also and not checkpoint:
        raise ValueError("ema_also needs a checkpoint path: its averages are written beside it")
    if time_budget is not None and not 3 <= probe_steps <= warmup:
        raise ValueError(f"probe_steps must be in [3, {warmup}] (inside the warm-up)")

    def save_ckpt(tag: str) -> None:
        if checkpoint:
            with torch.no_grad():
                backup = [p.detach().clone() for p in params]
                for p, e in zip(params, ema):
                    p.copy_(e)
                save_checkpoint(pipe, checkpoint, {**(record or {}), "unet_steps_done": step, "unet_steps": total, "tag": tag})
                for p, b_ in zip(params, backup):
                    p.copy_(b_)

    for data in batches(stream, workers):
        if total is not None and step >= total:
            break
        total = budget.at(step)
        cur_lr = lr_at(step, total or 10**9, lr, warmup, lr_floor)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        with torch.no_grad():
            x = to_pixels(data["images"], device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                lat = vae.encode(x).latent_dist.mean.float() * sf
        ids = torch.as_tensor(data["ids"], device=device)
        noise = torch.randn(lat.shape, generator=gen, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=gen, device=device)
        noisy = sched.add_noise(lat, noise, t)
        store.clear()
        with kernel(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            ctx = te(ids)[0]
            pred = unet(noisy, t, ctx).sample
        snr = snr_all[t]
        # min-SNR-gamma (Hang et al. 2023): both targets weigh the x0 error by min(snr, gamma).
        if velocity:
            target, weight = sched.get_velocity(lat, noise, t), torch.clamp(snr, max=min_snr) / (snr + 1)
        else:
            target, weight = noise, torch.clamp(snr, max=min_snr) / snr
        mse = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))
        loss = (weight * mse).mean()
        gl = torch.zeros((), device=device)
        if ground_weight > 0:
            masks = torch.as_tensor(data["masks"], device=device).float()
            tokens = torch.as_tensor(data["tokens"], device=device)
            gl = grounding_loss(store.maps, masks, tokens)
            loss = loss + ground_weight * gl
        opt.zero_grad(set_to_none=True)
        with kernel():
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            now_params = [p.detach() for p in params]
            torch._foreach_lerp_(ema, now_params, 1 - ema_decay_at(step, ema_decay, ema_warmup))
            for k, track in also.items():
                torch._foreach_lerp_(track, now_params, 1 - ema_decay_at(step, ema_decay, k))
        losses.append(mse.mean().item() if step % 10 == 0 else None)
        if step % 10 == 0:
            glosses.append(gl.item())
        step += 1
        now = time.time()
        if step % 200 == 0 or step == 1:
            recent = [v for v in losses[-200:] if v is not None]
            log(stage="unet", step=step, of=total, lr=round(cur_lr, 6), mse=round(float(np.mean(recent)), 5),
                ground=round(float(np.mean(glosses[-20:])), 4), elapsed=round(now - t0, 1))
        if checkpoint and now - last_ckpt > checkpoint_every:
            save_ckpt("periodic")
            last_ckpt = now
        if hard_stop is not None and now - t0 > hard_stop:
            log(stage="unet", event="hard stop", step=step, of=total)
            break
    with torch.no_grad():
        for k, track in also.items():
            for p, e in zip(params, track):
                p.copy_(e)
            save_checkpoint(pipe, ema_also_path(checkpoint, k),
                            {**(record or {}), "unet_steps_done": step, "unet_steps": total, "ema_warmup": k})
        for p, e in zip(params, ema):
            p.copy_(e)
    if ground_weight > 0:
        probe.uninstall(unet)
    unet.to(memory_format=torch.contiguous_format)
    unet.eval()
    te.eval()
    info = {"unet_steps": total, "unet_steps_done": step, "unet_seconds": round(time.time() - t0, 1)}
    save_ckpt("final")
    return info

