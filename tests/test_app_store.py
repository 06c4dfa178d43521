"""The dashboard's store (no UI): sources, resampling, token/word maps, aggregates, probe, comparison."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.divergence import map_js_divergence
from analysis.trajectory import pca_2d, project
from app.state import ALL_LAYERS
from analysis.maps import resize
from app.store import Comparison, RunData, Selection, Store, files_from_upload, resolve_source
from export.contract import DatasetError
from tests.synthetic import write_synthetic_run

STEPS, RES = 5, [8, 8, 4]


def read_bin(run: Path, rel: str) -> np.ndarray:
    shape = json.loads((run / "metadata.json").read_text())["files"][rel]["shape"]
    return np.fromfile(run / rel, dtype="<f2").reshape(shape).astype(np.float32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    common = dict(steps=STEPS, layers=3, tokens=7, r=8, s=4, layer_resolutions=RES, image_size=16)
    a = write_synthetic_run(root / "a", prompt="a red circle", seed=0, **common)
    b = write_synthetic_run(root / "b", prompt="a blue circle", seed=1, **common)
    no_latents = write_synthetic_run(root / "c", prompt="a red circle", seed=2, save_latents=False, **common)
    short = write_synthetic_run(root / "d", prompt="a red circle", seed=3, **{**common, "steps": 3})
    return {"a": a, "b": b, "c": no_latents, "d": short, "root": root}


@pytest.fixture
def store():
    return Store(cache_mb=8)


def pil_bilinear(m: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(m, np.float32), mode="F").resize((w, h), Image.BILINEAR))


# --------------------------------------------------------------------------- resampling and sources


@pytest.mark.parametrize("shape,out", [((4, 4), (8, 8)), ((8, 8), (32, 32)), ((3, 5), (12, 20)), ((6, 6), (6, 6))])
def test_resize_matches_pil_bilinear_when_upsampling(shape, out):
    m = np.random.default_rng(0).random(shape).astype(np.float32)
    np.testing.assert_allclose(resize(m, *out), pil_bilinear(m, *out), atol=1e-6)


def test_resize_keeps_the_mean_of_a_constant_and_copies_same_size():
    m = np.full((4, 4), 0.25, np.float32)
    np.testing.assert_allclose(resize(m, 16, 16), 0.25)
    same = resize(m, 4, 4)
    assert same is not m and np.array_equal(same, m)


def test_resolve_source_forms(runs, tmp_path):
    assert resolve_source(str(runs["a"])) == str(runs["a"])
    assert resolve_source("https://host/run/") == "https://host/run/"
    uploads = {"myrun": {"myrun/metadata.json": b"{}"}}
    assert resolve_source("upload:myrun", uploads) is uploads["myrun"]
    with pytest.raises(DatasetError, match="no such folder"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="not in this session"):
        resolve_source("upload:gone", uploads)
    with pytest.raises(DatasetError, match="no dataset"):
        resolve_source("  ")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        resolve_source(str(tmp_path / "file.txt"))


def test_upload_keeps_paths_and_names_the_folder(runs, store):
    names = ["run_x/metadata.json", "run_x/images/step_000.png"]
    folder, files = files_from_upload(names, [b"{}", b"png"])
    assert folder == "run_x" and set(files) == set(names)
    with pytest.raises(DatasetError, match="empty"):
        files_from_upload([], [])
    # a real folder, uploaded as the browser would send it, opens through the reader
    root = runs["a"]
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    label = store.add_upload([f"a/{p.relative_to(root).as_posix()}" for p in paths], [p.read_bytes() for p in paths])
    assert label == "upload:a"
    data = store.open(label)
    assert data.n_steps == STEPS and np.array_equal(data.image(2), np.asarray(Image.open(root / "images/step_002.png").convert("RGB")))


# --------------------------------------------------------------------------- one run


def test_open_reads_the_json_and_labels(runs, store):
    data = store.open(str(runs["a"]))
    assert data.n_steps == STEPS and data.cross_layers == [0, 1, 2] and data.cross_grid == (8, 8)
    assert data.self_grid == (4, 4) and data.run.self_grid(2) == (4, 4)
    groups = data.layer_groups()
    assert groups["All layers"] == {"all layers (mean at 8×8)": ALL_LAYERS}
    assert groups["down_blocks.2 · 4×4"] == {"L2 · down_blocks.2 · 4×4 · attn 0 · block 0": "2"}
    assert data.layer_values() == [ALL_LAYERS, "0", "1", "2"]
    # synthetic tokens: <start> a red circle a red <end>; "a" and "red" repeat as separate words
    options = data.token_options(merge=False)
    assert list(options.values()) == list(range(7))
    assert data.token_text(0) == "<start>" and data.token_text(2) == "red"


def test_word_merge_sums_the_sub_word_maps(runs, store):
    data = store.open(str(runs["a"]))
    meta = data.metadata
    meta["tokens"][3]["word"] = meta["tokens"][2]["word"]  # pretend "red" + "circle" are one word
    word = [i for i, t in enumerate(meta["tokens"]) if t["word"] == meta["tokens"][2]["word"]]
    assert 3 in word and data.token_indices(2, True) == word and data.token_indices(2, False) == [2]
    maps = read_bin(runs["a"], "attention/cross/layer_1_step_002.bin")
    np.testing.assert_allclose(data.cross_map("1", 2, 2, True), maps[word].sum(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(data.cross_map("1", 2, 2, False), maps[2])
    merged = data.token_options(merge=True)
    assert any("red + circle" in label for label in merged) and 3 not in merged.values()
    assert data.canonical_token(3, True) == 2


def test_one_layer_map_is_the_file_and_mean_is_the_resampled_average(runs, store):
    data = store.open(str(runs["a"]))
    for layer in range(3):
        np.testing.assert_array_equal(data.cross_map(str(layer), 3, 4, False),
                                      read_bin(runs["a"], f"attention/cross/layer_{layer}_step_003.bin")[4])
    maps = [read_bin(runs["a"], f"attention/cross/layer_{layer}_step_003.bin")[4] for layer in range(3)]
    expected = np.mean([pil_bilinear(m, 8, 8) for m in maps], axis=0)
    np.testing.assert_allclose(data.cross_map(ALL_LAYERS, 3, 4, False), expected, atol=1e-6)


def test_aggregate_is_daam_mean_over_layers_and_steps(runs, store):
    data = store.open(str(runs["a"]))
    expected = np.mean([np.mean([pil_bilinear(read_bin(runs["a"], f"attention/cross/layer_{l}_step_{s:03d}.bin")[3], 8, 8)
                                 for l in range(3)], axis=0) for s in range(1, 4)], axis=0)
    np.testing.assert_allclose(data.aggregate_map(3, False, 1, 3), expected, atol=1e-6)
    np.testing.assert_allclose(data.aggregate_map(3, False, 3, 1), expected, atol=1e-6)  # order-free
    with pytest.raises(DatasetError, match="outside"):
        data.aggregate_map(3, False, 0, STEPS)


def test_probe_is_the_query_row_of_the_self_map(runs, store):
    data = store.open(str(runs["a"]))
    full = read_bin(runs["a"], "attention/self/layer_0_step_001.bin")
    # (x=0.9, y=0.3) on a 4x4 grid: column 3, row 1
    np.testing.assert_array_equal(data.probe_map("0", 1, 0.9, 0.3), full[1 * 4 + 3].reshape(4, 4))
    assert data.probe_map(ALL_LAYERS, 1, 0.9, 0.3).shape == (4, 4)
    np.testing.assert_allclose(data.probe_map(ALL_LAYERS, 1, 0.9, 0.3).sum(), 1.0, atol=2e-2)


def test_token_share_and_metrics_views(runs, store):
    data = store.open(str(runs["a"]))
    maps = read_bin(runs["a"], "attention/cross/layer_2_step_004.bin")
    mass = maps.sum(axis=(1, 2))
    sel = Selection(step=4, layer="2", token=1)
    np.testing.assert_allclose(data.shares(sel)[0], mass / mass.sum(), rtol=1e-6)
    metrics = json.loads((runs["a"] / "metrics.json").read_text())
    names, values, _where = data.entropies(sel)
    assert names == ["L0", "L1", "L2"]
    np.testing.assert_allclose(values, [row[4] for row in metrics["entropy"]["per_layer"]])
    np.testing.assert_allclose(data.kl_curve("1"), metrics["kl_consecutive"]["per_layer"][1])
    np.testing.assert_allclose(data.kl_curve(ALL_LAYERS), metrics["kl_consecutive"]["mean"])


def test_bad_inputs_raise_one_line_errors(runs, store):
    data = store.open(str(runs["a"]))
    with pytest.raises(DatasetError, match="step 9 is outside"):
        data.cross_map("0", 9, 1, False)
    with pytest.raises(DatasetError, match="layer 7 has no cross"):
        data.cross_map("7", 0, 1, False)
    with pytest.raises(DatasetError, match="token 40"):
        data.cross_map("0", 0, 40, False)


def test_schema_failures_are_named(runs, store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(runs["a"], bad)
    meta = json.loads((bad / "metadata.json").read_text())
    meta["run"]["cfg_scale"] = "high"
    (bad / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="metadata.json fails validation: run/cfg_scale"):
        store.open(str(bad))


def test_cache_bound_holds_while_stepping_everything(runs):
    store = Store(cache_mb=1)
    data = store.open(str(runs["a"]))
    for step in range(STEPS):
        for layer in range(3):
            data.cross_map(str(layer), step, 1, False)
            data.probe_map(str(layer), step, 0.5, 0.5)
        data.image(step)
    stats = data.run.cache_stats()
    assert stats["max_bytes"] == 2**20 and 0 < stats["bytes"] <= stats["max_bytes"]


# --------------------------------------------------------------------------- two runs


def test_comparison_js_matches_analysis(runs, store):
    a, b = store.open(str(runs["a"])), store.open(str(runs["b"]))
    comparison = Comparison(a, b)
    assert comparison.ok and comparison.differences == []
    assert [p[2] for p in comparison.pairs] == ["<start>", "a", "red/blue", "circle", "a", "red/blue", "<end>"]
    per_token, grid = comparison.js()
    assert per_token.shape == (STEPS, 3, 7) and grid.shape == (STEPS, 3)
    words = [i for i, t in enumerate(a.tokens) if not t["special"]]
    for step in (0, 4):
        for layer in range(3):
            rel = f"attention/cross/layer_{layer}_step_{step:03d}.bin"
            expected = map_js_divergence(read_bin(runs["a"], rel), read_bin(runs["b"], rel))
            np.testing.assert_allclose(per_token[step, layer], expected, rtol=1e-12)
            assert grid[step, layer] == pytest.approx(expected[words].mean(), rel=1e-12)


def test_shared_pca_basis_when_both_have_latents(runs, store):
    a, b = store.open(str(runs["a"])), store.open(str(runs["b"]))
    ca, cb, evr, how = Comparison(a, b).trajectories()
    la = np.load(runs["a"] / "latents_noise_fp16.npz")["latents"][1:].astype(np.float32).astype(np.float64)
    lb = np.load(runs["b"] / "latents_noise_fp16.npz")["latents"][1:].astype(np.float32).astype(np.float64)
    fit = pca_2d(np.concatenate([la.reshape(STEPS, -1), lb.reshape(STEPS, -1)]))
    np.testing.assert_allclose(ca, project(la, fit), atol=1e-9)
    np.testing.assert_allclose(cb, project(lb, fit), atol=1e-9)
    assert "both runs' latents" in how and 0 < evr[0] <= 1
    values, label, _how = Comparison(a, b).latent_delta()
    np.testing.assert_allclose(values, np.linalg.norm((la - lb).reshape(STEPS, -1), axis=1), rtol=1e-9)


def test_without_latents_the_fallback_is_said(runs, store):
    a, c = store.open(str(runs["a"])), store.open(str(runs["c"]))
    ca, cc, evr, how = Comparison(a, c).trajectories()
    assert "no shared basis" in how and "latents_noise_fp16.npz" in how
    np.testing.assert_allclose(ca, a.pca_coords())
    assert np.isnan(evr[0])
    values, label, how = Comparison(a, c).latent_delta()
    np.testing.assert_allclose(values, a.metric_curve("latent_norm") - c.metric_curve("latent_norm"))
    assert "no latents file" in how


def test_incomparable_runs_list_the_differences(runs, store):
    comparison = Comparison(store.open(str(runs["a"])), store.open(str(runs["d"])))
    assert not comparison.ok
    assert any("step count differs: 5 vs 3" in d for d in comparison.differences)
    per_token, grid = comparison.js()
    assert np.isnan(grid).all()


def test_store_params_update_together(runs, store):
    seen = []
    store.param.watch(lambda *events: seen.append(sorted(e.name for e in events)), ["run", "comparison"])
    store.set_run(store.open(str(runs["a"])))
    store.set_other(store.open(str(runs["b"])))
    assert store.comparison is not None and store.comparison.b is store.other
    store.set_other(None)
    assert store.comparison is None
    assert seen[0] == ["run"] and ["comparison"] in seen
    assert isinstance(store.run, RunData)


# --------------------------------------------------------------------------- schema 2: non-square, per head


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A per-head run with 2 heads, 4x8 cross grids and 16x32 images."""
    return write_synthetic_run(tmp_path_factory.mktemp("wide") / "wide", steps=3, layers=2, tokens=5, seed=4,
                               per_head=True, heads=2, grid=(4, 8), image_hw=(16, 32))


