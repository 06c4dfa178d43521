"""``diffviz export-figure`` and ``export.words``: the word grid's numbers, pixels, CLI and errors."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.store import RunData
from export import figure, words as W
from export.contract import DatasetError
from export.reader import open_run
from tests.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "datasets" / "default"
PROMPT = "a red circle and blue square"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("figure")
    # 9 tokens: <start> a red circle and blue square a red <end>: "a" and "red" have two pieces each
    flat = write_synthetic_run(base / "flat", steps=4, layers=3, tokens=10, prompt=PROMPT, grid=(4, 8),
                               image_hw=(16, 32), self_attention=False, save_latents=False, seed=1)
    heads = write_synthetic_run(base / "heads", steps=4, layers=2, tokens=8, prompt=PROMPT, grid=(4, 8),
                                image_hw=(16, 32), per_head=True, heads=2, self_attention=False,
                                save_latents=False, seed=2)
    mixed = write_synthetic_run(base / "mixed", steps=4, layers=3, tokens=7, prompt=PROMPT,
                                layer_resolutions=[8, 4, 2], self_attention=False, save_latents=False, seed=3)
    return {"flat": flat, "heads": heads, "mixed": mixed}


def reference_word_map(run, rows, first, last):
    """Mean over layers and steps of the stored maps (every layer on one grid, so no resampling), rows summed."""
    layers = [int(l["index"]) for l in run.layers if l.get("cross_shape")]
    maps = [run.cross(l, s) for l in layers for s in range(first, last + 1)]
    return np.mean(np.stack(maps), axis=0, dtype=np.float64)[list(rows)].sum(axis=0)


def pil_upsample(m, height, width):
    return np.asarray(Image.fromarray(np.asarray(m, np.float32), mode="F").resize((width, height), Image.BILINEAR))


def reference_panel(image, up, zoom, high, alpha=figure.DEFAULT_ALPHA):
    """The image enlarged (nearest), the upsampled map scaled to ``high``, Bokeh's palette lookup, alpha blend."""
    from bokeh.palettes import Inferno256

    h, w = image.shape[:2]
    under = np.asarray(Image.fromarray(image).resize((w * zoom, h * zoom), Image.NEAREST), np.float64)
    lut = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in Inferno256], np.float64)
    idx = np.clip(np.floor(up / high * 256), 0, 255).astype(int)
    return np.rint((1 - alpha) * under + alpha * lut[idx])


# --------------------------------------------------------------------------- words


def test_words_merge_pieces_and_agree_with_the_store(runs):
    run = open_run(runs["flat"])
    tokens = run.metadata["tokens"]
    entries = W.words(tokens, run.metadata["words"])
    assert [(w.label, w.rows, w.content) for w in entries] == [
        ("<start>", (0,), False), ("a", (1, 7), False), ("red", (2, 8), True), ("circle", (3,), True),
        ("and", (4,), False), ("blue", (5,), True), ("square", (6,), True), ("<end>", (9,), False)]
    store = RunData(run, "flat")
    # the dashboard's merged selector lists the same entries, keyed by each word's first token
    options = store.token_options(merge=True)
    assert list(options.values()) == [w.rows[0] for w in entries]
    assert [label.split(": ", 1)[1].split("  (")[0] for label in options] == [w.label for w in entries]
    assert all(store.token_indices(w.rows[0], True) == list(w.rows) for w in entries)
    assert W.default_token(tokens) == store.default_token() == 2
    assert [W.token_text(t) for t in tokens] == [store.token_text(i) for i in range(len(tokens))]
    assert W.token_text({"text": "<|endoftext|>", "special": True}) == "<end>"
    assert W.token_text({"text": "</w>", "special": False}) == "␣"


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("name, head, steps", [("mixed", "mean", (1, 3)), ("heads", "1", (0, 3)),
                                               ("heads", "mean", (2, 2))])
def test_aggregate_equals_the_dashboards(runs, name, head, steps):
    run = open_run(runs[name])
    ours = figure.aggregate(run, *steps, head=head)
    store = RunData(run, name).aggregate_all(*steps, head=head)
    assert ours.shape == store.shape == (run.num_tokens, *RunData(run, name).cross_grid)
    np.testing.assert_allclose(ours, store, rtol=1e-5, atol=1e-7)


