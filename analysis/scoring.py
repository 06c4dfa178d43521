"""Scoring attention maps against object masks, and the DAAM aggregate they are scored on.

Plain numpy (it runs in the Pyodide worker too). A *stack* is ``[T, h, w]``: one map per token row,
at any grid; masks are bool ``[H, W]`` at the image's size.

* :func:`upsample` — bilinear with half-pixel centres, the same numbers as torch's
  ``F.interpolate(mode="bilinear", align_corners=False)`` (edges clamped, no antialiasing).
* :func:`daam` — DAAM's aggregate: every stack (each layer at each step) upsampled *straight* to
  the image size in one bilinear step, then summed (or averaged). Stacks that share a grid are summed
  before they are upsampled, which gives the same numbers because upsampling is linear.
* Per word map: **pointing** (is the map's maximum inside the word's own mask?), **IoU** (the map
  normalised by its maximum and thresholded at ``tau``, DAAM's 0.4, against the own mask) and
  **own vs other** (the map's mass on its own mask out of the mass on its own and the other object's
  mask; 0.5 is chance). A word with no other object to lose to (a shape word whose shape both objects
  share owns both masks) gets no own-vs-other score.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from .maps import resize

TAU = 0.4
TOKEN_KINDS = ("colour", "shape")


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[..., h, w]`` -> ``[..., height, width]`` float32, bilinear with half-pixel centres (torch's
    ``align_corners=False``); a copy when the size is unchanged."""
    if height < 1 or width < 1:
        raise ValueError(f"upsample: target size must be positive, got {height}x{width}")
    return resize(maps, int(height), int(width))


def daam(stacks: Iterable[np.ndarray], height: int, width: int, *, mean: bool = False) -> np.ndarray:
    """The DAAM aggregate of ``stacks`` (``[..., h, w]`` maps of any grids, one per layer and step): each
    upsampled straight to ``(height, width)`` and summed, or averaged with ``mean``."""
    by_grid: dict[tuple[int, ...], np.ndarray] = {}
    n = 0
    lead = None
    for stack in stacks:
        s = np.asarray(stack, np.float64)
        if s.ndim < 2:
            raise ValueError(f"daam: a map must have at least 2 dimensions, got shape {s.shape}")
        if lead is None:
            lead = s.shape[:-2]
        elif s.shape[:-2] != lead:
            raise ValueError(f"daam: every map needs the leading shape {lead}, got {s.shape[:-2]}")
        key = s.shape[-2:]
        by_grid[key] = by_grid[key] + s if key in by_grid else s.copy()
        n += 1
    if not n:
        raise ValueError("daam: no maps to aggregate")
    out = np.zeros(lead + (int(height), int(width)), np.float64)
    for acc in by_grid.values():
        out += upsample(acc.astype(np.float32), height, width)
    return (out / n if mean else out).astype(np.float32)


# --- per-map scores ---------------------------------------------------------------------------

def pointing(amap: np.ndarray, own: np.ndarray) -> float:
    """1.0 when the map's (first) maximum lies inside ``own``; 0.0 otherwise, and for an all-zero map."""
    amap = np.asarray(amap)
    if not float(amap.max()) > 0:
        return 0.0
    return float(bool(np.asarray(own).flat[int(np.argmax(amap))]))


def region(amap: np.ndarray, tau: float = TAU) -> np.ndarray:
    """The map's region: cells with ``map >= tau * max(map)`` (empty for an all-zero map)."""
    amap = np.asarray(amap)
    peak = float(amap.max())
    return amap >= tau * peak if peak > 0 else np.zeros(amap.shape, bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (0.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 0.0


def own_vs_other(amap: np.ndarray, own: np.ndarray, other: np.ndarray) -> float:
    """The map's mass on ``own`` out of its mass on ``own`` and ``other`` (0.5 when both are zero)."""
    amap = np.asarray(amap, np.float64)
    m_own, m_other = float(amap[np.asarray(own, bool)].sum()), float(amap[np.asarray(other, bool)].sum())
    return m_own / (m_own + m_other) if m_own + m_other > 0 else 0.5


def token_scores(amap: np.ndarray, own: np.ndarray, other: np.ndarray | None, tau: float = TAU) -> dict:
    """Pointing, IoU at ``tau`` and own-vs-other (None without an ``other`` mask) of one map ``[H, W]``."""
    amap = np.asarray(amap)
    if amap.shape != np.shape(own) or (other is not None and amap.shape != np.shape(other)):
        raise ValueError(f"token_scores: map {amap.shape} and masks {np.shape(own)} differ in shape")
    return {"pointing": pointing(amap, own), "iou": iou(region(amap, tau), own),
            "own_vs_other": None if other is None else own_vs_other(amap, own, other)}


# --- words of a prompt, and whole views ---------------------------------------------------------

def word(kind: str, rows: Sequence[int], own: np.ndarray, other: np.ndarray | None) -> dict:
    """One scorable word: its token ``rows`` of a stack (their maps are summed), its own and other masks."""
    rows = [int(r) for r in rows]
    if not rows:
        raise ValueError(f"word ({kind}): no token rows")
    return {"kind": kind, "rows": rows, "own": np.asarray(own, bool),
            "other": None if other is None else np.asarray(other, bool)}


def score_words(stack: np.ndarray, words: Sequence[Mapping], tau: float = TAU) -> list[dict]:
    """Every word's scores (``token_scores`` plus its ``kind``) on one stack ``[T, H, W]``."""
    stack = np.asarray(stack)
    out = []
    for w in words:
        if max(w["rows"]) >= stack.shape[0] or min(w["rows"]) < 0:
            raise ValueError(f"word rows {w['rows']} are outside a stack of {stack.shape[0]} rows")
        amap = stack[w["rows"]].sum(axis=0)
        out.append({"kind": w["kind"], **token_scores(amap, w["own"], w["other"], tau)})
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(scores: Iterable[Mapping], kinds: Sequence[str] = TOKEN_KINDS) -> dict:
    """Per kind: mean ``pointing``, ``miou`` and ``own_vs_other`` (None when nothing was scored), ``n``
    words scored and ``n_own`` of them with an own-vs-other score."""
    scores = list(scores)
    out = {}
    for kind in kinds:
        mine = [s for s in scores if s["kind"] == kind]
        own = [s["own_vs_other"] for s in mine if s["own_vs_other"] is not None]
        out[kind] = {"pointing": _mean([s["pointing"] for s in mine]), "miou": _mean([s["iou"] for s in mine]),
                     "own_vs_other": _mean(own), "n": len(mine), "n_own": len(own)}
    return out


def score_view(maps, items: Sequence[Mapping], tau: float = TAU, kinds: Sequence[str] = TOKEN_KINDS) -> dict:
    """``summarise`` over ``items`` (``{"index": i, "words": [word(...), ...]}``), each scored on ``maps[i]``
    (``[T, H, W]``; ``maps`` an array ``[N, T, H, W]`` or a list of stacks)."""
    return summarise((s for it in items for s in score_words(maps[it["index"]], it["words"], tau)), kinds)