def test_per_head_maps_are_the_stored_heads_and_mean_is_the_reader_mean(wide, store):
    data = store.open(str(wide))
    assert data.per_head and data.head_values() == ["mean", "0", "1"]
    assert data.cross_grid == (4, 8) and tuple(data.run.image_size) == (data.height, data.width) == (16, 32)
    stored = read_bin(wide, "attention/cross/layer_1_step_002.bin")  # [heads, T, h, w] as written
    assert stored.shape == (2, 5, 4, 8)
    heads = data.run.cross_heads(1, 2)
    for k in range(2):
        shown = data.cross_map("1", 2, 3, False, head=str(k))
        np.testing.assert_array_equal(shown, heads[k][3])
        np.testing.assert_array_equal(shown, stored[k, 3])
    assert not np.array_equal(stored[0, 3], stored[1, 3])
    mean = data.cross_map("1", 2, 3, False)
    np.testing.assert_array_equal(mean, data.run.cross(1, 2)[3])
    np.testing.assert_allclose(mean, stored[:, 3].mean(axis=0), atol=1e-6)
    # token shares follow the head too
    mass = stored[1].sum(axis=(1, 2))
    np.testing.assert_allclose(data.shares(Selection(step=2, layer="1", token=3, head="1"))[0], mass / mass.sum(), rtol=1e-6)
    # the heat map brought to the image keeps H and W apart
    heat = resize(data.cross_map("1", 2, 3, False, head="1"), data.height, data.width)
    assert heat.shape == (16, 32)
    np.testing.assert_allclose(heat, pil_bilinear(stored[1, 3], 16, 32), atol=1e-6)
    with pytest.raises(DatasetError, match="head 2 is not one of them"):
        data.cross_map("1", 2, 3, False, head="2")


