"""One generation's settings: every ``diffviz generate`` flag, and the one set of rules that checks them.

The CLI (``capture.cli``) and the HTTP bridge both build a :class:`GenerateConfig` and call
:meth:`GenerateConfig.validate`; nothing else re-implements a rule. This module imports no torch,
so the rules can be checked before the heavy imports.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from export import contract

# the dataset contract's caps, so the generator never writes a run its own validator refuses
MAX_PROMPT_CHARS = contract.MAX_PROMPT_CHARS
MAX_STEPS = contract.MAX_STEPS
MAX_RESOLUTION = contract.MAX_GRID_SIDE
MAX_IMAGE_SIDE = contract.MAX_IMAGE_SIDE
MAX_CFG_SCALE = 100.0
DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = ("float32", "float16", "bfloat16")
#: ``org/name`` (or ``name``) as a model hub spells a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


class ConfigError(ValueError):
    """A setting that breaks a rule. ``str()`` is one line naming the flag."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = " ".join(str(message).split())
        super().__init__(f"--{field.replace('_', '-')}: {self.message}")


@dataclass
class GenerateConfig:
    """Every flag of ``diffviz generate``; field ``x_y`` is flag ``--x-y``."""

    prompt: str
    negative_prompt: str = ""
    cfg_scale: float = 7.5
    num_steps: int = 30
    #: glob patterns over layer (transformer block) and processor names; empty = every layer
    layers: tuple[str, ...] = ()
    max_layers: int | None = None
    include_cross_attention: bool = True
    include_self_attention: bool = True
    attention_resolution: int = 32
    self_attention_resolution: int = 16
    save_latents_noise: bool = True
    overwrite_output: bool = False
    max_dataset_mb: float = 200.0
    enforce_size_limit: bool = False
    fail_on_shape_error: bool = False
    device: str = "auto"
    output_dir: str = "datasets/run"
    #: a local folder (loaded offline) or a hub id; None = the embedded default model
    model: str | None = None
    seed: int = 0
    #: None = the model's native size
    height: int | None = None
    width: int | None = None
    #: None = float32 on CPU/MPS, float16 on CUDA
    dtype: str | None = None
    #: cross maps kept per head ([heads, T, h, w]) instead of their mean
    per_head: bool = False
    #: MM-DiT families: also store output-space concept maps (ConceptAttention-style)
    concept_maps: bool = False

    def __post_init__(self):
        # One side given: a square image of that side.
        if (self.height is None) != (self.width is None):
            self.height = self.width = self.height if self.height is not None else self.width

    # ------------------------------------------------------------------ building
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "GenerateConfig":
        """Build from a JSON-style mapping (the bridge). Keys are field names (``-`` may stand for ``_``).

        Unknown keys and values of the wrong type raise :class:`ConfigError` naming the field.
        The result is validated.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("config", f"expected an object of settings, got {type(data).__name__}")
        names = set(cls.field_names())
        kwargs: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = str(raw_key).replace("-", "_")
            if key not in names:
                raise ConfigError(key, f"unknown setting; known: {', '.join(sorted(names))}")
            kwargs[key] = _coerce(key, value)
        if "prompt" not in kwargs:
            raise ConfigError("prompt", "is required")
        config = cls(**kwargs)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"] = list(self.layers)
        return out

    # ------------------------------------------------------------------ rules
    def validate(self) -> "GenerateConfig":
        """Check every rule that needs no model and no disk; raise :class:`ConfigError` on the first break."""
        for name in self.field_names():
            _coerce(name, getattr(self, name))  # types (the CLI's parser already converted)
        if not self.prompt.strip():
            raise ConfigError("prompt", "must not be empty")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise ConfigError(name, f"is longer than {MAX_PROMPT_CHARS} characters")
        if not math.isfinite(self.cfg_scale) or not 0.0 <= self.cfg_scale <= MAX_CFG_SCALE:
            raise ConfigError("cfg_scale", f"must be a number in [0, {MAX_CFG_SCALE:g}], got {self.cfg_scale!r}")
        _int_range("num_steps", self.num_steps, 1, MAX_STEPS)
        _int_range("attention_resolution", self.attention_resolution, 1, MAX_RESOLUTION)
        _int_range("self_attention_resolution", self.self_attention_resolution, 1, MAX_RESOLUTION)
        if self.max_layers is not None:
            _int_range("max_layers", self.max_layers, 1, 10_000)
        for pattern in self.layers:
            if not pattern.strip():
                raise ConfigError("layers", "empty layer pattern")
        if not math.isfinite(self.max_dataset_mb) or self.max_dataset_mb <= 0:
            raise ConfigError("max_dataset_mb", f"must be a positive number, got {self.max_dataset_mb!r}")
        if self.device not in DEVICES:
            raise ConfigError("device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must be in [0, 2**63), got {self.seed}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                _int_range(name, value, 8, MAX_IMAGE_SIDE)  # the multiple is the model's (its family says)
        if not self.output_dir.strip():
            raise ConfigError("output_dir", "must not be empty")
        if self.model is not None and not self.model.strip():
            raise ConfigError("model", "must not be empty")
        if self.per_head and not self.include_cross_attention:
            raise ConfigError("per_head", "keeps each head's cross maps, so it needs cross attention on "
                                          "(drop --no-include-cross-attention)")
        return self

    def check_words(self) -> "GenerateConfig":
        """For the toy model (the default, or a folder that is it), refuse prompt words it does not know:
        it would read them as character pieces. Real models are not restricted."""
        from capture.toyworld import vocabulary

        for name in ("prompt", "negative_prompt"):
            problem = vocabulary.check_prompt(getattr(self, name), self.model)
            if problem:
                raise ConfigError(name, problem)
        return self

    def check_paths(self) -> "GenerateConfig":
        """The rules that look at the disk (read only): the model path, the output folder, and the prompt's
        words when the model is the toy one (:meth:`check_words`)."""
        model_source(self.model)
        self.check_words()
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError("output_dir", f"{out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite_output:
            raise ConfigError("output_dir", f"{out} exists and is not empty; pass --overwrite-output to replace it")
        parent = out.resolve().parent
        if parent.exists() and not parent.is_dir():
            raise ConfigError("output_dir", f"{parent} is not a folder")
        return self


#: Models shipped inside the package, selected by name (``--model toyworld-mmdit``).
NAMED_MODELS: dict[str, Path] = {
    "toyworld-mmdit": Path(__file__).resolve().parent / "toyworld" / "model_mmdit",
}


def model_source(model: str | None) -> tuple[str, str]:
    """``("default" | "folder" | "hub", location)`` for a ``--model`` value; ConfigError if it cannot be either.

    An existing folder is loaded offline. A value that looks like a path (absolute, ``./``, ``~``,
    more than one ``/``, or an existing file) but is no folder is an error; ``org/name`` is a hub id.
    """
    if model is None:
        return "default", ""
    if model in NAMED_MODELS:
        return "folder", str(NAMED_MODELS[model])
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return "folder", str(path)
    if path.exists():
        raise ConfigError("model", f"{model} is a file; give the folder that holds model_index.json")
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return "hub", model
    raise ConfigError("model", f"model folder {model} does not exist")


def _int_range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ConfigError(name, f"must be an integer in [{lo}, {hi}], got {value}")


def _coerce(name: str, value: Any) -> Any:
    """Check (and lightly normalise) one field's type; ConfigError naming the field when it is wrong."""
    kind = _FIELD_KINDS[name]
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        if optional:
            return None
        raise ConfigError(name, "must not be null")
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {type(value).__name__}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(name, f"must be a positive integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number, got {value!r}")
        return float(value)
    if kind == "globs":
        return split_patterns(value, name)
    raise AssertionError(kind)


def split_patterns(value: Any, name: str = "layers") -> tuple[str, ...]:
    """``"a,b"``, ``["a", "b,c"]`` -> ``("a", "b", "c")``."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ConfigError(name, f"must be a list of glob patterns, got {value!r}")
    return tuple(p.strip() for item in items for p in item.split(",") if p.strip())


_FIELD_KINDS = {
    "prompt": "str", "negative_prompt": "str", "cfg_scale": "float", "num_steps": "int",
    "layers": "globs", "max_layers": "int?", "include_cross_attention": "bool",
    "include_self_attention": "bool", "attention_resolution": "int", "self_attention_resolution": "int",
    "save_latents_noise": "bool", "overwrite_output": "bool", "max_dataset_mb": "float",
    "enforce_size_limit": "bool", "fail_on_shape_error": "bool", "device": "str", "output_dir": "str",
    "model": "str?", "seed": "int", "height": "int?", "width": "int?", "dtype": "str?", "per_head": "bool",
    "concept_maps": "bool",
}
assert set(_FIELD_KINDS) == {f.name for f in dataclasses.fields(GenerateConfig)}
