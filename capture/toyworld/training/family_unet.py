"""The UNet family's run: VAE (trained and hardened, or taken from a folder), UNet + text encoder, decoder adaptation."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, load_vae, round_to_fp16
from .common import Logger
from .config import TrainConfig
from .decoder import adapt_decoder
from .denoiser_unet import train_unet
from .vae import harden_decoder, measure_vae, train_vae


def _adapt(pipe, cfg: TrainConfig, record: dict, device: str, log: Logger) -> None:
    if not cfg.decoder_adapt_steps:
        return
    record["decoder_adapt"] = adapt_decoder(pipe, pairs=cfg.decoder_adapt_pairs, steps=cfg.decoder_adapt_steps,
                                            batch=cfg.vae_batch, lr=cfg.vae_lr / 4, seed=cfg.seed,
                                            device=device, log=log)
    record["vae_adapted"] = measure_vae(pipe.vae, seed=cfg.seed + 2000, device=device)
    log(stage="decoder-adapt", event="done", **record["decoder_adapt"], **record["vae_adapted"])


def run(cfg: TrainConfig, device: str, log: Logger):
    """Train (or convert, or adapt) the UNet pipeline as ``cfg`` says; returns (pipe, record)."""
    from ..architecture import build_pipeline

    if cfg.from_checkpoint:
        return load_checkpoint(cfg.from_checkpoint)
    if cfg.adapt_decoder_of:
        from diffusers import StableDiffusionPipeline
        src = Path(cfg.adapt_decoder_of)
        pipe = StableDiffusionPipeline.from_pretrained(str(src), dtype=torch.float32, local_files_only=True)
        record = json.loads((src / "training.json").read_text()) if (src / "training.json").exists() else {}
        record.update(decoder_adapt_steps=cfg.decoder_adapt_steps, decoder_adapt_pairs=cfg.decoder_adapt_pairs)
        record.pop("evaluation", None)
        _adapt(pipe, cfg, record, device, log)
        return pipe, record
    record = {**cfg.record(), "device": device, "torch": torch.__version__}
    pipe = build_pipeline(text_layers=cfg.text_layers, seed=cfg.seed, prediction_type=cfg.prediction)
    if cfg.vae_from:
        src = load_vae(cfg.vae_from)
        pipe.vae.load_state_dict(src.state_dict())
        pipe.vae.register_to_config(scaling_factor=src.config.scaling_factor)
        record["vae"] = {"from": str(cfg.vae_from), **measure_vae(pipe.vae.to(device).eval(), seed=cfg.seed + 2000, device=device)}
    else:
        train_vae(pipe.vae, steps=cfg.vae_steps, batch=cfg.vae_batch, lr=cfg.vae_lr, seed=cfg.seed,
                  device=device, log=log, workers=cfg.workers)
        if cfg.vae_harden_steps:
            harden_decoder(pipe.vae, steps=cfg.vae_harden_steps, batch=cfg.vae_batch, lr=cfg.vae_lr / 4,
                           seed=cfg.seed, device=device, log=log)
        info = measure_vae(pipe.vae, seed=cfg.seed + 2000, device=device)   # once, after both VAE stages
        pipe.vae.register_to_config(scaling_factor=round(1.0 / info["latent_std"], 4))
        record["vae"] = info
    log(stage="vae", **record["vae"], scaling_factor=pipe.vae.config.scaling_factor)
    if cfg.steps != 0:
        info = train_unet(pipe, steps=cfg.steps, time_budget=cfg.time_budget, batch=cfg.batch, lr=cfg.lr,
                          seed=cfg.seed, device=device, log=log, ground_weight=cfg.ground_weight,
                          ema_decay=cfg.ema, ema_warmup=cfg.ema_warmup, ema_also=tuple(cfg.ema_also),
                          p_empty=cfg.p_empty, lr_floor=cfg.lr_floor, workers=cfg.workers,
                          checkpoint=cfg.checkpoint, record=record, hard_stop=cfg.hard_stop,
                          probe_steps=cfg.probe_steps)
        record.update(info)
        log(stage="unet", event="done", **info)
        # What is shipped is fp16: the decoder adapts to the UNet as saved, so adapting a saved
        # folder (--adapt-decoder-of) gives the same weights as this one command.
        round_to_fp16(pipe.unet, pipe.text_encoder, pipe.vae)
        _adapt(pipe, cfg, record, device, log)
    else:
        record.update({"unet_steps": 0, "unet_steps_done": 0})
    return pipe, record
