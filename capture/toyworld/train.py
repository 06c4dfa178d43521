"""Train the toy-world model: ``diffviz train-toyworld``.

Three stages, one script, the same code path on CPU and GPU:

1. **VAE** (``--vae-steps``): the tiny ``AutoencoderKL`` of ``architecture`` learns to
   reconstruct world images (MSE + a small KL), then its decoder is hardened on noisy latents
   (``harden_decoder``). Its latent scale is measured and written into the config
   (``scaling_factor = 1 / std``), as Stable Diffusion does.
2. **UNet + text encoder**, jointly, on the frozen VAE's latents: epsilon prediction
   (``--prediction v_prediction`` for v) with min-SNR-5 weighting, 10 % empty captions
   (``--p-empty``, for classifier-free guidance), EMA weights that average most of the run
   (``ema_decay_at``, ``--ema-warmup``; ``--ema-also`` keeps other averages to compare),
   and — with ``--ground-weight`` > 0 — a *grounding loss* on the cross-attention maps
   (``grounding_loss``): every content word (colour, shape, size, side) of a caption
   should put its attention on its own object's mask, all of it and evenly. The maps it
   trains are the maps the model uses, computed by ``probe.ProbeProcessor`` (equal to
   ``AttnProcessor2_0``).
3. **Decoder adaptation** (``--decoder-adapt-steps``, ``adapt_decoder``): the decoder alone
   learns to map the latents the trained UNet actually samples back to the true images, so the
   UNet's slightly rounded squares decode as squares. ``--adapt-decoder-of FOLDER`` runs only
   this stage on a trained folder, with the same result as the one command.

Scenes are drawn fresh every step from ``world`` (batch k comes from seed (seed, k), so the
data stream does not depend on the number of loader workers), mostly two-object scenes
(``TRAIN_COUNTS``). ``--time-budget`` picks the step count from the measured speed of steps
inside the LR warm-up (whose learning rates do not depend on the total) and logs it;
``--steps N`` repeats that run, on any device, without the timing. The defaults are the
shipped model's recipe, which is sized for this project's 2-core CPU: VAE 450 steps of
batch 64 and 200 steps of decoder hardening, then 1925 UNet steps of batch 128 at lr 1e-3,
one causal text layer, grounding weight 0.1, EMA warm-up 4, then 300 steps of decoder
adaptation on 2560 sampled latents. ``diffviz train-toyworld --device cpu --threads 2`` ran it
in 49 minutes there on a slow day, about 43 at the speed the first two stages ran the time before
(``training.json`` has the measured times and the variants tried). On a GPU the same code runs
under bf16 autocast.

The result is a complete ``StableDiffusionPipeline`` folder (fp16 safetensors) saved with
``save_pretrained``; ``training.json`` beside ``model_index.json`` records how it was made.
A single-file checkpoint (``--checkpoint``) holds all weights plus that record, and
``--from-checkpoint`` turns one into a pipeline folder.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from .training.checkpoint import (ema_also_path, load_checkpoint, load_vae, round_to_fp16,  # noqa: F401 - the CLI's API
                                  save_checkpoint, save_pipeline)
from .training.common import (ROLE_COUNT, TRAIN_COUNTS, Logger, WorldStream, batches, ema_decay_at,  # noqa: F401
                              lr_at, pick_device, to_pixels, token_table, tokenizer_words)
from .training.config import SHIPPED_STEPS, TrainConfig, TrainConfigError
from .training.decoder import adapt_decoder  # noqa: F401
from .training.denoiser_unet import train_unet  # noqa: F401
from .training.grounding import grounding_loss  # noqa: F401
from .training.vae import harden_decoder, measure_vae, train_vae  # noqa: F401

DEFAULT_OUT = "toyworld-model"


# --- CLI --------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffviz train-toyworld", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="pipeline folder to write (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--family", default="unet", choices=["unet", "sd3"],
                   help="unet: the Stable-Diffusion-shaped model; sd3: the MM-DiT (StableDiffusion3Pipeline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mmdit-layers", type=int, default=6, help="sd3: joint transformer blocks")
    p.add_argument("--mmdit-heads", type=int, default=6, help="sd3: attention heads")
    p.add_argument("--mmdit-head-dim", type=int, default=16, help="sd3: width of one head")
    p.add_argument("--clip-layers", type=int, default=2, help="sd3: layers of each CLIP encoder (SD3 reads the penultimate)")
    p.add_argument("--t5-layers", type=int, default=1, help="sd3: layers of the T5 encoder")
    p.add_argument("--shift", type=float, default=1.0, help="sd3: the flow-matching scheduler's shift")
    p.add_argument("--text-layers", type=int, default=1, help="transformer layers in the CLIP text encoder")
    p.add_argument("--prediction", default="epsilon", choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts (the scheduler config records it)")
    p.add_argument("--ground-weight", type=float, default=None,
                   help="weight of the attention grounding loss (0: off; default 0.1)")
    p.add_argument("--vae-steps", type=int, default=450)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-harden-steps", type=int, default=200,
                   help="then fine-tune the decoder alone on noisy latents for this many steps (0: off)")
    p.add_argument("--vae-from", default=None,
                   help="take the trained VAE from this pipeline folder or checkpoint (sd3 default: the UNet model's)")
    p.add_argument("--decoder-adapt-steps", type=int, default=300,
                   help="after the UNet, fine-tune the decoder on the UNet's own latents for this many steps (0: off)")
    p.add_argument("--decoder-adapt-pairs", type=int, default=2560,
                   help="(UNet latent, true image) pairs made for --decoder-adapt-steps")
    p.add_argument("--adapt-decoder-of", default=None, metavar="FOLDER",
                   help="skip training: run only the decoder adaptation on this trained pipeline folder")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoiser steps (default: the family's recipe, unet {SHIPPED_STEPS}, sd3 1800; or chosen by --time-budget)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the UNet stage; sets --steps from measured speed")
    p.add_argument("--probe-steps", type=int, default=150, help="steps timed to turn --time-budget into a step count")
    p.add_argument("--hard-stop", type=float, default=None, help="stop the UNet stage after this many seconds regardless")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="denoiser learning rate (default: unet 1e-3, sd3 5e-4)")
    p.add_argument("--ema", type=float, default=0.999, help="cap of the EMA decay")
    p.add_argument("--ema-warmup", type=float, default=4.0,
                   help="EMA decay is min(--ema, (1+step)/(K+step)); a smaller K averages over more of the run")
    p.add_argument("--ema-also", type=float, nargs="+", default=(), metavar="K",
                   help="also keep the run's averages with these EMA warm-ups, as checkpoints beside --checkpoint")
    p.add_argument("--p-empty", type=float, default=0.1,
                   help="fraction of training captions left empty (the unconditional half of guidance)")
    p.add_argument("--lr-floor", type=float, default=0.1,
                   help="the cosine schedule ends at this fraction of --lr")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--checkpoint", default=None, help="also keep a single-file checkpoint here (rewritten periodically)")
    p.add_argument("--log", default=None, help="append JSON-lines progress here")
    p.add_argument("--from-checkpoint", default=None, help="skip training: turn this checkpoint into the --out folder")
    p.add_argument("--eval-prompts", type=int, default=0, help="after training, run eval-attention on this many prompts")
    p.add_argument("--eval-cfg", type=float, nargs="*", default=None, help="guidance scales for the closing evaluation")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The parsed flags as one ``TrainConfig`` (family defaults filled in, validated)."""
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()}
    values["ema_also"] = tuple(values["ema_also"])
    values["eval_cfg"] = tuple(values["eval_cfg"]) if values["eval_cfg"] is not None else None
    return TrainConfig(**values).resolved().validate()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        device = pick_device(cfg.device)
    except (TrainConfigError, ValueError) as exc:
        print(f"train-toyworld: error: {exc}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    log = Logger(cfg.log)
    if cfg.family == "sd3":
        from .training import family_sd3 as family
    else:
        from .training import family_unet as family
    pipe, record = family.run(cfg, device, log)
    if cfg.eval_prompts:
        from . import evaluate
        for scale in cfg.eval_cfg or [evaluate.DEFAULT_CFG]:
            report = evaluate.evaluate(pipe, n_prompts=cfg.eval_prompts, seed=evaluate.DEFAULT_SEED, cfg=scale,
                                       batched=True, batch_size=128)
            record.setdefault("evaluation", []).append(evaluate.summary(report))
            log(stage="eval", cfg=scale, **evaluate.summary(report))
    out = Path(cfg.out)
    pipe.to("cpu")
    tmp = out.with_name(out.name + ".tmp-train")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pipeline(pipe, tmp, record)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(stage="saved", out=str(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
