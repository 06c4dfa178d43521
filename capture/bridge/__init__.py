"""``diffviz bridge``: a local HTTP service that lets the dashboard start generations and open the results.

    diffviz bridge [--port 8765] [--datasets DIR] [--allow-origin ORIGIN ...] [--allow-model PATH ...]
                   [--max-job-gb 2]

It wraps the very same code as ``diffviz generate`` (``capture.run.generate`` with a
``capture.config.GenerateConfig`` checked by the CLI's own rules) behind a small JSON API, served by
tornado (which the stack already ships through bokeh/panel), bound to 127.0.0.1 only:

    GET    /                    what this bridge is: version, datasets folder, allowed models (a toy model
                                with its ``vocabulary``), defaults, limits
    POST   /jobs                start a generation (JSON body: the CLI's settings by field name, plus an
                                optional run ``name``) -> 202 + the job; 400 naming the field on a bad value,
                                and for the toy model on a prompt word it does not know
    GET    /jobs                every job this bridge knows (newest first)
    GET    /jobs/{id}           state, stage, step, total, fraction, ETA, error
    DELETE /jobs/{id}           cancel (a queued job never starts; a running one stops, leaving nothing behind)
    GET    /runs                the runs in the datasets folder
    GET    /runs/{name}/        one run's summary;  GET /runs/{name}/{path}: one of its files, read only

Jobs run one at a time on a single worker thread (others wait in a queue); the pipeline stays loaded
between jobs (``capture.pipeline.load_pipeline`` caches it); a job does not belong to any HTTP
connection, so a client that goes away changes nothing. A failed or cancelled job leaves no run and no
partial folder behind (``export.writer.RunWriter`` builds in a temporary folder and renames at the end);
the temporary folders of a process killed outright are removed when the bridge starts. The progress a
job reports is the stream of ``capture.progress.Progress`` events that ``generate`` emits, the same
events that draw the CLI's tqdm bars (which the bridge also draws on its terminal). The job-state
names are ``export.protocol``'s, shared with the dashboard's client.

Limits: a request is checked whole before anything is queued: the body's size and nesting, every
string (valid Unicode, no NUL, capped length) and number (finite, in range), the CLI's rules, the layer
plan, and the job's projected cost (memory at its peak plus what it writes, ``policy.job_cost``)
against ``--max-job-gb``. Each failure is a 400 naming the setting.

Security: loopback only; the ``Host`` header must name the loopback (DNS rebinding); CORS only for the
allowed origins (``--allow-origin``; default: any port of http://localhost and http://127.0.0.1, plus
``$DIFFVIZ_PAGES_ORIGIN``, the static site's GitHub Pages origin); a POST or DELETE from any other origin
is refused; POST bodies must be JSON (so a browser preflights them) and at most 64 KiB; run names and
file paths cannot leave the datasets folder (``..``, absolute paths and symlinks out are refused), and
only regular files are served (never a FIFO or a device); a model path is accepted only when it is in
``--allow-model`` (the embedded default is always allowed). Error messages carry no absolute paths.

The package: ``policy`` (what is accepted, and the cost estimate), ``jobs`` (Job, JobQueue),
``service`` (the Bridge: info, jobs, runs, files), ``http`` (tornado handlers, BridgeServer), ``cli``.
"""
from __future__ import annotations

from capture.bridge.cli import build_parser, main
from capture.bridge.http import DEFAULT_PORT, FILE_CHUNK, HOST, BridgeServer, make_app
from capture.bridge.jobs import STAGE_SPAN, Job, JobQueue
from capture.bridge.policy import (DEFAULT_MAX_JOB_GB, DEFAULT_MODEL_NAMES, JOB_HISTORY, LOCAL_ORIGINS, MAX_BODY_BYTES,
                                   MAX_QUEUED, PAGES_ORIGIN_ENV, PROG, RUN_NAME, Cost, ModelAllowList, Origins,
                                   RequestError, job_cost, one_line)
from capture.bridge.service import DEFAULT_DATASETS, Bridge
from export.protocol import CANCELLED, DONE, FAILED, FINAL_STATES, QUEUED, RUNNING

__all__ = [
    "main", "build_parser", "Bridge", "BridgeServer", "make_app", "Job", "JobQueue", "ModelAllowList", "Origins",
    "RequestError", "Cost", "job_cost", "one_line",
    "HOST", "DEFAULT_PORT", "DEFAULT_DATASETS", "PAGES_ORIGIN_ENV", "LOCAL_ORIGINS", "MAX_BODY_BYTES", "MAX_QUEUED",
    "JOB_HISTORY", "RUN_NAME", "DEFAULT_MODEL_NAMES", "DEFAULT_MAX_JOB_GB", "STAGE_SPAN", "FILE_CHUNK", "PROG",
    "QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED", "FINAL_STATES",
]
