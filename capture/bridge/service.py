"""The bridge itself, without HTTP: the datasets folder, the allow-lists, the job queue, and the runs.

Every method here may touch the disk; the HTTP layer (``capture.bridge.http``) calls them on a worker
thread, never on its event loop. A run's JSON is read through ``export.bounded`` (regular files inside
the run folder, within the size caps, non-blocking: a FIFO is refused, not waited on).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import mimetypes
import os
import secrets
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterable
from urllib.parse import quote

from capture.bridge import policy
from capture.bridge.jobs import Job, JobQueue
from capture.bridge.policy import (DEFAULT_MAX_JOB_GB, GB, MAX_BODY_BYTES, MAX_QUEUED, PROG, RUN_NAME, ModelAllowList,
                                   Origins, RequestError, one_line)
from export import bounded, contract, writer
from export.contract import shown

DEFAULT_DATASETS = "datasets"


class Bridge:
    """What the HTTP handlers act on: the datasets folder, the allow-lists and the job queue."""

    def __init__(self, datasets: str | os.PathLike = DEFAULT_DATASETS, *, origins: Origins | None = None,
                 models: Iterable[str] = (), show_progress: bool = True, log=None,
                 max_job_gb: float = DEFAULT_MAX_JOB_GB):
        from capture import run  # noqa: F401 - torch and diffusers now, not during the first request

        self.root = Path(datasets).expanduser().resolve()
        self.origins = origins or Origins.default()
        self.models = ModelAllowList(models)
        self.max_job_gb = float(max_job_gb)
        self.log = log or (lambda message: print(f"{PROG}: {message}", file=sys.stderr, flush=True))
        self.tidied = writer.tidy_stale(self.root, log=self.log) if self.root.is_dir() else []
        self.jobs = JobQueue(show_progress=show_progress, log=self.log)

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
                       "max_queued": MAX_QUEUED, "max_job_gb": self.max_job_gb},
            "queued": self.jobs.pending(),
            "running": self.jobs.current.id if self.jobs.current else None,
        }

    # ---- jobs -----------------------------------------------------------------------------------
    def make_job(self, body: Any) -> Job:
        """Check a POST /jobs body with the CLI's rules and the bridge's limits and build the job (not
        queued yet); RequestError naming the field."""
        from capture import pipeline as pipeline_mod
        from capture import run
        from capture.config import ConfigError, GenerateConfig
        from capture.recorder import LayerSelectionError, ShapeMismatchError

        if not isinstance(body, dict):
            raise RequestError(400, "body: expected a JSON object of settings", "body")
        policy.check_values(body)
        settings = {str(k).replace("-", "_"): v for k, v in body.items()}
        name = self._run_name(settings)
        settings["model"] = self.models.resolve(settings.get("model"))
        settings["output_dir"] = str(self.root / name)
        try:
            # run.check: what generate checks before loading weights, so a bad request gets its 400 at once.
            # Silent (size_warning=False): the job warns on its own thread (run.plan_warnings in jobs.py).
            config, prepared = run.check(GenerateConfig.from_mapping(settings), size_warning=False)
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
        cost = policy.job_cost(prepared, config)
        policy.check_cost(cost, self.max_job_gb * GB)
        return Job(id=secrets.token_hex(6), name=name, config=config, prepared=prepared, cost=cost)

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
        return policy.check_run_name(value, key)

    # ---- runs -----------------------------------------------------------------------------------
    def _is_run(self, folder: Path) -> bool:
        """A real folder directly in the datasets folder whose metadata.json is a file inside it."""
        try:
            if folder.is_symlink() or not folder.is_dir():
                return False
            contract.resolve_inside(folder, contract.METADATA_FILE)
            return (folder / contract.METADATA_FILE).is_file()
        except (OSError, ValueError, RuntimeError):  # DatasetError is a ValueError
            return False

    def run_dir(self, name: str) -> Path:
        """The folder of run ``name``; RequestError 400/404 if it is no run inside the datasets folder."""
        if not RUN_NAME.match(name or ""):
            raise RequestError(400, f"{shown(name)} is not a run name")
        try:
            folder = (self.root / name).resolve()
        except (OSError, RuntimeError):
            raise RequestError(404, f"no run {name!r} in the datasets folder") from None
        if folder.parent != self.root or not self._is_run(folder):
            raise RequestError(404, f"no run {name!r} in the datasets folder")
        return folder

    def run_summary(self, folder: Path) -> dict[str, Any] | None:
        """A run's line in GET /runs, from its metadata.json (None if that cannot be read within the caps)."""
        try:
            meta = bounded.read_json(folder, contract.METADATA_FILE)
        except (contract.DatasetError, OSError):
            return None
        info = meta.get("run", {}) if isinstance(meta, dict) else {}
        info = info if isinstance(info, dict) else {}
        return {"name": folder.name, "url": f"/runs/{quote(folder.name)}/", "prompt": info.get("prompt"),
                "num_steps": info.get("num_steps"), "seed": info.get("seed"), "model": info.get("model"),
                "created": meta.get("created") if isinstance(meta, dict) else None, "valid": _valid(folder)}

    def summary(self, name: str) -> dict[str, Any]:
        """GET /runs/{name}/: the run's summary; RequestError 404 if there is none."""
        summary = self.run_summary(self.run_dir(name))
        if summary is None:
            raise RequestError(404, f"no run {name!r} in the datasets folder")
        return summary

    def runs(self) -> list[dict[str, Any]]:
        """GET /runs: every run in the datasets folder, newest first."""
        try:
            entries = sorted(self.root.iterdir()) if self.root.is_dir() else []
        except OSError:
            return []
        out = []
        for entry in entries:
            if not RUN_NAME.match(entry.name) or not self._is_run(entry):
                continue
            summary = self.run_summary(entry)
            if summary is not None:
                out.append(summary)
        out.sort(key=lambda r: (str(r.get("created") or ""), r["name"]), reverse=True)
        return out

    def open_file(self, name: str, relpath: str) -> tuple[BinaryIO, int, str, contextlib.ExitStack]:
        """``(file, size, content type, closer)`` for GET /runs/{name}/{relpath}: a regular file inside the
        run, within the largest file cap, opened without blocking. RequestError 400/404 otherwise, with no
        absolute path in the message. Close with ``closer.close()``."""
        folder = self.run_dir(name)
        try:
            contract.check_relative_path(relpath)
        except contract.DatasetError as exc:
            raise RequestError(400, one_line(exc)) from None
        stack = contextlib.ExitStack()
        try:
            fh = stack.enter_context(bounded.open_regular(folder, relpath, limit=contract.MAX_LATENTS_BYTES))
            size = os.fstat(fh.fileno()).st_size
        except contract.DatasetError as exc:
            stack.close()
            reason = "" if isinstance(exc, bounded.MissingFile) else f" ({self._scrub(one_line(exc), folder)})"
            raise RequestError(404, f"{shown(relpath)}: not in run {name!r}{reason}") from None
        except OSError as exc:
            stack.close()
            raise RequestError(404, f"{shown(relpath)}: not in run {name!r} ({exc.strerror or type(exc).__name__})") \
                from None
        suffix = Path(relpath).suffix.lower()
        ctype = {".json": "application/json", ".png": "image/png"}.get(suffix) \
            or mimetypes.guess_type(Path(relpath).name)[0] or "application/octet-stream"
        return fh, size, ctype, stack

    def _scrub(self, text: str, folder: Path) -> str:
        """``text`` without the run folder's or the datasets folder's absolute path."""
        return text.replace(str(folder), "<run>").replace(str(self.root), "<datasets>")


def _valid(folder: Path) -> bool | None:
    """validation.json's verdict, read within its cap without blocking; None when it cannot be read."""
    try:
        report = bounded.read_json(folder, contract.VALIDATION_FILE)
    except (contract.DatasetError, OSError):
        return None
    return bool(report.get("valid")) if isinstance(report, dict) else None
