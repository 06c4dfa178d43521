"""The bridge's jobs: one generation request each (:class:`Job`), run one at a time by :class:`JobQueue`.

A job does not belong to any HTTP connection. It carries the ``capture.run.Prepared`` that the request's
checks made, so the generation does not prepare the model a second time. ``Job.snapshot`` (what
GET /jobs/{id} returns) never raises: a job that cannot be described in full is still listed.
"""
from __future__ import annotations

import collections
import datetime as _dt
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from capture.bridge.policy import JOB_HISTORY, MAX_QUEUED, PROG, RequestError, one_line
from export.protocol import CANCELLED, DONE, FAILED, FINAL_STATES, QUEUED, RUNNING

#: Stages up to which a cancel still leaves nothing behind (the run is renamed into place after these).
_CANCELLABLE_UNTIL = ("validating", 0)
#: Share of the progress bar given to each stage: (start, end).
STAGE_SPAN = {"loading model": (0.0, 0.05), "denoising": (0.05, 0.95), "analysis": (0.95, 0.97),
              "writing": (0.97, 0.98), "validating": (0.98, 1.0), "done": (1.0, 1.0)}


def _iso(t: float | None) -> str | None:
    """UTC time with milliseconds (``2026-11-28T19:00:00.123Z``), so that job order is visible."""
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Job:
    """One generation request and what it has reported so far. ``snapshot()`` is what GET /jobs/{id} returns."""

    id: str
    name: str
    config: Any                    # capture.config.GenerateConfig
    prepared: Any = None           # capture.run.Prepared from the request's checks (dropped once the job ends)
    cost: Any = None               # capture.bridge.policy.Cost, None when unknown before loading
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    stage: str = "queued"
    step: int = 0
    total: int = 0
    message: str = ""
    error: str | None = None
    error_type: str | None = None
    warnings: list[str] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_too_late: bool = False
    _denoise_t0: float | None = None
    _denoise_step0: int = 0
    _eta: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- fed by generate()'s progress events (on the worker thread) ---------------------------------
    def on_progress(self, event: Any) -> None:
        """Record one ``capture.progress.Progress``; raise ``Cancelled`` if a cancel arrived while the
        run can still be dropped (anywhere before the final rename)."""
        from capture.progress import STAGES, Cancelled

        now = time.monotonic()
        with self._lock:
            if event.stage == "denoising":
                if self._denoise_t0 is None or event.step == 0:
                    self._denoise_t0, self._denoise_step0 = now, event.step
                done = event.step - self._denoise_step0
                self._eta = ((now - self._denoise_t0) / done * (event.total - event.step)) if done > 0 else None
            elif event.stage == "done":
                self._eta = 0.0
            elif event.stage != "loading model":
                self._eta = None
            self.stage, self.step, self.total = event.stage, int(event.step), int(event.total)
            self.message = event.message or (self.message if event.stage == "denoising" else "")
            stage, step = _CANCELLABLE_UNTIL
            before_rename = (STAGES.index(event.stage), event.step) <= (STAGES.index(stage), step)
            if self.cancel.is_set():
                if before_rename:
                    raise Cancelled("generation cancelled")
                self.cancel_too_late = True

    def fraction(self) -> float:
        if self.state == DONE:
            return 1.0
        lo, hi = STAGE_SPAN.get(self.stage, (0.0, 0.0))
        part = (self.step / self.total) if self.total else 0.0
        return round(lo + (hi - lo) * min(max(part, 0.0), 1.0), 4)

    def snapshot(self, position: int | None = None) -> dict[str, Any]:
        """The job as JSON data. Never raises: if a part cannot be described, the rest still is."""
        try:
            return self._snapshot(position)
        except Exception as exc:  # noqa: BLE001 - GET /jobs must list every job whatever one holds
            return {"id": str(self.id), "state": str(self.state), "stage": str(self.stage), "run": str(self.name),
                    "error": self.error, "error_type": self.error_type, "position": position,
                    "snapshot_error": type(exc).__name__}

    def _snapshot(self, position: int | None) -> dict[str, Any]:
        with self._lock:
            now = time.time()
            started = self.started
            return {
                "id": self.id, "state": self.state, "stage": self.stage, "step": self.step, "total": self.total,
                "message": self.message, "fraction": self.fraction(),
                "eta_s": None if self._eta is None else round(self._eta, 1),
                "elapsed_s": None if started is None else round((self.finished or now) - started, 1),
                "error": self.error, "error_type": self.error_type, "warnings": list(self.warnings),
                "run": self.name, "url": f"/runs/{quote(self.name)}/",
                "cancel_requested": self.cancel.is_set(), "cancel_too_late": self.cancel_too_late,
                "created": _iso(self.created), "started": _iso(self.started), "finished": _iso(self.finished),
                "position": position,
                "params": {k: v for k, v in self.config.to_dict().items() if k != "output_dir"},
            }


