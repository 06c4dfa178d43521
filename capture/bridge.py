"""``diffviz bridge``: a local HTTP service that lets the dashboard start generations and open the results.

    diffviz bridge [--port 8765] [--datasets DIR] [--allow-origin ORIGIN ...] [--allow-model PATH ...]

It wraps the very same code as ``diffviz generate`` (``capture.run.generate`` with a
``capture.config.GenerateConfig`` checked by the CLI's own rules) behind a small JSON API, served by
tornado (which the stack already ships through bokeh/panel), bound to 127.0.0.1 only:

    GET    /                    what this bridge is: version, datasets folder, allowed models, defaults, limits
    POST   /jobs                start a generation (JSON body: the CLI's settings by field name, plus an
                                optional run ``name``) -> 202 + the job; 400 naming the field on a bad value
    GET    /jobs                every job this bridge knows (newest first)
    GET    /jobs/{id}           state, stage, step, total, fraction, ETA, error
    DELETE /jobs/{id}           cancel (a queued job never starts; a running one stops, leaving nothing behind)
    GET    /runs                the runs in the datasets folder
    GET    /runs/{name}/        one run's summary;  GET /runs/{name}/{path}: one of its files, read only

Jobs run one at a time on a single worker thread (others wait in a queue); the pipeline stays loaded
between jobs (``capture.pipeline.load_pipeline`` caches it); a job does not belong to any HTTP
connection, so a client that goes away changes nothing. A failed or cancelled job leaves no run and no
partial folder behind (``export.writer.RunWriter`` builds in a temporary folder and renames at the end).
The progress a job reports is the stream of ``capture.progress.Progress`` events that ``generate``
emits, the same events that draw the CLI's tqdm bars (which the bridge also draws on its terminal).

Security: loopback only; the ``Host`` header must name the loopback (DNS rebinding); CORS only for the
allowed origins (``--allow-origin``; default: any port of http://localhost and http://127.0.0.1, plus
``$DIFFVIZ_PAGES_ORIGIN``, the static site's GitHub Pages origin); a POST or DELETE from any other origin
is refused; POST bodies must be JSON (so a browser preflights them) and at most 64 KiB; run names and
file paths cannot leave the datasets folder (``..``, absolute paths and symlinks out are refused); a
model path is accepted only when it is in ``--allow-model`` (the embedded default is always allowed).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as _dt
import json
import mimetypes
import os
import queue
import re
import secrets
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote, urlsplit

from capture.cli import OneLineParser, fail, parse

PROG = "diffviz bridge"
HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_DATASETS = "datasets"
#: The static site's GitHub Pages origin (``https://USER.github.io``), allowed by default when set.
PAGES_ORIGIN_ENV = "DIFFVIZ_PAGES_ORIGIN"
#: Default CORS origins: any port (``:*``) of the two loopback names.
LOCAL_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*")
#: Largest POST body accepted (the settings of one generation are well under 4 KiB).
MAX_BODY_BYTES = 64 * 1024
#: Most jobs waiting at once; more get 429.
MAX_QUEUED = 16
#: Finished jobs remembered for GET /jobs/{id}.
JOB_HISTORY = 200
#: A run name: one folder name, no hidden (``.``) folders (the writer's temporary folders start with a dot).
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Values of ``model`` in a request that mean "the embedded default model".
DEFAULT_MODEL_NAMES = ("", "default", "toyworld")
#: Stages up to which a cancel still leaves nothing behind (the run is renamed into place after these).
_CANCELLABLE_UNTIL = ("validating", 0)
#: Share of the progress bar given to each stage: (start, end).
STAGE_SPAN = {"loading model": (0.0, 0.05), "denoising": (0.05, 0.95), "analysis": (0.95, 0.97),
              "writing": (0.97, 0.98), "validating": (0.98, 1.0), "done": (1.0, 1.0)}
FILE_CHUNK = 1 << 20

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)


class RequestError(Exception):
    """An HTTP error with a one-line message; ``field`` names the bad setting of a POST /jobs."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())
        self.field = field


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# =========================================================================== origins and models


