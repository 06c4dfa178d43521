"""The toy world: seeded synthetic scenes, their captions and their ground truth.

A scene is one to three objects (circle, square, triangle) in pure colours (red,
green, blue, yellow) on a plain white 32×32 background. Objects never overlap and
never share a colour, so every object's mask is also "the pixels of its colour" —
which is what lets the evaluation segment *generated* images by colour alone.

Captions come from a small grammar::

    caption := phrase ( "and" phrase )*          (objects in random order)
    phrase  := "a" [size] colour shape [ "on the" side ]
    size    := "small" | "big"                   (only when true)
    side    := "left" | "right" | "top" | "bottom"   (only when true)

Everything is numpy and vectorised over a batch, so training can draw fresh
scenes every step. The same ``seed`` always gives the same scenes, images,
masks and captions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

IMAGE_SIZE = 32
MAX_OBJECTS = 3
#: Words a caption may have at most (the 16-token context less BOS and EOS).
MAX_WORDS = 14

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIDES: tuple[str, ...] = ("left", "right", "top", "bottom")
SIZE_WORDS: tuple[str, ...] = ("small", "big")
FUNCTION_WORDS: tuple[str, ...] = ("a", "and", "on", "the")
BACKGROUND = (255, 255, 255)

#: Every word the caption grammar can produce, in the order the shipped tokenizer numbers them
#: (``architecture.build_tokenizer`` makes one token per word): the toy model knows these and no others.
VOCABULARY: tuple[str, ...] = FUNCTION_WORDS + SIDES + SIZE_WORDS + COLOUR_NAMES + SHAPES

#: Object extent (pixels, both axes) is drawn from [MIN_SIZE, MAX_SIZE].
MIN_SIZE, MAX_SIZE = 8, 14
SMALL_MAX, BIG_MIN = 9, 13
#: A side word is true when the object's centre is this far from the middle.
SIDE_MARGIN = 5.0
#: Bounding boxes of two objects keep at least this many pixels between them.
GAP = 2

#: Roles of an object's words in a caption (the last axis of ``Batch.roles``).
ROLE_NAMES: tuple[str, ...] = ("colour", "shape", "size", "side")


@dataclass
class Scenes:
    """A batch of scenes; object slots past ``count`` hold -1."""

    count: np.ndarray   # [n] int, 1..3
    colour: np.ndarray  # [n, 3] int index into COLOUR_NAMES
    shape: np.ndarray   # [n, 3] int index into SHAPES
    size: np.ndarray    # [n, 3] int extent in pixels
    x0: np.ndarray      # [n, 3] int left edge
    y0: np.ndarray      # [n, 3] int top edge

    def __len__(self) -> int:
        return int(self.count.shape[0])

    def centre(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x0 + self.size / 2.0, self.y0 + self.size / 2.0


@dataclass
class Batch:
    """What training (and tests) need from one draw of the world."""

    scenes: Scenes
    images: np.ndarray   # [n, 32, 32, 3] uint8
    masks: np.ndarray    # [n, 3, 32, 32] bool, one per object slot
    captions: list[str]
    words: list[list[str]]
    roles: np.ndarray    # [n, 3, 4] int word index (0-based, BOS not counted) of each role, -1 if absent


def sample_scenes(rng: np.random.Generator, n: int, counts: Sequence[float] = (0.25, 0.5, 0.25),
                  *, min_count: int = 1, candidates: int = 32) -> Scenes:
    """Draw ``n`` scenes: object count by ``counts`` (probabilities of 1, 2, 3), distinct colours, no overlap.

    Placement is vectorised rejection sampling: ``candidates`` layouts per scene, the first
    one whose boxes keep ``GAP`` pixels apart wins (a per-scene loop catches the rare miss).
    """
    probs = np.asarray(counts, dtype=float)
    probs = probs / probs.sum()
    count = np.maximum(rng.choice(np.arange(1, MAX_OBJECTS + 1), size=n, p=probs), min_count)
    present = np.arange(MAX_OBJECTS)[None, :] < count[:, None]
    colour = np.argsort(rng.random((n, len(COLOURS))), axis=1)[:, :MAX_OBJECTS]
    shape = rng.integers(0, len(SHAPES), size=(n, MAX_OBJECTS))
    s = rng.integers(MIN_SIZE, MAX_SIZE + 1, size=(n, candidates, MAX_OBJECTS))
    xs = rng.integers(1, IMAGE_SIZE - s)
    ys = rng.integers(1, IMAGE_SIZE - s)
    ok = np.ones((n, candidates), dtype=bool)
    for a in range(MAX_OBJECTS):
        for b in range(a):
            apart = ((xs[..., a] >= xs[..., b] + s[..., b] + GAP) | (xs[..., b] >= xs[..., a] + s[..., a] + GAP)
                     | (ys[..., a] >= ys[..., b] + s[..., b] + GAP) | (ys[..., b] >= ys[..., a] + s[..., a] + GAP))
            ok &= apart | ~present[:, a, None]
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    size, x0, y0 = s[rows, first].copy(), xs[rows, first].copy(), ys[rows, first].copy()
    for i in np.flatnonzero(~ok.any(axis=1)):
        _place(rng, int(count[i]), size[i], x0[i], y0[i])
    for arr in (colour, shape, size, x0, y0):
        arr[~present] = -1
    return Scenes(count=count, colour=colour.astype(np.int64), shape=shape.astype(np.int64),
                  size=size.astype(np.int64), x0=x0.astype(np.int64), y0=y0.astype(np.int64))


def _place(rng: np.random.Generator, k: int, size: np.ndarray, x0: np.ndarray, y0: np.ndarray) -> None:
    """Place ``k`` boxes one scene at a time (the fallback; shrinks them if the image is crowded)."""
    for attempt in range(1000):
        s = rng.integers(MIN_SIZE, MAX_SIZE + 1, size=k)
        if attempt > 100:
            s = np.minimum(s, MIN_SIZE + 2)
        xs, ys = rng.integers(1, IMAGE_SIZE - s), rng.integers(1, IMAGE_SIZE - s)
        if all(xs[a] >= xs[b] + s[b] + GAP or xs[b] >= xs[a] + s[a] + GAP
               or ys[a] >= ys[b] + s[b] + GAP or ys[b] >= ys[a] + s[a] + GAP
               for a in range(k) for b in range(a)):
            size[:k], x0[:k], y0[:k] = s, xs, ys
            return
    raise RuntimeError("could not place objects")  # pragma: no cover - never seen at 32x32


def render(scenes: Scenes) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, 32, 32, 3] uint8 and masks [n, 3, 32, 32] bool (empty for absent slots)."""
    n = len(scenes)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + np.float32(0.5)  # pixel centres
    s = scenes.size[..., None, None].astype(np.float32)
    x0 = scenes.x0[..., None, None].astype(np.float32)
    y0 = scenes.y0[..., None, None].astype(np.float32)
    cx, cy, half = x0 + s / 2.0, y0 + s / 2.0, s / 2.0
    inside_box = (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
    circle = (xx - cx) ** 2 + (yy - cy) ** 2 <= half ** 2
    triangle = inside_box & (np.abs(xx - cx) <= (yy - y0) / s * half)
    shape = scenes.shape[..., None, None]
    masks = np.where(shape == 0, circle, np.where(shape == 1, inside_box, triangle))
    masks &= (scenes.colour >= 0)[..., None, None]
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images[...] = np.asarray(BACKGROUND, dtype=np.uint8)
    palette = np.asarray([COLOURS[c] for c in COLOUR_NAMES], dtype=np.uint8)
    for slot in range(MAX_OBJECTS):
        rgb = palette[np.clip(scenes.colour[:, slot], 0, None)][:, None, None, :]
        images = np.where(masks[:, slot, :, :, None], rgb, images)
    return images, masks


def true_sides(scenes: Scenes) -> np.ndarray:
    """[n, 3, 4] bool: which side words are true for each object (left, right, top, bottom)."""
    cx, cy = scenes.centre()
    mid = IMAGE_SIZE / 2.0
    return np.stack([cx < mid - SIDE_MARGIN, cx > mid + SIDE_MARGIN, cy < mid - SIDE_MARGIN, cy > mid + SIDE_MARGIN], axis=-1)


def describe(scenes: Scenes, rng: np.random.Generator, *, p_size: float = 0.3, p_side: float = 0.3,
             shuffle: bool = True) -> tuple[list[list[str]], np.ndarray]:
    """Captions as word lists, and each object's role positions [n, 3, 4] (word index, -1 if absent)."""
    n = len(scenes)
    sides = true_sides(scenes)
    roles = np.full((n, MAX_OBJECTS, len(ROLE_NAMES)), -1, dtype=np.int64)
    out: list[list[str]] = []
    for i in range(n):
        k = int(scenes.count[i])
        order = rng.permutation(k) if shuffle else np.arange(k)
        phrases: list[tuple[int, list[tuple[str, int]]]] = []
        for slot in order:
            slot = int(slot)
            phrase: list[tuple[str, int]] = [("a", -1)]
            size = int(scenes.size[i, slot])
            size_word = SIZE_WORDS[0] if size <= SMALL_MAX else SIZE_WORDS[1] if size >= BIG_MIN else None
            if size_word and rng.random() < p_size:
                phrase.append((size_word, 2))
            phrase.append((COLOUR_NAMES[scenes.colour[i, slot]], 0))
            phrase.append((SHAPES[scenes.shape[i, slot]], 1))
            true = np.flatnonzero(sides[i, slot])
            if true.size and rng.random() < p_side:
                phrase += [("on", -1), ("the", -1), (SIDES[int(rng.choice(true))], 3)]
            phrases.append((slot, phrase))
        # Drop qualifiers (last phrase first) until the caption fits the context.
        while sum(len(p) for _, p in phrases) + len(phrases) - 1 > MAX_WORDS:
            for _, p in reversed(phrases):
                if any(role >= 2 for _, role in p):
                    if p[-1][1] == 3:
                        del p[-3:]
                    else:
                        del p[1]
                    break
        words: list[str] = []
        for j, (slot, phrase) in enumerate(phrases):
            if j:
                words.append("and")
            for word, role in phrase:
                if role >= 0:
                    roles[i, slot, role] = len(words)
                words.append(word)
        out.append(words)
    return out, roles


def make_batch(rng: np.random.Generator, n: int, counts: Sequence[float] = (0.25, 0.5, 0.25), **describe_kw) -> Batch:
    """Scenes, images, masks and captions for one training step."""
    scenes = sample_scenes(rng, n, counts)
    images, masks = render(scenes)
    words, roles = describe(scenes, rng, **describe_kw)
    return Batch(scenes=scenes, images=images, masks=masks, captions=[" ".join(w) for w in words], words=words, roles=roles)


def encode_words(words: Sequence[Sequence[str]], word_ids: Mapping[str, int], bos: int, eos: int,
                 length: int) -> np.ndarray:
    """Token ids [n, length] exactly as the pipeline's tokenizer pads them: BOS, words, EOS, EOS…"""
    ids = np.full((len(words), length), eos, dtype=np.int64)
    ids[:, 0] = bos
    for i, ws in enumerate(words):
        if len(ws) > length - 2:
            raise ValueError(f"caption of {len(ws)} words does not fit {length} tokens")
        ids[i, 1:1 + len(ws)] = [word_ids[w] for w in ws]
    return ids


# --- evaluation prompts and segmentation ------------------------------------------------------

def two_object_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` two-object prompts, two different colours and two different shapes.

    They cycle through all 36 (colour, shape) pairings in both orders, shuffled by ``seed``;
    each entry is ``{"prompt", "objects": [(colour, shape), (colour, shape)]}``.
    """
    combos = []
    for c1 in range(len(COLOURS)):
        for s1 in range(len(SHAPES)):
            for c2 in range(len(COLOURS)):
                for s2 in range(len(SHAPES)):
                    if c1 != c2 and s1 != s2:
                        combos.append(((COLOUR_NAMES[c1], SHAPES[s1]), (COLOUR_NAMES[c2], SHAPES[s2])))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    out = []
    for j in range(n):
        a, b = combos[int(order[j % len(combos)])]
        out.append({"prompt": f"a {a[0]} {a[1]} and a {b[0]} {b[1]}", "objects": [a, b]})
    return out


#: A pixel belongs to a colour when it is within this RGB distance of the pure colour.
COLOUR_TOLERANCE = 110.0
#: Smallest segment (pixels) that counts as an object.
MIN_OBJECT_PIXELS = 12


def colour_labels(image: np.ndarray, tolerance: float = COLOUR_TOLERANCE) -> np.ndarray:
    """[H, W] int: 0 background, k = 1 + index into COLOUR_NAMES, -1 for pixels near no pure colour."""
    img = np.asarray(image, dtype=np.float64)
    palette = np.asarray([BACKGROUND] + [COLOURS[c] for c in COLOUR_NAMES], dtype=np.float64)
    dist = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)
    label = dist.argmin(-1)
    label[dist.min(-1) > tolerance] = -1
    return label


def colour_regions(image: np.ndarray, tolerance: float = COLOUR_TOLERANCE) -> dict[str, list[np.ndarray]]:
    """Per colour found, its 4-connected regions of at least MIN_OBJECT_PIXELS, largest first."""
    label = colour_labels(image, tolerance)
    out = {}
    for k, name in enumerate(COLOUR_NAMES, start=1):
        regions = [r for r in _components(label == k) if r.sum() >= MIN_OBJECT_PIXELS]
        if regions:
            out[name] = regions
    return out


def segment(image: np.ndarray, tolerance: float = COLOUR_TOLERANCE) -> dict[str, np.ndarray]:
    """Per colour name, the bool mask [H, W] of its largest 4-connected region (colours found only)."""
    return {name: regions[0] for name, regions in colour_regions(image, tolerance).items()}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a bool mask, largest first (numpy flood fill; images are 32×32)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack = [(y0, x0)]
        seen[y0, x0] = True
        ys, xs = [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        comp = np.zeros_like(mask, dtype=bool)
        comp[ys, xs] = True
        comps.append(comp)
    comps.sort(key=lambda c: -int(c.sum()))
    return comps


#: Fill ratio (area / bounding-box area) splits: triangle ≈ 0.5, circle ≈ π/4 ≈ 0.79, square = 1.
TRIANGLE_BELOW, SQUARE_ABOVE = 0.65, 0.9


def classify_shape(mask: np.ndarray) -> str | None:
    """circle, square or triangle from a region's fill ratio; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = ys.size / box
    if fill < TRIANGLE_BELOW:
        return "triangle"
    return "square" if fill > SQUARE_ABOVE else "circle"