def test_word_grid_order_selection_and_one_step(runs):
    run = open_run(runs["flat"])
    default = figure.word_grid(run)
    assert [w.label for w, _ in default] == ["red", "circle", "blue", "square"]
    picked = figure.word_grid(run, words=["square", "RED"], steps=(2, 2))
    assert [w.label for w, _ in picked] == ["square", "red"]
    for w, m in picked:  # one step: the plain mean over layers of that step's maps
        assert m.shape == (4, 8)
        np.testing.assert_allclose(m, reference_word_map(run, w.rows, 2, 2), rtol=1e-5, atol=1e-7)
    whole = dict((w.label, m) for w, m in default)
    np.testing.assert_allclose(whole["red"], reference_word_map(run, (2, 8), 0, 3), rtol=1e-5, atol=1e-7)
    assert not np.allclose(whole["red"], picked[1][1])  # steps 2:2 is not the whole run
    one_layer = dict((w.label, m) for w, m in figure.word_grid(run, words=["blue"], layers=[1]))
    np.testing.assert_allclose(one_layer["blue"], np.mean([run.cross(1, s)[5] for s in range(4)], axis=0), rtol=1e-5)
    with pytest.raises(DatasetError, match=r"unknown word 'dog'; this run's words: <start>, a, red, circle"):
        figure.word_grid(run, words=["red", "dog"])


# --------------------------------------------------------------------------- pixels