def _normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class Origins:
    """The CORS allow-list: exact origins, or ``scheme://host:*`` for any port of that host (or none)."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = [_normal_origin(p) for p in patterns if p and p.strip()]
        for p in self.patterns:
            parts = urlsplit(p.replace(":*", ""))
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
                raise ValueError(f"--allow-origin {p!r}: give scheme://host[:port] (port may be *)")

    @classmethod
    def default(cls) -> "Origins":
        pages = os.environ.get(PAGES_ORIGIN_ENV, "").strip()
        return cls([*LOCAL_ORIGINS, *([pages] if pages else [])])

    def allows(self, origin: str | None) -> bool:
        if not origin:
            return False
        origin = _normal_origin(origin)
        try:
            parts = urlsplit(origin)
            port = parts.port
        except ValueError:
            return False
        if parts.path or not parts.hostname:
            return False
        for pattern in self.patterns:
            if pattern == origin:
                return True
            if pattern.endswith(":*"):
                base = urlsplit(pattern[:-2])
                if (parts.scheme, parts.hostname) == (base.scheme, base.hostname) and (port is None or port > 0):
                    return True
        return False


class ModelAllowList:
    """Which ``model`` values a request may name: the default, and what ``--allow-model`` listed at start-up."""

    def __init__(self, models: Iterable[str] = ()):
        self.entries: list[tuple[str, str]] = []   # (as given, resolved path or hub id)
        for model in models:
            model = model.strip()
            if not model:
                continue
            path = Path(os.path.expanduser(model))
            self.entries.append((model, str(path.resolve()) if path.exists() else model))

    def resolve(self, value: Any) -> str | None:
        """The ``GenerateConfig.model`` for a request's ``model`` (None = default); RequestError if not allowed."""
        if value is None or (isinstance(value, str) and value.strip() in DEFAULT_MODEL_NAMES):
            return None
        if not isinstance(value, str):
            raise RequestError(400, f"model: must be a string, got {type(value).__name__}", "model")
        value = value.strip()
        from capture.pipeline import DEFAULT_MODEL_DIR

        path = Path(os.path.expanduser(value))
        resolved = str(path.resolve()) if path.exists() else None
        if resolved == str(DEFAULT_MODEL_DIR):
            return None
        for given, key in self.entries:
            if value == given or value == key or (resolved is not None and resolved == key):
                return given
        raise RequestError(403, f"model: {value!r} is not in this bridge's allow-list; start the bridge with "
                                f"--allow-model {value} to allow it", "model")

    def listing(self) -> list[dict[str, str]]:
        out = [{"value": "default", "label": "toyworld (embedded default)"}]
        out += [{"value": given, "label": given} for given, _ in self.entries]
        return out


# =========================================================================== jobs


