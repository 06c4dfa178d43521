"""One settings object for ``diffviz train-toyworld``: ``TrainConfig``; field ``x_y`` is flag ``--x-y``.

Fields that the two families (``unet``: the Stable-Diffusion-shaped model, ``sd3``: the MM-DiT) set
differently are ``None`` here and filled from ``FAMILY_DEFAULTS`` by ``resolved()``; ``validate()``
refuses a bad value with one line naming the flag.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("unet", "sd3")
#: UNet steps of the shipped UNet model (chosen by --time-budget 2100 on the 2-core CPU).
SHIPPED_STEPS = 1925

#: Each family's recipe: the shipped model of that family is what the defaults make.
FAMILY_DEFAULTS: dict[str, dict] = {
    "unet": {"steps": SHIPPED_STEPS, "lr": 1e-3, "ground_weight": 0.1, "vae_from": None},
    # The MM-DiT shares the UNet model's trained VAE (its decoder adapted, in the MM-DiT's own copy).
    "sd3": {"steps": 1800, "lr": 5e-4, "ground_weight": 0.1,
            "vae_from": str(Path(__file__).resolve().parents[1] / "model")},
}


class TrainConfigError(ValueError):
    """A setting that breaks a rule; ``str()`` is one line naming the flag."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"--{field.replace('_', '-')} {message}")


@dataclass
class TrainConfig:
    """Every setting of one training run."""

    out: str = "toyworld-model"
    overwrite: bool = False
    family: str = "unet"
    device: str = "auto"
    seed: int = 0
    # --- UNet family architecture
    text_layers: int = 1
    prediction: str = "epsilon"
    # --- MM-DiT family architecture
    mmdit_layers: int = 6
    mmdit_heads: int = 6
    mmdit_head_dim: int = 16
    clip_layers: int = 2
    t5_layers: int = 1
    shift: float = 1.0
    # --- VAE stage
    vae_steps: int = 450
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_harden_steps: int = 200
    vae_from: str | None = None
    # --- denoiser stage (None: the family's default)
    steps: int | None = None
    time_budget: float | None = None
    probe_steps: int = 150
    hard_stop: float | None = None
    batch: int = 128
    lr: float | None = None
    ground_weight: float | None = None
    ema: float = 0.999
    ema_warmup: float = 4.0
    ema_also: tuple[float, ...] = ()
    p_empty: float = 0.1
    lr_floor: float = 0.1
    workers: int = 0
    threads: int | None = None
    # --- decoder adaptation stage
    decoder_adapt_steps: int = 300
    decoder_adapt_pairs: int = 2560
    adapt_decoder_of: str | None = None
    # --- checkpoint, log, closing evaluation
    checkpoint: str | None = None
    log: str | None = None
    from_checkpoint: str | None = None
    eval_prompts: int = 0
    eval_cfg: tuple[float, ...] | None = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def resolved(self) -> "TrainConfig":
        """A copy with the family's defaults in every field left ``None`` that has one (``steps`` stays
        ``None`` under ``--time-budget``)."""
        if self.family not in FAMILIES:
            raise TrainConfigError("family", f"must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        values = {}
        for name, default in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None and not (name == "steps" and self.time_budget is not None):
                values[name] = default
        return dataclasses.replace(self, **values)

    def validate(self) -> "TrainConfig":
        """Raise ``TrainConfigError`` (one line) for the first bad setting; return self."""
        if self.family not in FAMILIES:
            raise TrainConfigError("family", f"must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainConfigError("device", f"must be auto, cpu or cuda, got {self.device!r}")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise TrainConfigError("prediction", f"must be epsilon or v_prediction, got {self.prediction!r}")
        for name, low in (("steps", 0), ("vae_steps", 1), ("batch", 1), ("vae_batch", 1), ("workers", 0),
                          ("vae_harden_steps", 0), ("decoder_adapt_steps", 0), ("decoder_adapt_pairs", 1),
                          ("eval_prompts", 0), ("text_layers", 0), ("mmdit_layers", 1), ("mmdit_heads", 1),
                          ("mmdit_head_dim", 2), ("clip_layers", 2), ("t5_layers", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise TrainConfigError(name, f"must be an integer of at least {low}, got {value!r}")
        for name in ("lr", "vae_lr", "time_budget", "hard_stop", "shift"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise TrainConfigError(name, f"must be a positive number, got {value!r}")
        for name, ok, want in (("ema", 0.0 <= self.ema < 1.0, "in [0, 1)"),
                               ("ema_warmup", self.ema_warmup > 1, "above 1"),
                               ("ground_weight", self.ground_weight is None or self.ground_weight >= 0, "non-negative"),
                               ("ema_also", all(k > 1 for k in self.ema_also), "values above 1"),
                               ("p_empty", 0 <= self.p_empty < 1, "in [0, 1)"),
                               ("lr_floor", 0 <= self.lr_floor <= 1, "in [0, 1]"),
                               ("probe_steps", 3 <= self.probe_steps <= 200, "between 3 and 200 (the LR warm-up)")):
            if not ok:
                raise TrainConfigError(name, f"must be {want}")
        if self.ema_also and not self.checkpoint:
            raise TrainConfigError("ema_also", "needs --checkpoint (its averages are written beside it)")
        if self.steps is not None and self.time_budget is not None:
            raise TrainConfigError("time_budget", "and --steps cannot both be given")
        if self.family == "sd3" and (self.adapt_decoder_of or self.from_checkpoint or self.ema_also):
            raise TrainConfigError("family", "sd3 trains from scratch only (no --adapt-decoder-of, --from-checkpoint, --ema-also)")
        for name in ("vae_from", "from_checkpoint", "adapt_decoder_of"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise TrainConfigError(name, f"{value} does not exist")
        if Path(self.out).exists() and not self.overwrite:
            raise TrainConfigError("out", f"{self.out} exists (use --overwrite to replace it)")
        return self

    def record(self) -> dict:
        """The settings as training.json records them (where the output goes is not part of the recipe)."""
        skip = {"out", "overwrite", "log", "checkpoint", "from_checkpoint", "adapt_decoder_of"}
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
