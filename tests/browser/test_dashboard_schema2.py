"""A schema-2 run in a real Chromium: non-square images (16x32) keep their aspect ratio on screen, and the
Attention view's head selector shows one head's stored map.

The expected map is read straight from the run's file (numpy); the aspect ratio is measured on the
rendered figure (its plot frame, and the screen positions of the image's corners).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.browser.test_dashboard import dashboard, read_bin, show_tab, wait_step
from tests.synthetic import write_synthetic_run

H, W, HEADS, TOKENS, STEPS = 16, 32, 2, 5, 3
TIMEOUT = 60_000


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("schema2") / "wide", steps=STEPS, layers=2, tokens=TOKENS, seed=7,
                               per_head=True, heads=HEADS, grid=(4, 8), image_hw=(H, W))


@pytest.fixture(scope="module")
def page(browser, panel_server, bokeh, wide):
    server = panel_server(env={"DIFFVIZ_DATASET": str(wide), "DIFFVIZ_CACHE_MB": "16"})
    with dashboard(browser, bokeh, server.url) as bp:
        yield bp


def rendered_aspect(bp, figure: str) -> tuple[float, float]:
    """``(frame width / height, on-screen width / height of the image's extent)`` of ``figure`` as drawn."""
    frame = bp.page.evaluate("(n) => { const b = Bokeh.index.find_one(window.__dv.model(n)).frame.bbox; return [b.width, b.height]; }",
                             figure)
    (x0, y0), (x1, y1) = bp.screen_xy(figure, 0, 0), bp.screen_xy(figure, W, H)
    return frame[0] / frame[1], (x1 - x0) / (y1 - y0)


def test_wide_per_head_run_keeps_its_aspect_and_shows_the_selected_head(page, wide, artifacts):
    for figure in ("timeline-image-figure", "timeline-final-figure"):
        frame, image = rendered_aspect(page, figure)
        assert frame == pytest.approx(W / H, rel=0.02) and image == pytest.approx(W / H, rel=0.02), figure

    show_tab(page, "Attention")
    page.set_widget("dv:step", 2)
    wait_step(page, "attention-image", 2)
    page.set_widget("dv:layer", "1")
    page.set_widget("dv:token", "3")
    options = page.widget("dv:head", "options")
    assert len(options) == HEADS + 1 and page.widget("dv:head", "visible") is True
    # the user's own path: pick "head 1" in the rendered <select>
    page.widget_element("dv:head", "select").select_option(label="head 1")
    expected = read_bin(wide, "attention/cross/layer_1_step_002.bin")[1, 3]  # [heads, T, h, w] -> head 1, token 3
    raw = page.array(page.wait_values("attention-heat", "raw", expected)[0])
    np.testing.assert_array_equal(raw, expected)
    assert page.widget("dv:head") == "1"
    assert not np.array_equal(raw, read_bin(wide, "attention/cross/layer_1_step_002.bin")[0, 3])

    frame, image = rendered_aspect(page, "attention-overlay-figure")
    assert frame == pytest.approx(W / H, rel=0.02) and image == pytest.approx(W / H, rel=0.02)
    assert (page.column("attention-heat", "dw")[0], page.column("attention-heat", "dh")[0]) == (W, H)
    page.screenshot(artifacts / "dashboard-schema2-attention.png")


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    """A real recording: the tiny random-weight SDXL pipeline, 2 steps at 32x64, per head."""
    pytest.importorskip("torch")
    from capture.config import GenerateConfig
    from capture.run import generate
    from tests.tiny_pipelines import build_sdxl

    root = tmp_path_factory.mktemp("sdxl")
    model = build_sdxl(root / "tiny-sdxl")
    return generate(GenerateConfig(prompt="a red circle and a blue square", model=str(model), num_steps=2,
                                   height=32, width=64, attention_resolution=8, self_attention_resolution=4,
                                   per_head=True, device="cpu", output_dir=str(root / "run")))


def test_a_recorded_sdxl_run_opens_with_its_heads(browser, panel_server, bokeh, sdxl_run):
    server = panel_server(env={"DIFFVIZ_DATASET": str(sdxl_run), "DIFFVIZ_CACHE_MB": "16"})
    with dashboard(browser, bokeh, server.url) as bp:
        frame = bp.page.evaluate(
            "(n) => { const b = Bokeh.index.find_one(window.__dv.model(n)).frame.bbox; return [b.width, b.height]; }",
            "timeline-final-figure")
        assert frame[0] / frame[1] == pytest.approx(2.0, rel=0.02)
        show_tab(bp, "Attention")
        assert len(bp.widget("dv:head", "options")) == 4 + 1  # the tiny SDXL's attention layers have 4 heads
        bp.set_widget("dv:step", 1)
        wait_step(bp, "attention-image", 1)
        bp.set_widget("dv:layer", "0")
        bp.set_widget("dv:token", "2")
        bp.widget_element("dv:head", "select").select_option(label="head 3")
        expected = read_bin(sdxl_run, "attention/cross/layer_0_step_001.bin")[3, 2]
        raw = bp.array(bp.wait_values("attention-heat", "raw", expected)[0])
        np.testing.assert_array_equal(raw, expected)
