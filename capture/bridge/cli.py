"""``diffviz bridge``'s command line: the flags, their checks, and the server's life on this terminal."""
from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any

from capture.bridge.http import DEFAULT_PORT, HOST, BridgeServer
from capture.bridge.policy import DEFAULT_MAX_JOB_GB, LOCAL_ORIGINS, PAGES_ORIGIN_ENV, PROG, Origins
from capture.bridge.service import DEFAULT_DATASETS, Bridge
from capture.cli import OneLineParser, fail, parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Run the local generator bridge: the dashboard's 'Local generator' panel "
                                             "starts generations through it and opens the results. Listens on "
                                             "127.0.0.1 only.",
                      epilog="example: diffviz bridge --port 8765 --datasets datasets --allow-origin https://USER.github.io")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port on 127.0.0.1 (default %(default)s)")
    p.add_argument("--datasets", default=DEFAULT_DATASETS,
                   help="folder the runs are written to and served from (default %(default)s)")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="a web origin allowed to call the bridge (repeatable; scheme://host[:port], port may be *). "
                        f"Default: {', '.join(LOCAL_ORIGINS)} and ${PAGES_ORIGIN_ENV} when set")
    p.add_argument("--allow-model", action="append", default=[], metavar="PATH",
                   help="a model folder (or hub id) requests may name (repeatable); the embedded default is always allowed")
    p.add_argument("--max-job-gb", type=float, default=DEFAULT_MAX_JOB_GB, metavar="GB",
                   help="refuse a job whose projected cost (memory at its peak plus what it writes, estimated from "
                        "its layer plan) is over this many GB (default %(default)g)")
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
    if not math.isfinite(args.max_job_gb) or args.max_job_gb <= 0:
        return _fail(f"--max-job-gb: must be a positive number, got {args.max_job_gb:g}", 2)
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
    bridge = Bridge(datasets, origins=origins, models=args.allow_model, show_progress=not args.quiet,
                    max_job_gb=args.max_job_gb)
    server = BridgeServer(bridge, args.port)

    def announce() -> None:
        server.wait_ready()
        if server.port is not None:
            models = ", ".join(["default", *args.allow_model])
            print(f"{PROG}: listening on {server.url}  (datasets: {bridge.root}; origins: "
                  f"{', '.join(origins.patterns)}; models: {models}; jobs up to {args.max_job_gb:g} GB)  Ctrl-C stops",
                  file=sys.stderr, flush=True)

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
