"""A sweep's grid: parsing ``--set`` / ``--seeds`` / list flags, expanding the product, naming the runs.

No torch here: every run's settings are built and checked before any model loads.

    grid = Grid.build("a {colour} circle", [("colour", ["red", "green"])], seeds=[0, 1],
                      cfg_scales=[7.5], num_steps=[2], base=config)
    for spec in grid.expand("sweeps/colours"):
        spec.name, spec.params, spec.config      # "r0000-colour-red-seed-0-...", {...}, GenerateConfig
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from capture.config import GenerateConfig
from export import sweep as sweep_index

#: the swept GenerateConfig fields, after the --set axes, in this order
CONFIG_AXES = ("seed", "cfg_scale", "num_steps")
#: settings that are the sweep's, not shared run settings (they differ per run or are actions)
NOT_BASE = frozenset({"prompt", "output_dir", "overwrite_output", *CONFIG_AXES})
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


class GridError(ValueError):
    """A bad sweep flag; ``str()`` is one line naming it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ============================================================================ parsing
def _items(flag: str, text: str) -> list[str]:
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise GridError(f"{flag}: empty item in {text!r}; give comma-separated values")
    return parts


def _no_repeats(flag: str, values: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            raise GridError(f"{flag}: {v!r} appears twice")
        seen.add(v)
    if len(values) > sweep_index.MAX_AXIS_VALUES:
        raise GridError(f"{flag}: {len(values)} values, over the cap of {sweep_index.MAX_AXIS_VALUES}")
    return values


def parse_seeds(text: str) -> list[int]:
    """``"0-3"``, ``"1,5,9"``, ``"0-3,8"`` -> the seeds in the order given (ranges inclusive)."""
    out: list[int] = []
    for part in _items("--seeds", text):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise GridError(f"--seeds: {part!r} is not a seed or a range like 0-3")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise GridError(f"--seeds: range {part!r} runs backwards")
        if hi - lo + 1 + len(out) > sweep_index.MAX_AXIS_VALUES:
            raise GridError(f"--seeds: more than {sweep_index.MAX_AXIS_VALUES} seeds")
        out.extend(range(lo, hi + 1))
    return _no_repeats("--seeds", out)


def parse_floats(flag: str, text: str) -> list[float]:
    """``"3,7.5"`` -> [3.0, 7.5] (finite numbers only)."""
    out = []
    for part in _items(flag, text):
        try:
            value = float(part)
        except ValueError:
            raise GridError(f"{flag}: {part!r} is not a number") from None
        if not math.isfinite(value):
            raise GridError(f"{flag}: {part!r} is not a finite number")
        out.append(value)
    return _no_repeats(flag, out)


def parse_ints(flag: str, text: str) -> list[int]:
    """``"10,30"`` -> [10, 30]."""
    out = []
    for part in _items(flag, text):
        if not re.fullmatch(r"\d+", part):
            raise GridError(f"{flag}: {part!r} is not a whole number")
        out.append(int(part))
    return _no_repeats(flag, out)


def parse_set(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["colour=red,green", "shape=circle"]`` -> [("colour", ["red", "green"]), ("shape", ["circle"])]."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        name, eq, values = str(item).partition("=")
        name = name.strip()
        if not eq:
            raise GridError(f"--set: {item!r} is not NAME=v1,v2,...")
        if not sweep_index.AXIS_NAME.match(name):
            raise GridError(f"--set: {name!r} is not a placeholder name ([A-Za-z_][A-Za-z0-9_]*)")
        if name in CONFIG_AXES:
            raise GridError(f"--set: {name!r} is a setting of its own; use --{name.replace('_', '-')}"
                            + ("s" if name == "seed" else ""))
        if any(name == n for n, _ in axes):
            raise GridError(f"--set: {name!r} is given twice; list its values once, comma-separated")
        parsed = _no_repeats(f"--set {name}", _items(f"--set {name}", values))
        for v in parsed:
            if len(v) > sweep_index.MAX_VALUE_CHARS or "{" in v or "}" in v:
                raise GridError(f"--set {name}: {v[:40]!r} is longer than {sweep_index.MAX_VALUE_CHARS} "
                                "characters or holds a brace")
        axes.append((name, parsed))
    return axes


def placeholders(template: str) -> list[str]:
    """The ``{NAME}`` fields of a prompt, in order of first use (``{{`` and ``}}`` are literal braces)."""
    names: list[str] = []
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise GridError(f"--prompt: {exc} in {template[:60]!r}") from None
    for _literal, field, spec, conversion in fields:
        if field is None:
            continue
        if not sweep_index.AXIS_NAME.match(field) or spec or conversion:
            raise GridError(f"--prompt: {{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                            "is not a placeholder; write {NAME}, or {{ and }} for literal braces")
        if field not in names:
            names.append(field)
    return names


# ============================================================================ names
def _value_text(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def run_name(index: int, width: int, params: dict[str, Any]) -> str:
    """``r0003-colour-red-seed-1-cfg_scale-7.5-num_steps-30``: the index keeps names unique when the
    values are cut or their unsafe characters replaced, so the rest is only for people."""
    head = f"r{index:0{width}d}"
    body = "-".join(f"{k}-{_SAFE.sub('_', _value_text(v))}" for k, v in params.items())
    return f"{head}-{body}"[: sweep_index.MAX_RUN_NAME_CHARS].rstrip("-.")


# ============================================================================ the grid
@dataclass(frozen=True)
class RunSpec:
    index: int
    name: str
    params: dict[str, Any]
    prompt: str
    config: GenerateConfig


@dataclass(frozen=True)
class Grid:
    template: str
    #: (axis name, values) in expansion order: the --set axes, then seed, cfg_scale, num_steps
    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    #: the settings every run shares, as a GenerateConfig whose swept fields are placeholders
    base: GenerateConfig

    @classmethod
    def build(cls, template: str, sets: list[tuple[str, list[str]]], *, seeds: list[int], cfg_scales: list[float],
              num_steps: list[int], base: GenerateConfig) -> "Grid":
        wanted = placeholders(template)
        given = [name for name, _ in sets]
        unfilled = [n for n in wanted if n not in given]
        if unfilled:
            raise GridError(f"--prompt: placeholder {{{unfilled[0]}}} has no values; add --set {unfilled[0]}=v1,v2")
        unknown = [n for n in given if n not in wanted]
        if unknown:
            raise GridError(f"--set {unknown[0]}: the prompt has no {{{unknown[0]}}} placeholder")
        axes = [(n, tuple(v)) for n, v in sets] + [("seed", tuple(seeds)), ("cfg_scale", tuple(cfg_scales)),
                                                   ("num_steps", tuple(num_steps))]
        size = math.prod(len(v) for _, v in axes)
        if size > sweep_index.MAX_RUNS:
            raise GridError(f"the grid has {size} runs, over the cap of {sweep_index.MAX_RUNS}")
        return cls(template, tuple(axes), base)

    def __len__(self) -> int:
        return math.prod(len(v) for _, v in self.axes)

    def expand(self, out: str | Path) -> list[RunSpec]:
        """Every run, in grid order (``itertools.product``, last axis fastest), with its config built."""
        names = [n for n, _ in self.axes]
        width = max(4, len(str(len(self) - 1)))
        fills = [n for n in names if n not in CONFIG_AXES]
        specs = []
        for index, combo in enumerate(itertools.product(*(v for _, v in self.axes))):
            params = dict(zip(names, combo))
            prompt = self.template.format(**{n: params[n] for n in fills})
            name = run_name(index, width, params)
            config = dataclasses.replace(self.base, prompt=prompt, seed=params["seed"], cfg_scale=params["cfg_scale"],
                                         num_steps=params["num_steps"], output_dir=str(Path(out) / name))
            specs.append(RunSpec(index, name, params, prompt, config))
        return specs

    def index_grid(self) -> list[dict[str, Any]]:
        return [{"name": n, "values": list(v)} for n, v in self.axes]

    def index_base(self) -> dict[str, Any]:
        return {k: v for k, v in self.base.to_dict().items() if k not in NOT_BASE}
