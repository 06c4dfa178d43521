"""analysis.divergence against scipy's jensenshannon, analysis.trajectory against sklearn's PCA."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from sklearn.decomposition import PCA

from analysis.divergence import js_divergence, map_js_divergence
from analysis.trajectory import PCA_FIT_ON, PCA_METHOD, latent_pca_record, pca_2d, project
from export.validate import schema_errors

RNG = np.random.default_rng(99)
TOL = 1e-6


# ---------------------------------------------------------------- Jensen-Shannon
@pytest.mark.parametrize("k", [2, 5, 77, 1024])
def test_js_matches_scipy(k):
    for _ in range(5):
        p, q = RNG.random(k), RNG.random(k)
        assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=TOL)


def test_js_with_zeros_and_edges():
    p = np.array([0.0, 0.3, 0.7, 0.0])
    q = np.array([0.5, 0.0, 0.5, 0.0])
    assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=TOL)
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0, abs=1e-12)  # disjoint -> 1 bit
    assert js_divergence([5.0], [2.0]) == 0.0  # one token
    # all-zero counts as uniform
    assert js_divergence(np.zeros(4), np.full(4, 0.25)) == pytest.approx(0.0, abs=1e-12)
    one_hot = np.array([1.0, 0, 0, 0])
    assert js_divergence(np.zeros(4), one_hot) == pytest.approx(jensenshannon(np.full(4, 0.25), one_hot, base=2) ** 2, abs=TOL)
    assert js_divergence(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError):
        js_divergence([0.5, 0.5], [1.0])


def test_map_js_matches_scipy_per_token():
    a, b = RNG.random((6, 8, 8)), RNG.random((6, 8, 8))
    b[2] = 0  # an empty map counts as uniform
    want = [jensenshannon(a[t].ravel(), (b[t].ravel() if b[t].any() else np.ones(64)), base=2) ** 2 for t in range(6)]
    got = map_js_divergence(a, b)
    assert got.shape == (6,)
    np.testing.assert_allclose(got, want, atol=TOL)
    np.testing.assert_allclose(map_js_divergence(a, a), 0.0, atol=1e-12)
    assert map_js_divergence(a[:1], b[:1]).shape == (1,)
    with pytest.raises(ValueError):
        map_js_divergence(a, b[:5])


# ---------------------------------------------------------------- PCA
def assert_equal_up_to_sign(ours, theirs, atol=TOL):
    """Column c of ``ours`` equals column c of ``theirs`` or its negation."""
    ours, theirs = np.atleast_2d(ours), np.atleast_2d(theirs)
    for c in range(theirs.shape[1]):
        a, b = ours[:, c], theirs[:, c]
        sign = 1.0 if np.abs(a - b).max() <= np.abs(a + b).max() else -1.0
        np.testing.assert_allclose(a, sign * b, atol=atol)


@pytest.mark.parametrize("n,d", [(30, 64), (3, 1000), (10, 2), (2, 5)])
def test_pca_matches_sklearn(n, d):
    x = np.cumsum(RNG.standard_normal((n, d)), axis=0)
    ours = pca_2d(x)
    ref = PCA(n_components=2, svd_solver="full").fit(x)
    np.testing.assert_allclose(ours.explained_variance_ratio, ref.explained_variance_ratio_, atol=TOL)
    np.testing.assert_allclose(ours.mean, ref.mean_, atol=TOL)
    scale = max(1.0, np.abs(ref.transform(x)).max())
    usable = ref.explained_variance_ratio_ > 1e-12  # a zero-variance axis has no defined direction
    assert_equal_up_to_sign(ours.coords[:, usable] / scale, ref.transform(x)[:, usable] / scale)
    assert_equal_up_to_sign(ours.components[usable].T, ref.components_[usable].T)
    # projecting new points agrees with sklearn's transform under the same signs
    new = x[:2] + RNG.standard_normal((2, d))
    assert_equal_up_to_sign(np.vstack([ours.coords, project(new, ours)])[:, usable] / scale,
                            np.vstack([ref.transform(x), ref.transform(new)])[:, usable] / scale)


def test_pca_flattens_latents_and_fixes_signs():
    x = RNG.standard_normal((8, 4, 3, 3))
    a = pca_2d(x)
    assert a.coords.shape == (8, 2) and a.components.shape == (2, 36)
    for comp in a.components:
        assert comp[np.argmax(np.abs(comp))] > 0  # sign convention
    b = pca_2d(-x)  # same data mirrored: same components (signs are fixed), mirrored coordinates
    np.testing.assert_allclose(b.components, a.components, atol=TOL)
    np.testing.assert_allclose(b.coords, -a.coords, atol=TOL)


def test_pca_degenerate_inputs():
    one = pca_2d(RNG.standard_normal((1, 10)))  # one step
    assert one.coords.tolist() == [[0.0, 0.0]] and one.explained_variance_ratio.tolist() == [0.0, 0.0]
    same = pca_2d(np.ones((5, 4)))  # no variation at all
    assert np.all(same.coords == 0) and same.explained_variance_ratio.tolist() == [0.0, 0.0]
    line = np.outer(np.arange(6.0), RNG.standard_normal(5))  # rank one: second component empty
    r = pca_2d(line)
    np.testing.assert_allclose(r.explained_variance_ratio, [1.0, 0.0], atol=TOL)
    ref = PCA(n_components=1).fit(line)
    assert_equal_up_to_sign(r.coords[:, :1], ref.transform(line))
    np.testing.assert_allclose(r.coords[:, 1], 0.0, atol=TOL)
    single_feature = np.cumsum(RNG.standard_normal((7, 1)), axis=0)  # D = 1 < 2 components
    r = pca_2d(single_feature)
    assert_equal_up_to_sign(r.coords[:, :1], PCA(n_components=1).fit_transform(single_feature))
    assert r.explained_variance_ratio.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        project(np.zeros((2, 3)), r)


def test_latent_pca_record_schema():
    rec = latent_pca_record(RNG.standard_normal((6, 4, 2, 2)))
    assert schema_errors(rec, "latent_pca") == []
    assert len(rec["coords"]) == 6 and rec["fit_on"] == PCA_FIT_ON and rec["method"] == PCA_METHOD
    assert schema_errors(latent_pca_record(RNG.standard_normal((1, 3))), "latent_pca") == []
