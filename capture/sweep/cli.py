"""``diffviz sweep``: record a grid of runs into one folder, indexed by ``sweep.json``.

    diffviz sweep --prompt "a {colour} circle and a blue square" --set colour=red,green,yellow --seeds 0-3 \\
      --cfg-scale 3,7.5 --num-steps 30 --out sweeps/colours [--executor ray [--ray-address auto]]

Every ``diffviz generate`` flag applies to every run; ``--cfg-scale`` and ``--num-steps`` take lists,
``--seeds`` lists and ranges, ``--set NAME=v1,v2`` fills ``{NAME}`` in the prompt. Every run's settings
are checked before any model loads. The same command again resumes: finished runs are kept untouched.
Exit codes: 0 every run done, 1 some failed, 2 bad input (nothing written), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from capture.cli import OneLineParser, build_parser, config_from_args, fail, parse
from capture.config import ConfigError, GenerateConfig
from capture.sweep.grid import Grid, GridError, parse_floats, parse_ints, parse_seeds, parse_set

PROG = "diffviz sweep"
EXAMPLE = ('example: diffviz sweep --prompt "a {colour} circle and a blue square" --set colour=red,green,yellow '
           '--seeds 0-3 --cfg-scale 3,7.5 --num-steps 30 --out sweeps/colours')


def build_sweep_parser() -> argparse.ArgumentParser:
    """``generate``'s parser with the swept flags redefined as lists and the sweep's own flags added."""
    d = GenerateConfig(prompt="")
    p = OneLineParser(prog=PROG, parents=[build_parser()], conflict_handler="resolve", epilog=EXAMPLE,
                      description="Record a grid of runs (every combination of the listed values) into one folder.")
    p.add_argument("--prompt", required=True,
                   help="the prompt; {NAME} is filled from --set NAME=... ({{ and }} are literal braces)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=V1,V2",
                   help="values for the prompt's {NAME} placeholder (repeatable)")
    p.add_argument("--seeds", "--seed", dest="seeds", default=str(d.seed),
                   help="seeds: a list and/or inclusive ranges, e.g. 0-3,8 (default %(default)s)")
    p.add_argument("--cfg-scale", default=f"{d.cfg_scale:g}", help="guidance scales, comma-separated (default %(default)s)")
    p.add_argument("--num-steps", default=str(d.num_steps), help="step counts, comma-separated (default %(default)s)")
    p.add_argument("--out", "--output-dir", dest="output_dir", required=True,
                   help="the sweep folder: sweep.json and one run folder per run")
    p.add_argument("--overwrite-output", action="store_true",
                   help="write into a folder that holds a different sweep (or other files): its runs are replaced "
                        "one by one as the new ones land; nothing is deleted first")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process, the model loaded once; ray: one Ray actor per worker (default %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers, each with its own pipeline (default: the cluster's GPUs, else 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker, fixed so float32 rounding is the same on every executor "
                        "(default: local: torch's default; ray: the CPUs divided by --workers)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (auto, or host:port); without it a local cluster is started and stopped")
    return p


def _fail(message: object, code: int) -> int:
    return fail(PROG, message, code)


def _grid(args: argparse.Namespace) -> Grid:
    sets = parse_set(args.set)
    seeds = parse_seeds(args.seeds)
    cfgs = parse_floats("--cfg-scale", args.cfg_scale)
    steps = parse_ints("--num-steps", args.num_steps)
    ns = argparse.Namespace(**vars(args))
    ns.seed, ns.cfg_scale, ns.num_steps = seeds[0], cfgs[0], steps[0]
    return Grid.build(args.prompt, sets, seeds=seeds, cfg_scales=cfgs, num_steps=steps, base=config_from_args(ns))


def main(argv: list[str] | None = None) -> int:
    args = parse(build_sweep_parser(), argv)
    if isinstance(args, int):
        return args
    for flag in ("workers", "threads"):
        value = getattr(args, flag)
        if value is not None and not 1 <= value <= 4096:
            return _fail(f"--{flag}: must be an integer in [1, 4096], got {value}", 2)
    if args.ray_address is not None and args.executor != "ray":
        return _fail("--ray-address: needs --executor ray", 2)
    out = Path(args.output_dir).absolute()  # Ray workers do not share this process's working directory
    try:
        grid = _grid(args)
        specs = grid.expand(out)
    except (GridError, ConfigError) as exc:
        return _fail(exc, 2)
    for spec in specs:  # every run's rules, before anything heavy is imported
        try:
            spec.config.validate().check_words()
        except ConfigError as exc:
            return _fail(f"run {spec.name}: {exc}", 2)
    if args.executor == "ray":
        from capture.sweep.ray_executor import RayUnavailable, import_ray

        try:
            import_ray()
        except RayUnavailable as exc:
            return _fail(exc, 2)

    from capture.sweep.ledger import IndexWriteError, Ledger, SweepRefused
    from capture.sweep.lock import SweepLock, SweepLocked

    ledger = Ledger(out, grid, specs)
    try:
        ledger.check()
    except SweepRefused as exc:
        return _fail(exc, 2)
    if out.exists() and not out.is_dir():
        return _fail(f"--out: {out} exists and is not a folder", 2)
    created = _make_folder(out)
    if isinstance(created, str):
        return _fail(created, 2)
    lock = SweepLock(out)
    try:
        try:
            lock.acquire()
        except SweepLocked as exc:
            return _fail(exc, 2)
        return _locked(args, out, ledger, specs, lock)
    except IndexWriteError as exc:
        return _index_failure(exc, ledger, specs)
    finally:
        lock.release()
        if created:
            try:
                out.rmdir()  # only if this sweep left it empty (refused before writing anything)
            except OSError:
                pass


def _index_failure(exc: Exception, ledger, specs) -> int:
    done = ledger.counts()["done"]
    return _fail(f"{exc}; {done} of {len(specs)} runs are done and kept; free the space (or fix the cause) and run "
                 "the same command again to resume", 1)


def _make_folder(out: Path) -> bool | str:
    """Create OUT (True) or find it there (False); a one-line problem when it cannot be made."""
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        return f"--out: cannot create {out} ({exc.strerror or type(exc).__name__})"
    return True


def _locked(args: argparse.Namespace, out: Path, ledger, specs, lock) -> int:
    """The sweep, with OUT's lock held: tidy what killed writers left, plan, check, run."""
    from capture.sweep.ledger import SweepRefused
    from export import sweep as sweep_index
    from export.writer import tidy_stale

    notes: list[str] = [lock.note] if lock.note else []
    removed = sweep_index.tidy_temps(out)
    if removed:
        notes.append(f"removed {len(removed)} temp file(s) of an index write that was killed ({removed[0]})")
    tidy_stale(out, log=notes.append)  # partial runs of killed writers (their pids are gone)
    try:
        todo = ledger.plan(overwrite=args.overwrite_output, log=notes.append)
    except SweepRefused as exc:
        return _fail(exc, 2)
    seen_warnings: set[str] = set()
    problem = _prepare_all(todo, seen_warnings)
    if problem:
        return _fail(problem, 2)
    return _execute(args, out, ledger, specs, todo, notes, seen_warnings)