@dataclass
class Job:
    """One generation request and what it has reported so far. ``snapshot()`` is what GET /jobs/{id} returns."""

    id: str
    name: str
    config: Any                    # capture.config.GenerateConfig
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
        with self._lock:
            now = time.time()
            started = self.started
            out = {
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
        return out


def _iso(t: float | None) -> str | None:
    """UTC time with milliseconds (``2026-11-28T19:00:00.123Z``), so that job order is visible."""
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


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
        self.log(f"job {job.id} queued: run {job.name!r}, {job.config.num_steps} steps")
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

    def snapshots(self) -> list[dict[str, Any]]:
        with self._lock:
            jobs = list(self.jobs.values())
        return [j.snapshot(self.position(j)) for j in reversed(jobs)]

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
                run.generate(job.config, progress=progress, cancel=job.cancel)
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


# =========================================================================== the bridge (no HTTP here)


class Bridge:
    """What the HTTP handlers act on: the datasets folder, the allow-lists and the job queue."""

    def __init__(self, datasets: str | os.PathLike = DEFAULT_DATASETS, *, origins: Origins | None = None,
                 models: Iterable[str] = (), show_progress: bool = True, log=None):
        from capture import run  # noqa: F401 - torch and diffusers now, not during the first request

        self.root = Path(datasets).expanduser().resolve()
        self.origins = origins or Origins.default()
        self.models = ModelAllowList(models)
        self.jobs = JobQueue(show_progress=show_progress, log=log)

    # ---- info -----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        from capture import config as config_mod
        from diffviz import __version__

        defaults = config_mod.GenerateConfig(prompt="").to_dict()
        for key in ("output_dir", "model", "overwrite_output", "prompt"):
            defaults.pop(key, None)
        return {
            "service": "diffviz-bridge", "version": __version__, "datasets": str(self.root),
            "models": self.models.listing(), "defaults": defaults,
            "limits": {"max_prompt_chars": config_mod.MAX_PROMPT_CHARS, "max_steps": config_mod.MAX_STEPS,
                       "max_resolution": config_mod.MAX_RESOLUTION, "max_image_side": config_mod.MAX_IMAGE_SIDE,
                       "max_cfg_scale": config_mod.MAX_CFG_SCALE, "max_body_bytes": MAX_BODY_BYTES,
                       "max_queued": MAX_QUEUED},
            "queued": self.jobs.pending(),
            "running": self.jobs.current.id if self.jobs.current else None,
        }

    # ---- jobs -----------------------------------------------------------------------------------
    def make_job(self, body: Any) -> Job:
        """Check a POST /jobs body with the CLI's rules and build the job; RequestError naming the field."""
        from capture import pipeline as pipeline_mod
        from capture import run
        from capture.config import ConfigError, GenerateConfig
        from capture.recorder import LayerSelectionError, ShapeMismatchError

        if not isinstance(body, dict):
            raise RequestError(400, "body: expected a JSON object of settings", "body")
        settings = {str(k).replace("-", "_"): v for k, v in body.items()}
        name = self._run_name(settings)
        settings["model"] = self.models.resolve(settings.get("model"))
        settings["output_dir"] = str(self.root / name)
        try:
            config = _precheck(GenerateConfig.from_mapping(settings))
            target = self.root / name
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                raise ConfigError("name", f"{name!r} exists in the datasets folder and is not a run folder")
            if target.is_dir() and any(target.iterdir()) and not config.overwrite_output:
                raise ConfigError("name", f"run {name!r} already exists; choose another name or set overwrite_output")
            config.check_paths()
        except ConfigError as exc:
            raise RequestError(400, str(exc), exc.field) from None
        except LayerSelectionError as exc:
            raise RequestError(400, f"--layers: {one_line(exc)}", "layers") from None
        except ShapeMismatchError as exc:
            raise RequestError(400, f"--fail-on-shape-error: {one_line(exc)}", "fail_on_shape_error") from None
        except run.SizeLimitError as exc:
            raise RequestError(400, f"--max-dataset-mb: {one_line(exc)}", "max_dataset_mb") from None
        except pipeline_mod.ModelLoadError as exc:
            raise RequestError(400, f"--model: {one_line(exc)}", "model") from None
        return Job(id=secrets.token_hex(6), name=name, config=config)

    def _run_name(self, settings: dict[str, Any]) -> str:
        """The run's folder name inside the datasets folder: ``name`` (or ``output_dir``), or a fresh one."""
        given = [k for k in ("name", "output_dir") if settings.get(k) not in (None, "")]
        if len(given) > 1:
            raise RequestError(400, "name: give either name or output_dir, not both", "name")
        key = given[0] if given else "name"
        value = settings.pop("name", None) if key == "name" else settings.get("output_dir")
        settings.pop("name", None)
        settings.pop("output_dir", None)
        if value in (None, ""):
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            return f"run-{stamp}-{secrets.token_hex(2)}"
        if not isinstance(value, str) or not RUN_NAME.match(value) or value in (".", ".."):
            raise RequestError(400, f"{key}: {value!r} is not a run name (one folder name inside the datasets "
                                    "folder: letters, digits, '.', '_', '-'; no '/', no leading dot)", key)
        return value

    # ---- runs -----------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        """The folder of run ``name``; RequestError 404 if it is no run inside the datasets folder."""
        if not RUN_NAME.match(name or ""):
            raise RequestError(400, f"{name!r} is not a run name")
        folder = (self.root / name).resolve()
        if folder.parent != self.root or not (folder / "metadata.json").is_file():
            raise RequestError(404, f"no run {name!r} in the datasets folder")
        return folder

    def run_file(self, name: str, relpath: str) -> Path:
        from export import contract

        folder = self.run_dir(name)
        try:
            contract.check_relative_path(relpath)
        except contract.DatasetError as exc:
            raise RequestError(400, one_line(exc)) from None
        try:
            path = contract.resolve_inside(folder, relpath)
        except contract.DatasetError:
            raise RequestError(404, f"{relpath!r}: not in run {name!r}") from None
        if not path.is_file():
            raise RequestError(404, f"{relpath!r}: not in run {name!r}")
        return path

    def run_summary(self, folder: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
            info = meta.get("run", {}) if isinstance(meta, dict) else {}
        except (OSError, ValueError):
            return None
        return {"name": folder.name, "url": f"/runs/{quote(folder.name)}/", "prompt": info.get("prompt"),
                "num_steps": info.get("num_steps"), "seed": info.get("seed"), "model": info.get("model"),
                "created": meta.get("created"), "valid": _valid(folder)}

    def runs(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        out = []
        for entry in sorted(self.root.iterdir()):
            if not RUN_NAME.match(entry.name) or entry.is_symlink() or not entry.is_dir():
                continue
            summary = self.run_summary(entry) if (entry / "metadata.json").is_file() else None
            if summary is not None:
                out.append(summary)
        out.sort(key=lambda r: (r.get("created") or "", r["name"]), reverse=True)
        return out


def _precheck(config: Any) -> Any:
    """``run.check``: what generate checks before loading weights, so a bad request gets its 400 at once.

    Without an enforced limit the size is not warned about here: its warning belongs to the job.
    """
    from capture import run

    return run.check(config, size_warning=False)[0]


def _valid(folder: Path) -> bool | None:
    try:
        return bool(json.loads((folder / "validation.json").read_text(encoding="utf-8")).get("valid"))
    except (OSError, ValueError, AttributeError):
        return None


# =========================================================================== HTTP (tornado)


def make_app(bridge: Bridge):
    import tornado.web

    class Base(tornado.web.RequestHandler):
        def initialize(self) -> None:
            self.bridge = bridge

        def set_default_headers(self) -> None:
            self.set_header("Cache-Control", "no-store")
            self.set_header("X-Content-Type-Options", "nosniff")
            self.set_header("Server", "diffviz-bridge")

        def prepare(self) -> None:
            host = (self.request.host or "").rsplit(":", 1)[0].strip("[]").lower()
            if host not in ("127.0.0.1", "localhost"):
                raise RequestError(403, f"Host {self.request.host!r} is not the loopback; open the bridge as http://127.0.0.1")
            origin = self.request.headers.get("Origin")
            if origin is not None and not bridge.origins.allows(origin) and self.request.method not in ("GET", "HEAD", "OPTIONS"):
                raise RequestError(403, f"origin {origin} is not allowed (start the bridge with --allow-origin {origin})")
            self._cors()

        def _cors(self) -> None:
            """``Access-Control-Allow-Origin`` echoing an allowed ``Origin``; nothing for any other origin."""
            origin = self.request.headers.get("Origin")
            if origin is not None and bridge.origins.allows(origin):
                self.set_header("Access-Control-Allow-Origin", origin)
                self.set_header("Vary", "Origin")

        def options(self, *args: Any) -> None:
            origin = self.request.headers.get("Origin")
            if not bridge.origins.allows(origin):
                self.set_status(403)
                return self.finish()
            self.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            self.set_header("Access-Control-Allow-Headers", "Content-Type")
            self.set_header("Access-Control-Max-Age", "600")
            if self.request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
                self.set_header("Access-Control-Allow-Private-Network", "true")
            self.set_status(204)
            self.finish()

        def send_json(self, data: Any, status: int = 200) -> None:
            self.set_status(status)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps(data, ensure_ascii=False))

        def write_error(self, status_code: int, **kwargs: Any) -> None:
            exc = kwargs.get("exc_info", (None, None, None))[1]
            field_name = None
            if isinstance(exc, RequestError):
                self.set_status(exc.status)
                status_code, message, field_name = exc.status, exc.message, exc.field
            elif exc is not None and status_code >= 500:
                message = f"internal error: {type(exc).__name__}: {one_line(exc)}"
            else:
                message = self._reason
            self._cors()  # send_error cleared the headers; the page must still be able to read the error
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps({"error": message, "field": field_name, "status": status_code}, ensure_ascii=False))

        def log_exception(self, typ, value, tb) -> None:
            if isinstance(value, RequestError):
                return
            super().log_exception(typ, value, tb)

    class Root(Base):
        def get(self) -> None:
            self.send_json(bridge.info())

    class Jobs(Base):
        def get(self) -> None:
            self.send_json({"jobs": bridge.jobs.snapshots()})

        async def post(self) -> None:
            if len(self.request.body) > MAX_BODY_BYTES:
                raise RequestError(413, f"body: larger than {MAX_BODY_BYTES} bytes", "body")
            ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise RequestError(415, "body: send the settings as JSON (Content-Type: application/json)", "body")
            try:
                body = json.loads(self.request.body.decode("utf-8") or "null")
            except (UnicodeDecodeError, ValueError) as exc:
                raise RequestError(400, f"body: not valid JSON ({one_line(exc)})", "body") from None
            # the checks read the model's configs from disk: keep the event loop free meanwhile
            job = await asyncio.get_running_loop().run_in_executor(None, bridge.make_job, body)
            bridge.jobs.submit(job)
            self.set_header("Location", f"/jobs/{job.id}")
            self.send_json(job.snapshot(bridge.jobs.position(job)), 202)

    class OneJob(Base):
        def _job(self, job_id: str) -> Job:
            job = bridge.jobs.get(job_id)
            if job is None:
                raise RequestError(404, f"no job {job_id!r}")
            return job

        def get(self, job_id: str) -> None:
            job = self._job(job_id)
            self.send_json(job.snapshot(bridge.jobs.position(job)))

        def delete(self, job_id: str) -> None:
            job = bridge.jobs.cancel(self._job(job_id).id)
            self.send_json(job.snapshot(bridge.jobs.position(job)))

    class Runs(Base):
        def get(self) -> None:
            self.send_json({"runs": bridge.runs(), "datasets": str(bridge.root)})

    class RunFiles(Base):
        async def get(self, name: str, relpath: str) -> None:
            if not relpath:
                summary = bridge.run_summary(bridge.run_dir(name))
                if summary is None:
                    raise RequestError(404, f"no run {name!r} in the datasets folder")
                return self.send_json(summary)
            path = bridge.run_file(name, relpath)
            ctype = {".json": "application/json", ".png": "image/png"}.get(path.suffix.lower()) \
                or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self.set_header("Content-Type", ctype)
            self.set_header("Cache-Control", "no-cache")
            with open(path, "rb") as fh:
                while chunk := fh.read(FILE_CHUNK):
                    self.write(chunk)
                    await self.flush()
            self.finish()

    class NotFound(Base):
        def prepare(self) -> None:
            super().prepare()
            raise RequestError(404, f"no such endpoint: {self.request.method} {self.request.path}")

    return tornado.web.Application(
        [
            (r"/", Root),
            (r"/jobs/?", Jobs),
            (r"/jobs/([0-9a-f]+)/?", OneJob),
            (r"/runs/?", Runs),
            (r"/runs/([^/]+)/(.*)", RunFiles),
        ],
        default_handler_class=NotFound,
        compress_response=False,
        log_function=_log_request,
    )


def _log_request(handler: Any) -> None:
    """Log only failures (tornado's access log would print every poll of GET /jobs/{id})."""
    status = handler.get_status()
    if status >= 500:
        print(f"{PROG}: {status} {handler.request.method} {handler.request.path}", file=sys.stderr, flush=True)


class BridgeServer:
    """The bridge's HTTP server on 127.0.0.1:``port`` (0 = any free port).

    ``start()`` runs it on a background thread (tests, embedding) and returns once it listens;
    ``serve_forever()`` runs it on the calling thread until ``stop()`` or Ctrl-C.
    """

    def __init__(self, bridge: Bridge, port: int = DEFAULT_PORT):
        self.bridge = bridge
        self.requested_port = port
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _serve(self, handle_signals: bool = False) -> None:
        import signal

        import tornado.httpserver
        import tornado.netutil

        try:
            sockets = tornado.netutil.bind_sockets(self.requested_port, address=HOST)
            server = tornado.httpserver.HTTPServer(make_app(self.bridge), max_body_size=4 * MAX_BODY_BYTES,
                                                   xheaders=False)
            server.add_sockets(sockets)
            self.port = sockets[0].getsockname()[1]
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            if handle_signals:  # SIGTERM and SIGINT end the server cleanly (the caller then cancels the jobs)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.add_signal_handler(sig, self._stopping.set)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.stop()
            await server.close_all_connections()

    def start(self, timeout: float = 30.0) -> "BridgeServer":
        self._thread = threading.Thread(target=lambda: _quiet_run(self._serve()), name="diffviz-bridge-http", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise self._error
        if self.port is None:
            raise RuntimeError("the bridge did not start listening")
        return self

    def serve_forever(self, handle_signals: bool = False) -> None:
        asyncio.run(self._serve(handle_signals))

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self.bridge.jobs.stop(timeout)


def _quiet_run(coro) -> None:
    try:
        asyncio.run(coro)
    except BaseException:  # noqa: BLE001 - start() reports the bind error
        pass


# =========================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Run the local generator bridge: the dashboard's 'Local generator' panel "
                                       "starts generations through it and opens the results. Listens on 127.0.0.1 only.",
                epilog="example: diffviz bridge --port 8765 --datasets datasets --allow-origin https://USER.github.io")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port on 127.0.0.1 (default %(default)s)")
    p.add_argument("--datasets", default=DEFAULT_DATASETS, help="folder the runs are written to and served from (default %(default)s)")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="a web origin allowed to call the bridge (repeatable; scheme://host[:port], port may be *). "
                        f"Default: {', '.join(LOCAL_ORIGINS)} and ${PAGES_ORIGIN_ENV} when set")
    p.add_argument("--allow-model", action="append", default=[], metavar="PATH",
                   help="a model folder (or hub id) requests may name (repeatable); the embedded default is always allowed")
    p.add_argument("--quiet", action="store_true", help="no progress bars on this terminal")
    return p


