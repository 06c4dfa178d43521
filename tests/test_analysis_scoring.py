"""analysis.scoring: bilinear upsampling equals torch's, IoU equals sklearn's, the other scores by hand."""
from __future__ import annotations

import numpy as np
import pytest

from analysis import scoring


@pytest.mark.parametrize("shape, size", [((3, 5, 7), (13, 9)), ((2, 4, 4), (32, 32)), ((1, 3, 2), (17, 31)),
                                         ((2, 9, 11), (4, 5))])
def test_upsample_equals_torch_interpolate(shape, size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear",
                                           align_corners=False)[0].numpy()
    got = scoring.upsample(x, *size)
    assert got.shape == shape[:1] + size and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-6


def test_upsample_by_hand_and_bad_size():
    # 2 -> 4 with half-pixel centres: output centres sit at -0.25, 0.25, 0.75, 1.25 (the ends clamp).
    got = scoring.upsample(np.array([[0.0, 1.0]]), 1, 4)
    assert np.allclose(got, [[0.0, 0.25, 0.75, 1.0]])
    with pytest.raises(ValueError, match="positive"):
        scoring.upsample(np.zeros((2, 2)), 0, 4)


def test_daam_is_the_sum_of_layers_each_upsampled_once():
    rng = np.random.default_rng(2)
    coarse = [rng.random((3, 4, 4)) for _ in range(4)]     # two layers x two steps at 4x4
    fine = [rng.random((3, 8, 8)) for _ in range(2)]
    want = sum(scoring.upsample(m, 32, 32).astype(np.float64) for m in coarse + fine)
    got = scoring.daam(coarse + fine, 32, 32)
    assert got.shape == (3, 32, 32) and np.abs(got - want).max() < 1e-5
    assert np.allclose(scoring.daam(coarse + fine, 32, 32, mean=True), want / 6, atol=1e-6)
    # One step straight to the image is not the old two-step path (4x4 -> 8x8 -> 32x32) at the borders.
    two_step = scoring.upsample(scoring.upsample(coarse[0], 8, 8), 32, 32)
    assert np.abs(two_step - scoring.upsample(coarse[0], 32, 32)).max() > 1e-3
    with pytest.raises(ValueError, match="no maps"):
        scoring.daam([], 4, 4)
    with pytest.raises(ValueError, match="leading shape"):
        scoring.daam([np.zeros((3, 4, 4)), np.zeros((2, 4, 4))], 8, 8)


def test_iou_matches_sklearn_jaccard():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for _ in range(20):
        amap = rng.random((9, 13)) ** 3
        own = rng.random((9, 13)) < 0.3
        region = scoring.region(amap, 0.4)
        assert np.array_equal(region, amap / amap.max() >= 0.4)
        want = metrics.jaccard_score(own.ravel(), region.ravel(), zero_division=0.0)
        assert scoring.iou(region, own) == pytest.approx(want, abs=1e-12)
        assert scoring.token_scores(amap, own, ~own, 0.4)["iou"] == pytest.approx(want, abs=1e-12)
    assert scoring.iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0


def test_token_scores_by_hand():
    own = np.zeros((4, 4), bool)
    own[:2, :2] = True
    other = np.zeros((4, 4), bool)
    other[2:, 2:] = True
    amap = np.zeros((4, 4))
    amap[0, 0], amap[0, 1], amap[3, 3] = 1.0, 0.5, 0.3
    s = scoring.token_scores(amap, own, other, tau=0.4)
    # map >= 0.4 * max: (0,0) and (0,1) -> intersection 2, union 4
    assert s == {"pointing": 1.0, "iou": pytest.approx(0.5), "own_vs_other": pytest.approx(1.5 / 1.8)}
    amap2 = np.zeros((4, 4))
    amap2[3, 3] = 1.0
    assert scoring.token_scores(amap2, own, other) == {"pointing": 0.0, "iou": 0.0, "own_vs_other": 0.0}
    # No other object (a shared shape word): pointing and IoU only.
    assert scoring.token_scores(amap, own | other, None)["own_vs_other"] is None
    assert scoring.token_scores(np.zeros((4, 4)), own, other) == {"pointing": 0.0, "iou": 0.0, "own_vs_other": 0.5}
    with pytest.raises(ValueError, match="differ in shape"):
        scoring.token_scores(np.zeros((4, 5)), own, other)


def test_score_view_sums_token_rows_and_counts_own_scores():
    own = np.zeros((4, 4), bool)
    own[:, :2] = True
    other = ~own
    stack = np.zeros((5, 4, 4))
    stack[1][own] = 1.0                       # colour word: one row, all on its own object
    stack[2][:, :1], stack[3][:, 3:] = 1.0, 3.0   # shape word of two sub-word rows: 1 own column, 3x on the other
    words = [scoring.word("colour", [1], own, other), scoring.word("shape", [2, 3], own, other),
             scoring.word("shape", [1], own, None)]
    v = scoring.score_view([stack], [{"index": 0, "words": words}])
    assert v["colour"] == {"pointing": 1.0, "miou": 1.0, "own_vs_other": 1.0, "n": 1, "n_own": 1}
    # the two rows' sum: 4 own cells at 1, 4 other cells at 3 -> pointing misses, own share 4 / 16
    assert v["shape"]["n"] == 2 and v["shape"]["n_own"] == 1
    assert v["shape"]["own_vs_other"] == pytest.approx(4 / 16)
    assert v["shape"]["pointing"] == pytest.approx(0.5)       # the second shape word points inside own
    assert scoring.summarise([])["colour"] == {"pointing": None, "miou": None, "own_vs_other": None, "n": 0, "n_own": 0}
    with pytest.raises(ValueError, match="outside"):
        scoring.score_words(stack, [scoring.word("colour", [5], own, other)])
