"""MM-DiT families (SD3, Flux) from tiny random-weight folders: bit-identical recording over a whole
transformer, maps equal to the full attention matrix the default processors compute, and 2-step
non-square runs that validate strictly."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from capture import families, joint  # noqa: E402
from capture import pipeline as pipeline_mod  # noqa: E402
from capture.config import ConfigError, GenerateConfig  # noqa: E402
from capture.joint import joint_layer_names, plan_joint_layers  # noqa: E402
from capture.recorder import pooling_matrix  # noqa: E402
from capture.run import generate  # noqa: E402
from export import validate as validate_mod  # noqa: E402
from export.reader import open_run  # noqa: E402
from tests.tiny_pipelines import build_flux, build_sd3  # noqa: E402

PROMPT = "a red circle and a blue square"
HW = (32, 48)  # non-square: SD3 16x24 image tokens, Flux 8x12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit")
    return {"sd3": build_sd3(root / "tiny-sd3"), "flux": build_flux(root / "tiny-flux")}


def _pipe(models, name):
    return pipeline_mod.load_pipeline(str(models[name]), device="cpu", dtype="float32")


def _inputs(pipe, name, generator):
    """One transformer call's inputs, built by the pipeline's own encoders (CFG batch for SD3)."""
    family = families.for_pipeline(pipe)
    peek = family.peek_pipe(pipe)
    h, w = HW
    if name == "sd3":
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=True,
                                                             max_sequence_length=family.max_sequence_length(peek.tokenizers))
        latents = torch.randn(2, 4, h // 2, w // 2, generator=generator)
        return dict(hidden_states=latents, encoder_hidden_states=torch.cat([neg, embeds]),
                    pooled_projections=torch.cat([neg_pooled, pooled]), timestep=torch.tensor([500.0, 500.0]))
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, None, max_sequence_length=family.max_sequence_length(peek.tokenizers))
    latents = torch.randn(1, 4, h // 2, w // 2, generator=generator)
    packed = pipe._pack_latents(latents, 1, 4, h // 2, w // 2)  # 2x2 patches: [1, 8*12, 16]
    image_ids = pipe._prepare_latent_image_ids(1, h // 4, w // 4, "cpu", torch.float32)
    return dict(hidden_states=packed, encoder_hidden_states=embeds, pooled_projections=pooled,
                timestep=torch.tensor([0.5]), txt_ids=text_ids, img_ids=image_ids, guidance=None)


def _recorder(pipe, *, resolution=12, self_resolution=4, per_head=False, concept=False):
    family = families.for_pipeline(pipe)
    peek = family.peek_pipe(pipe)
    config = GenerateConfig(prompt=PROMPT, attention_resolution=resolution, self_attention_resolution=self_resolution,
                            per_head=per_head, concept_maps=concept)
    plans, problems = family.plan(peek, (HW[0] // 2, HW[1] // 2), config)
    assert not problems
    tokens = family.tokens(peek.tokenizers, PROMPT)
    return family.recorder(pipe, plans, tokens, context_length=peek.context_length), tokens, peek


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_recording_is_bit_identical_over_a_whole_transformer(models, name):
    pipe = _pipe(models, name)
    inputs = _inputs(pipe, name, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = pipe.transformer(**inputs, return_dict=False)[0]
        recorder, _, _ = _recorder(pipe, per_head=True, concept=True)
        recorder.install()
        try:
            recorded = pipe.transformer(**inputs, return_dict=False)[0]
        finally:
            recorder.remove()
        again = pipe.transformer(**inputs, return_dict=False)[0]
    assert torch.equal(plain, recorded)
    assert torch.equal(plain, again)  # the default processors are back
    assert all(type(p).__name__ in ("JointAttnProcessor2_0", "FluxAttnProcessor")
               for p in pipe.transformer.attn_processors.values())


def _recorded(pipe, recorder, inputs):
    """One transformer forward with ``recorder`` installed; its maps."""
    with torch.no_grad():
        recorder.install()
        try:
            pipe.transformer(**inputs, return_dict=False)
        finally:
            recorder.remove()
    return recorder.collect()


@pytest.mark.parametrize("dense", [True, False], ids=["cpu-dense", "sdpa"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_maps_equal_the_full_attention_matrix(models, name, dense, monkeypatch):
    """The reference: the probabilities softmax(q kᵀ/√d) of the very q, k the default processors hand to
    scaled_dot_product_attention, materialised, then split into quadrants and pooled with numpy. Both
    recording paths: the CPU's materialised one, and the SDPA-with-selector one that GPUs take."""
    pipe = _pipe(models, name)
    inputs = _inputs(pipe, name, torch.Generator().manual_seed(1))
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        q, k = query, key
        scale = q.shape[-1] ** -0.5
        seen.append(torch.softmax((q[-1] @ k[-1].transpose(-1, -2)) * scale, dim=-1).double().numpy())
        return sdpa(query, key, value, *args, **kwargs)

    if not dense:
        monkeypatch.setattr(joint, "DENSE_MAX", 0)
    recorder, tokens, peek = _recorder(pipe, concept=False)
    assert all(slot.dense == dense for slot in recorder._slots)
    with torch.no_grad():
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        pipe.transformer(**inputs, return_dict=False)
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    maps = _recorded(pipe, recorder, inputs)
    names = joint_layer_names(pipe.transformer)
    assert len(seen) == len(names) == len(recorder.layers)
    positions = [t["index"] for t in tokens.tokens]
    for plan, probs in zip(recorder.layers, seen):
        mean = probs.mean(axis=0)                                # [S, S], heads averaged
        n_img, n_txt = int(np.prod(plan.native)), peek.context_length
        img = slice(0, n_img) if name == "sd3" else slice(n_txt, n_txt + n_img)
        txt0 = n_img if name == "sd3" else 0
        cols = [txt0 + p for p in positions]
        cell = pooling_matrix(plan.native, plan.cross_grid)
        cell_mean = cell / cell.sum(axis=1, keepdims=True)
        cross = cell_mean @ mean[img][:, cols]                   # [cells, T]
        np.testing.assert_allclose(maps.cross[plan.index], cross.T.reshape(len(cols), *plan.cross_grid), atol=2e-6)
        sg = pooling_matrix(plan.native, plan.self_grid)
        self_ = (sg / sg.sum(axis=1, keepdims=True)) @ mean[img][:, img] @ sg.T
        np.testing.assert_allclose(maps.self_[plan.index], self_, atol=2e-6)
        text = mean[cols][:, img] @ cell.T                       # [T, cells]
        np.testing.assert_allclose(maps.text[plan.index], text.reshape(len(cols), *plan.cross_grid), atol=2e-6)
        # The joint sum rules: neither part of an image query's row reaches 1.
        assert maps.cross[plan.index].sum(axis=0).max() < 1 and maps.self_[plan.index].sum(axis=1).max() < 1