def test_v1_runs_have_only_the_head_mean(runs, store):
    data = store.open(str(runs["a"]))
    assert not data.per_head and data.head_values() == ["mean"] and data.fit_head("1") == "mean"
    with pytest.raises(DatasetError, match="only the mean over heads"):
        data.cross_map("0", 0, 1, False, head="0")


def test_probe_on_a_non_square_self_grid(wide, store):
    data = store.open(str(wide))
    sh, sw = data.run.self_grid(0)
    full = read_bin(wide, "attention/self/layer_0_step_001.bin")
    assert full.shape == (sh * sw, sh * sw)
    row, col = int(0.3 * sh), int(0.9 * sw)
    np.testing.assert_array_equal(data.probe_map("0", 1, 0.9, 0.3), full[row * sw + col].reshape(sh, sw))
    assert data.probe_map(ALL_LAYERS, 1, 0.9, 0.3).shape == data.self_grid == (sh, sw)


# --------------------------------------------------------------------------- the one-way flow: State.fit, derived maps


def test_state_fit_brings_the_state_inside_a_run(runs, store):
    from app.state import State

    data = store.open(str(runs["a"]))
    state = State(step=99, layer="7", token=99, step_range=(0, 0))
    assert state.fitted(data) == {"step": STEPS - 1, "layer": ALL_LAYERS, "token": data.default_token(),
                                  "step_range": (0, STEPS - 1)}
    state = State(step=1, layer="1", token=data.default_token(), step_range=(1, 2))
    assert state.fitted(data) == {} and state.fitted(data, last_step=True) == {"step": STEPS - 1}
    assert state.fit(data, last_step=True) == ["step"] and state.step == STEPS - 1


