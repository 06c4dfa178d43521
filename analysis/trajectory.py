"""2-D PCA of the latent trajectory, by numpy SVD (so it also runs under Pyodide).

Equal to ``sklearn.decomposition.PCA(n_components=2)`` up to the sign of each component.
Signs are fixed so that each component's entry of largest magnitude is positive.

Degenerate inputs: fewer than 2 components' worth of variation (one sample, one feature,
identical samples) gives zero components, zero coordinates and zero explained variance for the
missing directions rather than an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PCA_METHOD = (
    "PCA by numpy SVD of the mean-centred, flattened latents (float64); 2 components; "
    "sign fixed so each component's largest-magnitude entry is positive"
)
PCA_FIT_ON = "latents after each step"


@dataclass(frozen=True)
class PCAResult:
    coords: np.ndarray                    # [N, 2]
    explained_variance_ratio: np.ndarray  # [2]
    mean: np.ndarray                      # [D]
    components: np.ndarray                # [2, D]


def pca_2d(x: Any, n_components: int = 2) -> PCAResult:
    """Fit PCA on ``x[N, ...]`` (flattened to ``[N, D]``) and project it onto the first components."""
    a = np.asarray(x, dtype=np.float64)
    a = a.reshape(a.shape[0], -1)
    n, d = a.shape
    mean = a.mean(axis=0) if n else np.zeros(d)
    centred = a - mean
    components = np.zeros((n_components, d))
    ratio = np.zeros(n_components)
    if n >= 2 and d >= 1:
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        total = float(np.sum(s**2))
        k = min(n_components, vt.shape[0])
        if total > 0:
            vt = vt[:k]
            pivot = np.argmax(np.abs(vt), axis=1)
            signs = np.sign(vt[np.arange(k), pivot])
            signs[signs == 0] = 1.0
            components[:k] = vt * signs[:, None]
            ratio[:k] = np.clip(s[:k] ** 2 / total, 0.0, 1.0)
            # a direction with no variance has no meaningful axis
            dead = s[:k] ** 2 <= total * 1e-24
            components[:k][dead] = 0.0
            ratio[:k][dead] = 0.0
    result = PCAResult(coords=np.zeros((n, n_components)), explained_variance_ratio=ratio, mean=mean, components=components)
    return PCAResult(coords=project(a, result), explained_variance_ratio=ratio, mean=mean, components=components)


def project(x: Any, result: PCAResult) -> np.ndarray:
    """Project ``x[M, ...]`` (same feature count as the fit) onto a fitted PCA: ``[M, 2]``."""
    a = np.asarray(x, dtype=np.float64)
    a = a.reshape(a.shape[0], -1)
    if a.shape[1] != result.mean.shape[0]:
        raise ValueError(f"project: {a.shape[1]} features, the PCA was fitted on {result.mean.shape[0]}")
    return (a - result.mean) @ result.components.T


def latent_pca_record(latents_after: Any) -> dict[str, Any]:
    """``latent_pca.json`` for the latents after each step ``[N, ...]``."""
    r = pca_2d(latents_after)
    return {
        "coords": r.coords.tolist(),
        "explained_variance_ratio": r.explained_variance_ratio.tolist(),
        "fit_on": PCA_FIT_ON,
        "method": PCA_METHOD,
    }
