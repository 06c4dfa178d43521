"""analysis.metrics against scipy references, with the edge cases and conventions it documents."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats

from analysis import metrics as M
from export.validate import schema_errors

RNG = np.random.default_rng(1234)
TOL = 1e-6


def rand_dist(*shape, axis=-1, rng=RNG):
    x = rng.random(shape) + 1e-3
    return x / x.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------- latent norms / cosine
@pytest.mark.parametrize("shape", [(7, 4, 8, 8), (1, 3), (5, 1)])
def test_latent_norms_match_scipy(shape):
    x = RNG.standard_normal(shape)
    want = [scipy.linalg.norm(row.ravel()) for row in x]
    np.testing.assert_allclose(M.latent_norms(x), want, rtol=TOL, atol=TOL)


def test_latent_norms_zero_and_float16():
    assert M.latent_norms(np.zeros((3, 4, 2, 2))).tolist() == [0.0, 0.0, 0.0]
    x = RNG.standard_normal((4, 16)).astype(np.float16)
    np.testing.assert_allclose(M.latent_norms(x), [scipy.linalg.norm(r.astype(np.float64)) for r in x], rtol=TOL)


@pytest.mark.parametrize("n", [1, 2, 30])
def test_cosine_to_previous_matches_scipy(n):
    x = RNG.standard_normal((n + 1, 4, 3, 3))
    want = [1 - scipy.spatial.distance.cosine(x[i + 1].ravel(), x[i].ravel()) for i in range(n)]
    got = M.cosine_to_previous(x)
    assert got.shape == (n,)
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


def test_cosine_conventions_for_zero_vectors_and_one_latent():
    z, v = np.zeros(6), RNG.standard_normal(6)
    # both zero -> 1 (no change); one zero -> 0; a vector with itself -> 1; with its negation -> -1
    np.testing.assert_allclose(M.cosine_to_previous(np.stack([z, z, v, v, -v, z])), [1.0, 0.0, 1.0, -1.0, 0.0], atol=TOL)
    assert M.cosine_to_previous(v[None]).shape == (0,)


# ---------------------------------------------------------------- entropy
@pytest.mark.parametrize("k,h,w", [(2, 4, 4), (7, 8, 8), (77, 16, 16), (16, 1, 1)])
def test_attention_entropy_matches_scipy(k, h, w):
    a = rand_dist(k, h, w, axis=0)
    want = scipy.stats.entropy(a.reshape(k, -1), axis=0).mean() / np.log(k)
    assert M.attention_entropy(a) == pytest.approx(want, abs=TOL)


def test_attention_entropy_renormalises_columns_like_scipy():
    a = RNG.random((9, 5, 5)) * 3  # columns do not sum to 1
    want = scipy.stats.entropy(a.reshape(9, -1), axis=0).mean() / np.log(9)
    assert M.attention_entropy(a) == pytest.approx(want, abs=TOL)


def test_attention_entropy_edge_cases():
    k = 5
    assert M.attention_entropy(np.full((k, 3, 3), 1 / k)) == pytest.approx(1.0, abs=TOL)  # uniform -> 1
    one_hot = np.zeros((k, 3, 3))
    one_hot[2] = 1
    assert M.attention_entropy(one_hot) == pytest.approx(0.0, abs=TOL)
    assert M.attention_entropy(np.zeros((k, 3, 3))) == pytest.approx(1.0, abs=TOL)  # zero mass counts as uniform
    assert M.attention_entropy(RNG.random((1, 4, 4))) == 0.0  # one key: K = 1 -> 0
    # half the positions one-hot, half empty (uniform) -> mean 0.5
    mixed = np.zeros((k, 2, 1))
    mixed[0, 0, 0] = 1
    assert M.attention_entropy(mixed) == pytest.approx(0.5, abs=TOL)


# ---------------------------------------------------------------- token distribution / dominance
def test_token_distribution_is_mass_share():
    a = RNG.random((6, 4, 4))
    want = a.sum(axis=(1, 2)) / a.sum()
    np.testing.assert_allclose(M.token_distribution(a), want, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(M.token_distribution(np.zeros((4, 2, 2))), [0.25] * 4)
    np.testing.assert_allclose(M.token_distribution(RNG.random((1, 3, 3))), [1.0])


def test_token_dominance_share_and_ranking_match_scipy_rankdata():
    d = RNG.random((12, 7))
    d[3, 2] = d[3, 5]  # a tie
    share, ranking = M.token_dominance(d)
    np.testing.assert_allclose(share, d / d.sum(axis=1, keepdims=True), rtol=TOL)
    for s in range(d.shape[0]):
        # rank of each token, most dominant = 0, ties in index order
        rank = scipy.stats.rankdata(-share[s], method="ordinal") - 1
        np.testing.assert_array_equal(ranking[s], np.argsort(rank))
    assert list(ranking[3]).index(2) < list(ranking[3]).index(5)


def test_token_dominance_edge_cases():
    share, ranking = M.token_dominance(np.zeros((2, 3)))
    np.testing.assert_allclose(share, np.full((2, 3), 1 / 3))
    assert ranking.tolist() == [[0, 1, 2], [0, 1, 2]]
    share, ranking = M.token_dominance(np.array([0.2, 0.8]))  # one step given as 1-D
    np.testing.assert_allclose(share, [[0.2, 0.8]])
    assert ranking.tolist() == [[1, 0]]
    share, ranking = M.token_dominance(np.array([[3.0]]))  # one token
    assert share.tolist() == [[1.0]] and ranking.tolist() == [[0]]


# ---------------------------------------------------------------- KL
def smooth(p, eps=M.KL_EPS):
    p = np.asarray(p, float)
    p = p / p.sum() if p.sum() > 0 else np.full(p.shape, 1 / p.size)
    p = p + eps
    return p / p.sum()


@pytest.mark.parametrize("k", [2, 16, 77])
def test_kl_divergence_matches_scipy(k):
    p, q = rand_dist(k), rand_dist(k)
    assert M.kl_divergence(p, q) == pytest.approx(scipy.stats.entropy(smooth(p), smooth(q)), abs=TOL)
    # on strictly positive inputs the smoothing is negligible: plain scipy KL (which renormalises)
    assert M.kl_divergence(p * 3, q * 5) == pytest.approx(scipy.stats.entropy(p * 3, q * 5), abs=TOL)
    assert M.kl_divergence(p, q, eps=0.0) == pytest.approx(scipy.stats.entropy(p, q), abs=1e-12)


def test_kl_edge_cases():
    p = rand_dist(8)
    assert M.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert M.kl_divergence(np.zeros(8), np.full(8, 1 / 8)) == pytest.approx(0.0, abs=1e-12)  # zeros = uniform
    assert M.kl_divergence([1.0], [1.0]) == 0.0  # one token
    # q has a zero where p has mass: finite thanks to eps, and equal to scipy on the smoothed inputs
    p, q = np.array([0.5, 0.5, 0.0]), np.array([1.0, 0.0, 0.0])
    v = M.kl_divergence(p, q)
    assert np.isfinite(v) and v > 5
    assert v == pytest.approx(scipy.stats.entropy(smooth(p), smooth(q)), rel=TOL)


@pytest.mark.parametrize("n", [1, 2, 10])
def test_consecutive_kl_matches_scipy(n):
    d = rand_dist(n, 12)
    got = M.consecutive_kl(d)
    assert got.shape == (n - 1,)
    want = [scipy.stats.entropy(smooth(d[s]), smooth(d[s - 1])) for s in range(1, n)]
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


# ---------------------------------------------------------------- metrics.json
def test_metrics_record_values_strings_and_schema():
    n, layers, k, t = 5, 3, 10, 4
    latents = RNG.standard_normal((n + 1, 4, 2, 2))
    full = rand_dist(layers, n, k, 3, 3, axis=2)
    entropy = np.array([[M.attention_entropy(full[l, s]) for s in range(n)] for l in range(layers)])
    dists = np.array([[M.token_distribution(full[l, s]) for s in range(n)] for l in range(layers)])
    rec = M.metrics_record(latents, entropy=entropy, token_dists=dists, num_tokens=t)
    assert schema_errors(rec, "metrics") == []
    assert rec["steps"] == list(range(n))
    np.testing.assert_allclose(rec["latent_norm"], M.latent_norms(latents[1:]), rtol=TOL)
    np.testing.assert_allclose(rec["latent_cosine_prev"], M.cosine_to_previous(latents), rtol=TOL)
    assert rec["entropy"]["normalisation"] == M.ENTROPY_NORMALISATION
    np.testing.assert_allclose(rec["entropy"]["mean"], entropy.mean(axis=0), rtol=TOL)
    share, ranking = M.token_dominance(dists.mean(axis=0)[:, :t])
    np.testing.assert_allclose(rec["token_dominance"]["share"], share, rtol=TOL)
    np.testing.assert_allclose(np.sum(rec["token_dominance"]["share"], axis=1), 1.0, rtol=TOL)
    assert rec["token_dominance"]["ranking"] == ranking.tolist()
    kl = rec["kl_consecutive"]
    assert kl["direction"] == M.KL_DIRECTION and kl["smoothing"] == M.KL_SMOOTHING
    assert np.shape(kl["per_layer"]) == (layers, n - 1)
    np.testing.assert_allclose(kl["per_layer"][1], M.consecutive_kl(dists[1]), rtol=TOL)
    np.testing.assert_allclose(kl["mean"], np.mean(kl["per_layer"], axis=0), rtol=TOL)


def test_metrics_record_without_cross_and_with_one_step():
    rec = M.metrics_record(RNG.standard_normal((2, 3)))
    assert rec["entropy"] is None and rec["token_dominance"] is None and rec["kl_consecutive"] is None
    assert schema_errors(rec, "metrics") == []
    one = M.metrics_record(RNG.standard_normal((2, 3)), entropy=[[0.5]], token_dists=[[[0.25, 0.75]]], num_tokens=2)
    assert one["kl_consecutive"]["per_layer"] == [[]] and one["kl_consecutive"]["mean"] == []
    assert schema_errors(one, "metrics") == []


def test_analysis_and_reader_import_without_scipy_sklearn_torch_or_jsonschema():
    """analysis/ and the reader must run under Pyodide: numpy (and Pillow for images) only."""
    code = (
        "import sys, analysis.metrics, analysis.divergence, analysis.trajectory, export.reader, export.writer;"
        "bad = [m for m in ('scipy', 'sklearn', 'torch', 'jsonschema', 'panel') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
