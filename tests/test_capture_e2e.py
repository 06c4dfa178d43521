"""End to end with the embedded default model: generate, validate strictly, read back; determinism,
cancel, size limits, overwrite, and a generator killed mid-write."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from capture import cli, run  # noqa: E402
from capture.config import GenerateConfig  # noqa: E402
from capture.pipeline import load_pipeline  # noqa: E402
from capture.progress import STAGES, Cancelled  # noqa: E402
from capture.recorder import record_attention  # noqa: E402
from export import contract  # noqa: E402
from export.reader import open_run  # noqa: E402
from export.validate import validate_run  # noqa: E402
from tests.test_cli_generate import snapshot  # noqa: E402
from tests.synthetic import write_synthetic_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on the left"
ARGS = ["--prompt", PROMPT, "--negative-prompt", "blue", "--cfg-scale", "7.5", "--num-steps", "4",
        "--attention-resolution", "8", "--self-attention-resolution", "4", "--max-layers", "5", "--seed", "3"]


def config_for(out: Path, **changes) -> GenerateConfig:
    args = cli.build_parser().parse_args(ARGS + ["--output-dir", str(out)])
    return GenerateConfig(**{**cli.config_from_args(args).to_dict(), **changes})


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    err, stdout = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(stdout):
        code = cli.main(ARGS + ["--output-dir", str(out), "--max-dataset-mb", "0.01"])
    return out, code, err.getvalue(), stdout.getvalue()


def test_generate_validates_strictly_and_reads_back(generated):
    out, code, err, stdout = generated
    assert code == 0, err
    assert stdout.strip() == str(out)
    assert "warning: the run is projected at" in err and "over --max-dataset-mb 0.01" in err
    for stage in ("loading model", "denoising", "analysis", "writing", "validating"):
        assert stage in err
    assert validate_run(out, strict=True) == []

    r = open_run(out)
    meta = r.metadata
    words = PROMPT.split()
    assert meta["words"] == words
    assert r.tokens == ["<|startoftext|>"] + [w + "</w>" for w in words] + ["<|endoftext|>"]
    assert [t["word"] for t in meta["tokens"]] == [None, *range(len(words)), None]
    pipe = load_pipeline(None, "cpu")
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert meta["context_length"] == pipe.tokenizer.model_max_length and meta["noise_source"] == run.NOISE_SOURCE
    assert meta["run"]["negative_prompt"] == "blue" and meta["run"]["model"] == {"source": "default", "id": "toyworld"}
    assert r.num_steps == 4 and len(set(r.timesteps)) == 4 and r.timesteps == sorted(r.timesteps, reverse=True)
    assert r.num_layers == 5
    T = len(words) + 2
    for layer in meta["layers"]:
        native = layer["native"]
        r_side, s_side = min(native[0], 8), min(native[0], 4)
        assert layer["cross_shape"] == [T, r_side, r_side]
        assert layer["self_shape"] == [s_side * s_side] * 2
        for step in range(4):
            cross = r.cross(layer["index"], step)
            assert list(cross.shape) == layer["cross_shape"]
            sums = cross.sum(axis=0)
            assert (sums <= 1.01).all() and sums.min() > 0  # the prompt's share of the full distribution
            selfm = r.self_attention(layer["index"], step)
            assert list(selfm.shape) == layer["self_shape"]
            np.testing.assert_allclose(selfm.sum(axis=1), 1.0, atol=1e-2)
    assert r.image(0).shape == (side, side, 3) and r.image(0).dtype == np.uint8
    latents, noise = r.latents()
    latent_shape = (pipe.unet.config.in_channels, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor)
    assert meta["latent_shape"] == list(latent_shape)
    assert latents.shape == (5, *latent_shape) and noise.shape == (4, *latent_shape)
    m = r.metrics
    assert len(m["entropy"]["per_layer"]) == 5 and len(m["kl_consecutive"]["mean"]) == 3
    assert all(abs(sum(s) - 1) < 1e-9 and len(s) == T for s in m["token_dominance"]["share"])
    np.testing.assert_allclose(m["latent_norm"], np.linalg.norm(latents[1:].reshape(4, -1), axis=1), rtol=1e-3)
    assert len(r.pca["coords"]) == 4


def test_stored_maps_equal_the_recorder_and_the_image_is_unchanged(generated):
    """The files hold exactly what the recorder saw (sliced to the prompt's tokens, float16), and the
    stored final latents equal a plain pipeline run's (recording changes nothing)."""
    out, code, _, _ = generated
    assert code == 0
    r = open_run(out)
    pipe = load_pipeline(None, "cpu")
    kwargs = dict(negative_prompt="blue", guidance_scale=7.5, num_inference_steps=4, output_type="latent")
    plain = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(3), **kwargs).images
    with record_attention(pipe, max_layers=5, resolution=8, self_resolution=4) as rec:
        recorded = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(3),
                        callback_on_step_end=rec.callback_on_step_end, **kwargs).images
    assert torch.equal(plain, recorded)
    latents, _ = r.latents()
    np.testing.assert_array_equal(latents[-1], plain[0].numpy().astype(np.float16).astype(np.float32))
    assert [p.name for p in rec.layers] == r.layer_names
    T = r.num_tokens
    for step, maps in enumerate(rec.steps):
        for layer in range(r.num_layers):
            np.testing.assert_array_equal(r.cross(layer, step), maps.cross[layer][:T].astype(np.float16).astype(np.float32))
            np.testing.assert_array_equal(r.self_attention(layer, step), maps.self_[layer].astype(np.float16).astype(np.float32))
            # the metrics were computed on the full distribution, padding included
            from analysis.metrics import attention_entropy
            assert r.metrics["entropy"]["per_layer"][layer][step] == pytest.approx(attention_entropy(maps.cross[layer]), abs=1e-9)


