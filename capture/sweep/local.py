"""The local executor: every run in this process, one after another, with the model loaded once."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from capture.sweep.grid import RunSpec
from capture.sweep.runner import Worker


def run_local(specs: Sequence[RunSpec], *, threads: int | None, on_result: Callable[[dict[str, Any]], None],
              bar=None) -> None:
    """Record ``specs`` in order, handing each result to ``on_result`` as it lands.

    A KeyboardInterrupt stops at once: the run in progress is removed by its writer, landed runs stay."""
    import torch

    before = torch.get_num_threads()
    worker = Worker(threads)
    if bar is not None:
        worker.on_progress = bar.stage
    try:
        for spec in specs:
            on_result(worker.run(spec.name, spec.config.to_dict()))
    finally:
        torch.set_num_threads(before)  # a caller in the same process (a test, the bridge) keeps its own
