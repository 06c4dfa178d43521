"""Qwen-Image, FLUX.2 and SANA recorded end to end on tiny random-weight pipelines (``tests/tiny_families.py``): the
output is bit-identical with and without recording; every stored map of a 2-step non-square run equals an
independent float64 reference of the very q and k the model used (a softmax of SDPA's arguments; for SANA's linear
self-attention the ReLU kernel of its ``to_q``/``to_k`` outputs), head-mean and per-head, within one float16 step;
the runs pass ``validate --strict``; the token sets sit where each pipeline puts the prompt; x̂0 previews decode as
the pipeline decodes; ``diffviz generate --model FOLDER`` works; and the recorder observes the conditional call of a
step that calls the denoiser twice (Qwen-Image's true CFG)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from capture import cli, families  # noqa: E402
from capture import pipeline as pipeline_mod  # noqa: E402
from capture.config import GenerateConfig  # noqa: E402
from capture.recorder import AttentionRecorder, build_recorder, plan_layers, record_attention  # noqa: E402
from capture.run import generate, prepare  # noqa: E402
from export import validate as validate_mod  # noqa: E402
from export.reader import open_run  # noqa: E402
from tests.test_capture_observe import Spy, cell_mean, within_one_half_step  # noqa: E402
from tests.tiny_families import tiny_family  # noqa: E402

PROMPT = "a red circle and a blue square"
#: family -> ((height, width) asked, cross resolution, self resolution); every grid pools evenly. SANA's 48x80 is
#: generated at its 512-px bin 384x640 (12x20 tokens) and resized back.
CASES = {"qwen_image": ((32, 48), 6, 3), "flux2": ((32, 48), 6, 3), "sana": ((48, 80), 10, 10)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's tiny pipeline folder, built when a test first asks for it (FLUX.2 needs a newer diffusers than
    the oldest one ``make compat`` runs the capture tests on)."""
    import diffusers

    class Built(dict):
        def __missing__(self, name):
            if not hasattr(diffusers, families.family_named(name).pipeline_class):
                pytest.skip(f"diffusers {diffusers.__version__} has no {families.family_named(name).pipeline_class}")
            self[name] = str(tiny_family(name, tmp_path_factory))
            return self[name]

    return Built()


def _pipe(folders, name):
    return pipeline_mod.load_pipeline(folders[name], device="cpu", dtype="float32")


class LinearSpy(Spy):
    """:class:`Spy` plus SANA's linear self-attention, from forward hooks on each ``attn1``'s ``to_q`` and ``to_k``
    (not the ReLU calls the recorder sees): ``A = relu(q)·relu(k)ᵀ / (Σ_j relu(q)·relu(k_j) + 1e-15)`` in float64, per
    head, of the last sample."""

    def __init__(self, denoiser, monkeypatch):
        super().__init__(denoiser, monkeypatch)
        for name, module in denoiser.named_modules():
            if name.endswith(".attn1"):
                seen = {}
                self.handles.append(module.to_q.register_forward_hook(self._keep(seen, "q")))
                self.handles.append(module.to_k.register_forward_hook(self._linear(seen, name, module.heads)))

    @staticmethod
    def _keep(seen, what):
        def hook(module, args, output):
            seen[what] = output
        return hook

    def _linear(self, seen, name, heads):
        def hook(module, args, output):
            q, k = (t[-1].double().unflatten(-1, (heads, -1)).transpose(0, 1).relu() for t in (seen["q"], output))
            scores = q @ k.transpose(-1, -2)                                    # [heads, N, N]
            self.calls.setdefault(name, []).append((scores / (scores.sum(-1, keepdim=True) + 1e-15)).numpy())
        return hook


