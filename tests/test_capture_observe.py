"""Recording by observation, family by family (the toy SD and MM-DiT models, tiny random SDXL, SD3, Flux and PixArt-Σ):
the pipeline's output is bit-identical with and without recording; every stored map of a 2-step non-square run
equals an independent float64 softmax of the very q and k (and mask and scale) the model handed to attention,
within one float16 step, head-mean and per-head; the run passes ``validate --strict``. Also: custom processors, a
caching hook's skipped steps, and a non-observable attention backend."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from capture import families  # noqa: E402
from capture import pipeline as pipeline_mod  # noqa: E402
from capture.config import GenerateConfig  # noqa: E402
from capture.recorder import ShapeMismatchError, record_attention  # noqa: E402
from capture.run import generate  # noqa: E402
from export import validate as validate_mod  # noqa: E402
from export.reader import open_run  # noqa: E402
from tests import tiny_pipelines  # noqa: E402

PROMPT = "a red circle and a blue square"
#: family -> (builder or a shipped model's name, (height, width), cross resolution, self resolution); every grid
#: pools evenly, and PixArt's 48x84 request is binned to 192x336
CASES = {
    "sd": (None, (32, 48), 6, 3),
    "mmdit": ("toyworld-mmdit", (32, 32), 4, 2),
    "sdxl": ("build_sdxl", (32, 48), 6, 3),
    "sd3": ("build_sd3", (32, 48), 6, 3),
    "flux": ("build_flux", (32, 48), 6, 3),
    "pixart": ("build_pixart", (48, 84), 7, 7),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built = {}
    for name, (source, *_rest) in CASES.items():
        if source is not None and source.startswith("build_"):
            built[name] = str(getattr(tiny_pipelines, source)(root / name))
        else:
            built[name] = source
    return built


def _pipe(models, name):
    return pipeline_mod.load_pipeline(models[name], device="cpu", dtype="float32")


class Spy:
    """The reference: ``F.scaled_dot_product_attention`` patched (a different mechanism from the recorder's), with
    forward pre-hooks naming the attention module that is running. Keeps, per module and call, the float64
    probabilities ``softmax(q kᵀ · scale + mask)`` of the last sample, ``[heads, queries, keys]``."""

    def __init__(self, denoiser, monkeypatch):
        self.calls: dict[str, list[np.ndarray]] = {}
        self.current: list[str] = []
        self.handles = []
        for name, module in denoiser.named_modules():
            if hasattr(module, "processor"):
                self.handles.append(module.register_forward_pre_hook(self._enter(name)))
                self.handles.append(module.register_forward_hook(self._leave))
        real = F.scaled_dot_product_attention

        def spy(*args, **kwargs):
            if not self.current:  # the text encoders' attention
                return real(*args, **kwargs)
            call = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args), **kwargs)
            q, k = call["query"][-1].double(), call["key"][-1].double()
            scale = call.get("scale") or q.shape[-1] ** -0.5
            scores = q @ k.transpose(-1, -2) * scale
            mask = call.get("attn_mask")
            if mask is not None:
                while mask.dim() < 4:
                    mask = mask[None]
                mask = mask[-1].double() if mask.dtype != torch.bool else torch.where(mask[-1], 0.0, -math.inf).double()
                scores = scores + mask
            self.calls.setdefault(self.current[-1], []).append(torch.softmax(scores, dim=-1).numpy())
            return real(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)

    def _enter(self, name):
        def hook(module, args):
            self.current.append(name)
        return hook

    def _leave(self, module, args, output):
        self.current.pop()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def cell_mean(native, grid) -> np.ndarray:
    """``[cells, pixels]``: each cell's mean over its pixels; pixel (y, x) lies in cell (y·gh // H, x·gw // W)."""
    (h, w), (gh, gw) = native, grid
    m = np.zeros((gh * gw, h * w))
    for y in range(h):
        for x in range(w):
            m[(y * gh // h) * gw + x * gw // w, y * w + x] = 1.0
    return m / m.sum(axis=1, keepdims=True)


def within_one_half_step(stored: np.ndarray, reference: np.ndarray) -> None:
    """``stored`` (read back from float16) equals ``reference`` within one float16 step at the value."""
    step = np.spacing(np.abs(reference).astype(np.float16)).astype(np.float64)
    bad = np.abs(stored.astype(np.float64) - reference) > step + 1e-7
    assert not bad.any(), f"{bad.sum()} of {bad.size} values off by more than one float16 step " \
                          f"(max {np.abs(stored - reference).max():.3g})"


def _reference(run, layer, probs: dict[str, np.ndarray], per_head: bool) -> dict[str, np.ndarray]:
    """The maps the contract defines for ``layer`` from the spy's probabilities of its modules."""
    meta = run.metadata
    native = tuple(layer["native"])
    n_img = native[0] * native[1]
    rows = [t["index"] for t in meta["tokens"]]
    cross_grid = tuple(layer["cross_shape"][-2:])
    self_grid = tuple(layer["self_grid"])
    cq, sq = cell_mean(native, cross_grid), cell_mean(native, self_grid)
    key_sum = (sq > 0).astype(np.float64)                            # [cells, pixels]: each cell's keys summed
    out = {}
    if layer["kind"] in ("unet", "cross-dit"):
        cross = np.einsum("cq,hqk->hck", cq, probs["attn2"])[:, :, rows]   # [H, cells, T]
        self_ = sq @ probs["attn1"].mean(axis=0) @ key_sum.T
    else:
        ctx = meta["context_length"]
        image_first = meta["family"]["name"] in ("sd3", "mmdit")
        img = np.arange(n_img) + (0 if image_first else ctx)
        cols = np.array(rows) + (n_img if image_first else 0)
        p = probs["attn"]
        cross = np.einsum("cq,hqk->hck", cq, p[:, img][:, :, cols])
        self_ = sq @ p[:, img][:, :, img].mean(axis=0) @ key_sum.T
        text = p[:, cols][:, :, img].mean(axis=0) @ (cq > 0).T.astype(np.float64)   # [T, cells]
        out["text"] = text.reshape(len(rows), *cross_grid)
    cross = cross.transpose(0, 2, 1).reshape(-1, len(rows), *cross_grid)
    out["cross"] = cross if per_head else cross.mean(axis=0)
    out["self"] = self_
    return out


def _record(models, name, tmp_path, monkeypatch, per_head):
    source, (height, width), res, self_res = CASES[name]
    pipe = _pipe(models, name)
    spy = Spy(families.for_pipeline(pipe).denoiser(pipe), monkeypatch)
    try:
        config = GenerateConfig(prompt=PROMPT, num_steps=2, height=height, width=width, model=models[name],
                                output_dir=str(tmp_path / f"{name}-{per_head}"), device="cpu", per_head=per_head,
                                attention_resolution=res, self_attention_resolution=self_res)
        path = generate(config, pipeline=pipe)
    finally:
        spy.remove()
    return path, spy


@pytest.mark.parametrize("name", list(CASES))
def test_maps_equal_a_float64_softmax_of_the_very_q_and_k(models, name, tmp_path, monkeypatch):
    for per_head in (False, True):
        path, spy = _record(models, name, tmp_path, monkeypatch, per_head)
        assert validate_mod.validate_run(path, strict=True) == []
        run = open_run(path)
        assert run.metadata["attention"]["processors"] and run.layers
        for layer in run.layers:
            modules = {site: spy.calls[f"{layer['name']}.{site}"] for site in ("attn1", "attn2", "attn")
                       if f"{layer['name']}.{site}" in spy.calls}
            for step in range(2):
                ref = _reference(run, layer, {site: calls[step] for site, calls in modules.items()}, per_head)
                stored = run.cross_heads(layer["index"], step) if per_head else run.cross(layer["index"], step)
                within_one_half_step(stored, ref["cross"])
                within_one_half_step(run.self_attention(layer["index"], step), ref["self"])
                if "text" in ref:
                    within_one_half_step(run.text(layer["index"], step), ref["text"])


@pytest.mark.parametrize("name", list(CASES))
def test_output_is_bit_identical_with_recording(models, name):
    pipe = _pipe(models, name)
    family = families.for_pipeline(pipe)
    _, (height, width), res, self_res = CASES[name]
    peek = family.peek_pipe(pipe)
    kwargs = family.pipeline_kwargs(GenerateConfig(prompt=PROMPT, cfg_scale=4.0), peek)
    call = dict(num_inference_steps=2, height=height, width=width, output_type="pt", **kwargs)

    def image(callback=None):
        extra = family.callback_kwargs(callback) if callback else {}
        with torch.no_grad():
            return pipe(PROMPT, generator=torch.Generator().manual_seed(3), **call, **extra).images

    plain = image()
    with record_attention(pipe, height=height, width=width, resolution=res, self_resolution=self_res,
                          prompt=PROMPT, per_head=True) as rec:
        recorded = image(rec.callback_on_step_end)
    assert torch.equal(plain, recorded)
    assert len(rec.steps) == 2 and all(len(s.cross) == len(rec.layers) for s in rec.steps)
    assert torch.equal(plain, image())   # the hooks are gone


class WrappedProcessor:
    """A custom processor: the default one wrapped, its output scaled by 1 (it calls SDPA through the default)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return self.inner(attn, hidden_states, *args, **kwargs) * 1.0


def test_a_custom_processor_is_recorded_with_the_output_unchanged(models):
    pipe = _pipe(models, "sd")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    module = pipe.unet.get_submodule(name)
    original = module.processor
    kwargs = dict(num_inference_steps=2, output_type="pt", guidance_scale=4.0)
    with torch.no_grad():
        plain = pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kwargs).images
        module.set_processor(WrappedProcessor(original))
        try:
            with record_attention(pipe, layers=[name + ".processor"], resolution=4, self_resolution=2) as rec:
                recorded = pipe(PROMPT, generator=torch.Generator().manual_seed(1),
                                callback_on_step_end=rec.callback_on_step_end, **kwargs).images
            assert isinstance(module.processor, WrappedProcessor)   # never replaced
        finally:
            module.set_processor(original)
    assert torch.equal(plain, recorded)
    assert rec.processors() == ["AttnProcessor2_0", "WrappedProcessor"]
    np.testing.assert_allclose(rec.steps[1].cross[0].sum(axis=0), 1.0, atol=1e-5)


def test_a_processor_that_computes_attention_another_way_is_refused_in_one_line(models, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor

    pipe = _pipe(models, "sd")
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    module = pipe.unet.get_submodule(name)
    original = module.processor
    module.set_processor(AttnProcessor())   # baddbmm + softmax: no scaled_dot_product_attention call
    out = tmp_path / "refused"
    try:
        config = GenerateConfig(prompt=PROMPT, num_steps=1, output_dir=str(out), device="cpu")
        with pytest.raises(ShapeMismatchError) as err:
            generate(config, pipeline=pipe)
    finally:
        module.set_processor(original)
    message = str(err.value)
    assert "\n" not in message and "AttnProcessor" in message and name.rsplit(".", 1)[0] in message
    assert "scaled_dot_product_attention" in message
    assert not out.exists()


def test_first_block_cache_steps_are_recorded_as_not_computed(models, tmp_path):
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = pipeline_mod.load_pipeline(models["flux"], device="cpu", dtype="float32")
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))   # every step after the first reuses
    try:
        config = GenerateConfig(prompt=PROMPT, num_steps=3, height=32, width=48, model=models["flux"],
                                output_dir=str(tmp_path / "cached"), device="cpu", attention_resolution=6,
                                self_attention_resolution=3)
        path = generate(config, pipeline=pipe)
    finally:
        pipe.transformer.disable_cache()
    assert validate_mod.validate_run(path, strict=True) == []
    run = open_run(path)
    first, *tail = run.layers
    assert "computed" not in first                       # the first block always runs
    assert tail and all(layer["computed"] == [True, False, False] for layer in tail)
    assert run.computed(0, 2) and not run.computed(1, 2) and run.computed(1, 0)
    assert not any(f"layer_{layer['index']}_step_001" in rel for layer in tail for rel in run.files)
    with pytest.raises(Exception, match="was not computed at step 1"):
        run.cross(1, 1)
    entropy = run.metrics["entropy"]["per_layer"]
    assert entropy[1][1:] == [None, None] and all(v is not None for v in entropy[0])
    assert run.metrics["entropy"]["mean"][1] == pytest.approx(entropy[0][1])   # over the layers computed


def test_a_non_observable_backend_is_switched_to_native_and_stated(models, tmp_path):
    from diffusers.models.attention_dispatch import AttentionBackendName

    pipe = pipeline_mod.load_pipeline(models["flux"], device="cpu", dtype="float32")
    processors = list(pipe.transformer.attn_processors.values())
    for processor in processors:
        processor._attention_backend = AttentionBackendName.FLEX   # never forms the probabilities
    try:
        config = GenerateConfig(prompt=PROMPT, num_steps=1, height=32, width=48, model=models["flux"],
                                output_dir=str(tmp_path / "flex"), device="cpu", attention_resolution=6,
                                self_attention_resolution=3)
        path = generate(config, pipeline=pipe)
        assert all(p._attention_backend == AttentionBackendName.FLEX for p in processors)   # restored after
    finally:
        for processor in processors:
            processor._attention_backend = None
    meta = open_run(path).metadata
    assert meta["attention"]["backend"] == {"used": "native", "requested": "flex"}
    assert validate_mod.validate_run(path, strict=True) == []


def test_the_dashboard_counts_a_new_kind_from_the_run(models, tmp_path):
    """The app reads layer kinds from metadata.json: a PixArt run's ``cross-dit`` layers are counted, not dropped."""
    from app.store import RunData

    config = GenerateConfig(prompt=PROMPT, num_steps=1, height=48, width=84, model=models["pixart"],
                            output_dir=str(tmp_path / "pixart"), device="cpu", attention_resolution=7,
                            self_attention_resolution=7)
    data = RunData(open_run(generate(config)), "pixart")
    assert data.layer_summary() == "2 (2 cross-dit; 2 cross, 2 self, 0 text)"
    assert data.layer_label(0) == "cross-dit · transformer_blocks.0 · 4×7"


def test_an_edit_rewrites_the_attention_call_in_one_place(models):
    """The seam interventions build on: ``edit`` returning the call unchanged leaves the output bit-identical; one
    that masks a token's key changes the output, and the recorded map shows that token at zero."""
    from capture.recorder import AttentionRecorder, plan_layers

    pipe = _pipe(models, "sd")
    unet = pipe.unet
    plans, _ = plan_layers(unet, (8, 8), resolution=8, self_=False)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, unet.config.in_channels, 8, 8, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)

    def forward(edit):
        recorder = AttentionRecorder(unet, plans, context_length=77, edit=edit).install()
        try:
            with torch.no_grad():
                out = unet(x, torch.tensor(500), encoder_hidden_states=ctx).sample
            return out, recorder.collect()
        finally:
            recorder.remove()

    def knock_out(plan, role, call):
        mask = torch.zeros(1, 1, 1, call["key"].shape[-2], dtype=call["query"].dtype)
        mask[..., 2] = float("-inf")   # key 2: no query may attend to it
        return {**call, "attn_mask": mask}

    with torch.no_grad():
        plain = unet(x, torch.tensor(500), encoder_hidden_states=ctx).sample
    same, _ = forward(lambda plan, role, call: call)
    assert torch.equal(plain, same)
    changed, maps = forward(knock_out)
    assert not torch.allclose(plain, changed)
    for layer in maps.cross.values():
        assert np.abs(layer[2]).max() == 0 and np.allclose(layer.sum(axis=0), 1.0, atol=1e-5)


def test_generate_cli_records_pixart_and_warns_only_its_own(models, tmp_path, capsys):
    """``diffviz generate --model FOLDER`` on PixArt-Σ: the run lands, and stderr holds diffviz's own warnings (the
    uneven self grid), not a library's deprecation notice."""
    from capture import cli

    code = cli.main(["--model", models["pixart"], "--prompt", PROMPT, "--num-steps", "2", "--height", "48", "--width",
                     "84", "--output-dir", str(tmp_path / "cli"), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.splitlines()
    assert lines and all(line.startswith("diffviz generate: warning: layer transformer_blocks.") for line in lines), err
    assert open_run(tmp_path / "cli").metadata["run"]["output_size"] == [48, 84]