def test_concept_maps_are_a_softmax_over_content_tokens(models):
    pipe = _pipe(models, "flux")
    inputs = _inputs(pipe, "flux", torch.Generator().manual_seed(2))
    recorder, tokens, _ = _recorder(pipe, concept=True)
    maps = _recorded(pipe, recorder, inputs)
    texts = [t["text"].lstrip("\u2581") for t in tokens.tokens]
    content = [i for i, t in enumerate(texts) if t in ("red", "circle", "blue", "square")]
    other = [i for i in range(len(texts)) if i not in content]
    for concept in maps.concept.values():
        np.testing.assert_allclose(concept[content].sum(axis=0), 1.0, atol=1e-5)
        assert np.abs(concept[other]).max() == 0


def test_layers_plans_and_kinds(models):
    sd3, flux = _pipe(models, "sd3"), _pipe(models, "flux")
    assert joint_layer_names(sd3.transformer) == ["transformer_blocks.0", "transformer_blocks.1"]
    assert joint_layer_names(flux.transformer) == ["transformer_blocks.0", "single_transformer_blocks.0",
                                                   "single_transformer_blocks.1"]
    plans, _ = plan_joint_layers(flux.transformer, (8, 12), resolution=4, self_resolution=4)
    assert [p.kind for p in plans] == ["joint", "single", "single"]
    assert [p.cross_grid for p in plans] == [(2, 4)] * 3  # factor 3 on both sides of 8x12
    plans, _ = plan_joint_layers(flux.transformer, (8, 12), patterns=["single_*"], max_layers=1)
    assert [p.name for p in plans] == ["single_transformer_blocks.1"]  # a cap of 1 keeps the middle one


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_two_step_non_square_run_validates_strictly(models, name, tmp_path):
    out = tmp_path / f"run-{name}"
    config = GenerateConfig(prompt=PROMPT, num_steps=2, height=HW[0], width=HW[1], model=str(models[name]),
                            output_dir=str(out), device="cpu", attention_resolution=12, self_attention_resolution=4,
                            concept_maps=True)
    path = generate(config)
    report = validate_mod.check_run(path)
    assert report.problems == [] and report.warnings == []
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["family"]["name"] == name and meta["schema_version"] == 2
    assert {layer["kind"] for layer in meta["layers"]} == ({"joint"} if name == "sd3" else {"joint", "single"})
    sets = [s["encoder"] for s in meta["token_sets"]]
    assert sets == (["text_encoder", "text_encoder_3"] if name == "sd3" else ["text_encoder_2"])
    words = {meta["words"][t["word"]] for t in meta["tokens"] if t["word"] is not None}
    assert {"red", "circle", "blue", "square"} <= words
    if name == "sd3":  # T5 tokens sit after CLIP's 77 slots, and share the CLIP tokens' word indices
        t5 = [t for t in meta["tokens"] if t["set"] == "text_encoder_3"]
        assert t5[0]["index"] == 77 and [t["word"] for t in t5[:-1]] == list(range(7))
    # each set's slots, from its tokenizer and the pipeline's T5 length (16 here), fill the text sequence
    spans = [(s["offset"], s["sequence_length"]) for s in meta["token_sets"]]
    assert spans == ([(0, 77), (77, 16)] if name == "sd3" else [(0, 16)])
    assert sum(length for _, length in spans) == meta["context_length"]
    run = open_run(path)
    assert run.has_text and run.has_concept
    assert run.text(0, 1).shape == tuple(meta["layers"][0]["text_shape"])
    assert meta["latent_shape"] == [4, HW[0] // 2, HW[1] // 2]
    assert meta["attention"]["cfg_half"] == ("conditional" if name == "sd3" else "all (no CFG batch)")
    assert run.final_image().shape == (*HW, 3) and run.image(1).shape == (*HW, 3)


def test_flux_refuses_a_negative_prompt_in_one_line(models, tmp_path):
    config = GenerateConfig(prompt=PROMPT, negative_prompt="blurry", num_steps=1, height=32, width=32,
                            model=str(models["flux"]), output_dir=str(tmp_path / "x"), device="cpu")
    with pytest.raises(ConfigError, match="guidance-distilled"):
        generate(config)
    assert not (tmp_path / "x").exists()