def test_png_size_and_panels_match_a_reference_blend(runs, tmp_path):
    run = open_run(runs["flat"])
    final = np.asarray(Image.open(runs["flat"] / "images" / "final.png").convert("RGB"))
    assert final.shape[:2] == (16, 32)
    out = tmp_path / "grid.png"
    assert figure.main([str(runs["flat"]), "--words", "red,circle,square", "--cols", "2", "--out", str(out)]) == 0
    png = np.asarray(Image.open(out).convert("RGB"))
    zoom = math.ceil(figure.MIN_PANEL / 32)
    ph, pw = 16 * zoom, 32 * zoom  # the image's aspect ratio, kept
    cap, gap = figure.caption_height(pw), figure.GAP
    assert png.shape == (2 * (cap + ph) + 3 * gap, 2 * pw + 3 * gap, 3)
    maps = {w.label: (w, reference_word_map(run, w.rows, 0, 3)) for w, _ in figure.word_grid(run)}
    for i, label in enumerate(["red", "circle", "square"]):
        x = gap + (i % 2) * (pw + gap)
        y = gap + (i // 2) * (cap + ph + gap) + cap
        up = pil_upsample(maps[label][1], ph, pw)
        expected = reference_panel(final, up, zoom, high=float(up.max()))
        got = png[y:y + ph, x:x + pw].astype(np.float64)
        diff = np.abs(got - expected)
        # within 2 levels: float rounding may flip a palette index at its edge
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (label, diff.max(), (diff > 0).mean())
        band = png[y - cap:y, x:x + pw]
        assert band.min() < 100 and (band == 255).all(axis=2).mean() > 0.8  # a dark caption on white
    assert (png[:gap] == 255).all() and (png[:, :gap] == 255).all()
    empty = png[gap + cap + ph + gap:, gap + pw + gap:]  # the fourth cell: nothing drawn
    assert (empty == 255).all()
    info = json.loads(Image.open(out).text["diffviz"])
    assert info["words"] == ["red", "circle", "square"] and info["steps"] == [0, 3] and info["layers"] == [0, 1, 2]


def test_grey_shared_scale_and_steps_option(runs, tmp_path):
    run = open_run(runs["flat"])
    final = np.asarray(Image.open(runs["flat"] / "images" / "final.png").convert("RGB"))
    grey = np.repeat(np.asarray(Image.fromarray(final).convert("L"))[:, :, None], 3, axis=2)
    out = tmp_path / "grid.png"
    argv = [str(runs["flat"]), "--steps", "2:2", "--grey", "--scale", "shared", "--zoom", "3", "--alpha", "0.5",
            "--out", str(out)]
    assert figure.main(argv) == 0
    png = np.asarray(Image.open(out).convert("RGB"))
    ph, pw = 48, 96
    cap, gap = figure.caption_height(pw), figure.GAP
    assert png.shape == (cap + ph + 2 * gap, 4 * pw + 5 * gap, 3)
    labels = ["red", "circle", "blue", "square"]
    rows = {w.label: w.rows for w, _ in figure.word_grid(run)}
    ups = [pil_upsample(reference_word_map(run, rows[label], 2, 2), ph, pw) for label in labels]
    high = max(float(u.max()) for u in ups)
    for i, (label, up) in enumerate(zip(labels, ups)):
        expected = reference_panel(grey, up, 3, high, alpha=0.5)
        got = png[gap + cap:gap + cap + ph, gap + i * (pw + gap):gap + i * (pw + gap) + pw].astype(np.float64)
        diff = np.abs(got - expected)
        # within 2 levels: float rounding may flip a palette index at its edge
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (label, diff.max(), (diff > 0).mean())
    # the API draws the same picture the command wrote
    api = figure.render_grid(run, steps=(2, 2), grey=True, scale="shared", zoom=3, alpha=0.5)
    assert np.array_equal(np.asarray(api), png)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such folder"),
    (["{run}", "--steps", "3:1"], "first step is after the last"),
    (["{run}", "--steps", "0:4"], "this run has steps 0:3"),
    (["{run}", "--steps", "a:b"], "expected FIRST:LAST"),
    (["{run}", "--layers", "0,7"], "layer 7 has no cross-attention maps"),
    (["{run}", "--layers", "x"], "expected layer numbers"),
    (["{run}", "--words", "red,dog"], "unknown word 'dog'"),
    (["{run}", "--head", "2"], "layer 0 has 2 heads"),
    (["{run}", "--head", "top"], "is not a head number"),
    (["{run}", "--cols", "0"], "cols 0"),
    (["{broken}"], "layer_1_step_003.bin"),
])
def test_bad_input_is_one_line_and_keeps_out(runs, tmp_path, capsys, args, message):
    broken = tmp_path / "broken"
    if "{broken}" in args:
        shutil.copytree(runs["heads"], broken)
        victim = broken / "attention" / "cross" / "layer_1_step_003.bin"
        victim.write_bytes(victim.read_bytes()[:100])  # truncated: found only when the last map is read
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "grid.png"
    out.write_bytes(b"an earlier figure")
    fill = {"run": str(runs["heads"]), "missing": str(tmp_path / "nope"), "broken": str(broken)}
    rc = figure.main([a.format(**fill) for a in args] + ["--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("diffviz export-figure: error: ") and err.count("\n") == 1 and message in err, err
    assert out.read_bytes() == b"an earlier figure"
    assert os.listdir(out_dir) == ["grid.png"]  # no temporary file left beside it


def test_head_on_a_mean_run_and_bad_out(runs, tmp_path, capsys):
    assert figure.main([str(runs["flat"]), "--head", "0", "--out", str(tmp_path / "g.png")]) == 2
    assert "stores only the mean over heads" in capsys.readouterr().err
    assert figure.main([str(runs["flat"]), "--out", str(tmp_path / "no" / "g.png")]) == 2
    assert figure.main([str(runs["flat"]), "--out", str(tmp_path / "g.xyz")]) == 2
    assert os.listdir(tmp_path) == []
    out = tmp_path / "g.png"
    out.write_bytes(b"old")
    assert figure.main([str(runs["heads"]), "--head", "1", "--out", str(out)]) == 0  # a good run replaces it
    assert Image.open(out).size[0] > 0 and os.listdir(tmp_path) == ["g.png"]
    fresh = tmp_path / "fresh.png"
    assert figure.main([str(runs["flat"]), "--out", str(fresh)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # as an ordinary new file, not mkstemp's 0600


def test_the_command_imports_no_torch(tmp_path):
    out = tmp_path / "grid.png"
    code = ("import sys, diffviz; rc = diffviz.main(['export-figure', sys.argv[1], '--out', sys.argv[2]]); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'diffusers', 'capture', 'panel'}); "
            "print(rc, heavy)")
    done = subprocess.run([sys.executable, "-c", code, str(DEFAULT_RUN), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"
    assert Image.open(out).size == (4 * 256 + 5 * figure.GAP, figure.caption_height(256) + 256 + 2 * figure.GAP)


# --------------------------------------------------------------------------- the shipped toy run


def test_toy_run_words_point_at_their_objects():
    from analysis.maps import resize
    from capture.toyworld import world

    run = open_run(DEFAULT_RUN)
    grid = figure.word_grid(run)
    # the prompt: "a red circle and a blue square"
    assert [w.label for w, _ in grid] == ["red", "circle", "blue", "square"]
    masks = world.segment(figure.base_image(run))
    owner = {"red": "red", "circle": "red", "blue": "blue", "square": "blue"}
    for w, m in grid:
        up = resize(m, *run.image_size)
        own, other = masks[owner[w.label]], masks[{"red": "blue", "blue": "red"}[owner[w.label]]]
        # attention per pixel is several times denser on the word's own object than elsewhere
        assert up[own].mean() > 4 * up[~own].mean(), w.label
        assert up[own].sum() > 5 * up[other].sum(), w.label
