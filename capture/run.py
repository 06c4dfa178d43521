"""One generation: run the pipeline with the recorder and stream every step into a dataset folder.

``generate(config)`` validates the settings, loads the model, plans the layers, projects the size,
then runs the pipeline. Each step (in ``callback_on_step_end``) moves that step's maps to the CPU once,
decodes the x̂0 preview and hands everything to ``export.writer.RunWriter``; nothing grows with the
number of steps except a few numbers per layer and the (small) latents. At the end the metrics and
the PCA trajectory are computed, metadata is written and the run is validated and renamed into place.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from analysis import metrics as metrics_mod
from analysis import trajectory
from capture import pipeline as pipeline_mod
from capture import families
from capture.config import ConfigError, GenerateConfig
from capture.families import Family, Peek, TokenInfo
from capture.progress import Cancelled, Progress
from capture.recorder import AttentionRecorder, LayerPlan, settle
from export import contract
from export.writer import RunWriter

NOISE_SOURCE = "scheduler_model_output"
PREVIEW = "pred_original_sample"
_RUN_LOCK = threading.Lock()  # one generation per process at a time: the pipelines are shared


class SizeLimitError(RuntimeError):
    """The run would be (or is) over ``--max-dataset-mb`` under ``--enforce-size-limit``."""


class SizeWarning(UserWarning):
    """The run is projected to be over ``--max-dataset-mb``."""


# --------------------------------------------------------------------------- taps on the pipeline


class _SchedulerTap:
    """Wraps ``scheduler.step`` (on the instance) to see x_t, the noise it was given and x̂0."""

    def __init__(self, scheduler, family: Family):
        self.scheduler = scheduler
        self.family = family
        self.first_sample = None     # x_T
        self.noise = None            # the model_output of the last step (guided ε, or v for flow matching)
        self.x0 = None               # x̂0 of the last step, as the family derives it
        self._step = scheduler.step

    def __enter__(self):
        original = self._step

        def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            if self.first_sample is None:
                self.first_sample = sample
            self.noise = model_output
            self.x0 = self.family.x0(self.scheduler, sample, model_output, out)
            return out if return_dict else out.to_tuple()

        self.scheduler.step = step
        return self

    def __exit__(self, *exc):
        self.scheduler.__dict__.pop("step", None)


# --------------------------------------------------------------------------- the per-step work


class _PendingStep:
    """One step's outputs on their way to the CPU (asynchronous on a GPU; see ``_StepWriter``)."""

    def __init__(self, step: int, timestep: int, maps, host: dict[str, torch.Tensor]):
        self.step, self.timestep, self.maps, self.host = step, timestep, maps, host
        self.event = None
        if any(t.is_pinned() for t in host.values()):
            self.event = torch.cuda.Event()
            self.event.record()

    def arrays(self) -> dict[str, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return {k: v.numpy() if v.dtype == torch.uint8 else v.float().numpy() for k, v in self.host.items()}


class _StepWriter:
    """The pipeline's ``callback_on_step_end``: at each step, start copying that step's maps, latents,
    noise and x̂0 preview to the CPU (asynchronously on a GPU), then measure and write the *previous*
    step, whose copies are done by now. The host never waits for the device mid-run; :meth:`flush`
    writes the last step."""

    def __init__(self, pipe, family: Family, recorder: AttentionRecorder, tap: _SchedulerTap, writer: RunWriter, *,
                 num_tokens: int, total: int, emit: Callable[[Progress], None], cancel, size: tuple[int, int]):
        self.pipe, self.family, self.recorder, self.tap, self.writer = pipe, family, recorder, tap, writer
        self.size = size
        self.num_tokens, self.total, self.emit, self.cancel = num_tokens, total, emit, cancel
        self.latents: list[np.ndarray] = []           # x_T, then the latents after each step
        self.noise: list[np.ndarray] = []
        self.timesteps: list[int] = []
        self.entropy: list[list[float]] = []          # [N][L]
        self.token_dists: list[list[np.ndarray]] = []  # [N][L][K]
        self._waiting: _PendingStep | None = None

    def __call__(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("generation cancelled; nothing was written")
        tensors = {"latents": self._grid(kwargs["latents"])[-1], "noise": self._grid(self.tap.noise)[-1],
                   "image": self._preview()}
        if step == 0:
            tensors["first"] = self._grid(self.tap.first_sample)[-1]
        pending = _PendingStep(step, int(timestep), self.recorder.start_copy(),
                               {k: _to_host(v) for k, v in tensors.items()})
        self.flush()
        self._waiting = pending
        return {}

    def flush(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            return
        arrays = waiting.arrays()
        maps = waiting.maps.result()
        if "first" in arrays:
            self.latents.append(arrays["first"])
        self.latents.append(arrays["latents"])
        self.noise.append(arrays["noise"])
        self.timesteps.append(waiting.timestep)
        mean = {i: full.mean(axis=0, dtype=np.float32) if full.ndim == 4 else full
                for i, full in maps.cross.items()}  # the metrics describe the head mean
        # every recorded layer in order; one not computed at this step (a caching hook skipped it) is NaN
        layers = [plan.index for plan in self.recorder.layers if plan.cross_grid is not None]
        missing = np.full(self.recorder.cross_rows(), np.nan)
        self.entropy.append([metrics_mod.attention_entropy(mean[i]) if i in mean else np.nan for i in layers])
        self.token_dists.append([metrics_mod.token_distribution(mean[i]) if i in mean else missing for i in layers])
        self.writer.write_step(
            waiting.step, image=arrays["image"],
            cross={layer: full[..., : self.num_tokens, :, :] for layer, full in maps.cross.items()},
            self_=maps.self_, text=maps.text, concept=maps.concept)
        self.emit(Progress("denoising", waiting.step + 1, self.total, f"t={waiting.timestep}"))

    def _grid(self, latents: torch.Tensor) -> torch.Tensor:
        return self.family.unpack(self.pipe, latents, *self.size)

    def _preview(self) -> torch.Tensor:
        x0 = self.tap.x0
        if x0 is None:
            raise RuntimeError(f"{type(self.pipe.scheduler).__name__}.step gives no pred_original_sample")
        return self.family.decode_preview(self.pipe, self._grid(x0))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy: pinned and asynchronous from a GPU, a plain copy on the CPU."""
    return t.detach().to("cpu", non_blocking=t.is_cuda, copy=True)


# --------------------------------------------------------------------------- generate


@dataclass
class Prepared:
    """What a run is, decided once before any weights load: its family, size, layer plan and tokens.
    ``plans`` is None until the architecture is known (a hub id is only known once loaded)."""

    family: Family
    peek: Peek | None = None
    height: int = 0
    width: int = 0
    plans: list[LayerPlan] | None = None
    tokens: TokenInfo | None = None
    latent_shape: list[int] | None = None
    #: the size of the pipeline's own output when it differs from the generated one (resolution binning)
    output_size: tuple[int, int] | None = None


def generate(config: GenerateConfig, *, progress: Callable[[Progress], None] | None = None,
             cancel: threading.Event | None = None, pipeline=None, prepared: Prepared | None = None) -> Path:
    """Record one run into ``config.output_dir`` and return its path.

    ``prepared`` is :func:`prepare`'s answer for this (validated) config; without it the config is
    validated and prepared here. Raises ConfigError / LayerSelectionError / ShapeMismatchError /
    SizeLimitError / ModelLoadError before anything is written; Cancelled if ``cancel`` is set during
    denoising (nothing is left behind); export's DatasetError if the new run fails validation or the
    real size breaks an enforced limit. Warnings (ShapeWarning, SizeWarning) go through :mod:`warnings`.
    """
    emit = progress or (lambda event: None)
    if prepared is None:
        config.validate()
        prepared = Prepared(families.for_pipeline(pipeline)) if pipeline is not None else prepare(config)
    config.check_paths()
    emit(Progress("loading model", 0, 1, config.model or pipeline_mod.DEFAULT_MODEL_ID))
    pipe = pipeline if pipeline is not None else pipeline_mod.load_pipeline(config.model, config.device, config.dtype)
    emit(Progress("loading model", 1, 1))
    if prepared.plans is None:
        prepared = _plan(config, prepared.family, prepared.family.peek_pipe(pipe))
    with _RUN_LOCK:
        return _generate(config, pipe, prepared, emit, cancel)


def check(config: GenerateConfig, *, size_warning: bool = True) -> tuple[GenerateConfig, Prepared]:
    """Validate ``config`` and :func:`prepare` it: what :func:`generate` checks before it loads any weights,
    so callers (the CLI, the bridge) fail fast. ``size_warning=False`` keeps the plan's warnings silent
    (an enforced limit still raises)."""
    return config.validate().check_words(), prepare(config, warn=size_warning)


def prepare(config: GenerateConfig, *, warn: bool = True) -> Prepared:
    """The checks of a validated config that need the model but not its weights: the device, the family,
    and where the configs can be read locally, the size rule, layer patterns, pooling fit, tokens and
    projected size."""
    pipeline_mod.resolve_device(config.device)
    family, peek = pipeline_mod.peek_model(config.model)
    return Prepared(family) if peek is None else _plan(config, family, peek, warn=warn)


def plan_warnings(config: GenerateConfig, prepared: Prepared) -> None:
    """Warn what :func:`prepare` warns about this plan (uneven pooling, projected size), for a caller that
    prepared silently and wants the warnings where it records them (the bridge's job thread). Cheap: the
    peek is reused, no configs are read."""
    if prepared.peek is not None and prepared.plans is not None:
        _plan(config, prepared.family, prepared.peek, warn=True)


def _plan(config: GenerateConfig, family: Family, peek: Peek, *, warn: bool = True) -> Prepared:
    """Raises ConfigError (size), LayerSelectionError, ShapeMismatchError (uneven pooling under
    --fail-on-shape-error) or SizeLimitError (under --enforce-size-limit); warns otherwise."""
    native_h, native_w = family.native_size(peek)
    requested = (config.height or native_h, config.width or native_w)
    height, width = family.generated_size(peek, *requested)   # resolution binning may change it (a bin fits)
    multiple = family.size_multiple(peek)
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise ConfigError(name, f"must be a multiple of {multiple} for {family.pipeline_class}, got {value}")
    latent_hw = family.latent_grid(peek, height, width)
    plans, problems = family.plan(peek, latent_hw, config)
    if config.fail_on_shape_error or warn:
        settle(problems, config.fail_on_shape_error)
    tokens = family.tokens(peek.tokenizers, config.prompt)
    latent_shape = [family.latent_channels(peek), *latent_hw]
    layers = [plan.to_metadata(len(tokens.tokens)) for plan in plans]
    _check_map_caps(layers)
    projected = contract.projected_bytes(
        config.num_steps, layers, image_size=(height, width),
        latent_shape=latent_shape, save_latents_noise=config.save_latents_noise)
    if projected > config.max_dataset_mb * 1e6:
        message = (f"the run is projected at {projected / 1e6:.1f} MB, over --max-dataset-mb "
                   f"{config.max_dataset_mb:g}; lower --num-steps, --max-layers or the resolutions")
        if config.enforce_size_limit:
            raise SizeLimitError(message)
        if warn:
            warnings.warn(message, SizeWarning, stacklevel=3)
    return Prepared(family, peek, height, width, plans, tokens, latent_shape, requested)


def _check_map_caps(layers: list[dict]) -> None:
    """ConfigError when one map file would pass ``contract.MAX_MAP_BYTES``, which the validator refuses."""
    for key, flag in (("self_shape", "self_attention_resolution"), ("cross_shape", "attention_resolution")):
        for layer in layers:
            shape = layer.get(key)
            if shape and contract.shape_bytes(shape) > contract.MAX_MAP_BYTES:
                raise ConfigError(flag, f"layer {layer['name']} would store {key.split('_')[0]} maps of shape {shape}, "
                                        f"{contract.shape_bytes(shape) / 2**20:.0f} MiB per step, over the "
                                        f"{contract.MAX_MAP_BYTES >> 20} MiB cap of one map file; lower it")


def _generate(config: GenerateConfig, pipe, prepared: Prepared, emit, cancel) -> Path:
    family, height, width = prepared.family, prepared.height, prepared.width
    recorder = family.recorder(pipe, prepared.plans, prepared.tokens, context_length=prepared.peek.context_length,
                               fail_on_shape_error=config.fail_on_shape_error)
    tokens, latent_shape = prepared.tokens.tokens, prepared.latent_shape
    limit = int(config.max_dataset_mb * 1e6)
    kwargs = family.pipeline_kwargs(config, prepared.peek)

    device = next(family.denoiser(pipe).parameters()).device
    writer = RunWriter(config.output_dir, overwrite=config.overwrite_output)
    with writer, torch.no_grad(), _SchedulerTap(pipe.scheduler, family) as tap:
        step_writer = _StepWriter(pipe, family, recorder, tap, writer, num_tokens=len(tokens),
                                  total=config.num_steps, emit=emit, cancel=cancel, size=(height, width))
        emit(Progress("denoising", 0, config.num_steps))
        recorder.install()
        try:
            asked_h, asked_w = prepared.output_size or (height, width)   # the pipeline bins it again itself
            out = pipe(prompt=config.prompt, num_inference_steps=config.num_steps, height=asked_h, width=asked_w,
                       generator=torch.Generator("cpu").manual_seed(config.seed), output_type="np",
                       **family.callback_kwargs(step_writer), **kwargs)
            step_writer.flush()
        finally:
            recorder.remove()
        if len(step_writer.timesteps) != config.num_steps:
            raise RuntimeError(f"the pipeline ran {len(step_writer.timesteps)} steps, not {config.num_steps}")
        # The pipeline's own output, rounded as diffusers' numpy_to_pil rounds.
        writer.write_final_image((np.asarray(out.images[0]) * 255).round().astype(np.uint8))

        emit(Progress("analysis", 0, 1))
        latents = np.stack(step_writer.latents)
        cross_on = bool(recorder.layers) and config.include_cross_attention
        metrics = metrics_mod.metrics_record(
            latents,
            entropy=np.asarray(step_writer.entropy).T if cross_on else None,
            token_dists=np.asarray(step_writer.token_dists).transpose(1, 0, 2) if cross_on else None,
            num_tokens=len(tokens))
        pca = trajectory.latent_pca_record(latents[1:])
        emit(Progress("analysis", 1, 1))

        emit(Progress("writing", 0, 1))
        metadata = _metadata(config, pipe, prepared, recorder, step_writer.timesteps, latent_shape, str(device))
        emit(Progress("writing", 1, 1))
        emit(Progress("validating", 0, 1, "writing the JSON files, checking every file, renaming into place"))
        path = writer.finish(
            metadata, metrics, pca,
            latents=latents if config.save_latents_noise else None,
            noise=np.stack(step_writer.noise) if config.save_latents_noise else None,
            max_bytes=limit if config.enforce_size_limit else None)
        emit(Progress("validating", 1, 1))
    if writer.final_bytes is not None and writer.final_bytes > limit and not config.enforce_size_limit:
        warnings.warn(f"the run is {writer.final_bytes / 1e6:.1f} MB, over --max-dataset-mb "
                      f"{config.max_dataset_mb:g}", SizeWarning, stacklevel=2)
    emit(Progress("done", 1, 1, f"wrote {path} ({(writer.final_bytes or 0) / 1e6:.2f} MB)"))
    return Path(path)


def _metadata(config: GenerateConfig, pipe, prepared: Prepared, recorder: AttentionRecorder, timesteps,
              latent_shape, device) -> dict[str, Any]:
    context = recorder.context_length
    info = prepared.tokens
    tokens = info.tokens
    cross_on = config.include_cross_attention and bool(recorder.layers)
    self_on = config.include_self_attention and bool(recorder.layers)
    # the sum rules come from the kinds registry; a run's layers are of one family, so the first kind's rules hold
    kinds = {plan.kind: contract.LAYER_KINDS[plan.kind] for plan in recorder.layers}
    rules = next(iter(kinds.values()), contract.LAYER_KINDS["unet"]).rules
    extra = {kind: {"enabled": any(plan.grid_shape(1, getattr(plan, kind)) for plan in recorder.layers),
                    "sum_rule": rules[kind]} for kind in (contract.KIND_TEXT, contract.KIND_CONCEPT) if kind in rules}
    family = prepared.family
    run = {
        "prompt": config.prompt, "negative_prompt": config.negative_prompt, "cfg_scale": config.cfg_scale,
        "num_steps": config.num_steps, "seed": config.seed, "height": prepared.height, "width": prepared.width,
        "dtype": str(family.denoiser(pipe).dtype).replace("torch.", ""), "device": device,
        "scheduler": type(pipe.scheduler).__name__, "model": pipeline_mod.model_info(config.model),
        "layer_patterns": list(config.layers), "max_layers": config.max_layers,
    }
    if prepared.output_size and tuple(prepared.output_size) != (prepared.height, prepared.width):
        run["output_size"] = list(prepared.output_size)
    return {
        "run": run,
        "family": {**family.describe(prepared.peek), "tokens_from": info.tokens_from},
        "token_sets": info.token_sets,
        "tokens": tokens,
        "words": info.words,
        "context_length": context,
        "timesteps": list(timesteps),
        "latent_shape": latent_shape,
        "noise_source": NOISE_SOURCE,
        "preview": PREVIEW,
        "attention": {
            "cfg_half": family.cfg_half(pipe),
            "heads": "per_head" if config.per_head else "mean",
            "cross": {"enabled": cross_on, "resolution": config.attention_resolution, "tokens": "prompt",
                      "full_distribution": rules[contract.KIND_CROSS] == contract.CROSS_SUM_RULE
                      and len(tokens) == context,
                      "sum_rule": rules[contract.KIND_CROSS]},
            "self": {"enabled": self_on, "resolution": config.self_attention_resolution,
                     "sum_rule": rules[contract.KIND_SELF]},
            **extra,
            "kinds": {name: kind.to_metadata() for name, kind in kinds.items()},
            "backend": recorder.backend,
            "processors": recorder.processors(),
        },
        "layers": recorder.layer_metadata_for(len(tokens)),
    }