def _fail(message: Any, code: int) -> int:
    return fail(PROG, message, code)


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    if not 0 <= args.port <= 65535:
        return _fail(f"--port: must be in [0, 65535], got {args.port}", 2)
    datasets = Path(args.datasets).expanduser()
    if datasets.exists() and not datasets.is_dir():
        return _fail(f"--datasets: {datasets} exists and is not a folder", 2)
    try:
        origins = Origins(args.allow_origin) if args.allow_origin else Origins.default()
    except ValueError as exc:
        return _fail(exc, 2)
    for model in args.allow_model:
        path = Path(os.path.expanduser(model))
        looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or path.exists()
        if looks_like_path and not (path / "model_index.json").is_file():
            return _fail(f"--allow-model: {model} is not a diffusers pipeline folder (no model_index.json)", 2)

    # torch and diffusers (imported by Bridge) only once the arguments are known to be sane
    datasets.mkdir(parents=True, exist_ok=True)
    bridge = Bridge(datasets, origins=origins, models=args.allow_model, show_progress=not args.quiet)
    server = BridgeServer(bridge, args.port)

    def announce() -> None:
        server._ready.wait()
        if server.port is not None:
            models = ", ".join(["default", *args.allow_model])
            print(f"{PROG}: listening on {server.url}  (datasets: {bridge.root}; origins: "
                  f"{', '.join(origins.patterns)}; models: {models})  Ctrl-C stops", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.serve_forever(handle_signals=True)
    except OSError as exc:
        return _fail(f"cannot listen on {HOST}:{args.port}: {exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        pass
    finally:
        print(f"{PROG}: stopping; a running job is cancelled and leaves nothing behind", file=sys.stderr, flush=True)
        bridge.jobs.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