def _prepare_all(todo, seen_warnings: set[str]) -> str | None:
    """The checks that read the model's configs (no weights): sizes, layer patterns, pooling, projected size.
    Once per distinct setting set (the seed does not change them). A problem line, or None."""
    if not todo:
        return None
    from capture import run as run_mod
    from capture.pipeline import ModelLoadError
    from capture.recorder import LayerSelectionError, ShapeMismatchError
    from capture.sweep.runner import prepare_key

    checked: set[str] = set()
    for spec in todo:
        key = prepare_key(spec.config.to_dict())
        if key in checked:
            continue
        checked.add(key)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                run_mod.prepare(spec.config)
            except (ConfigError, LayerSelectionError, ModelLoadError, ShapeMismatchError, run_mod.SizeLimitError) as exc:
                return f"run {spec.name}: {exc}"
        for w in caught:
            line = " ".join(str(w.message).split())
            if line not in seen_warnings:
                seen_warnings.add(line)
                print(f"{PROG}: warning: {line}", file=sys.stderr)
    return None


def _execute(args, out: Path, ledger, specs, todo, notes, seen_warnings) -> int:
    from capture.sweep.bar import SweepBar
    from capture.sweep.ledger import IndexWriteError
    from export.sweep import MAX_SWEEP_WORDS
    from export.writer import tidy_stale

    ledger.flush()
    bar = SweepBar(total=len(specs), initial=len(specs) - len(todo), disable=args.quiet)
    for line in notes:
        bar.write(f"{PROG}: note: {line}")

    def on_result(result: dict) -> None:
        ledger.record(result)
        ok = result["status"] == "done"
        bar.finished(result["name"], ok)
        for line in result.get("warnings") or []:
            if line not in seen_warnings:
                seen_warnings.add(line)
                bar.write(f"{PROG}: warning: {line}")
        if not ok:
            bar.write(f"{PROG}: run {result['name']} failed: {result.get('error')}")

    code = 0
    failure: IndexWriteError | None = None
    try:
        if not todo:
            pass
        elif args.executor == "ray":
            from capture.sweep.ray_executor import RayUnavailable, run_ray

            try:
                run_ray(todo, workers=args.workers, threads=args.threads, on_result=on_result, bar=bar,
                        address=args.ray_address)
            except RayUnavailable as exc:
                code = _fail(exc, 1)
        else:
            from capture.sweep.local import run_local

            run_local(todo, threads=args.threads, on_result=on_result, bar=bar)
    except KeyboardInterrupt:
        code = 130
    except IndexWriteError as exc:  # the sweep stops: the runs after this one could not be indexed either
        failure = exc
    finally:
        bar.close()
        if failure is None:
            try:
                ledger.flush()
            except IndexWriteError as exc:
                failure = exc
        tidy_stale(out)  # what killed writers left beside the runs (their pids are gone)
    counts = ledger.counts()
    if ledger.words_left_out:
        print(f"{PROG}: note: the index keeps the shares of {MAX_SWEEP_WORDS} distinct words; the runs' own "
              "metrics hold the rest", file=sys.stderr)
    if failure is not None:
        return _index_failure(failure, ledger, specs)
    if code == 130:
        return _fail(f"interrupted; {counts['done']} of {len(specs)} runs are done and kept; "
                     "the same command resumes", 130)
    if not args.quiet:
        print(f"{out / 'sweep.json'}: {counts['done']} of {len(specs)} runs done, {counts['failed']} failed")
    return code or (1 if counts["failed"] or counts["pending"] else 0)
