"""``diffviz export-figure``: DAAM's word grid as an image file, for a paper. No browser, no torch.

    diffviz export-figure datasets/default --out grid.png
    diffviz export-figure RUN --words red,circle --steps 10:29 --layers 0,5,6 --grey --scale shared --out grid.png

Each panel is one prompt word's aggregated cross-attention map (DAAM: the mean over the chosen cross
layers, each resampled to the finest of their grids, then the mean over steps ``a..b`` inclusive),
upsampled bilinearly to the image, colour-mapped and alpha-blended over the run's final image (its
last x̂0 preview when it has none). The same numbers as the dashboard's aggregate view.

    from export.figure import aggregate, word_grid, render_grid
    render_grid(open_run("datasets/default"), words=["red", "blue"]).save("grid.png")
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis import maps as _maps
from export.contract import DatasetError
from export.words import Word, words as _words

MEAN_HEAD = "mean"
SCALES = ("per-map", "shared")
#: palette names -> bokeh.palettes attribute (256 colours each, low to high); the dashboard offers the same
PALETTES = {"inferno": "Inferno256", "viridis": "Viridis256", "magma": "Magma256", "plasma": "Plasma256",
            "cividis": "Cividis256", "turbo": "Turbo256", "greys": "Greys256"}
DEFAULT_ALPHA = 0.6
DEFAULT_COLS = 4
#: white space around and between panels, in pixels
GAP = 8
#: the command reads each map once, so its reader keeps only a small cache
CLI_CACHE_MB = 8
#: the longest panel side allowed (a mistyped --zoom must not exhaust memory)
MAX_PANEL = 8192
#: small images (the toy model's are 32 px) are enlarged by a whole factor until the longer side reaches this
MIN_PANEL = 256


# --------------------------------------------------------------------------- the numbers


def cross_layers(run: Any) -> list[int]:
    return [int(layer["index"]) for layer in run.layers if layer.get("cross_shape")]


def _check_layers(run: Any, layers: Sequence[int] | None) -> list[int]:
    available = cross_layers(run)
    if not available:
        raise DatasetError("this run has no cross-attention maps")
    if layers is None:
        return available
    chosen: list[int] = []
    for layer in layers:
        if isinstance(layer, bool) or int(layer) != layer or int(layer) not in available:
            raise DatasetError(f"layer {layer!r} has no cross-attention maps; this run's cross layers: "
                               + ", ".join(map(str, available)))
        if int(layer) not in chosen:
            chosen.append(int(layer))
    if not chosen:
        raise DatasetError("no layers given")
    return chosen


def _check_head(run: Any, head: str | int, layers: Sequence[int]) -> int | None:
    """None for the mean over heads, else the head index (checked against every chosen layer)."""
    if str(head) == MEAN_HEAD:
        return None
    try:
        k = int(str(head))
    except ValueError:
        raise DatasetError(f"head {head!r} is not a head number or {MEAN_HEAD!r}") from None
    if not run.per_head:
        raise DatasetError(f"head {k}: this run stores only the mean over heads; use --head {MEAN_HEAD}")
    for layer in layers:
        n = int(run.num_heads(layer) or 0)
        if not 0 <= k < n:
            raise DatasetError(f"head {k}: layer {layer} has {n} heads (0..{n - 1})")
    return k


def _check_steps(run: Any, first: int, last: int) -> tuple[int, int]:
    n = int(run.num_steps)
    if not (0 <= first < n and 0 <= last < n):
        raise DatasetError(f"steps {first}:{last}: this run has steps 0:{n - 1}")
    if first > last:
        raise DatasetError(f"steps {first}:{last}: the first step is after the last")
    return int(first), int(last)


def aggregate(run: Any, first: int, last: int, layers: Sequence[int] | None = None,
              head: str | int = MEAN_HEAD) -> np.ndarray:
    """Every stored token's DAAM map ``[T, h, w]`` over steps ``first..last`` (inclusive): per step the
    mean over ``layers`` (default: every cross layer) of their maps resampled to the finest of their
    grids, then the mean over steps. ``head`` is ``"mean"`` (over heads) or one head's index."""
    first, last = _check_steps(run, first, last)
    layers = _check_layers(run, layers)
    k = _check_head(run, head, layers)
    grid = _maps.finest(run.cross_grid(layer) for layer in layers)

    def step_mean(layer: int) -> np.ndarray:
        # resampling is linear, so averaging a layer's steps first gives the same mean with one resize per layer
        acc = None
        for step in range(first, last + 1):
            m = run.cross(layer, step) if k is None else run.cross_heads(layer, step)[k]
            acc = np.asarray(m, np.float64) if acc is None else acc + m
        return (acc / (last - first + 1)).astype(np.float32)

    return _maps.mean_at((step_mean(layer) for layer in layers), grid)