def test_heat_pair_is_both_runs_maps_on_one_scale_and_their_difference(runs, store):
    a, b = store.open(str(runs["a"])), store.open(str(runs["b"]))
    comparison = Comparison(a, b)
    sel = Selection(step=2, layer="1", token=2, merge=False)
    heat_a, heat_b, diff = comparison.heat_pair(sel)
    want_a = read_bin(runs["a"], "attention/cross/layer_1_step_002.bin")[2]
    want_b = read_bin(runs["b"], "attention/cross/layer_1_step_002.bin")[2]
    np.testing.assert_array_equal(heat_a.map, want_a)
    np.testing.assert_array_equal(heat_b.map, want_b)
    np.testing.assert_array_equal(diff.map, want_a - want_b)
    assert (heat_a.low, heat_a.high) == (heat_b.low, heat_b.high) == (0.0, float(max(want_a.max(), want_b.max())))
    assert diff.low == -diff.high == -float(np.abs(want_a - want_b).max())
    assert "step 2" in heat_a.title and "L1" in heat_b.title and "'blue'" in heat_b.title
    # the all-layer mean: B's maps brought to A's grid, so the difference is defined cell by cell
    _a, _b, mean_diff = comparison.heat_pair(Selection(step=0, layer=ALL_LAYERS, token=2, merge=False))
    np.testing.assert_allclose(mean_diff.map, a.cross_map(ALL_LAYERS, 0, 2, False) - b.cross_map(ALL_LAYERS, 0, 2, False), atol=1e-7)


