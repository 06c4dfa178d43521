"""Checkpoint stage: fp16 rounding, the saved pipeline folder, and the single-file checkpoint."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def round_to_fp16(*modules) -> None:
    """Round every parameter to the nearest float16 value, in place (the dtype stays float32)."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.copy_(p.half().float())


def ema_also_path(checkpoint: str, k: float) -> str:
    """Where ``--ema-also K`` writes the run's average with warm-up K: beside ``--checkpoint``."""
    path = Path(checkpoint)
    return str(path.with_name(f"{path.name.removesuffix('.safetensors')}.ema{k:g}.safetensors"))


def save_checkpoint(pipe, path: str, record: dict) -> None:
    """All weights (fp16) of one pipeline in one safetensors file, with the training record."""
    from safetensors.torch import save_file
    tensors = {}
    for comp in ("unet", "text_encoder", "vae"):
        for k, v in getattr(pipe, comp).state_dict().items():
            tensors[f"{comp}.{k}"] = v.detach().to("cpu", torch.float16).contiguous()
    meta = {"record": json.dumps(record), "scaling_factor": str(pipe.vae.config.scaling_factor)}
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path: str):
    """A pipeline (float32) rebuilt from a single-file checkpoint, and its training record."""
    from safetensors import safe_open
    from ..architecture import build_pipeline
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        record = json.loads(meta["record"])
        pipe = build_pipeline(text_layers=int(record["text_layers"]), prediction_type=record.get("prediction", "epsilon"))
        for comp in ("unet", "text_encoder", "vae"):
            module = getattr(pipe, comp)
            state = {k[len(comp) + 1:]: f.get_tensor(k).float() for k in f.keys() if k.startswith(comp + ".")}
            module.load_state_dict(state)
    pipe.vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    return pipe, record


def save_pipeline(pipe, out: Path, record: dict) -> None:
    """``save_pretrained`` in fp16 safetensors, plus ``training.json``."""
    pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    pipe.to(torch.float32)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")



def load_vae(source: str):
    """The VAE of a saved pipeline folder, or of a single-file checkpoint."""
    from diffusers import AutoencoderKL
    src = Path(source)
    if src.is_dir():
        return AutoencoderKL.from_pretrained(str(src / "vae") if (src / "vae").is_dir() else str(src)).float()
    pipe, _ = load_checkpoint(str(src))
    return pipe.vae


if __name__ == "__main__":
    raise SystemExit(main())


def save_tensors(path: str, named: dict, meta: dict | None = None) -> None:
    """``named`` tensors (float32) in one safetensors file, written atomically: a mid-run snapshot."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp"
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in named.items()}, tmp,
              metadata={k: str(v) for k, v in (meta or {}).items()})
    os.replace(tmp, path)
