"""Per-step metrics of a run: latent norms and cosines, attention entropy, token dominance, KL.

numpy only (this module also runs in the browser under Pyodide). All arithmetic is float64.

Conventions, stated once and copied into ``metrics.json`` by :func:`metrics_record`:

* A *distribution* that is all zeros is treated as **uniform** (it carries no preference).
* Attention entropy is normalised by ``ln K`` (K keys), so it lies in [0, 1]; with ``K == 1``
  it is 0.
* KL divergence is in nats and smoothed: both distributions get ``KL_EPS`` added to every entry
  and are renormalised before ``sum(p * ln(p / q))``, so it is finite even where q is 0.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: Written to metrics.json ``entropy.normalisation``.
ENTROPY_NORMALISATION = (
    "mean over query positions of the Shannon entropy (nats) over the K keys of the full "
    "distribution, divided by ln K (0 when K == 1); a position with zero mass counts as uniform"
)
#: Smoothing added to every entry before KL (both distributions are then renormalised).
KL_EPS = 1e-10
#: Written to metrics.json ``kl_consecutive.direction``.
KL_DIRECTION = "KL(p_s || p_{s-1})"
#: Written to metrics.json ``kl_consecutive.smoothing``.
KL_SMOOTHING = f"nats; eps={KL_EPS:g} added to every entry of p and q, then each renormalised"
#: Written to metrics.json ``token_dominance.rule``.
DOMINANCE_RULE = (
    "share: each prompt token's attention mass (mean over layers of the full-distribution mass, "
    "averaged over positions) divided by the prompt tokens' total, so shares sum to 1 per step; "
    "ranking: token indices, most dominant first (ties keep index order)"
)
#: Written to metrics.json ``latent_cosine_prev.rule``.
COSINE_RULE = "cosine(x_after_step_s, x_before_step_s); 1 if both are zero, 0 if only one is"


def normalize(p: Any, axis: int = -1) -> np.ndarray:
    """``p / p.sum(axis)`` in float64; a slice that sums to 0 becomes uniform."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=axis, keepdims=True)
    k = p.shape[axis]
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, p / safe, 1.0 / k if k else 0.0)


def latent_norms(latents: Any) -> np.ndarray:
    """L2 norm of each ``latents[i]`` (all axes after the first flattened): ``[N, ...] -> [N]``."""
    x = np.asarray(latents, dtype=np.float64)
    return np.linalg.norm(x.reshape(x.shape[0], -1), axis=1)


