"""Progress events of one generation, and the exception that a cancel raises.

``run.generate`` reports through one callback taking a :class:`Progress`; the CLI renders the
events with tqdm (:class:`TqdmProgress`), the bridge forwards them as JSON.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Callable

STAGES = ("loading model", "denoising", "analysis", "writing", "validating", "done")


class Cancelled(Exception):
    """The generation was cancelled; nothing was left on disk."""


@dataclass(frozen=True)
class Progress:
    stage: str
    step: int
    total: int
    message: str = ""

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown progress stage {self.stage!r}")

    def to_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[Progress], None]


class TqdmProgress:
    """Renders progress events as one tqdm bar per stage on stderr (the CLI's callback)."""

    def __init__(self, file=None, disable: bool = False):
        self.file = file or sys.stderr
        self.disable = disable
        self._bar = None
        self._stage = None

    def __call__(self, event: Progress) -> None:
        from tqdm.auto import tqdm

        if event.stage != self._stage:
            self.close()
            self._stage = event.stage
            if event.stage == "done":
                if not self.disable and event.message:
                    print(event.message, file=self.file)
                return
            self._bar = tqdm(total=event.total or None, desc=event.stage, unit="step" if event.stage == "denoising" else "it",
                             file=self.file, disable=self.disable, leave=True, dynamic_ncols=True)
        if self._bar is not None:
            if event.message:
                self._bar.set_postfix_str(event.message, refresh=False)
            self._bar.update(max(0, event.step - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
