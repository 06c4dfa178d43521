"""Loading a Stable Diffusion pipeline: the embedded default, a local folder (offline) or a hub id.

Every source takes the same path, ``StableDiffusionPipeline.from_pretrained``. Pipelines are cached
per (model, device, dtype), so the bridge and the tests load each one once.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
import transformers

transformers.utils.logging.set_verbosity_error()  # before diffusers: silences its optional-backend notices
transformers.utils.logging.disable_progress_bar()

from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from capture.config import ConfigError, model_source  # noqa: E402

#: The embedded default model (the toy world), shipped inside the package.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "toyworld" / "model"
DEFAULT_MODEL_ID = "toyworld"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_cache: dict[tuple[str, str, str], StableDiffusionPipeline] = {}
_lock = threading.Lock()


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is one line."""


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> cuda, else mps, else cpu. Asking for a device that is not there raises ConfigError."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but this torch sees no CUDA device (use --device cpu or auto)")
    if device == "mps" and not has_mps:
        raise ConfigError("device", "mps was asked for but is not available here (use --device cpu or auto)")
    if device not in ("cuda", "cpu", "mps"):
        raise ConfigError("device", f"must be auto, cuda, cpu or mps, got {device!r}")
    return device


def resolve_dtype(dtype: str | None, device: str) -> str:
    """The dtype name to load in: float32 on CPU/MPS (float16 is ~4x slower on CPU), float16 on CUDA."""
    if dtype is None:
        return "float16" if device == "cuda" else "float32"
    if dtype not in _DTYPES:
        raise ConfigError("dtype", f"must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return dtype


def model_info(model: str | None) -> dict:
    """``{"source": "default"|"folder"|"hub", "id": ...}`` as metadata.json states it."""
    source, location = model_source(model)
    if source == "default":
        return {"source": "default", "id": DEFAULT_MODEL_ID}
    return {"source": source, "id": location if source == "hub" else Path(location).name or location}


def load_pipeline(model: str | None = None, device: str = "auto", dtype: str | None = None) -> StableDiffusionPipeline:
    """Load (or reuse) a pipeline on ``device`` in ``dtype``, with a DDIM scheduler and no progress bar.

    ``model`` is None (the embedded default), a local folder (loaded with ``local_files_only``) or a
    hub id. Raises ConfigError for a bad device/model path and ModelLoadError if loading fails.
    """
    source, location = model_source(model)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    folder = DEFAULT_MODEL_DIR if source == "default" else Path(location).resolve() if source == "folder" else None
    key = (str(folder) if folder else location, device, dtype)
    with _lock:
        if key in _cache:
            return _cache[key]
        diffusers_logging.disable_progress_bar()
        try:
            if folder is not None:
                if not (folder / "model_index.json").is_file():
                    raise ModelLoadError(f"{folder} has no model_index.json; it is not a diffusers pipeline folder")
                pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, dtype=_DTYPES[dtype])
            else:
                pipe = StableDiffusionPipeline.from_pretrained(location, dtype=_DTYPES[dtype])
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"could not load model {model or DEFAULT_MODEL_ID!r}: {first}") from exc
        if not isinstance(pipe.scheduler, DDIMScheduler):
            # DDIM's step output carries pred_original_sample, which the x̂0 previews show.
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        _cache[key] = pipe
        return pipe


def native_size(pipe: StableDiffusionPipeline) -> tuple[int, int]:
    """The model's native image size (height, width) in pixels."""
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return side, side


def peek_model(model: str | None):
    """``(unet, vae_scale_factor, tokenizer)`` of a local model without loading weights: the UNet is built
    from its config on the meta device (no memory). Lets the run check layer patterns and project its
    size before loading anything. ``None`` for a hub id."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    source, location = model_source(model)
    if source == "hub":
        return None
    folder = DEFAULT_MODEL_DIR if source == "default" else Path(location)
    missing = [name for name in ("model_index.json", "unet/config.json", "vae/config.json", "tokenizer")
               if not (folder / name).exists()]
    if missing:  # checked here, so that no loader ever falls back to asking a hub
        raise ModelLoadError(f"{folder} is not a Stable Diffusion pipeline folder (no {', '.join(missing)})")
    try:
        unet_config = UNet2DConditionModel.load_config(str(folder / "unet"), local_files_only=True)
        vae_config = AutoencoderKL.load_config(str(folder / "vae"), local_files_only=True)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{folder} is not a Stable Diffusion pipeline folder: {first}") from exc
    return unet, 2 ** (len(vae_config.get("block_out_channels", [0])) - 1), tokenizer