def test_daam_mode_draws_image_bars_and_entropy_from_the_same_steps(runs, store):
    from analysis.metrics import token_distribution
    data = store.open(str(runs["a"]))
    sel = Selection(step=0, layer="1", token=2, aggregate=True, first=1, last=3)
    heat = data.heat(sel)
    assert heat.step == 3 and heat.layer == ALL_LAYERS and "steps 1–3" in heat.title
    np.testing.assert_allclose(heat.map, data.aggregate_all(1, 3)[data.token_indices(2, True)].sum(axis=0))
    shares, where = data.shares(sel)
    np.testing.assert_allclose(shares, token_distribution(data.aggregate_all(1, 3)))
    assert "steps 1–3" in where and shares.sum() == pytest.approx(1.0)
    labels, values, _where = data.entropies(sel)
    for k, index in enumerate(data.cross_layers):
        assert values[k] == pytest.approx(np.mean(data.entropy_curve(index)[1:4]))


def test_a_failed_js_is_kept_and_not_read_again(runs, store):
    a, b = store.open(str(runs["a"])), store.open(str(runs["b"]))
    comparison = Comparison(a, b)
    calls = []

    def broken(layer, step):
        calls.append((layer, step))
        raise DatasetError(f"attention/cross/layer_{layer}_step_{step:03d}.bin: truncated")

    b.run.cross = broken
    for _ in range(2):
        with pytest.raises(DatasetError, match="layer_0_step_000.bin: truncated"):
            comparison.js()
    assert calls == [(0, 0)]


# --------------------------------------------------------------------------- joint-attention runs (SD3, Flux)


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    from tests.synthetic import write_joint_run

    root = tmp_path_factory.mktemp("joint")
    return {"sd3": write_joint_run(root / "sd3", family="sd3", steps=3, seed=5),
            "flux": write_joint_run(root / "flux", family="flux", steps=3, seed=6),
            "flux_b": write_joint_run(root / "flux_b", family="flux", steps=3, seed=7, prompt="a blue circle")}


def test_joint_runs_keep_the_sum_rules_of_joint_attention(joint):
    meta = json.loads((joint["flux"] / "metadata.json").read_text())
    assert meta["files"]["attention/text/layer_2_step_001.bin"]["kind"] == "text"
    assert [l["kind"] for l in meta["layers"]] == ["joint", "joint", "single"]
    cross = read_bin(joint["flux"], "attention/cross/layer_2_step_001.bin")
    self_ = read_bin(joint["flux"], "attention/self/layer_2_step_001.bin")
    text = read_bin(joint["flux"], "attention/text/layer_2_step_001.bin")
    assert cross.shape == text.shape == (5, 4, 6) and self_.shape == (24, 24)
    assert cross.sum(axis=0).max() < 1 and self_.sum(axis=1).max() < 1 and text.sum(axis=(1, 2)).max() < 1


def test_joint_labels_name_layer_kinds_and_token_sets(joint, store):
    data = store.open(str(joint["sd3"]))
    assert data.set_names == {"text_encoder": "CLIP", "text_encoder_3": "T5"}
    groups = data.layer_groups()
    assert groups["joint layers · 4×6"] == {"L0 · joint · transformer_blocks.0 · 4×6": "0",
                                            "L1 · joint · transformer_blocks.1 · 4×6": "1"}
    # <start> a red circle <end> (CLIP), then a red cir cle </s> (T5): one word list, merged within a set
    options = data.token_options(merge=True)
    assert options["2: red · CLIP"] == 2 and options["6: red · T5"] == 6 and options["7: circle · T5  (cir + cle)"] == 7
    assert "3: circle · CLIP" in options and 8 not in options.values()
    assert data.token_indices(7, True) == [7, 8] and data.token_indices(3, True) == [3]
    assert data.token_label(6, True) == "red · T5" and data.token_label(8, False) == "cle · T5"
    assert data.layer_summary() == "2 (2 joint; 2 cross, 2 self, 2 text)" and data.token_summary() == "10 (CLIP 5, T5 5)"
    flux = store.open(str(joint["flux"]))
    assert flux.set_names == {} and flux.token_label(1, True) == "red"  # one set: no set names
    assert flux.layer_groups()["single layers · 4×6"] == {"L2 · single · single_transformer_blocks.0 · 4×6": "2"}
    assert flux.layer_values() == [ALL_LAYERS, "0", "1", "2"]


