"""Per-step frames held in the browser, so a step change is drawn there at once.

A view keeps, for its current selection (run, layer, token, ...), a copy of the step-dependent data
of each step (the x̂0 image, the heat map) in a ``<name>-frames`` ColumnDataSource, filled a few steps
at a time in idle turns of the server's event loop. A ``CustomJS`` on the step slider (:func:`step_js`)
copies the new step's frame into the shown source *in place* and re-draws it: no server round trip,
and nothing is sent back (in-place edits are not property changes). Python still sends the
authoritative update for the step right after, with the same values, and everything else (markers,
bars, titles, the probe) follows that path. A step whose frame is not there yet simply waits for it.

Frames are dropped and refilled when the selection changes; they are kept only while a selection's
frames fit in ``DIFFVIZ_FRAME_BUDGET_MB`` (default 16 MB per source); ``DIFFVIZ_FRAMES=0`` turns
them off (the benchmark uses it to measure the server path alone).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Hashable, Sequence

import numpy as np
from bokeh.models import ColumnDataSource

#: Frames computed per idle turn of the event loop (small, so user events interleave).
FILL_PER_TURN = 3


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() else default


def frames_enabled() -> bool:
    return os.environ.get("DIFFVIZ_FRAMES", "1").strip() != "0"


class StepFrames:
    """The frames of one shown source: ``columns`` (arrays, one per step), plus ``low``/``high`` (the colour
    range each frame is drawn with) and ``ready`` (1 once a step's frame is filled)."""

    def __init__(self, name: str, columns: Sequence[str], placeholder: np.ndarray):
        self.name = name
        self.columns = tuple(columns)
        self.placeholder = placeholder
        self.source = ColumnDataSource(name=f"{name}-frames", data=self._empty(0))
        self.key: Hashable = None
        self.n = 0
        self.enabled = False
        self.budget = _env_int("DIFFVIZ_FRAME_BUDGET_MB", 16) * 2**20

    def _empty(self, n: int) -> dict[str, Any]:
        data: dict[str, Any] = {c: [self.placeholder] * n for c in self.columns}
        data.update(ready=[0] * n, low=[0.0] * n, high=[1.0] * n)
        return data

    def reset(self, key: Hashable, n_steps: int, frame_bytes: int) -> bool:
        """Start over for a new selection; returns True when this selection keeps frames."""
        if key == self.key and n_steps == self.n:
            return self.enabled
        self.key, self.n = key, n_steps
        self.enabled = frames_enabled() and key is not None and n_steps * frame_bytes <= self.budget
        self.source.data = self._empty(n_steps if self.enabled else 0)
        self._ready: set[int] = set()
        return self.enabled

    def has(self, step: int) -> bool:
        return step in getattr(self, "_ready", ())

    def skip(self, step: int) -> None:
        """Give up on a step's frame (its data failed to load; the server path reports it when shown)."""
        if self.enabled:
            self._ready.add(step)

    def put(self, step: int, arrays: dict[str, np.ndarray], low: float = 0.0, high: float = 1.0) -> None:
        if not self.enabled or not 0 <= step < self.n or self.has(step):
            return
        patch = {c: [(step, arrays[c])] for c in self.columns}
        patch.update(ready=[(step, 1)], low=[(step, float(low))], high=[(step, float(high))])
        self.source.patch(patch)
        self._ready.add(step)

    def missing(self, around: int) -> list[int]:
        """Steps still without a frame, nearest after ``around`` first (the way playback and scrubbing go)."""
        if not self.enabled:
            return []
        order = [(around + k) % self.n for k in range(1, self.n)] + [around]
        return [s for s in order if s not in self._ready]


class FrameFiller:
    """Fills a view's frames a few steps per idle turn; one chain at a time, dropped when the key moves on.

    ``schedule(fn)`` runs ``fn`` on a later turn of the event loop; ``fill(step)`` computes and stores one
    step's frames (and must store or skip it); ``key()`` names the current selection (None: stop)."""

    def __init__(self, schedule: Callable[[Callable[[], None]], None]):
        self.schedule = schedule
        self.running: Hashable = None

    def start(self, todo: Callable[[], list[int]], fill: Callable[[int], None], key: Callable[[], Hashable]) -> None:
        started_for = key()
        if started_for is None or self.running == started_for or not todo():
            return
        self.running = started_for

        def turn() -> None:
            if self.running != started_for:
                return  # a newer chain took over
            if key() != started_for:
                self.running = None
                return
            steps = todo()[:FILL_PER_TURN]
            for step in steps:
                fill(step)
            if steps and todo():
                self.schedule(turn)
            else:
                self.running = None

        self.schedule(turn)


STEP_JS = """
const step = cb_obj.value;
const col = (d, c) => (d instanceof Map ? d.get(c) : d[c]);
const show = (frames, shown, cols, mapper) => {
  const f = frames.data, d = shown.data;
  const ready = col(f, 'ready');
  if (!ready || !ready[step]) return;
  for (const c of cols) {
    const a = col(f, c)[step], b = col(d, c) && col(d, c)[0];
    if (!a || !b || a.length !== b.length || a.length < 2) return;
  }
  for (const c of cols) col(d, c)[0].set(col(f, c)[step]);
  const s = col(d, 'step');
  if (s) s[0] = step;
  if (mapper) { mapper.low = col(f, 'low')[step]; mapper.high = col(f, 'high')[step]; }
  shown.change.emit();
};
"""


def step_js(targets: Sequence[tuple[StepFrames, ColumnDataSource, Any]]) -> tuple[dict[str, Any], str]:
    """``(args, code)`` for a ``CustomJS`` on the step slider's ``value`` drawing each target's frame in place.

    ``targets``: ``(frames, shown source, colour mapper or None)``."""
    args: dict[str, Any] = {}
    code = [STEP_JS]
    for i, (frames, shown, mapper) in enumerate(targets):
        args[f"frames{i}"], args[f"shown{i}"] = frames.source, shown
        if mapper is not None:
            args[f"mapper{i}"] = mapper
        cols = ", ".join(f"'{c}'" for c in frames.columns)
        code.append(f"show(frames{i}, shown{i}, [{cols}], {f'mapper{i}' if mapper is not None else 'null'});")
    return args, "\n".join(code)
