"""The ``diffviz`` command.

Each subcommand lives in the package that does the work and is imported lazily,
so ``diffviz validate``, ``serve`` and ``build-site`` run without torch installed.
Every subcommand module exposes ``main(argv: list[str]) -> int``.
"""
from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

#: subcommand -> (module, one-line help). The module's ``main(argv)`` parses its own flags.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("capture.cli", "record a diffusion run into a dataset folder (needs the [capture] extra)"),
    "sweep": ("capture.sweep.cli", "record a grid of runs (prompts x seeds x settings) into one folder with a sweep.json index"),
    "validate": ("export.validate", "check a dataset folder against the contract"),
    "export-figure": ("export.figure", "write a run's word grid (DAAM maps over the image) as a PNG for a paper"),
    "eval-attention": ("capture.toyworld.evaluate", "score attention maps against the toy world's ground truth"),
    "train-toyworld": ("capture.toyworld.train", "train the embedded toy-world model"),
    "serve": ("app.serve", "serve the dashboard with panel serve"),
    "build-site": ("app.sitebuild.cli", "build the static Pyodide site"),
    "bridge": ("capture.bridge", "run the local generator bridge for the dashboard"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"diffviz {__version__}", "usage: diffviz COMMAND [options]   (diffviz COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffviz: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # e.g. torch missing for `generate`
        print(f"diffviz {name}: error: missing dependency {exc.name!r}; install with pip install 'diffviz[capture]'", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