def test_text_heat_is_the_stored_rows_with_the_cross_heats_step_and_layer(joint, store):
    data = store.open(str(joint["sd3"]))
    files = [read_bin(joint["sd3"], f"attention/text/layer_{layer}_step_001.bin") for layer in (0, 1)]
    heat = data.text_heat(Selection(step=1, layer="1", token=6))  # "red" in the T5 set: one row
    np.testing.assert_array_equal(heat.map, files[1][6])
    assert (heat.low, heat.high) == (float(files[1][6].min()), float(files[1][6].max()))
    assert heat.step == 1 and heat.layer == "1" and "'red · T5'" in heat.title and "L1 · joint" in heat.title
    # a word of two pieces: the mean of its rows; the mean over layers; one shared scale over every token
    np.testing.assert_allclose(data.text_heat(Selection(step=1, layer="0", token=8)).map, files[0][[7, 8]].mean(axis=0),
                               rtol=1e-6)
    mean = data.text_heat(Selection(step=1, layer=ALL_LAYERS, token=6, shared=True))
    np.testing.assert_allclose(mean.map, (files[0][6] + files[1][6]) / 2, rtol=1e-6)
    assert (mean.low, mean.high) == pytest.approx((0.0, float(((files[0] + files[1]) / 2).max())))
    # DAAM: all layers and the step range, drawn over the range's last step, as the cross heat
    daam = data.text_heat(Selection(step=0, layer="1", token=6, aggregate=True, first=1, last=2))
    steps = [read_bin(joint["sd3"], f"attention/text/layer_{layer}_step_{s:03d}.bin")[6] for layer in (0, 1) for s in (1, 2)]
    np.testing.assert_allclose(daam.map, np.mean(steps, axis=0), rtol=1e-5)
    assert daam.step == 2 and daam.layer == ALL_LAYERS == data.heat(Selection(step=0, layer="1", token=6, aggregate=True,
                                                                              first=1, last=2)).layer


def test_every_store_map_works_on_a_flux_run(joint, store):
    a, b = store.open(str(joint["flux"])), store.open(str(joint["flux_b"]))
    cross = read_bin(joint["flux"], "attention/cross/layer_2_step_002.bin")
    np.testing.assert_array_equal(a.heat(Selection(step=2, layer="2", token=1)).map, cross[1])
    np.testing.assert_array_equal(a.text_heat(Selection(step=2, layer="2", token=1)).map,
                                  read_bin(joint["flux"], "attention/text/layer_2_step_002.bin")[1])
    self_ = read_bin(joint["flux"], "attention/self/layer_2_step_002.bin")
    np.testing.assert_array_equal(a.probe_map("2", 2, 0.5, 0.5), self_[2 * 6 + 3].reshape(4, 6))
    assert a.heat(Selection(step=2, layer=ALL_LAYERS, token=1, aggregate=True, first=0, last=2)).map.shape == (4, 6)
    shares, _where = a.shares(Selection(step=2, layer="2", token=1))
    np.testing.assert_allclose(shares, cross.sum(axis=(1, 2)) / cross.sum(), rtol=1e-6)
    comparison = Comparison(a, b)
    assert comparison.ok, comparison.differences
    _ha, _hb, diff = comparison.heat_pair(Selection(step=2, layer="2", token=1))
    np.testing.assert_allclose(diff.map, cross[1] - read_bin(joint["flux_b"], "attention/cross/layer_2_step_002.bin")[1],
                               atol=1e-7)
    assert np.isfinite(comparison.js()[1]).all()


def test_runs_without_text_maps_have_no_text_heat(runs, store):
    data = store.open(str(runs["a"]))
    assert data.text_layers == [] and data.set_names == {} and data.token_label(2, True) == "red"
    assert data.layer_summary() == "3 (3 cross, 3 self)"
    with pytest.raises(DatasetError, match="no text->image maps"):
        data.text_heat(Selection(step=0, layer="0", token=2))