def run_words(run: Any) -> list[Word]:
    return _words(run.metadata["tokens"], run.metadata.get("words") or [])


def select_words(run: Any, names: Sequence[str] | None = None) -> list[Word]:
    """The words named (in the order given; a word the prompt repeats gives one entry per occurrence), or
    every content word. Names match exactly, else ignoring case."""
    every = run_words(run)
    if isinstance(names, str):
        names = [names]
    if names is None:
        chosen = [w for w in every if w.content]
        if not chosen:
            raise DatasetError("the prompt has no content words; name words with --words")
        return chosen
    chosen = []
    for name in names:
        name = str(name).strip()
        found = [w for w in every if w.label == name] or [w for w in every if w.label.lower() == name.lower()]
        if not found:
            known = list(dict.fromkeys(w.label for w in every))
            raise DatasetError(f"unknown word {name!r}; this run's words: {', '.join(known)}")
        chosen += [w for w in found if w not in chosen]
    if not chosen:
        raise DatasetError("no words given")
    return chosen


def word_grid(run: Any, words: Sequence[str] | None = None, steps: tuple[int, int] | None = None,
              layers: Sequence[int] | None = None, head: str | int = MEAN_HEAD) -> list[tuple[Word, np.ndarray]]:
    """``[(word, map [h, w])]``: each word's aggregated map (the sum of its sub-word rows) over ``steps``
    (inclusive ``(first, last)``, default the whole run). ``words`` by name, default every content word."""
    chosen = select_words(run, words)
    first, last = steps if steps is not None else (0, int(run.num_steps) - 1)
    stack = aggregate(run, first, last, layers, head)
    return [(w, _maps.word_map(stack, w.rows)) for w in chosen]


# --------------------------------------------------------------------------- the picture


def palette_lut(name: str = "inferno") -> np.ndarray:
    """``uint8 [256, 3]``, low to high, from ``bokeh.palettes``."""
    from bokeh import palettes

    key = PALETTES.get(str(name).lower())
    if key is None:
        raise DatasetError(f"unknown palette {name!r}; choose from {', '.join(PALETTES)}")
    colours = getattr(palettes, key)
    if key == "Greys256":
        colours = tuple(reversed(colours))  # as the dashboard: bokeh's greys run black to white, high attention is dark
    return np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in colours], dtype=np.uint8)


def base_image(run: Any) -> np.ndarray:
    """The image under the maps: ``images/final.png`` when the run has one, else the last step's x̂0 preview."""
    final = run.final_image()
    return final if final is not None else run.image(int(run.num_steps) - 1)


def auto_zoom(height: int, width: int) -> int:
    return max(1, math.ceil(MIN_PANEL / max(height, width, 1)))


