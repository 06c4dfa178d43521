"""The shipped toy-world model: a complete pipeline folder that loads offline and generates; the training pieces."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from capture.toyworld import probe, world  # noqa: E402
from capture.toyworld.architecture import DEFAULT_WORDS, build_pipeline  # noqa: E402
from capture.toyworld.train import grounding_loss, main as train_main, token_table  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "capture" / "toyworld" / "model"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline
    p = StableDiffusionPipeline.from_pretrained(str(MODEL), local_files_only=True, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def test_shipped_folder_is_a_small_fp16_pipeline():
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (MODEL / part).is_dir(), part
    weights = sorted(MODEL.glob("*/*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    assert not list(MODEL.glob("*/*.bin"))
    total = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert total <= 15 * 1024 * 1024, total
    from safetensors import safe_open
    for w in weights:
        with safe_open(str(w), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"F16"}, (w, dtypes)
    record = json.loads((MODEL / "training.json").read_text())
    assert record["unet_steps_done"] > 0 and "vae" in record


def test_loads_offline_and_generates(pipe):
    assert isinstance(pipe.unet, diffusers.UNet2DConditionModel)
    cross = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]
    assert len({n.split(".")[0] + n.split(".")[1] for n in cross}) >= 3  # cross-attention at several blocks
    ids, bos, eos, length = token_table(pipe.tokenizer)   # every grammar word is one token of the shipped tokenizer
    assert set(ids) == set(DEFAULT_WORDS)
    out = pipe("a red circle and a blue square", num_inference_steps=5, output_type="np",
               generator=torch.Generator("cpu").manual_seed(0))
    img = out.images[0]
    assert img.shape == (32, 32, 3) and np.isfinite(img).all()
    again = pipe("a red circle and a blue square", num_inference_steps=5, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.allclose(img, again)


def test_probe_processor_matches_default_attention(pipe):
    """The training/eval probe must not change what the UNet computes."""
    gen = torch.Generator("cpu").manual_seed(1)
    c, r = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    lat = torch.randn(2, c, r, r, generator=gen)
    ids = torch.as_tensor(pipe.tokenizer(["a red circle", "a blue square and a green triangle"], padding="max_length",
                                         max_length=16)["input_ids"])
    with torch.no_grad():
        ctx = pipe.text_encoder(ids)[0]
        ref = pipe.unet(lat, torch.tensor([500, 20]), ctx).sample
        store = probe.ProbeStore()
        names = probe.install(pipe.unet, store)
        try:
            got = pipe.unet(lat, torch.tensor([500, 20]), ctx).sample
        finally:
            probe.uninstall(pipe.unet)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert set(store.maps) == set(names) and len(names) >= 3
    for m in store.maps.values():
        assert m.shape[0] == 2 and m.shape[2] == 16
        assert torch.allclose(m.sum(-1), torch.ones(m.shape[:2]), atol=1e-5)  # a distribution over the 16 keys


def test_grounding_loss_is_zero_on_the_mask_and_high_off_it():
    masks = torch.zeros(1, 3, 32, 32)
    masks[0, 0, :16, :16] = 1.0                          # object 0: top-left quarter
    tokens = torch.full((1, 3, 4), -1, dtype=torch.long)
    tokens[0, 0, 0] = 2                                  # its colour word is token 2
    on = torch.zeros(1, 256, 16)
    on[0, :, 0] = 1.0
    grid = torch.zeros(16, 16)
    grid[:8, :8] = 1.0
    on[0, :, 2] = grid.flatten() / grid.sum()           # token 2 looks only at the top-left quarter, evenly
    assert grounding_loss({"l": on}, masks, tokens).item() == pytest.approx(0.0, abs=1e-6)
    flat = torch.full((1, 256, 16), 1.0 / 16)           # uniform: a quarter of the mass inside
    # share 1/4 -> (3/4)^2; total variation to the quarter's uniform map: 3/4.
    assert grounding_loss({"l": flat}, masks, tokens).item() == pytest.approx(0.75 ** 2 + 0.75, rel=1e-5)
    dot = torch.zeros(1, 256, 16)
    dot[0, 4 * 16 + 4, 2] = 1.0                          # all the mass on one pixel inside the object
    # share 1 -> 0; but the map is no match for the mask: TV = 1 - 1/64.
    assert grounding_loss({"l": dot}, masks, tokens).item() == pytest.approx(1 - 1 / 64, rel=1e-5)
    off = torch.zeros(1, 64, 16)
    off[0, -1, 2] = 1.0                                  # bottom-right corner, outside: share 0, TV 1
    assert grounding_loss({"l": off}, masks, tokens).item() == pytest.approx(2.0, rel=1e-6)
    # Two layers at two grids: the mean of the two layers' losses.
    both = grounding_loss({"a": on, "b": off}, masks, tokens).item()
    assert both == pytest.approx(1.0, rel=1e-5)


def test_harden_decoder_trains_the_decoder_and_leaves_the_encoder():
    """The latents the UNet learns come from the encoder, so hardening must not move it."""
    from capture.toyworld.train import Logger, harden_decoder
    vae = build_pipeline(seed=0).vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    harden_decoder(vae, steps=2, batch=4, lr=1e-3, seed=0, device="cpu", log=Logger(None, quiet=True))
    after = vae.state_dict()
    enc = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in before if k.startswith(("decoder.", "post_quant_conv.")) and k.endswith("weight")]
    assert enc and dec
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert sum(not torch.equal(before[k], after[k]) for k in dec) > len(dec) // 2
    assert all(p.requires_grad for p in vae.parameters())    # the VAE is left as it was found


def test_ema_warmup_sets_how_much_of_the_run_is_averaged():
    """The EMA under ``ema_decay_at`` after n steps, in closed form: with K=2 every iterate (and the initial
    weights) counts 1/(n+1); with K=4 iterate j counts 3(j+1)(j+2)/((n+1)(n+2)(n+3)), about ∝ j²."""
    from capture.toyworld.train import ema_decay_at
    n = 500
    iterates = np.random.default_rng(0).normal(size=n) + np.arange(n) / n   # a drifting parameter

    def ema(k, init=0.0):
        e = init
        for step, x in enumerate(iterates):
            e += (1 - ema_decay_at(step, 0.9999, k)) * (x - e)
        return e

    j = np.arange(1, n + 1)
    assert ema(2) == pytest.approx(iterates.sum() / (n + 1), rel=1e-9)
    assert ema(4) == pytest.approx((3 * (j + 1) * (j + 2) * iterates).sum() / ((n + 1) * (n + 2) * (n + 3)), rel=1e-9)
    assert ema(4, init=1.0) - ema(4) == pytest.approx(6 / ((n + 1) * (n + 2) * (n + 3)), rel=1e-6)
    assert ema_decay_at(10**6, 0.999, 4) == 0.999               # the cap
    assert ema_decay_at(100, 0.999, 10) == pytest.approx(101 / 110)


def test_lr_schedule_warms_up_then_falls_to_its_floor():
    from capture.toyworld.train import lr_at
    assert lr_at(0, 1000, 1e-3, 100) == pytest.approx(1e-5)
    assert lr_at(99, 1000, 1e-3, 100) == pytest.approx(1e-3)
    assert lr_at(550, 1000, 1e-3, 100, floor=0.0) == pytest.approx(0.5e-3)     # half-way down the cosine
    assert lr_at(1000, 1000, 1e-3, 100) == pytest.approx(1e-4)                # the default floor, 0.1
    assert lr_at(1000, 1000, 1e-3, 100, floor=0.0) == 0.0
    lrs = [lr_at(s, 1000, 1e-3, 100, floor=0.0) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_train_cli_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert train_main(["--out", str(out), "--steps", "1"]) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert train_main(["--out", str(tmp_path / "x"), "--vae-from", str(tmp_path / "nope")]) == 2
    assert train_main(["--out", str(tmp_path / "x"), "--ema-warmup", "1"]) == 2
    assert "--ema-warmup must be above 1" in capsys.readouterr().err
    assert train_main(["--out", str(tmp_path / "x"), "--ema-also", "3"]) == 2        # no --checkpoint to put it beside
    assert "--ema-also needs --checkpoint" in capsys.readouterr().err
    for flag, value in (("--p-empty", "1"), ("--lr-floor", "-0.1"), ("--ema-also", "0.5")):
        assert train_main(["--out", str(tmp_path / "x"), "--checkpoint", str(tmp_path / "c"), flag, value]) == 2
        assert f"error: {flag} must be" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_train_cli_tiny_run_writes_a_loadable_pipeline(tmp_path, prediction):
    """The same code path as the shipped model, at toy scale: VAE, UNet with the grounding loss, save."""
    out = tmp_path / "model"
    rc = train_main(["--out", str(out), "--device", "cpu", "--vae-steps", "2", "--vae-batch", "4",
                     "--vae-harden-steps", "2", "--steps", "2",
                     "--batch", "4", "--text-layers", "0", "--ground-weight", "0.1", "--threads", "2",
                     "--checkpoint", str(tmp_path / "ckpt.safetensors"), "--log", str(tmp_path / "log.jsonl"),
                     "--ema-also", "2", "--p-empty", "0.25", "--lr-floor", "0", "--prediction", prediction,
                     "--decoder-adapt-steps", "2", "--decoder-adapt-pairs", "4"])
    assert rc == 0
    record = json.loads((out / "training.json").read_text())
    assert record["unet_steps_done"] == 2 and record["text_layers"] == 0
    assert record["p_empty"] == 0.25 and record["lr_floor"] == 0 and record["ema_warmup"] == 4
    assert record["decoder_adapt"]["pairs"] == 4 and record["decoder_adapt"]["steps"] == 2
    from diffusers import StableDiffusionPipeline
    p = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, dtype=torch.float32)
    assert p.text_encoder.config.num_hidden_layers == 0
    assert p.scheduler.config.prediction_type == prediction == record["prediction"]
    assert p.vae.config.scaling_factor == pytest.approx(record["vae"]["scaling_factor"] if "scaling_factor" in record["vae"]
                                                        else 1.0 / record["vae"]["latent_std"], rel=1e-3)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "unet" and r.get("event") == "done" for r in log)
    # The single-file checkpoint rebuilds the same weights.
    from capture.toyworld.train import load_checkpoint
    again, rec = load_checkpoint(str(tmp_path / "ckpt.safetensors"))
    assert rec["unet_steps_done"] == 2
    a = dict(p.unet.named_parameters())
    for k, v in again.unet.named_parameters():
        assert torch.allclose(v, a[k].float(), atol=1e-3), k
    # --ema-also 2: the same run averaged with another warm-up, beside the checkpoint, and not the same weights.
    other, rec2 = load_checkpoint(str(tmp_path / "ckpt.ema2.safetensors"))
    assert rec2["ema_warmup"] == 2 and rec2["unet_steps_done"] == 2
    assert other.scheduler.config.prediction_type == prediction
    b = dict(other.unet.named_parameters())
    assert any(not torch.equal(v, b[k]) for k, v in again.unet.named_parameters())


def test_adapting_a_saved_folder_gives_the_one_command_weights(tmp_path):
    """The decoder adaptation runs on the UNet as saved (fp16), so ``--adapt-decoder-of`` a folder trained
    without it reproduces the one-command run exactly: the shipped model was made that way."""
    tiny = ["--device", "cpu", "--threads", "2", "--vae-steps", "2", "--vae-batch", "4", "--vae-harden-steps", "1",
            "--steps", "2", "--batch", "4", "--decoder-adapt-pairs", "4"]
    assert train_main(["--out", str(tmp_path / "one"), *tiny, "--decoder-adapt-steps", "3"]) == 0
    assert train_main(["--out", str(tmp_path / "plain"), *tiny, "--decoder-adapt-steps", "0"]) == 0
    assert train_main(["--out", str(tmp_path / "two"), "--adapt-decoder-of", str(tmp_path / "plain"),
                       "--device", "cpu", "--threads", "2", "--vae-batch", "4", "--decoder-adapt-pairs", "4",
                       "--decoder-adapt-steps", "3"]) == 0
    from safetensors.torch import load_file
    for comp in ("vae", "unet", "text_encoder"):
        name = "diffusion_pytorch_model.safetensors" if comp != "text_encoder" else "model.safetensors"
        one, two, plain = (load_file(str(tmp_path / run / comp / name)) for run in ("one", "two", "plain"))
        assert one.keys() == two.keys()
        assert all(torch.equal(one[k], two[k]) for k in one), comp
        changed = [k for k in one if not torch.equal(one[k], plain[k])]
        assert (comp == "vae") == bool(changed), comp                   # only the VAE moved ...
        assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)   # ... and only its decoder
    record = json.loads((tmp_path / "two" / "training.json").read_text())
    assert record["decoder_adapt"]["steps"] == 3 and record["unet_steps_done"] == 2
