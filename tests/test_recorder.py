"""The attention recorder: bit-identical outputs, maps equal to a hand-computed reference, layer plans."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from capture import pipeline as _pipeline  # noqa: E402,F401  (silences transformers' import notices)
from capture.recorder import (  # noqa: E402
    AttentionRecorder, LayerSelectionError, ShapeMismatchError, ShapeWarning, layer_names, native_grids,
    plan_layers, pooling_matrix, record_attention, select_layers,
)
from capture import recorder as recorder_mod  # noqa: E402
from capture.toyworld.architecture import build_pipeline  # noqa: E402

CONTEXT = 16


@pytest.fixture(scope="module")
def toy():
    pipe = build_pipeline(seed=0)
    pipe.unet.eval()
    return pipe


def odd_unet() -> UNet2DConditionModel:
    """SD-1.5's block layout (attention-free last down / first up block) in miniature; latent 10 -> 10, 5, 3."""
    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=10, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=32, attention_head_dim=4,
    ).eval()


def _inputs(unet, side: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, side, side, generator=g)
    ctx = torch.randn(2, CONTEXT, dim, generator=g)   # [unconditional, conditional]
    return x, torch.tensor(421), ctx


class _Capture:
    """Forward pre-hooks that keep each attention module's inputs (for the hand-computed reference)."""

    def __init__(self, unet, names):
        self.inputs, self.handles = {}, []
        for name in names:
            for kind in ("attn1", "attn2"):
                module = unet.get_submodule(f"{name}.{kind}")
                self.handles.append(module.register_forward_pre_hook(self._hook(f"{name}.{kind}", module), with_kwargs=True))

    def _hook(self, key, module):
        def hook(mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            ehs = kwargs.get("encoder_hidden_states")
            self.inputs[key] = (module, hs.detach().clone(), None if ehs is None else ehs.detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def reference_probs(module, hs, ehs) -> np.ndarray:
    """softmax(Q Kᵀ / √d) of the conditional (last) sample, averaged over heads: float64 [queries, keys]."""
    hs, ehs = hs[-1:].double(), (hs if ehs is None else ehs)[-1:].double()
    q = F.linear(hs, module.to_q.weight.double(), None if module.to_q.bias is None else module.to_q.bias.double())
    k = F.linear(ehs, module.to_k.weight.double(), None if module.to_k.bias is None else module.to_k.bias.double())
    heads = module.heads
    d = q.shape[-1] // heads
    q = q.view(1, -1, heads, d).transpose(1, 2)
    k = k.view(1, -1, heads, d).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return p.mean(dim=1)[0].numpy()


def loop_pool(grid_map: np.ndarray, cells: tuple[int, int], reduce) -> np.ndarray:
    """Pool the two leading axes [h, w, ...] into cells by explicit loops; pixel i goes to cell floor(i*g/n)."""
    h, w = grid_map.shape[:2]
    gh, gw = cells
    out = np.zeros((gh, gw) + grid_map.shape[2:])
    for cy in range(gh):
        ys = [y for y in range(h) if y * gh // h == cy]
        for cx in range(gw):
            xs = [x for x in range(w) if x * gw // w == cx]
            out[cy, cx] = reduce(grid_map[np.ix_(ys, xs)].reshape(len(ys) * len(xs), *grid_map.shape[2:]), axis=0)
    return out


def reference_cross(probs, native, grid) -> np.ndarray:
    """[Q, K] -> [K, gh, gw]: queries averaged per cell."""
    h, w = native
    pooled = loop_pool(probs.reshape(h, w, -1), grid, np.mean)
    return pooled.transpose(2, 0, 1)


def reference_self(probs, native, grid) -> np.ndarray:
    """[Q, Q] -> [cells, cells]: queries averaged per cell, keys summed per cell."""
    h, w = native
    by_query = loop_pool(probs.reshape(h, w, h * w), grid, np.mean).reshape(-1, h * w)  # [cells, Q]
    keys = loop_pool(by_query.T.reshape(h, w, -1), grid, np.sum).reshape(-1, by_query.shape[0])  # [cells_k, cells_q]
    return keys.T


def run_unet(unet, plans, x, t, ctx):
    recorder = AttentionRecorder(unet, plans, context_length=ctx.shape[1]).install()
    try:
        out = unet(x, t, encoder_hidden_states=ctx).sample
        maps = recorder.collect()
    finally:
        recorder.remove()
    return out, maps


@pytest.mark.parametrize("which", ["toy", "toy-sdpa", "toy-native", "odd"])
def test_bit_identical_and_maps_match_reference(toy, which, monkeypatch):
    """toy: every grid pooled; toy-sdpa: the same through SDPA with the key-pooling value (the GPU path);
    toy-native: nothing pooled (keys and queries kept); odd: 10/5/3 grids, uneven pooling and a grid below the
    resolution."""
    if which == "toy-sdpa":
        monkeypatch.setattr(recorder_mod, "DENSE_MAX", 0)
        which = "toy"
    unet = odd_unet() if which == "odd" else toy.unet
    side = unet.config.sample_size
    x, t, ctx = _inputs(unet, side, unet.config.cross_attention_dim)
    resolution, self_resolution = {"toy": (4, 2), "toy-native": (32, 16), "odd": (4, 2)}[which]
    plans, problems = plan_layers(unet, (side, side), resolution=resolution, self_resolution=self_resolution)
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        expected = unet(x, t, encoder_hidden_states=ctx).sample
        capture = _Capture(unet, [p.name for p in plans])
        try:
            out, maps = run_unet(unet, plans, x, t, ctx)
        finally:
            capture.remove()
        after = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(out, expected), "recording changed the UNet output"
    assert torch.equal(after, expected), "processors were not restored"
    assert set(maps.cross) == set(maps.self_) == {p.index for p in plans} and plans
    for plan in plans:
        module, hs, ehs = capture.inputs[f"{plan.name}.attn2"]
        want = reference_cross(reference_probs(module, hs, ehs), plan.native, plan.cross_grid)
        assert maps.cross[plan.index].shape == (CONTEXT, *plan.cross_grid) == want.shape
        np.testing.assert_allclose(maps.cross[plan.index], want, atol=1e-6, rtol=0)
        module, hs, ehs = capture.inputs[f"{plan.name}.attn1"]
        want = reference_self(reference_probs(module, hs, None), plan.native, plan.self_grid)
        n = plan.self_grid[0] * plan.self_grid[1]
        assert maps.self_[plan.index].shape == (n, n) == want.shape
        np.testing.assert_allclose(maps.self_[plan.index], want, atol=1e-6, rtol=0)
        np.testing.assert_allclose(maps.self_[plan.index].sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(maps.cross[plan.index].sum(axis=0), 1.0, atol=1e-5)
    if which == "odd":
        # 10 -> 10, 5, 3 (stride-2 convs round up); the attention-free blocks have no layers.
        assert [p.native for p in plans] == [(10, 10), (5, 5), (3, 3), (5, 5), (5, 5), (10, 10), (10, 10)]
        assert [p.block for p in plans] == ["down_blocks.0", "down_blocks.1", "mid_block"] + ["up_blocks.1"] * 2 + ["up_blocks.2"] * 2
        # only pooled down: a 3x3 grid stays 3x3 under resolution 4; one integer factor per grid (10 / 3,
        # 5 / 2, 3 / 2), so uneven grids are reported
        assert plans[2].cross_grid == (3, 3) and plans[2].self_grid == (1, 1)
        assert plans[0].cross_grid == (3, 3) and plans[1].cross_grid == (2, 2)
        assert any("10x10" in p and "3x3" in p for p in problems) and any("5x5" in p and "2x2" in p for p in problems)
        assert not any("native grid 3x3" in p for p in problems)
    else:
        assert problems == []
    if which == "toy-native":
        assert all(p.cross_grid == p.self_grid == p.native for p in plans)


def test_pooled_maps_equal_avg_pool_when_divisible():
    """An independent reference for the even case: torch's avg_pool2d (queries) and sum pooling (keys)."""
    unet = odd_unet()
    n = unet.config.sample_size                                               # 10
    x, t, ctx = _inputs(unet, n, unet.config.cross_attention_dim, seed=3)
    plans, problems = plan_layers(unet, (n, n), patterns=["down_blocks.0.*"], resolution=5, self_resolution=2)
    assert problems == [] and plans[0].native == (n, n)
    capture = _Capture(unet, [plans[0].name])
    with torch.no_grad():
        try:
            _, maps = run_unet(unet, plans, x, t, ctx)
        finally:
            capture.remove()
    module, hs, ehs = capture.inputs[f"{plans[0].name}.attn2"]
    probs = torch.from_numpy(reference_probs(module, hs, ehs))                 # [n*n, K]
    want = F.avg_pool2d(probs.T.reshape(1, CONTEXT, n, n), n // 5)[0].numpy()  # [K, 5, 5]
    np.testing.assert_allclose(maps.cross[0], want, atol=1e-6, rtol=0)
    module, hs, _ = capture.inputs[f"{plans[0].name}.attn1"]
    probs = torch.from_numpy(reference_probs(module, hs, None))                 # [n*n queries, n*n keys]
    k = n // 2
    q_pooled = F.avg_pool2d(probs.T.reshape(1, n * n, n, n), k)[0].reshape(n * n, 4).T          # [4 cells, keys]
    want = (F.avg_pool2d(q_pooled.reshape(1, 4, n, n), k)[0].reshape(4, 4) * k * k).numpy()    # keys summed
    np.testing.assert_allclose(maps.self_[0], want, atol=1e-6, rtol=0)


def test_pipeline_image_unchanged_by_recording(toy):
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, output_type="latent")
    toy.set_progress_bar_config(disable=True)
    plain = toy("a red circle", generator=torch.Generator().manual_seed(5), **kwargs).images
    with record_attention(toy, max_layers=3, resolution=8, self_resolution=4) as rec:
        recorded = toy("a red circle", generator=torch.Generator().manual_seed(5),
                       callback_on_step_end=rec.callback_on_step_end, **kwargs).images
    assert torch.equal(plain, recorded)
    assert len(rec.steps) == 3 and all(len(s.cross) == 3 and len(s.self_) == 3 for s in rec.steps)
    assert not np.allclose(rec.steps[0].cross[0], rec.steps[2].cross[0])  # steps differ: nothing stale


def test_layer_selection():
    unet = odd_unet()
    names = layer_names(unet)
    assert names == ["down_blocks.0.attentions.0.transformer_blocks.0", "down_blocks.1.attentions.0.transformer_blocks.0",
                     "mid_block.attentions.0.transformer_blocks.0",
                     "up_blocks.1.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.1.transformer_blocks.0",
                     "up_blocks.2.attentions.0.transformer_blocks.0", "up_blocks.2.attentions.1.transformer_blocks.0"]
    assert select_layers(unet, ["up_blocks.*"]) == names[3:]
    # a processor-name glob selects its layer; comma-split lists are handled by the config
    assert select_layers(unet, ["mid_block.*.attn2.processor"]) == [names[2]]
    assert select_layers(unet, ["down_blocks.1*", "up_blocks.2.attentions.1.*"]) == [names[1], names[6]]
    assert select_layers(unet, [], max_layers=3) == [names[0], names[3], names[6]]   # evenly spaced
    assert select_layers(unet, [], max_layers=1) == [names[3]]
    assert select_layers(unet, [], max_layers=99) == names
    with pytest.raises(LayerSelectionError) as err:
        select_layers(unet, ["up_blocks.*", "nope*"])
    assert "'nope*'" in str(err.value) and names[0] in str(err.value) and "\n" not in str(err.value)


def test_kinds_and_native_sizes():
    unet = odd_unet()
    plans, _ = plan_layers(unet, (10, 10), cross=False, resolution=8, self_resolution=32)
    assert all(p.cross_grid is None for p in plans)
    assert [p.self_grid for p in plans] == [p.native for p in plans]  # never pooled up
    meta = plans[0].to_metadata(tokens=5)
    assert meta["cross_shape"] is None and meta["self_shape"] == [100, 100] and meta["native"] == [10, 10]
    assert native_grids(unet, (10, 10)) == {"down_blocks.0": (10, 10), "down_blocks.1": (5, 5), "down_blocks.2": (3, 3),
                                            "mid_block": (3, 3), "up_blocks.0": (3, 3), "up_blocks.1": (5, 5),
                                            "up_blocks.2": (10, 10)}


def test_pooling_matrix_is_a_partition():
    m = pooling_matrix((5, 7), (4, 3))
    assert m.shape == (12, 35)
    assert np.array_equal(m.sum(axis=0), np.ones(35))          # each pixel in exactly one cell
    assert (m.sum(axis=1) > 0).all()                            # no empty cell


def test_shape_mismatch_warns_or_fails(toy):
    """A plan that expects the wrong grid: skipped with a warning at step 0, or an error when asked."""
    unet = toy.unet
    side = unet.config.sample_size
    x, t, ctx = _inputs(unet, side, unet.config.cross_attention_dim)
    plans, _ = plan_layers(unet, (side, side), max_layers=2, resolution=8, self_resolution=4)
    plans[0].native = (12, 12)  # wrong on purpose
    with torch.no_grad():
        recorder = AttentionRecorder(unet, plans, context_length=CONTEXT).install()
        try:
            unet(x, t, encoder_hidden_states=ctx)
            with pytest.warns(ShapeWarning, match="12x12|144 queries"):
                maps = recorder.collect()
        finally:
            recorder.remove()
    assert [p.name for p in recorder.layers] == [plans[1].name] and recorder.layers[0].index == 0
    assert set(maps.cross) == {0}
    plans, _ = plan_layers(unet, (side, side), max_layers=2, resolution=8, self_resolution=4)
    plans[1].native = plans[1].cross_grid = plans[1].self_grid = (4, 4)
    with torch.no_grad():
        recorder = AttentionRecorder(unet, plans, context_length=CONTEXT, fail_on_shape_error=True).install()
        try:
            unet(x, t, encoder_hidden_states=ctx)
            with pytest.raises(ShapeMismatchError, match="16 queries"):
                recorder.collect()
        finally:
            recorder.remove()