def greyscale(image: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]``: the image's luma (PIL's ``L``: ITU-R 601-2), in three channels."""
    from PIL import Image

    luma = np.asarray(Image.fromarray(np.ascontiguousarray(image, np.uint8)).convert("L"))
    return np.repeat(luma[:, :, None], 3, axis=2)


def panel(image: np.ndarray, upsampled: np.ndarray, high: float, lut: np.ndarray, alpha: float) -> np.ndarray:
    """``uint8 [H, W, 3]``: ``upsampled`` (a map at the image's size) scaled by ``0..high``, looked up in
    ``lut`` the way Bokeh's linear colour mapper does (``floor(v * 256)``), and blended over ``image``."""
    v = np.clip(np.asarray(upsampled, np.float64) / high, 0.0, 1.0) if high > 0 else np.zeros(upsampled.shape)
    index = np.minimum((v * len(lut)).astype(np.intp), len(lut) - 1)
    out = (1.0 - alpha) * np.asarray(image, np.float64) + alpha * lut[index].astype(np.float64)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def caption_font(panel_width: int):
    from PIL import ImageFont

    size = max(12, min(32, panel_width // 16))
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def caption_height(panel_width: int) -> int:
    """The band above each panel that holds its word."""
    font = caption_font(panel_width)
    return int(getattr(font, "size", 11)) + 8


def grid_layout(n: int, cols: int, panel_hw: tuple[int, int]) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """``((width, height), [(x, y) of each panel's top-left])`` for ``n`` panels in ``cols`` columns,
    each with its caption band above it."""
    ph, pw = panel_hw
    cap = caption_height(pw)
    rows = math.ceil(n / cols)
    size = (cols * pw + (cols + 1) * GAP, rows * (cap + ph) + (rows + 1) * GAP)
    boxes = [(GAP + (i % cols) * (pw + GAP), GAP + (i // cols) * (cap + ph + GAP) + cap) for i in range(n)]
    return size, boxes


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def captions(chosen: Sequence[Word]) -> list[str]:
    """Each word's label; a word the prompt repeats gets ``(2)``, ``(3)`` … on its later occurrences."""
    seen: dict[str, int] = {}
    out = []
    for w in chosen:
        seen[w.label] = seen.get(w.label, 0) + 1
        out.append(w.label if seen[w.label] == 1 else f"{w.label} ({seen[w.label]})")
    return out


def render_grid(run: Any, words: Sequence[str] | None = None, steps: tuple[int, int] | None = None,
                layers: Sequence[int] | None = None, head: str | int = MEAN_HEAD, *, grey: bool = False,
                scale: str = "per-map", cols: int | None = None, palette: str = "inferno",
                alpha: float = DEFAULT_ALPHA, zoom: int | None = None):
    """The word grid as a ``PIL.Image`` (RGB): one panel per word, its caption above it.

    A panel is the image enlarged ``zoom`` times (nearest: whole pixels; default: enough for
    :data:`MIN_PANEL`), with the word's map resampled bilinearly to that size over it. ``scale``
    ``"per-map"`` scales each map to its own maximum, ``"shared"`` all maps to the largest. ``grey``
    puts the image's luma under the maps, so a colour map never blends into a coloured image."""
    from PIL import Image, ImageDraw

    if scale not in SCALES:
        raise DatasetError(f"scale {scale!r}: choose from {', '.join(SCALES)}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise DatasetError(f"alpha {alpha}: must be between 0 and 1")
    lut = palette_lut(palette)
    grid = word_grid(run, words, steps, layers, head)
    n = len(grid)
    cols = min(n, DEFAULT_COLS) if cols is None else int(cols)
    if cols < 1:
        raise DatasetError(f"cols {cols}: must be at least 1")
    cols = min(cols, n)
    image = base_image(run)
    if grey:
        image = greyscale(image)
    height, width = image.shape[:2]
    zoom = auto_zoom(height, width) if zoom is None else int(zoom)
    if not 1 <= zoom * max(height, width) <= MAX_PANEL:
        raise DatasetError(f"zoom {zoom}: panels must be 1 to {MAX_PANEL} px wide; this image is {width}x{height}")
    ph, pw = height * zoom, width * zoom
    under = np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1)
    upsampled = [_maps.resize(m, ph, pw) for _, m in grid]
    shared_high = max(float(u.max()) for u in upsampled)
    (fw, fh), boxes = grid_layout(n, cols, (ph, pw))
    out = Image.new("RGB", (fw, fh), "white")
    draw = ImageDraw.Draw(out)
    font = caption_font(pw)
    cap = caption_height(pw)
    _, top, _, bottom = draw.textbbox((0, 0), "Hg", font=font)  # one baseline for every caption
    for (x, y), u, label in zip(boxes, upsampled, captions([w for w, _ in grid])):
        high = shared_high if scale == "shared" else float(u.max())
        out.paste(Image.fromarray(panel(under, u, high, lut, float(alpha))), (x, y))
        text = _fit(draw, label, font, pw)
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((x + (pw - (right - left)) / 2 - left, y - cap + (cap - (bottom - top)) / 2 - top), text,
                  fill="black", font=font)
    first, last = steps if steps is not None else (0, int(run.num_steps) - 1)
    out.info["diffviz"] = json.dumps({
        "prompt": str(run.metadata.get("run", {}).get("prompt", "")), "words": [w.label for w, _ in grid],
        "steps": [first, last], "layers": _check_layers(run, layers), "head": str(head), "scale": scale,
        "grey": bool(grey), "palette": palette, "alpha": float(alpha)})
    return out


# --------------------------------------------------------------------------- the command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def parse_steps(text: str) -> tuple[int, int]:
    """``"a:b"`` (inclusive) or ``"a"`` (one step) as ``(a, b)``."""
    parts = str(text).split(":")
    try:
        if len(parts) == 1:
            first = last = int(parts[0])
        elif len(parts) == 2:
            first, last = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise DatasetError(f"--steps {text!r}: expected FIRST:LAST, two step numbers (inclusive), or one step") from None
    return first, last


def parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise DatasetError(f"--layers {text!r}: expected layer numbers separated by commas, e.g. 0,3,5") from None


def parse_words(text: str) -> list[str]:
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise DatasetError(f"--words {text!r}: expected words separated by commas, e.g. red,circle")
    return names


def _save(image, out: Path) -> None:
    """Write ``image`` to a temporary file beside ``out``, then rename it: a failure never touches ``out``."""
    from PIL import Image, PngImagePlugin

    fmt = Image.registered_extensions().get(out.suffix.lower())
    options: dict[str, Any] = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("diffviz", image.info.get("diffviz", ""))
        options["pnginfo"] = info
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format=fmt, **options)
        os.chmod(tmp, _file_mode(out))  # mkstemp's 0600 would outlive the rename
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _file_mode(out: Path) -> int:
    """The permissions a plain ``open(out, "w")`` would give: the old file's, else 0666 less the umask."""
    try:
        return out.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _check_out(out: Path) -> None:
    from PIL import Image

    if out.is_dir():
        raise DatasetError(f"--out {out}: is a folder; give a file name such as grid.png")
    if not out.parent.is_dir():
        raise DatasetError(f"--out {out}: no such folder {out.parent}")
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise DatasetError(f"--out {out}: unknown image type {out.suffix or '(none)'!r}; use .png (or .pdf, .jpg)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="diffviz export-figure",
        description="Write DAAM's word grid for a run: each prompt word's cross-attention map, averaged over "
                    "layers and steps, over the run's final image. Needs no browser and no torch.")
    parser.add_argument("run", help="the run folder (or URL)")
    parser.add_argument("--words", help="words to show, in this order, separated by commas (default: every content "
                                        "word of the prompt, i.e. not <start>/<end> and not a function word)")
    parser.add_argument("--steps", help="steps FIRST:LAST to average, inclusive and counted from 0, e.g. 10:29; "
                                        "or one step N (default: every step)")
    parser.add_argument("--layers", help="cross-attention layer indices to average, separated by commas "
                                         "(default: every cross layer)")
    parser.add_argument("--head", default=MEAN_HEAD, help="'mean' (over heads, the default) or one head's index "
                                                          "(runs stored per head)")
    parser.add_argument("--grey", action="store_true", help="put the image in greyscale under the maps")
    parser.add_argument("--scale", choices=SCALES, default="per-map",
                        help="per-map: each map scaled to its own maximum (default); shared: one scale for all")
    parser.add_argument("--cols", type=int, help=f"panels per row (default: up to {DEFAULT_COLS})")
    parser.add_argument("--palette", choices=list(PALETTES), default="inferno", help="colour map (default: inferno)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"opacity of the map over the image, 0..1 (default: {DEFAULT_ALPHA})")
    parser.add_argument("--zoom", type=int, help="enlarge the image this many times (whole pixels; default: "
                                                 f"enough for panels of at least {MIN_PANEL} px)")
    parser.add_argument("--out", required=True, help="the image file to write (.png; .pdf and .jpg work too)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        _check_out(out)
        from export.reader import open_run

        steps = parse_steps(args.steps) if args.steps is not None else None
        layers = parse_layers(args.layers) if args.layers is not None else None
        names = parse_words(args.words) if args.words is not None else None
        run = open_run(args.run, cache_mb=CLI_CACHE_MB)
        image = render_grid(run, names, steps, layers, args.head, grey=args.grey, scale=args.scale,
                            cols=args.cols, palette=args.palette, alpha=args.alpha, zoom=args.zoom)
        _save(image, out)
    except (DatasetError, ValueError, OSError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in text:
            text = f"{exc.filename}: {text}"
        print(f"{parser.prog}: error: {text}", file=sys.stderr)
        return 2
    shown = json.loads(image.info["diffviz"])
    n = len(shown["words"])
    head = "mean of heads" if str(args.head) == MEAN_HEAD else f"head {args.head}"
    print(f"wrote {out}: {n} word{'' if n == 1 else 's'} ({', '.join(shown['words'])}), "
          f"steps {shown['steps'][0]}:{shown['steps'][1]}, {len(shown['layers'])} layers, {head}, "
          f"{image.width}x{image.height} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
