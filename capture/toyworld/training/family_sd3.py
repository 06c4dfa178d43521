"""The MM-DiT family's run: shared VAE (shift and scale measured), SD3 denoiser, decoder adaptation."""
from __future__ import annotations

import time

import torch

from .checkpoint import load_vae, round_to_fp16, save_tensors
from .common import Logger
from .config import TrainConfig
from .decoder import adapt_decoder
from .denoiser_mmdit import train_mmdit
from .vae import measure_vae


def build(cfg: TrainConfig, vae):
    from ..mmdit import build_mmdit_pipeline
    return build_mmdit_pipeline(vae, layers=cfg.mmdit_layers, heads=cfg.mmdit_heads, head_dim=cfg.mmdit_head_dim,
                                clip_layers=cfg.clip_layers, t5_layers=cfg.t5_layers, shift=cfg.shift, seed=cfg.seed)


def run(cfg: TrainConfig, device: str, log: Logger):
    """Train the MM-DiT pipeline as ``cfg`` says; returns (pipe, record). ``cfg`` is resolved and validated."""
    record = {**cfg.record(), "device": device, "torch": torch.__version__, "seconds": {}}
    t0 = time.time()
    vae = load_vae(cfg.vae_from).to(device).eval()
    # SD3 latents are (z - shift_factor) * scaling_factor: centre and scale the shared VAE's latents.
    info = measure_vae(vae, seed=cfg.seed + 2000, device=device)
    vae.register_to_config(shift_factor=round(info["latent_mean"], 4), scaling_factor=round(1.0 / info["latent_std"], 4))
    record["vae"] = {"from": str(cfg.vae_from), **info, "shift_factor": vae.config.shift_factor,
                     "scaling_factor": vae.config.scaling_factor}
    record["seconds"]["vae"] = round(time.time() - t0, 1)
    log(stage="vae", **record["vae"])
    pipe = build(cfg, vae)
    record["parameters"] = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                            for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")}
    log(stage="mmdit", event="built", **record["parameters"])
    names = [f"{m}.{n}" for m in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
             for n, p in getattr(pipe, m).named_parameters() if p.requires_grad]

    def snapshot(step, params, ema):
        if cfg.checkpoint:
            save_tensors(cfg.checkpoint, dict(zip(names, ema)), {"step": step})

    if cfg.steps != 0:
        info = train_mmdit(pipe, steps=cfg.steps, time_budget=cfg.time_budget, batch=cfg.batch, lr=cfg.lr,
                           seed=cfg.seed, device=device, log=log, ground_weight=cfg.ground_weight, ema_decay=cfg.ema,
                           ema_warmup=cfg.ema_warmup, p_empty=cfg.p_empty, lr_floor=cfg.lr_floor, workers=cfg.workers,
                           hard_stop=cfg.hard_stop, probe_steps=cfg.probe_steps, checkpoint=snapshot)
        record.update(info)
        record["seconds"]["denoiser"] = info["denoiser_seconds"]
        log(stage="mmdit", event="done", **info)
    # What is shipped is fp16: the decoder adapts to the denoiser as saved.
    round_to_fp16(pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae)
    if cfg.decoder_adapt_steps:
        record["decoder_adapt"] = adapt_decoder(pipe, pairs=cfg.decoder_adapt_pairs, steps=cfg.decoder_adapt_steps,
                                                batch=cfg.vae_batch, lr=cfg.vae_lr / 4, seed=cfg.seed, device=device,
                                                log=log, family="sd3")
        record["seconds"]["decoder_adapt"] = record["decoder_adapt"]["seconds"]
        record["vae_adapted"] = measure_vae(pipe.vae, seed=cfg.seed + 2000, device=device)
        log(stage="decoder-adapt", event="done", **record["decoder_adapt"], **record["vae_adapted"])
    return pipe, record
