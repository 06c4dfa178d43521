"""``diffviz serve``: a thin wrapper over ``panel serve app/main.py``.

    diffviz serve [--port 5006] [--address 127.0.0.1] [--dataset PATH_OR_URL] [--cache-mb 256] [--show]

The dataset and the cache bound reach the app through ``DIFFVIZ_DATASET`` and ``DIFFVIZ_CACHE_MB``
(``panel serve app/main.py`` reads the same variables, and uses ``datasets/default`` without them).
``--dataset`` may name a sweep (a folder holding ``sweep.json``, as ``diffviz sweep`` writes it): the dashboard
then opens with its Sweep tab, and its first finished run in the other tabs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from app.store import DEFAULT_CACHE_MB, PROJECT_ROOT, is_url
from export.contract import METADATA_FILE
from export.sweep import SWEEP_FILE

APP = Path(__file__).with_name("main.py")
#: Large enough for a whole run folder picked in the browser (uploads travel over the websocket).
WEBSOCKET_MAX_MB = 512


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffviz serve", description="Serve the diffviz dashboard with panel serve.")
    p.add_argument("--port", type=int, default=5006, help="port to listen on (default 5006)")
    p.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--dataset", default=None,
                   help="run or sweep to open first: a folder or an http(s) URL (default datasets/default)")
    p.add_argument("--cache-mb", type=int, default=None,
                   help=f"bound of each open run's cache of decoded maps and images, in MB (default {DEFAULT_CACHE_MB})")
    p.add_argument("--allow-websocket-origin", action="append", default=[], metavar="HOST[:PORT]",
                   help="extra origin allowed to connect (repeatable; needed when serving beyond localhost)")
    p.add_argument("--show", action="store_true", help="open the dashboard in a browser")
    p.add_argument("--dev", action="store_true", help="reload the app when its files change (panel serve --dev)")
    return p


def command(args: argparse.Namespace) -> list[str]:
    """The ``panel serve`` command line for the parsed arguments."""
    cmd = [sys.executable, "-m", "panel", "serve", str(APP), "--address", args.address, "--port", str(args.port),
           "--websocket-max-message-size", str(WEBSOCKET_MAX_MB * 2**20)]
    origins = list(args.allow_websocket_origin)
    if args.address in ("127.0.0.1", "localhost", "0.0.0.0"):
        origins += [f"localhost:{args.port}", f"127.0.0.1:{args.port}"]
    for origin in dict.fromkeys(origins):
        cmd += ["--allow-websocket-origin", origin]
    if args.show:
        cmd.append("--show")
    if args.dev:
        cmd.append("--dev")
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # usage errors exit 2 with one line
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: must be between 1 and 65535")
    if args.cache_mb is not None and args.cache_mb <= 0:
        parser.error(f"--cache-mb {args.cache_mb}: must be a positive number of MB")
    env = dict(os.environ)
    if args.dataset:
        dataset = args.dataset.strip()
        if not is_url(dataset):
            path = Path(dataset).expanduser()
            if not path.is_dir() and not (PROJECT_ROOT / path).is_dir():
                parser.error(f"--dataset {dataset}: no such folder")
            dataset = str(path.resolve() if path.is_dir() else (PROJECT_ROOT / path).resolve())
            if not any((Path(dataset) / name).is_file() for name in (METADATA_FILE, SWEEP_FILE)):
                parser.error(f"--dataset {args.dataset.strip()}: neither a run (no {METADATA_FILE}) nor a sweep (no {SWEEP_FILE})")
        env["DIFFVIZ_DATASET"] = dataset
    if args.cache_mb is not None:
        env["DIFFVIZ_CACHE_MB"] = str(args.cache_mb)
    print(f"diffviz: serving the dashboard at http://{args.address}:{args.port}/main", flush=True)
    try:
        return subprocess.call(command(args), env=env, cwd=str(PROJECT_ROOT))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