def test_deterministic_for_a_fixed_seed(generated, tmp_path):
    out, code, _, _ = generated
    assert code == 0
    again = run.generate(config_for(tmp_path / "again", max_dataset_mb=50.0))
    a = json.loads((out / "metadata.json").read_text())["files"]
    b = json.loads((again / "metadata.json").read_text())["files"]
    assert a.keys() == b.keys()
    assert {k: v["sha256"] for k, v in a.items()} == {k: v["sha256"] for k, v in b.items()}


def test_cancel_leaves_nothing(tmp_path):
    cancel = threading.Event()
    events = []

    def progress(event):
        events.append(event)
        if event.stage == "denoising" and event.step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        run.generate(config_for(tmp_path / "cancelled", num_steps=6), progress=progress, cancel=cancel)
    assert list(tmp_path.iterdir()) == []
    assert events[0].stage == "loading model" and {e.stage for e in events} <= set(STAGES)
    assert max(e.step for e in events if e.stage == "denoising") == 2


def test_overwrite_with_one_kind_and_chosen_layers(tmp_path, capsys):
    target = write_synthetic_run(tmp_path / "run")
    code = cli.main(ARGS + ["--output-dir", str(target), "--overwrite-output", "--no-include-self-attention",
                            "--layers", "up_blocks.1.*", "--no-save-latents-noise", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert validate_run(target, strict=True) == []
    r = open_run(target)
    assert r.layer_names == ["up_blocks.1.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.1.transformer_blocks.0"]
    assert r.has_cross and not r.has_self and r.latents() is None
    assert not (target / "attention" / "self").exists() and not (target / contract.LATENTS_FILE).exists()
    assert r.metadata["run"]["prompt"] == PROMPT
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temp folder left beside it


def test_enforced_size_limit_fails_again_at_the_end(tmp_path, capsys, monkeypatch):
    """If the projection said yes but the real run is over the limit, nothing is installed."""
    old = write_synthetic_run(tmp_path / "run")
    before = snapshot(tmp_path)
    monkeypatch.setattr(run.contract, "projected_bytes", lambda *a, **k: 0)
    code = cli.main(ARGS + ["--output-dir", str(old), "--overwrite-output", "--max-dataset-mb", "0.05",
                            "--enforce-size-limit", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert re.search(r"error: the run is [0-9.]+ MB, over the 0\.\d MB limit; not written", err), err
    assert snapshot(tmp_path) == before


def test_killed_mid_write_leaves_the_old_run_intact(tmp_path):
    """SIGKILL the generator while it streams steps into its temp folder: the old run is untouched."""
    target = write_synthetic_run(tmp_path / "run")
    before = snapshot(target)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffviz", "generate", "--prompt", PROMPT, "--num-steps", "500", "--quiet",
         "--attention-resolution", "8", "--self-attention-resolution", "4", "--output-dir", str(target),
         "--overwrite-output"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.glob(".run.partial-*") if len(list((p / "attention" / "cross").glob("*.bin"))) >= 6]
            if partial:
                break
            time.sleep(0.2)
        assert partial, f"no step files appeared in a temp folder (rc={proc.poll()})"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(target) == before
    assert validate_run(target, strict=True) == []


def test_uneven_pooling_warns_and_strict_validation_names_it(tmp_path, capsys):
    """Uneven windows are defined by the contract ("Pooling"): the run is valid, and --strict names each grid."""
    out = tmp_path / "run"
    code = cli.main(["--prompt", "a red circle", "--num-steps", "2", "--attention-resolution", "3", "--height", "40",
                     "--self-attention-resolution", "16", "--max-layers", "3", "--quiet", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert validate_run(out) == []
    strict = validate_run(out, strict=True)
    r = open_run(out)
    # one integer factor per grid, the smallest that brings the long side to <= 3: at 40 px the toy's
    # latent grids are 10 (factor 4 -> 2, even) and 5 (factor 2 -> 2, uneven)
    grid = {layer["name"]: layer["native"][0] // -(-layer["native"][0] // 3) for layer in r.layers}
    uneven = [layer for layer in r.layers if layer["native"][0] % grid[layer["name"]]]
    assert uneven and len(uneven) < len(r.layers), "the default model has 10x10 and 5x5 grids at 40 px"
    for layer in uneven:
        n, g = layer["native"][0], grid[layer["name"]]
        assert f"warning: layer {layer['name']}: native grid {n}x{n} does not divide into {g}x{g}" in err
    assert err.count("does not divide") == len(uneven)  # planned once, warned once
    assert strict == [f"metadata.json: layers[{layer['index']}]: cross maps pool the native {layer['native'][0]}x"
                      f"{layer['native'][1]} grid into {grid[layer['name']]} cells of uneven size (uneven pooling, "
                      f"CONTRACT.md 'Pooling')" for layer in uneven]
    assert [layer["cross_shape"][1:] for layer in r.layers] == [[grid[layer["name"]]] * 2 for layer in r.layers]
