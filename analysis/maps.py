"""Map arithmetic shared by the dashboard's store, ``diffviz export-figure`` and the toy-world evaluation.

Plain numpy (it runs in the Pyodide worker too). Grids are ``(h, w)`` pairs: schema-2 maps may be
non-square. A *stack* is ``[T, h, w]``: one map per prompt token.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import numpy as np


@functools.lru_cache(maxsize=64)
def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of 1-D linear interpolation with pixel-centre alignment (edges clamped)."""
    pos = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    w = np.zeros((n_out, n_in), np.float64)
    np.add.at(w, (np.arange(n_out), lo), 1 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    w = w.astype(np.float32)
    w.flags.writeable = False  # shared through the cache
    return w


def resize(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resampling of ``[..., H, W]`` with pixel-centre alignment: PIL's bilinear resize when
    upsampling (no corner pinning). An exact copy when the size is unchanged."""
    m = np.asarray(m, dtype=np.float32)
    h, w = m.shape[-2:]
    if (h, w) == (height, width):
        return m.copy()
    return (interpolation_matrix(h, height) @ m @ interpolation_matrix(w, width).T).astype(np.float32, copy=False)


def finest(grids: Iterable[Sequence[int]]) -> tuple[int, int]:
    """The grid with the most cells (ties: the first), ``(0, 0)`` for none."""
    grids = [(int(g[0]), int(g[1])) for g in grids]
    return max(grids, key=lambda g: g[0] * g[1]) if grids else (0, 0)


def mean_at(stacks: Iterable[np.ndarray], grid: Sequence[int]) -> np.ndarray:
    """The mean of maps of different resolutions, each resampled (bilinear) to ``grid`` first.
    ``stacks`` may be ``[h, w]`` maps or ``[T, h, w]`` stacks (all of one kind)."""
    h, w = int(grid[0]), int(grid[1])
    acc, n = None, 0
    for stack in stacks:
        part = resize(stack, h, w)
        acc = part if acc is None else acc + part
        n += 1
    if acc is None:
        raise ValueError("no maps to average")
    return (acc / n).astype(np.float32, copy=False)


def word_map(stack: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """One word's map ``[h, w]``: the sum of its sub-word token rows of a ``[T, h, w]`` stack."""
    return np.asarray(stack, np.float32)[list(rows)].sum(axis=0)


def query_cell(qx: float, qy: float, grid: Sequence[int]) -> tuple[int, int]:
    """``(row, col)`` of the cell of an ``(h, w)`` grid under the fractional position ``(qx, qy)`` (top-left origin)."""
    h, w = int(grid[0]), int(grid[1])
    return min(max(int(qy * h), 0), h - 1), min(max(int(qx * w), 0), w - 1)


def probe_row(self_map: np.ndarray, grid: Sequence[int], qx: float, qy: float) -> np.ndarray:
    """Where the query cell under ``(qx, qy)`` attends: its row of a pooled self map ``[h*w, h*w]``, as ``[h, w]``."""
    h, w = int(grid[0]), int(grid[1])
    row, col = query_cell(qx, qy, (h, w))
    return np.asarray(self_map[row * w + col], np.float32).reshape(h, w)


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a − b`` of two maps, ``b`` first resampled to ``a``'s grid when the grids differ."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.shape[-2:] != b.shape[-2:]:
        b = resize(b, *a.shape[-2:])
    return a - b


def shared_range(*maps: np.ndarray) -> tuple[float, float]:
    """One colour range ``(low, high)`` covering every finite value of ``maps`` (``high > low``)."""
    finite = [np.asarray(m)[np.isfinite(m)] for m in maps]
    finite = [f for f in finite if f.size]
    if not finite:
        return 0.0, 1.0
    low = float(min(f.min() for f in finite))
    high = float(max(f.max() for f in finite))
    return (low, high) if high > low else (low, low + 1e-6)


def symmetric_range(m: np.ndarray) -> tuple[float, float]:
    """``(−r, r)`` with ``r`` the largest finite ``|m|``: a difference map's scale, zero in the middle."""
    values = np.abs(np.asarray(m)[np.isfinite(m)])
    r = float(values.max()) if values.size else 0.0
    r = r if r > 0 else 1e-6
    return -r, r
