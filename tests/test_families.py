"""Model families: the registry, SDXL from a tiny random-weight folder, non-square and per-head recording."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from capture import cli, families  # noqa: E402
from capture import pipeline as pipeline_mod  # noqa: E402
from capture.recorder import AttentionRecorder, plan_layers, pooled_grid  # noqa: E402
from export import validate as validate_mod  # noqa: E402
from export.reader import open_run  # noqa: E402
from tests.test_cli_generate import run_cli, snapshot  # noqa: E402
from tests.tiny_pipelines import build_sdxl  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return pipeline_mod.load_pipeline(str(sdxl_dir), device="cpu", dtype="float32")


def test_registry_picks_the_family_from_model_index(sdxl_dir):
    assert families.pipeline_class_of(None) == "StableDiffusionPipeline"
    assert families.for_model(None).name == "sd"
    assert families.for_model(str(sdxl_dir)).name == "sdxl"


def test_sdxl_loads_through_from_pretrained(sdxl):
    assert type(sdxl).__name__ == "StableDiffusionXLPipeline"
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert families.for_pipeline(sdxl).name == "sdxl"


def test_unsupported_pipeline_class_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    model = tmp_path / "kandinsky"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_cli(["--prompt", "a red circle", "--model", str(model), "--output-dir", "new"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "pipeline class KandinskyV22Pipeline is not supported" in err
    assert "StableDiffusionXLPipeline (sdxl)" in err and "StableDiffusionPipeline (sd)" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, expected", [
    (["--height", "36", "--width", "64"], "--height: must be a multiple of 8 for StableDiffusionXLPipeline, got 36"),
    (["--per-head", "--no-include-cross-attention"], "--per-head: keeps each head's cross maps"),
])
def test_sdxl_bad_sizes_and_flags(sdxl_dir, tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_cli(["--prompt", "a red circle", "--model", str(sdxl_dir), "--output-dir", "new",
                            "--num-steps", "2", *argv], capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert snapshot(tmp_path) == before


def test_pooled_grid_keeps_the_aspect_ratio():
    assert pooled_grid((128, 64), 32) == (32, 16)       # factor 4
    assert pooled_grid((104, 152), 32) == (20, 30)      # factor 5 (152 / 5 = 30.4 -> 30, uneven)
    assert pooled_grid((8, 16), 32) == (8, 16)          # never pooled up
    assert pooled_grid((1, 100), 10) == (1, 10)


def test_sdxl_layers_and_cap(sdxl):
    plans, problems = plan_layers(sdxl.unet, (16, 32), resolution=4, self_resolution=4)
    assert problems == []
    assert [p.block for p in plans].count("down_blocks.1") == 4 and len(plans) == 12
    assert all(p.native == (8, 16) and p.cross_grid == (2, 4) and p.self_grid == (2, 4) for p in plans)
    assert {p.heads for p in plans} == {4}
    capped, _ = plan_layers(sdxl.unet, (16, 32), max_layers=3)
    assert [p.name for p in capped] == [plans[0].name, plans[6].name, plans[11].name]


def _forward(unet, plans, per_head=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 32, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    if plans is None:
        return unet(x, torch.tensor(500), encoder_hidden_states=ctx, added_cond_kwargs=added).sample, None
    recorder = AttentionRecorder(unet, plans, context_length=77).install()
    try:
        out = unet(x, torch.tensor(500), encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        return out, recorder.collect()
    finally:
        recorder.remove()


@torch.no_grad()
def test_recorder_is_bit_identical_over_a_whole_sdxl_unet(sdxl):
    unet = sdxl.unet
    unet.set_attn_processor(AttnProcessor2_0())
    plain, _ = _forward(unet, None)
    for per_head in (False, True):
        plans, _ = plan_layers(unet, (16, 32), resolution=4, self_resolution=4, per_head=per_head)
        recorded, maps = _forward(unet, plans)
        assert torch.equal(plain, recorded)
        assert len(maps.cross) == len(maps.self_) == 12
        first = maps.cross[0]
        assert first.shape == ((4, 77, 2, 4) if per_head else (77, 2, 4))
        # every stored query cell's distribution over the 77 keys sums to 1
        np.testing.assert_allclose(first.sum(axis=-3), 1.0, atol=1e-5)
        np.testing.assert_allclose(maps.self_[0].sum(axis=1), 1.0, atol=1e-5)


@torch.no_grad()
def test_per_head_maps_average_to_the_head_mean(sdxl):
    plans_mean, _ = plan_layers(sdxl.unet, (16, 32), resolution=8, self_=False)
    plans_heads, _ = plan_layers(sdxl.unet, (16, 32), resolution=8, self_=False, per_head=True)
    _, mean = _forward(sdxl.unet, plans_mean)
    _, heads = _forward(sdxl.unet, plans_heads)
    for layer in mean.cross:
        np.testing.assert_allclose(heads.cross[layer].mean(axis=0), mean.cross[layer], atol=1e-6)
        assert heads.cross[layer].std(axis=0).max() > 1e-4  # the heads do differ


def test_sdxl_end_to_end_non_square_per_head(sdxl_dir, tmp_path, monkeypatch, capsys):
    """A 2-step 1:2 SDXL run, per head, through the CLI: validates strictly and reads back."""
    monkeypatch.chdir(tmp_path)
    common = ["--prompt", "a red circle and a blue square", "--model", str(sdxl_dir), "--num-steps", "2",
              "--height", "32", "--width", "64", "--attention-resolution", "8", "--self-attention-resolution", "4",
              "--device", "cpu", "--quiet"]
    assert run_cli(common + ["--per-head", "--output-dir", "heads"], capsys)[0] == 0
    assert run_cli(common + ["--output-dir", "mean"], capsys)[0] == 0
    assert validate_mod.validate_run(tmp_path / "heads", strict=True) == []
    heads, mean = open_run(tmp_path / "heads"), open_run(tmp_path / "mean")
    meta = heads.metadata
    assert meta["schema_version"] == 2 and meta["attention"]["heads"] == "per_head"
    assert meta["family"]["name"] == "sdxl" and meta["family"]["pipeline"] == "StableDiffusionXLPipeline"
    assert meta["family"]["tokens_from"] == "tokenizer"
    assert [s["tokenizer"] for s in meta["token_sets"]] == ["tokenizer", "tokenizer_2"]
    # both CLIP sets fill the same 77 slots (concatenated on the feature axis), read from their tokenizers
    assert [(s["offset"], s["sequence_length"]) for s in meta["token_sets"]] == [(0, 77), (0, 77)]
    assert all(s["agrees"] for s in meta["token_sets"])
    assert meta["run"]["height"] == 32 and meta["run"]["width"] == 64
    layer = meta["layers"][0]
    assert layer["kind"] == "unet" and layer["native"] == [8, 16] and layer["cross_shape"] == [4, 9, 4, 8]
    assert layer["self_grid"] == [2, 4] and layer["self_shape"] == [8, 8]
    assert heads.final_image().shape == (32, 64, 3)
    assert heads.image(1).shape == (32, 64, 3)
    # the same seed with and without --per-head: the head mean of the stored heads is the stored mean
    for index in range(len(meta["layers"])):
        for step in range(2):
            stacked = heads.cross_heads(index, step)
            assert stacked.shape[0] == meta["layers"][index]["heads"]
            np.testing.assert_allclose(stacked.mean(axis=0), mean.cross(index, step), atol=2e-3)
    np.testing.assert_array_equal(heads.final_image(), mean.final_image())