def _reference(run, layer, probs: dict[str, np.ndarray], per_head: bool) -> dict[str, np.ndarray]:
    """The maps the contract defines for ``layer`` from the reference probabilities of its modules."""
    meta = run.metadata
    native = tuple(layer["native"])
    n_img = native[0] * native[1]
    rows = [t["index"] for t in meta["tokens"]]
    cross_grid, self_grid = tuple(layer["cross_shape"][-2:]), tuple(layer["self_grid"])
    cq, sq = cell_mean(native, cross_grid), cell_mean(native, self_grid)
    key_sum = (sq > 0).astype(np.float64)
    out = {}
    if layer["kind"] == "linear":
        cross = np.einsum("cq,hqk->hck", cq, probs["attn2"])[:, :, rows]
        image_self = probs["attn1"].mean(axis=0)
    else:   # Qwen-Image and FLUX.2: one softmax over [text; image]
        ctx = meta["context_length"]
        img, p = np.arange(n_img) + ctx, probs["attn"]
        cross = np.einsum("cq,hqk->hck", cq, p[:, img][:, :, rows])
        image_self = p[:, img][:, :, img].mean(axis=0)
        out["text"] = (p[:, rows][:, :, img].mean(axis=0) @ (cq > 0).T.astype(np.float64)).reshape(len(rows), *cross_grid)
    cross = cross.transpose(0, 2, 1).reshape(-1, len(rows), *cross_grid)
    out["cross"] = cross if per_head else cross.mean(axis=0)
    out["self"] = sq @ image_self @ key_sum.T
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_maps_equal_a_float64_reference_of_the_very_q_and_k(folders, name, tmp_path, monkeypatch):
    (height, width), res, self_res = CASES[name]
    pipe = _pipe(folders, name)
    for per_head in (False, True):   # the per-head run keeps self maps at their native grid (no key pooling)
        spy = LinearSpy(pipe.transformer, monkeypatch)
        try:
            config = GenerateConfig(prompt=PROMPT, num_steps=2, height=height, width=width, model=folders[name],
                                    output_dir=str(tmp_path / f"{name}-{per_head}"), device="cpu", per_head=per_head,
                                    attention_resolution=res, self_attention_resolution=64 if per_head else self_res)
            path = generate(config, pipeline=pipe)
        finally:
            spy.remove()
        assert validate_mod.validate_run(path, strict=True) == []
        run = open_run(path)
        meta = run.metadata
        assert meta["family"]["name"] == name and meta["attention"]["cfg_half"] != ""
        assert {layer["kind"] for layer in run.layers} == set(families.family_named(name).kinds)
        calls_per_step = 2 if name == "qwen_image" else 1   # true CFG: the prompt's call, then the negative one's
        for layer in run.layers:
            modules = {site: spy.calls[f"{layer['name']}.{site}"] for site in ("attn1", "attn2", "attn")
                       if f"{layer['name']}.{site}" in spy.calls}
            assert all(len(calls) == 2 * calls_per_step for calls in modules.values())
            for step in range(2):
                probs = {site: calls[step * calls_per_step] for site, calls in modules.items()}
                ref = _reference(run, layer, probs, per_head)
                stored = run.cross_heads(layer["index"], step) if per_head else run.cross(layer["index"], step)
                within_one_half_step(stored, ref["cross"])
                within_one_half_step(run.self_attention(layer["index"], step), ref["self"])
                if "text" in ref:
                    within_one_half_step(run.text(layer["index"], step), ref["text"])
    # planned from the folder's configs alone (as `generate` and the bridge's cost model do before loading): the same
    # tokens and grids, and each observed call's (queries, keys) as the cost model counts them (Qwen-Image's text
    # length depends on the prompt: the model counts its longest)
    prepared = prepare(config)
    family = families.family_named(name)
    assert prepared.tokens.tokens == meta["tokens"] and (prepared.height, prepared.width) == run.image_size
    for plan, layer in zip(prepared.plans, run.layers):
        assert (plan.name, list(plan.native)) == (layer["name"], layer["native"])
        for module, role in plan.sites:
            queries, keys = spy.calls[f"{plan.name}.{module}"][0].shape[-2:]
            extent = family.attention_extent(plan, role, prepared.peek.context_length)
            if name == "qwen_image":
                assert extent[0] >= queries and extent[1] >= keys and extent[0] - queries == 512 - meta["context_length"]
            else:
                assert extent == (queries, keys)
    if name == "qwen_image":   # the negative prompt's call has its own (shorter) text: it is not what was stored
        key_lengths = {calls[0].shape[-1] - calls[1].shape[-1] for calls in spy.calls.values()}
        assert key_lengths == {meta["context_length"] - 6}   # " " is 1 token + the template's 5
    if name == "sana":   # generated at its aspect-ratio bin, resized back to the size asked
        assert (meta["run"]["height"], meta["run"]["width"], meta["run"]["output_size"]) == (384, 640, [48, 80])
        assert run.final_image().shape == (48, 80, 3) and run.image(1).shape == (384, 640, 3)


@pytest.mark.parametrize("name", list(CASES))
def test_output_is_bit_identical_with_recording(folders, name):
    pipe = _pipe(folders, name)
    family = families.for_pipeline(pipe)
    (height, width), res, self_res = CASES[name]
    kwargs = family.pipeline_kwargs(GenerateConfig(prompt=PROMPT, cfg_scale=4.0), family.peek_pipe(pipe))
    call = dict(num_inference_steps=2, height=height, width=width, output_type="pt", **kwargs)

    def image(callback=None):
        extra = family.callback_kwargs(callback) if callback else {}
        with torch.no_grad():
            return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(3), **call, **extra).images

    plain = image()
    with record_attention(pipe, height=height, width=width, resolution=res, self_resolution=self_res,
                          prompt=PROMPT, per_head=True) as rec:
        recorded = image(rec.callback_on_step_end)
    assert torch.equal(plain, recorded)
    assert len(rec.steps) == 2 and all(len(s.cross) == len(s.self_) == len(rec.layers) for s in rec.steps)
    assert torch.equal(plain, image())   # the hooks are gone
    if name == "qwen_image":   # its text length is the prompt's: without one there is nothing to plan the keys by
        with pytest.raises(ValueError, match="depends on the prompt"):
            build_recorder(pipe, height=height, width=width)


