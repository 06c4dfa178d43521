"""The sweep's progress bar: one tqdm bar over the runs, its postfix the stage of the runs in progress."""
from __future__ import annotations

import sys
from typing import Any


class SweepBar:
    def __init__(self, total: int, initial: int = 0, *, disable: bool = False, file=None):
        from tqdm.auto import tqdm

        self.file = file or sys.stderr
        self.disable = disable
        self.failed = 0
        self._stages: dict[str, str] = {}
        self._bar = tqdm(total=total, initial=initial, desc="runs", unit="run", file=self.file, disable=disable,
                         dynamic_ncols=True, leave=True)

    def stage(self, name: str, event: Any) -> None:
        """``event``: a capture.progress.Progress, or a dict with stage, step and total (from a Ray worker)."""
        get = event.get if isinstance(event, dict) else lambda k: getattr(event, k)
        stage, step, total = get("stage"), get("step"), get("total")
        self._stages[name] = f"{stage} {step}/{total}" if stage == "denoising" else str(stage)
        self._show()

    def clear(self, names) -> None:
        for name in list(self._stages):
            if name not in names:
                del self._stages[name]
        self._show()

    def finished(self, name: str, ok: bool) -> None:
        self._stages.pop(name, None)
        self.failed += not ok
        self._bar.update(1)
        self._show()

    def write(self, line: str) -> None:
        if self.disable:
            print(line, file=self.file)
        else:
            self._bar.write(line, file=self.file)

    def _show(self) -> None:
        parts = [f"{name.split('-', 1)[0]} {text}" for name, text in self._stages.items()]
        if self.failed:
            parts.append(f"{self.failed} failed")
        self._bar.set_postfix_str("; ".join(parts)[:100], refresh=True)

    def close(self) -> None:
        self._bar.close()