def cosine_to_previous(latents: Any) -> np.ndarray:
    """Cosine between consecutive latents: ``[N+1, ...] -> [N]`` (entry s compares x[s+1] with x[s]).

    Zero vectors: the cosine of two zero vectors is 1 (no change); of one zero vector with a
    non-zero one, 0.
    """
    x = np.asarray(latents, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    a, b = x[1:], x[:-1]
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    both = (na > 0) & (nb > 0)
    out = np.where(both, dot / np.where(both, na * nb, 1.0), 0.0)
    out = np.where((na == 0) & (nb == 0), 1.0, out)
    return np.clip(out, -1.0, 1.0)


def attention_entropy(cross: Any) -> float:
    """Normalised attention entropy of one cross map ``[K, H, W]`` (K keys over an H x W grid).

    Each position's column ``cross[:, h, w]`` is renormalised to a distribution (zero mass →
    uniform), its entropy in nats is divided by ``ln K`` and the result is averaged over the
    positions. ``K == 1`` gives 0.
    """
    a = np.asarray(cross, dtype=np.float64)
    k = a.shape[0]
    if k <= 1:
        return 0.0
    p = normalize(a.reshape(k, -1), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=0)
    return float(h.mean() / np.log(k))


def token_distribution(cross: Any) -> np.ndarray:
    """Each key's share of the attention mass of a map ``[K, H, W] -> [K]`` (sums to 1; zeros → uniform)."""
    a = np.asarray(cross, dtype=np.float64)
    return normalize(a.reshape(a.shape[0], -1).sum(axis=1))


def token_dominance(dists: Any) -> tuple[np.ndarray, np.ndarray]:
    """``dists[N, T] -> (share[N, T], ranking[N, T])``.

    ``share[s]`` is ``dists[s]`` renormalised to sum to 1 (zeros → uniform); ``ranking[s]`` lists
    token indices from the largest share to the smallest (a stable sort, so ties keep index order).
    """
    share = normalize(np.atleast_2d(np.asarray(dists, dtype=np.float64)), axis=1)
    ranking = np.argsort(-share, axis=1, kind="stable")
    return share, ranking


def _smooth(p: np.ndarray, eps: float) -> np.ndarray:
    return normalize(normalize(p) + eps)


def kl_divergence(p: Any, q: Any, eps: float = KL_EPS) -> float:
    """``KL(p || q)`` in nats after smoothing: ``p' = norm(norm(p) + eps)``, same for q.

    Zero vectors count as uniform before smoothing. Equals ``scipy.stats.entropy(p', q')``.
    """
    ps = _smooth(np.asarray(p, dtype=np.float64), eps)
    qs = _smooth(np.asarray(q, dtype=np.float64), eps)
    return float(max(0.0, np.sum(ps * np.log(ps / qs))))


def consecutive_kl(dists: Any, eps: float = KL_EPS) -> np.ndarray:
    """``dists[N, K] -> [N-1]`` with entry s-1 = ``KL(dists[s] || dists[s-1])`` (see :func:`kl_divergence`)."""
    d = np.atleast_2d(np.asarray(dists, dtype=np.float64))
    if d.shape[0] < 2:
        return np.zeros(0)
    p, q = _smooth(d[1:], eps), _smooth(d[:-1], eps)
    return np.maximum(0.0, np.sum(p * np.log(p / q), axis=1))


def _floats(a: Any) -> list:
    """Nested lists of floats; NaN (a layer not computed at a step) becomes None (JSON null)."""
    x = np.asarray(a, dtype=np.float64)
    return np.where(np.isnan(x), None, x).tolist() if np.isnan(x).any() else x.tolist()


def _layer_mean(x: np.ndarray, n: int) -> np.ndarray:
    """The mean over layers (axis 0) of the layers computed at each step (NaN where none was)."""
    if not x.shape[0]:
        return np.zeros((n,) + x.shape[2:])
    with np.errstate(invalid="ignore"):
        counts = (~np.isnan(x)).sum(axis=0)
        return np.where(counts > 0, np.nansum(x, axis=0) / np.maximum(counts, 1), np.nan)


def metrics_record(
    latents: Any,
    *,
    entropy: Sequence[Sequence[float]] | None = None,
    token_dists: Any = None,
    num_tokens: int | None = None,
) -> dict[str, Any]:
    """Assemble ``metrics.json``.

    ``latents``: ``[N+1, ...]`` with x_T first. ``entropy``: ``[L, N]`` from
    :func:`attention_entropy` on each layer's full pooled cross map (``None`` when cross attention
    is off). ``token_dists``: ``[L, N, K]`` from :func:`token_distribution` on the same full maps;
    ``num_tokens`` (T) slices the prompt's tokens out of the K keys for ``token_dominance``.
    A layer that was not computed at a step (a caching hook skipped it) has NaN there: its entries are null, the
    means are over the layers computed at that step, and a step with none has null means and token rows.
    """
    x = np.asarray(latents)
    n = x.shape[0] - 1
    record: dict[str, Any] = {
        "steps": list(range(n)),
        "latent_norm": _floats(latent_norms(x[1:])),
        "latent_cosine_prev": _floats(cosine_to_previous(x)),
        "latent_cosine_rule": COSINE_RULE,
        "entropy": None,
        "token_dominance": None,
        "kl_consecutive": None,
    }
    if entropy is not None:
        e = np.asarray(entropy, dtype=np.float64).reshape(-1, n)
        record["entropy"] = {
            "normalisation": ENTROPY_NORMALISATION,
            "per_layer": _floats(e),
            "mean": _floats(_layer_mean(e, n)),
        }
    if token_dists is not None:
        d = np.asarray(token_dists, dtype=np.float64)
        if d.ndim != 3 or d.shape[1] != n:
            raise ValueError(f"token_dists must be [L, N={n}, K], got {list(d.shape)}")
        t = d.shape[2] if num_tokens is None else int(num_tokens)
        mean = _layer_mean(d, n)[:, :t]
        none = np.isnan(mean).any(axis=1)
        share, ranking = token_dominance(np.nan_to_num(mean))
        kl = np.array([consecutive_kl(layer) for layer in d]).reshape(d.shape[0], max(n - 1, 0))
        missing = np.isnan(d).any(axis=2)                      # [L, N]: the layer was not computed
        kl[missing[:, 1:] | missing[:, :-1]] = np.nan
        record["token_dominance"] = {"rule": DOMINANCE_RULE,
                                     "share": [None if skip else row for skip, row in zip(none, _floats(share))],
                                     "ranking": [None if skip else row for skip, row in zip(none, ranking.tolist())]}
        record["kl_consecutive"] = {
            "direction": KL_DIRECTION,
            "smoothing": KL_SMOOTHING,
            "per_layer": _floats(kl),
            "mean": _floats(_layer_mean(kl, max(n - 1, 0))),
        }
    return record
