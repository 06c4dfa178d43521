"""Loading a pipeline: the embedded default, a local folder (offline) or a hub id.

The model's family (``capture.families``) names the pipeline class; every source then takes the same
path, that class's ``from_pretrained``. Pipelines are cached per (model, device, dtype), so the bridge
and the tests load each one once.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import transformers

transformers.utils.logging.set_verbosity_error()  # before diffusers: silences its optional-backend notices
transformers.utils.logging.disable_progress_bar()

from diffusers.utils import logging as diffusers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()  # its loader's advice (accelerate, low_cpu_mem_usage) is not the user's problem

from capture import families  # noqa: E402
from capture.config import NAMED_MODELS, ConfigError, model_source  # noqa: E402
from capture.families import DEFAULT_MODEL_DIR, Family, ModelLoadError, Peek, one_line  # noqa: E402,F401

DEFAULT_MODEL_ID = "toyworld"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_cache: dict[tuple[str, str, str], Any] = {}
_lock = threading.Lock()


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
    if model in NAMED_MODELS:   # a shipped model chosen by name is recorded by that name
        return {"source": source, "id": model}
    return {"source": source, "id": location if source == "hub" else Path(location).name or location}


def load_pipeline(model: str | None = None, device: str = "auto", dtype: str | None = None):
    """Load (or reuse) a pipeline on ``device`` in ``dtype``, with a DDIM scheduler and no progress bar.

    ``model`` is None (the embedded default), a local folder (loaded with ``local_files_only``) or a
    hub id. Raises ConfigError for a bad device/model path and ModelLoadError if loading fails or no
    family records the model's pipeline class.
    """
    source, location = model_source(model)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    folder = DEFAULT_MODEL_DIR if source == "default" else Path(location).resolve() if source == "folder" else None
    key = (str(folder) if folder else location, device, dtype)
    with _lock:
        if key in _cache:
            return _cache[key]
        family = families.for_model(model)
        diffusers_logging.disable_progress_bar()
        try:
            pipe = family.load(str(folder) if folder else location, local=folder is not None, dtype=_DTYPES[dtype])
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one line
            raise ModelLoadError(f"could not load model {model or DEFAULT_MODEL_ID!r}: {one_line(exc)}") from exc
        family.use_scheduler(pipe)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        _cache[key] = pipe
        return pipe


def peek_model(model: str | None) -> tuple[Family, Peek | None]:
    """The model's family, and its architecture read from configs alone (the denoiser on the meta device,
    no weights) so that a run can check its plan and project its size before loading anything.
    The peek is None for a hub id."""
    family = families.for_model(model)
    source, location = model_source(model)
    if source == "hub":
        return family, None
    return family, family.peek(DEFAULT_MODEL_DIR if source == "default" else Path(location))


def native_size(pipe) -> tuple[int, int]:
    """The loaded pipeline's native image size (height, width) in pixels."""
    family = families.for_pipeline(pipe)
    return family.native_size(family.peek_pipe(pipe))
