"""One sweep worker: a loaded pipeline and the loop body that records one run with it.

The local executor calls :class:`Worker` in its own process; the Ray executor wraps the same class as an
actor, one per worker, so both executors run exactly this code (same thread count, same seeds, same maps).
A run's failure is returned as a one-line result, never raised, so one bad run does not stop a sweep.
"""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from typing import Any, Callable

#: test-only: a marker path; the first worker to reach step 2 of a run creates it and dies at once, leaving
#: that run half-written (the Ray test's crash; nothing else reads this variable)
DIE_ONCE_ENV = "DIFFVIZ_SWEEP_TEST_DIE_ONCE"


def one_line(exc: BaseException) -> str:
    """As ``diffviz generate`` prints it: the message of the errors that name their flag or file, and the
    exception's type before anything else's."""
    from capture import run as run_mod
    from capture.config import ConfigError
    from capture.pipeline import ModelLoadError
    from capture.recorder import LayerSelectionError, ShapeMismatchError
    from export.contract import DatasetError

    text = " ".join(str(exc).split())
    known = (ConfigError, DatasetError, LayerSelectionError, ModelLoadError, ShapeMismatchError, run_mod.SizeLimitError)
    return text if isinstance(exc, known) else f"{type(exc).__name__}: {text}"


def prepare_key(config_dict: dict[str, Any]) -> str:
    """What :func:`capture.run.prepare` depends on: everything but the seed and where the run goes."""
    return json.dumps({k: v for k, v in config_dict.items() if k not in ("seed", "output_dir", "overwrite_output")},
                      sort_keys=True)


class Worker:
    """Holds one pipeline (loaded on first use, then kept) and records runs with it.

    ``threads`` fixes torch's intra-op thread count, so float32 sums are split (and rounded) the same way
    in every worker and in the local executor.
    """

    def __init__(self, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()
        self._prepared: dict[str, Any] = {}
        self._current: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.on_progress: Callable[[str, Any], None] | None = None

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "threads": self.threads}

    def status(self) -> dict[str, Any] | None:
        """The run in progress and its stage (the Ray driver polls this for its progress bar)."""
        with self._lock:
            return None if self._current is None else dict(self._current)

    def _progress(self, name: str):
        die = os.environ.get(DIE_ONCE_ENV)

        def progress(event) -> None:
            with self._lock:
                self._current = {"name": name, "stage": event.stage, "step": event.step, "total": event.total}
            if die and event.stage == "denoising" and event.step >= 1:
                try:
                    fd = os.open(die, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    os._exit(17)
            if self.on_progress is not None:
                self.on_progress(name, event)
        return progress

    def run(self, name: str, config_dict: dict[str, Any]) -> dict[str, Any]:
        """Record one run; returns ``{name, status, error, headline, warnings, seconds, pid}``."""
        from capture import pipeline as pipeline_mod
        from capture import run as run_mod
        from capture.config import GenerateConfig
        from export import sweep as sweep_index

        started = time.perf_counter()
        result: dict[str, Any] = {"name": name, "status": sweep_index.STATUS_FAILED, "error": None, "headline": None,
                                  "warnings": [], "pid": os.getpid()}
        with self._lock:
            self._current = {"name": name, "stage": "starting", "step": 0, "total": 0}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                config = GenerateConfig.from_mapping(config_dict)
                key = prepare_key(config_dict)
                if key not in self._prepared:
                    self._prepared[key] = run_mod.prepare(config)
                pipe = pipeline_mod.load_pipeline(config.model, config.device, config.dtype)
                path = run_mod.generate(config, pipeline=pipe, prepared=self._prepared[key],
                                        progress=self._progress(name))
                result["headline"] = sweep_index.headline(path)
                result["status"] = sweep_index.STATUS_DONE
            except Exception as exc:  # noqa: BLE001 - one line per failed run; the sweep goes on
                result["error"] = one_line(exc)[: sweep_index.MAX_ERROR_CHARS]
            finally:
                with self._lock:
                    self._current = None
        result["warnings"] = sorted({" ".join(str(w.message).split()) for w in caught})
        result["seconds"] = time.perf_counter() - started
        return result
