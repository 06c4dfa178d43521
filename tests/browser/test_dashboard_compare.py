"""The Compare and Timeline views in a real Chromium against one ``panel serve``: a broken file of run B blanks
only the panels that need it, the verdict lists every differing setting, the images keep their aspect ratio,
the step label follows a run with another step count, and the Play toggle's pause sign is a real glyph.

Run A (6 steps, 16x24 images) is opened; run B differs in seed and cfg and has one attention file cut in half.
Expected values come from the runs' files (numpy, PIL), never from the app.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.synthetic import write_synthetic_run

STEPS, LONG_STEPS, H, W = 6, 9, 16, 24
BROKEN = "attention/cross/layer_0_step_002.bin"
TIMEOUT = 60_000
#: The slider's rendered label, e.g. "Step: 5 / 8 · t = 444" (whitespace collapsed).
LABEL_JS = """() => { const v = Bokeh.index.find_one(window.__dv.tagged('dv:step'));
  const el = (v.shadow_el || v.el).querySelector('.bk-slider-title'); return el ? el.textContent.replace(/\\s+/g, ' ').trim() : null; }"""


def meta(run) -> dict:
    return json.loads((run / "metadata.json").read_text())


def packed(run, step: int) -> np.ndarray:
    rgb = np.asarray(Image.open(run / f"images/step_{step:03d}.png").convert("RGB"), dtype=np.uint32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16) | (np.uint32(255) << 24)


def latents(run) -> np.ndarray:
    with np.load(run / "latents_noise_fp16.npz") as z:
        return z["latents"].astype(np.float32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    common = dict(layers=2, tokens=5, r=8, s=4, image_hw=(H, W), grid=(4, 6))
    a = write_synthetic_run(root / "a", steps=STEPS, seed=0, prompt="a red circle", **common)
    b = write_synthetic_run(root / "b", steps=STEPS, seed=7, prompt="a red circle", **common)
    data = (b / BROKEN).read_bytes()
    (b / BROKEN).write_bytes(data[: len(data) // 2])
    m = meta(b)
    m["run"]["cfg_scale"] = 3.0
    (b / "metadata.json").write_text(json.dumps(m))
    long = write_synthetic_run(root / "long", steps=LONG_STEPS, seed=5, prompt="a red circle", **common)
    return {"a": a, "b": b, "long": long, "root": root}


@pytest.fixture(scope="module")
def page(browser, panel_server, bokeh, runs):
    server = panel_server(env={"DIFFVIZ_DATASET": str(runs["a"]), "DIFFVIZ_CACHE_MB": "16"})
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    try:
        p = context.new_page()
        p.set_default_timeout(TIMEOUT)
        warnings: list[str] = []
        p.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
        bp = bokeh(p).open(f"{server.url}?compare={runs['b']}&step=2", ready_model="timeline-image")
        bp.warnings = warnings
        yield bp
    finally:
        context.close()


def show_tab(bp, name: str) -> None:
    bp.page.get_by_text(name, exact=True).first.click()


def frame_aspect(bp, figure: str) -> tuple[float, float]:
    """``(plot frame w/h, on-screen w/h of the image's extent)`` as drawn."""
    fw, fh = bp.page.evaluate("(n) => { const b = Bokeh.index.find_one(window.__dv.model(n)).frame.bbox; return [b.width, b.height]; }",
                              figure)
    (x0, y0), (x1, y1) = bp.screen_xy(figure, 0, 0), bp.screen_xy(figure, W, H)
    return fw / fh, (x1 - x0) / (y1 - y0)


def test_a_broken_file_of_b_blanks_only_the_js_panels(page, runs, artifacts):
    for tab in ("Attention", "Trajectory", "Compare runs"):
        show_tab(page, tab)
    status = page.page.locator(".dv-compare-status")
    status.wait_for()
    page.wait_column("compare-image-b", "step", "v[0] === 2")
    # the JS panels are blank, and their titles name the file
    page.page.wait_for_function("(f) => window.__dv.model('compare-js-figure').title.text.includes(f)", arg=BROKEN)
    assert page.column("compare-js", "js") == [] and page.column("compare-token-js", "js") == []
    assert BROKEN in page.page.evaluate("() => window.__dv.model('compare-token-js-figure').title.text")
    # everything else is drawn from the files: both images, both trajectories, the latent delta
    for key in ("a", "b"):
        shown = page.array(page.column(f"compare-image-{key}", "image")[0])
        np.testing.assert_array_equal(shown, packed(runs[key], 2))
        assert len(page.column(f"compare-pca-{key}", "x")) == STEPS
    la, lb = latents(runs["a"]), latents(runs["b"])
    expected = np.linalg.norm((la[1:] - lb[1:]).reshape(STEPS, -1).astype(np.float64), axis=1)
    np.testing.assert_allclose(page.column("compare-delta", "delta"), expected, rtol=1e-5)
    # the verdict names the file instead of calling the runs comparable, and lists the differing settings
    text = " ".join(status.inner_text().split())
    assert BROKEN in text and "Comparable" not in text and "dv-warn" in status.get_attribute("class")
    assert "seed: 0 (A) vs 7 (B)" in text and "cfg: 7.5 (A) vs 3.0 (B)" in text
    assert "prompt:" not in text  # the same prompt is not listed
    assert "different starting image" in text  # the sentence on what differing seeds mix into the divergence
    page.screenshot(artifacts / "dashboard-compare-broken-b-1280x720.png", full_page=True)


def test_compare_images_keep_the_image_aspect(page):
    show_tab(page, "Compare runs")
    page.wait_column("compare-image-a", "dw", f"v[0] === {W}")
    for key in ("a", "b"):
        frame, drawn = frame_aspect(page, f"compare-image-{key}-figure")
        assert frame == pytest.approx(W / H, rel=0.02) and drawn == pytest.approx(W / H, rel=0.02), key


def test_no_figure_warns_about_initial_ranges(page):
    assert not [w for w in page.warnings if "initial ranges" in w]


def test_step_label_follows_a_run_with_another_step_count(page, runs):
    show_tab(page, "Timeline")
    page.set_widget("dv:step", 5)
    t_a, t_long = meta(runs["a"])["timesteps"], meta(runs["long"])["timesteps"]
    assert t_a[5] != t_long[5]
    page.page.wait_for_function(f"() => ({LABEL_JS})() === 'Step: 5 / {STEPS - 1} · t = {t_a[5]}'")
    box = page.page.get_by_placeholder("datasets/default or https://…/run/")
    box.fill(str(runs["long"]))
    page.page.get_by_role("button", name="Load").click()
    page.wait_column("timeline-curves", "step", f"v.length === {LONG_STEPS}")
    want = f"Step: 5 / {LONG_STEPS - 1} · t = {t_long[5]}"  # the step stays 5; its label is the new run's
    try:
        page.page.wait_for_function(f"() => ({LABEL_JS})() === {json.dumps(want)}", timeout=10_000)
    finally:
        assert page.page.evaluate(LABEL_JS) == want


def test_the_pause_sign_is_a_glyph_of_the_page_fonts(page):
    """Drawn in the button's font, the pause sign differs from a code point no font has (drawn as a box)."""
    show_tab(page, "Timeline")
    page.page.get_by_role("button", name="▶ Play").click()
    button = page.page.get_by_role("button", name=re.compile("Pause"))
    button.wait_for()
    label = button.inner_text().strip()
    sign = label.split()[0]
    same = page.page.evaluate(
        """([el, sign]) => {
             const font = getComputedStyle(el).font, c = document.createElement('canvas');
             c.width = 120; c.height = 40;
             const draw = (text) => { const g = c.getContext('2d'); g.clearRect(0, 0, 120, 40); g.font = font;
                                      g.fillText(text, 4, 30); return Array.from(g.getImageData(0, 0, 120, 40).data); };
             const a = draw(sign), missing = draw('\\u0378'.repeat(sign.length));
             return a.every((v, i) => v === missing[i]);
           }""", [button.element_handle(), sign])
    button.click()
    page.page.get_by_role("button", name="▶ Play").wait_for()
    assert label.endswith("Pause") and not same, label
