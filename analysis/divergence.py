"""Jensen–Shannon divergence between distributions and between attention maps (numpy only).

Convention: inputs are renormalised to sum to 1; an all-zero input counts as uniform.
The divergence is in bits (base 2), so it lies in [0, 1]; it equals
``scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import normalize

JS_RULE = "Jensen-Shannon divergence, base 2 (in [0, 1]); inputs renormalised, all-zero inputs count as uniform"


def _js_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS divergence (bits) along the last axis of two arrays of distributions."""
    p, q = normalize(p), normalize(q)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(m > 0, m, 1.0)), 0.0)
        return terms.sum(axis=-1)

    return np.clip(0.5 * (kl(p) + kl(q)), 0.0, 1.0)


def js_divergence(p: Any, q: Any) -> float:
    """Jensen–Shannon divergence of two distributions over the same support, in bits."""
    p, q = np.asarray(p, dtype=np.float64).ravel(), np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"js_divergence: shapes differ: {p.shape} vs {q.shape}")
    return float(_js_rows(p, q))


def map_js_divergence(a: Any, b: Any) -> np.ndarray:
    """Per-token JS divergence of two attention maps ``[T, H, W]`` -> ``[T]``.

    Each token's spatial map (H x W values) is taken as a distribution over positions.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"map_js_divergence: shapes differ: {list(a.shape)} vs {list(b.shape)}")
    t = a.shape[0]
    return _js_rows(a.reshape(t, -1), b.reshape(t, -1))