class JobQueue:
    """A single worker thread that runs jobs in submission order; the model stays loaded in between."""

    def __init__(self, *, show_progress: bool = True, log=None):
        self.jobs: "collections.OrderedDict[str, Job]" = collections.OrderedDict()
        self._queue: "queue.Queue[Job | None]" = queue.Queue()
        self._lock = threading.RLock()
        self.show_progress = show_progress
        self.log = log or (lambda message: print(f"{PROG}: {message}", file=sys.stderr, flush=True))
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._work, name="diffviz-bridge-worker", daemon=True)
        self._thread.start()

    # ---- called from the HTTP thread --------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job`` (the last step of a POST /jobs: every check has passed); 429 / 400 before it is added."""
        with self._lock:
            if self.pending() >= MAX_QUEUED:
                raise RequestError(429, f"{MAX_QUEUED} jobs are already waiting; try again later")
            if job.name in self.reserved_names():
                raise RequestError(400, f"name: a queued or running job already writes run {job.name!r}", "name")
            self.jobs[job.id] = job
            while len(self.jobs) > JOB_HISTORY + MAX_QUEUED + 1:
                oldest = next((j for j in self.jobs.values() if j.state in FINAL_STATES), None)
                if oldest is None:
                    break
                del self.jobs[oldest.id]
        self._queue.put(job)
        cost = "" if job.cost is None else f", estimated {job.cost.total / 1e9:.2f} GB"
        self.log(f"job {job.id} queued: run {job.name!r}, {job.config.num_steps} steps{cost}")
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is None:
            return None
        with job._lock:
            if job.state in FINAL_STATES:
                return job
            job.cancel.set()
            if job.state == QUEUED:
                job.state, job.stage, job.finished = CANCELLED, "cancelled", time.time()
                job.prepared = None
        self.log(f"job {job.id}: cancel requested")
        return job

    def pending(self) -> int:
        with self._lock:
            return sum(1 for j in self.jobs.values() if j.state == QUEUED)

    def reserved_names(self) -> set[str]:
        with self._lock:
            return {j.name for j in self.jobs.values() if j.state in (QUEUED, RUNNING)}

    def position(self, job: Job) -> int | None:
        """0 = running, 1 = next, ...; None when finished."""
        with self._lock:
            if job.state == RUNNING:
                return 0
            if job.state != QUEUED:
                return None
            waiting = [j for j in self.jobs.values() if j.state == QUEUED]
            return 1 + waiting.index(job) if job in waiting else None

    def snapshot(self, job: Job) -> dict[str, Any]:
        """``job.snapshot`` with its queue position; never raises."""
        try:
            position = self.position(job)
        except Exception:  # noqa: BLE001
            position = None
        return job.snapshot(position)

    def snapshots(self) -> list[dict[str, Any]]:
        with self._lock:
            jobs = list(self.jobs.values())
        return [self.snapshot(j) for j in reversed(jobs)]

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel everything (a running job stops at its next step, leaving nothing) and end the worker."""
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            if job.state not in FINAL_STATES:
                self.cancel(job.id)
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- the worker thread ------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with job._lock:
                if job.state != QUEUED:
                    continue  # cancelled while waiting
                job.state, job.stage, job.started = RUNNING, "loading model", time.time()
                self.current = job
            try:
                self._run(job)
            finally:
                self.current = None
                job.prepared = None  # the plan's meta-device model and tokenizers are not kept for history

    def _run(self, job: Job) -> None:
        from capture import run
        from capture.progress import Cancelled, TqdmProgress

        bar = TqdmProgress(disable=not self.show_progress)

        def progress(event: Any) -> None:
            job.on_progress(event)   # the bridge's record (may raise Cancelled)
            bar(event)               # the same events as the CLI's bars, on this terminal

        self.log(f"job {job.id} started: {job.config.prompt!r}")
        outcome, error, error_type = DONE, None, None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if job.prepared is not None:
                    run.plan_warnings(job.config, job.prepared)
                run.generate(job.config, progress=progress, cancel=job.cancel, prepared=job.prepared)
            except Cancelled:
                outcome = CANCELLED
            except BaseException as exc:  # noqa: BLE001 - reported in the job, never a traceback to the client
                outcome, error, error_type = FAILED, one_line(exc), type(exc).__name__
            finally:
                bar.close()
        with job._lock:
            job.warnings = [one_line(w.message) for w in caught]
            job.state, job.error, job.error_type, job.finished = outcome, error, error_type, time.time()
            if outcome == CANCELLED:
                job.stage = "cancelled"
        self.log(f"job {job.id} {outcome}" + (f": {error}" if error else ""))