def test_the_recorded_denoiser_call_of_a_step_is_the_one_the_family_names():
    """A pipeline that calls its denoiser twice per step (Qwen-Image's true CFG: the prompt's call first) records the
    call the family names (``denoiser_call``), not whichever ran last."""
    unet = pipeline_mod.load_pipeline(None, device="cpu", dtype="float32").unet
    plans, _ = plan_layers(unet, (8, 8), resolution=8, self_resolution=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    contexts = [torch.randn(1, 77, unet.config.cross_attention_dim, generator=g) for _ in range(2)]

    def one_step(contexts, call):
        recorder = AttentionRecorder(unet, plans, context_length=77, denoiser_call=call).install()
        try:
            with torch.no_grad():
                for context in contexts:
                    unet(x, torch.tensor(500), encoder_hidden_states=context)
            return recorder.collect()
        finally:
            recorder.remove()

    first, second = one_step(contexts[:1], None), one_step(contexts[1:], None)
    for call, alone in ((0, first), (1, second)):
        both = one_step(contexts, call)
        assert both.cross.keys() == alone.cross.keys() == set(range(len(plans)))
        for layer in alone.cross:
            np.testing.assert_array_equal(both.cross[layer], alone.cross[layer])
            np.testing.assert_array_equal(both.self_[layer], alone.self_[layer])
    assert not np.allclose(first.cross[0], second.cross[0])


def _encoded(pipe, prompt, **kwargs):
    """The pipeline's own prompt encoding, with the token ids its text encoder received."""
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("ids", kwargs.get("input_ids", args[0] if args else None)[0].tolist())

    hook = pipe.text_encoder.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            out = pipe.encode_prompt(prompt, device="cpu", **kwargs)
    finally:
        hook.remove()
    return seen["ids"], out


def test_qwen_image_tokens_are_the_prompts_then_5_template_tokens_follow(folders):
    """The pipeline drops 34 template positions; then the prompt's tokens, then 5 closing template tokens."""
    prompt, qwen = "a big red circle", _pipe(folders, "qwen_image")
    info = families.for_pipeline(qwen).tokens({"tokenizer": qwen.tokenizer}, prompt)
    ids, (embeds, _mask) = _encoded(qwen, prompt)
    assert [t["index"] for t in info.tokens] == [0, 1, 2, 3] and info.words == ["a", "big", "red", "circle"]
    assert [t["id"] for t in info.tokens] == ids[34:38] == qwen.tokenizer(prompt).input_ids
    assert info.token_sets[0]["sequence_length"] == embeds.shape[1] == len(ids) - 34 == 4 + 5


def test_flux2_tokens_sit_between_inst_tags(folders):
    """Strictly between [INST] and [/INST], found in the ids (not at a fixed offset), 512 slots in all."""
    prompt, flux2 = "a big red circle", _pipe(folders, "flux2")
    info = families.for_pipeline(flux2).tokens({"tokenizer": flux2.tokenizer}, prompt)
    ids, (embeds, _text_ids) = _encoded(flux2, prompt)
    start = info.tokens[0]["index"]
    assert [t["index"] for t in info.tokens] == list(range(start, start + 4)) and info.words[-1] == "circle"
    assert [t["id"] for t in info.tokens] == ids[start:start + 4]
    assert flux2.tokenizer.convert_ids_to_tokens([ids[start - 1], ids[start + 4]]) == ["[INST]", "[/INST]"]
    assert info.token_sets[0]["offset"] + info.token_sets[0]["sequence_length"] == embeds.shape[1] == 512


def test_sana_tokens_are_bos_then_the_lower_cased_prompt(folders):
    """``<bos>``, then the lower-cased, stripped prompt (its first word merged with the instruction's trailing space):
    exactly the keys the pipeline's own mask leaves unmasked, with the ids it kept there."""
    prompt, sana = " A Big RED circle", _pipe(folders, "sana")
    info = families.for_pipeline(sana).tokens({"tokenizer": sana.tokenizer}, prompt)
    instruction = inspect.signature(type(sana).__call__).parameters["complex_human_instruction"].default
    ids, (_embeds, mask, _neg, _neg_mask) = _encoded(sana, prompt, complex_human_instruction=instruction)
    kept = [ids[0]] + ids[-299:]   # the pipeline's select_index
    assert [t["text"] for t in info.tokens] == ["<bos>", "▁a", "▁big", "▁red", "▁circle"]
    assert info.words == ["a", "big", "red", "circle"] and info.tokens[0]["special"]
    assert mask.shape == (1, 300) and mask[0].nonzero().flatten().tolist() == [t["index"] for t in info.tokens]
    assert [kept[t["index"]] for t in info.tokens] == [t["id"] for t in info.tokens]


@pytest.mark.parametrize("name, size, res", [("qwen_image", (32, 48), (6, 3)), ("flux2", (48, 32), (6, 3)),
                                             ("sana", (384, 640), (10, 5))])
def test_generate_cli_records_each_family_and_previews_decode_as_the_pipeline(folders, name, size, res, tmp_path,
                                                                              capsys):
    """``diffviz generate --model FOLDER``: a 2-step non-square run lands and passes ``validate --strict``; at the last
    step σ goes to 0, so the last x̂0 preview is the pipeline's own output (decoded with Qwen's latent mean/std,
    FLUX.2's batch-norm statistics, SANA's DC-AE scaling; SANA asked for one of its bins: no resize)."""
    out = tmp_path / "cli"
    code = cli.main(["--model", folders[name], "--prompt", PROMPT, "--num-steps", "2", "--height", str(size[0]),
                     "--width", str(size[1]), "--output-dir", str(out), "--quiet", "--device", "cpu",
                     "--attention-resolution", str(res[0]), "--self-attention-resolution", str(res[1]),
                     *(["--concept-maps"] if name != "sana" else [])])
    assert code == 0, capsys.readouterr().err
    assert validate_mod.validate_run(out, strict=True) == []
    run = open_run(out)
    assert run.metadata["family"]["pipeline"] == families.family_named(name).pipeline_class
    assert "output_size" not in run.metadata["run"] and run.image_size == size
    assert run.has_concept == (name != "sana")   # joint layers: concept maps within their rule (validated above)
    final, preview = run.final_image().astype(int), run.image(1).astype(int)
    assert final.std() > 1 and np.abs(final - preview).max() <= 1
    if name == "sana":   # the dashboard reads the new kind from the run
        from app.store import RunData

        data = RunData(run, "sana")
        assert data.layer_summary() == "2 (2 linear; 2 cross, 2 self, 0 text)"
        assert data.layer_label(0) == "linear · transformer_blocks.0 · 6×10"   # 12x20 tokens, pooled by 2


def test_a_linear_layers_self_rows_may_fall_short_of_1_but_never_pass_it(tmp_path):
    """Kind ``linear``: a head whose query meets no key has a zero row, so a stored row may sum to < 1 (a ``unet``
    layer's may not); a row above 1 is refused, naming the linear rule."""
    from export import contract
    from tests.synthetic import write_synthetic_run
    from tests.test_validate import load_meta, read_map, replace_file, save_meta

    run = write_synthetic_run(tmp_path / "run", steps=2, layers=1)
    rel = contract.self_path(0, 1)
    rows = read_map(run, rel)
    replace_file(run, rel, (rows * 0.75).astype("<f2").tobytes())
    assert any(p.startswith(f"{rel}: rows sum to") for p in validate_mod.validate_run(run))
    meta = load_meta(run)
    meta["layers"][0]["kind"] = "linear"
    meta["attention"]["kinds"] = {"linear": contract.LAYER_KINDS["linear"].to_metadata()}
    save_meta(run, meta)
    assert validate_mod.validate_run(run) == []
    replace_file(run, rel, (rows * 1.5).astype("<f2").tobytes())
    top = (rows * 1.5).astype("<f2").astype(np.float64).sum(axis=1).max()
    assert [p for p in validate_mod.validate_run(run) if p.startswith(rel)] == \
        [f"{rel}: rows reach {top:.4f} > 1 + 0.01 ({contract.LINEAR_SELF_SUM_RULE})"]


def test_a_diffusers_without_the_familys_classes_is_one_line(folders, monkeypatch, tmp_path, capsys):
    """FLUX.2 came after the oldest diffusers diffviz allows: there, its folder is refused in one line, before any
    weights load and without writing anything."""
    monkeypatch.setattr(type(families.family_named("flux2")), "transformer_class", "NoSuchTransformer2DModel")
    code = cli.main(["--model", folders["flux2"], "--prompt", PROMPT, "--num-steps", "1", "--output-dir",
                     str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "has no NoSuchTransformer2DModel: Flux2Pipeline needs a newer diffusers" in err
    assert not (tmp_path / "out").exists()
