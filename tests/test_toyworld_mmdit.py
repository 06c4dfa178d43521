"""The toy-world MM-DiT: its T5 tokenizer, its joint-attention probe, one training step, its config, the shipped folder."""
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from capture.toyworld import mmdit  # noqa: E402
from capture.toyworld.architecture import DEFAULT_WORDS  # noqa: E402
from capture.toyworld.probe import ProbeStore  # noqa: E402
from capture.toyworld.training.config import TrainConfig, TrainConfigError  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "capture" / "toyworld" / "model_mmdit"


@pytest.fixture(scope="module")
def tiny():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(str(SHIPPED / "vae"), local_files_only=True).float()
    return mmdit.build_mmdit_pipeline(vae, layers=2, heads=2, head_dim=8)


def test_t5_tokenizer_round_trips_the_vocabulary():
    tok = mmdit.build_t5_tokenizer()
    for w in DEFAULT_WORDS:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [mmdit.SPIECE + w]
    text = "a red circle and a blue square on the left"
    ids = tok(text, padding="max_length", max_length=mmdit.T5_LENGTH).input_ids
    assert len(ids) == 16 and ids[10] == tok.eos_token_id and ids[11:] == [tok.pad_token_id] * 5
    assert tok.decode(ids, skip_special_tokens=True) == text
    table = {w: tok(w, add_special_tokens=False).input_ids[0] for w in DEFAULT_WORDS}
    assert mmdit.t5_ids([text.split()], table, tok.eos_token_id, tok.pad_token_id)[0].tolist() == ids


def test_encode_matches_the_pipeline_and_the_probe_matches_the_default_processor(tiny):
    prompt = "a red circle and a blue square"
    with torch.no_grad():
        pe, _, pooled, _ = tiny.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                              max_sequence_length=mmdit.T5_LENGTH)
        clip = tiny.tokenizer(prompt, padding="max_length", max_length=16, return_tensors="pt").input_ids
        t5 = tiny.tokenizer_3(prompt, padding="max_length", max_length=16, return_tensors="pt").input_ids
        embeds, pool = mmdit.encode(tiny, clip, t5)
        assert embeds.shape == (1, 32, mmdit.T5_WIDTH)
        assert torch.allclose(embeds, pe, atol=1e-6) and torch.allclose(pool, pooled, atol=1e-6)
        x = torch.randn(2, 8, 8, 8)
        kw = dict(hidden_states=x, timestep=torch.tensor([700.0, 100.0]), encoder_hidden_states=embeds.repeat(2, 1, 1),
                  pooled_projections=pool.repeat(2, 1))
        ref = tiny.transformer(**kw).sample
        store = ProbeStore()
        names = mmdit.install(tiny.transformer, store)
        try:
            out = tiny.transformer(**kw).sample
        finally:
            mmdit.uninstall(tiny.transformer)
    assert names == ["transformer_blocks.0", "transformer_blocks.1"]
    assert torch.allclose(out, ref, atol=1e-5)
    maps = store.maps["transformer_blocks.1"]
    assert maps.shape == (2, 64, 32)
    sums = maps.sum(-1)       # the softmax also covers the image keys
    assert bool((sums > 0).all() and (sums < 1).all())


def test_one_training_step_runs_and_moves_the_weights(tiny):
    from capture.toyworld.training.common import Logger
    from capture.toyworld.training.denoiser_mmdit import train_mmdit
    before = [p.detach().clone() for p in tiny.transformer.parameters()]
    info = train_mmdit(tiny, steps=1, time_budget=None, batch=2, lr=1e-3, seed=0, device="cpu",
                       log=Logger(None, quiet=True), ground_weight=0.1, warmup=1)
    assert info["denoiser_steps_done"] == 1 and info["final_mse"] > 0 and info["final_ground"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny.transformer.parameters()))
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    assert all(isinstance(p, JointAttnProcessor2_0) for p in tiny.transformer.attn_processors.values())


@pytest.mark.parametrize("changes, flag", [
    ({"family": "sd4"}, "--family"), ({"mmdit_layers": 0}, "--mmdit-layers"), ({"lr": -1.0}, "--lr"),
    ({"shift": float("nan")}, "--shift"), ({"p_empty": 1.0}, "--p-empty"), ({"batch": 2.5}, "--batch"),
    ({"steps": 3, "time_budget": 10.0}, "--time-budget"), ({"vae_from": "/nonexistent/x"}, "--vae-from"),
])
def test_config_refuses_bad_values_in_one_line(tmp_path, changes, flag):
    cfg = TrainConfig(**{"family": "sd3", "out": str(tmp_path / "m"), **changes})
    with pytest.raises(TrainConfigError) as err:
        cfg.resolved().validate()
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


def test_config_fills_the_family_defaults(tmp_path):
    sd3 = TrainConfig(family="sd3", out=str(tmp_path / "m")).resolved().validate()
    assert (sd3.steps, sd3.lr, sd3.ground_weight) == (1800, 5e-4, 0.1) and Path(sd3.vae_from).is_dir()
    unet = TrainConfig(out=str(tmp_path / "m")).resolved().validate()
    assert (unet.steps, unet.lr, unet.vae_from) == (1925, 1e-3, None)
    assert TrainConfig(out=str(tmp_path / "m"), time_budget=60.0).resolved().steps is None


def test_shipped_folder_loads_offline_small_and_fp16():
    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open
    from capture.config import model_source
    assert model_source("toyworld-mmdit") == ("folder", str(SHIPPED))
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 15 * 2**20
    for weights in SHIPPED.rglob("*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys()), weights
    pipe = StableDiffusion3Pipeline.from_pretrained(str(SHIPPED), local_files_only=True, dtype=torch.float32)
    assert pipe.transformer.config.patch_size == 1 and pipe.tokenizer_3.model_max_length == mmdit.T5_LENGTH
    vae = pipe.vae.config
    record = json.loads((SHIPPED / "training.json").read_text())
    assert vae.shift_factor == record["vae"]["shift_factor"] and vae.scaling_factor == record["vae"]["scaling_factor"]
    assert set(record["seconds"]) >= {"denoiser", "decoder_adapt"} and record["denoiser_steps_done"] > 0
