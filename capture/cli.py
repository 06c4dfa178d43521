"""``diffviz generate``: record a diffusion run into a dataset folder.

Bad input gets one line on stderr and exit code 2, before anything is written; a failure during the
run gets one line and exit code 1; Ctrl-C exits 130. In every case an existing run is left as it was.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from capture.config import GenerateConfig, split_patterns

PROG = "diffviz generate"
EXAMPLE = ('example: diffviz generate --prompt "a red circle on the left" --num-steps 30 '
           '--attention-resolution 32 --self-attention-resolution 16 --max-layers 12 --output-dir datasets/my_run')


class UsageError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``PROG: error: …``), for every capture command."""

    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def fail(prog: str, message: object, code: int) -> int:
    """Print ``PROG: error: MESSAGE`` on one line and return the exit code."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code: 2 after a one-line usage error, 0 after --help."""
    try:
        return parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        return fail(parser.prog, exc, 2)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


def build_parser() -> argparse.ArgumentParser:
    d = GenerateConfig(prompt="")
    from capture.families import REGISTRY

    supported = ", ".join(f"{cls} ({module})" for cls, module in REGISTRY.items())
    p = OneLineParser(prog=PROG, description="Record what a diffusion pipeline does at every denoising step. "
                                             f"Pipeline classes (model_index.json's _class_name): {supported}.",
                      epilog=EXAMPLE)
    onoff = argparse.BooleanOptionalAction
    from capture.toyworld.world import VOCABULARY

    p.add_argument("--prompt", required=True, help="the text prompt (required); the embedded toy model knows only "
                                                   f"these words: {', '.join(VOCABULARY)}")
    p.add_argument("--negative-prompt", default=d.negative_prompt,
                   help="negative prompt (default: none; the toy model's words only)")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="classifier-free guidance scale (default %(default)s)")
    p.add_argument("--num-steps", type=int, default=d.num_steps, help="denoising steps, 1..1000 (default %(default)s)")
    p.add_argument("--layers", action="append", default=[], metavar="GLOB",
                   help="layers to record: glob patterns over layer names (down_blocks.0.attentions.0."
                        "transformer_blocks.0) or processor names (...attn2.processor); repeatable or "
                        "comma-separated (default: all)")
    p.add_argument("--max-layers", type=int, default=d.max_layers,
                   help="record at most this many layers, evenly spaced down..mid..up (default: no cap)")
    p.add_argument("--include-cross-attention", action=onoff, default=d.include_cross_attention,
                   help="record cross-attention maps (default: on)")
    p.add_argument("--include-self-attention", action=onoff, default=d.include_self_attention,
                   help="record self-attention maps (default: on)")
    p.add_argument("--attention-resolution", type=int, default=d.attention_resolution,
                   help="cross maps are pooled down, never up, by one integer factor on both sides, "
                        "until the long side is <= R (default %(default)s)")
    p.add_argument("--self-attention-resolution", type=int, default=d.self_attention_resolution,
                   help="self maps are pooled the same way to a grid whose long side is <= S "
                        "(default %(default)s)")
    p.add_argument("--save-latents-noise", action=onoff, default=d.save_latents_noise,
                   help="save latents and predicted noise per step as float16 npz (default: on)")
    p.add_argument("--overwrite-output", action="store_true", help="replace an existing run (only once the new one is complete)")
    p.add_argument("--max-dataset-mb", type=float, default=d.max_dataset_mb,
                   help="warn when the projected size is over this (default %(default)s)")
    p.add_argument("--enforce-size-limit", action="store_true",
                   help="fail instead of warning: before generating, and again at the end")
    p.add_argument("--fail-on-shape-error", action="store_true",
                   help="fail when an attention map does not fit its planned shape (default: warn and skip)")
    p.add_argument("--device", default=d.device, choices=["auto", "cuda", "cpu", "mps"], help="(default %(default)s)")
    p.add_argument("--output-dir", default=d.output_dir, help="the run folder to write (default %(default)s)")
    p.add_argument("--model", default=None, help="a diffusers pipeline folder (offline) or hub id of one of the pipeline "
                                                 "classes above (default: the embedded toy model)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default %(default)s)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="(default: float32 on CPU/MPS, float16 on CUDA)")
    p.add_argument("--per-head", action="store_true",
                   help="keep every head's cross maps ([heads, T, h, w]) instead of their mean")
    p.add_argument("--concept-maps", action="store_true",
                   help="MM-DiT models (SD3, Flux): also store output-space concept maps (ConceptAttention-style)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    values = {name: getattr(args, name) for name in GenerateConfig.field_names()}
    values["layers"] = split_patterns(values["layers"])
    return GenerateConfig(**values)


def _fail(message: object, code: int) -> int:
    return fail(PROG, message, code)


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    from capture.config import ConfigError

    try:
        config = config_from_args(args).validate()
        config.check_paths()
    except ConfigError as exc:
        return _fail(exc, 2)

    # The heavy imports (torch, diffusers) only once the arguments are known to be sane.
    from capture import run
    from capture.pipeline import ModelLoadError
    from capture.progress import Cancelled, TqdmProgress
    from capture.recorder import LayerSelectionError, ShapeMismatchError
    from export.contract import DatasetError

    bar = TqdmProgress(disable=args.quiet)
    started = []

    def progress(event):
        started.append(event.stage)
        bar(event)

    def show(message, category, filename, lineno, file=None, line=None):
        bar.close()
        print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    usage_errors = (ConfigError, LayerSelectionError, ModelLoadError, run.SizeLimitError, ShapeMismatchError)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # a library's own deprecation notices (diffusers' DPM-Solver on numpy 2) are not the user's to act on
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = show
        try:
            path = run.generate(config, progress=progress, prepared=run.prepare(config))
        except KeyboardInterrupt:
            bar.close()
            return _fail("interrupted; nothing was written and any existing run is unchanged", 130)
        except Cancelled as exc:
            bar.close()
            return _fail(exc, 130)
        except usage_errors as exc:
            bar.close()
            return _fail(exc, 1 if "denoising" in started else 2)
        except DatasetError as exc:
            bar.close()
            return _fail(exc, 1 if "denoising" in started else 2)
        except Exception as exc:  # noqa: BLE001 - one line, no traceback; the old run is intact
            bar.close()
            return _fail(f"{type(exc).__name__}: {exc}", 1)
        finally:
            bar.close()
    if not args.quiet:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
