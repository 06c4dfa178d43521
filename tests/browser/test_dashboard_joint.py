"""A joint-attention (SD3-like) run in Chromium at 1280x720: "word → image" shows the stored text->image map of a
token picked in the T5 set, every tab draws without a banner or a failed panel (with a second joint run loaded, so
A | B | A − B and the comparison run too), the Attention tab fits the viewport, and a UNet run hides "word → image".

The expected map is read straight from the run's file (numpy), never through the app.
"""
from __future__ import annotations

from urllib.parse import quote

import numpy as np
import pytest

from tests.browser.test_dashboard import banner_text, read_bin, show_tab, wait_step
from tests.browser.test_layout import measure, problems
from tests.synthetic import write_joint_run, write_synthetic_run

STEPS = 3
TIMEOUT = 60_000
TABS = ("Timeline", "Attention", "Trajectory", "Compare runs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    return {"a": write_joint_run(root / "sd3_a", family="sd3", steps=STEPS, seed=1),
            "b": write_joint_run(root / "sd3_b", family="sd3", steps=STEPS, seed=2, prompt="a blue circle"),
            "unet": write_synthetic_run(root / "unet", steps=STEPS, layers=2, tokens=5, seed=3)}


@pytest.fixture(scope="module")
def page(browser, panel_server, bokeh, runs):
    server = panel_server(env={"DIFFVIZ_DATASET": str(runs["a"]), "DIFFVIZ_CACHE_MB": "16"})
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        bp = bokeh(page).open(f"{server.url}?dataset={quote(str(runs['a']))}&compare={quote(str(runs['b']))}&step=1",
                              ready_model="attention-text")
        wait_step(bp, "timeline-image", 1)
        bp.errors = errors
        bp.server = server
        yield bp
    finally:
        context.close()


def failed_titles(bp) -> list[str]:
    """Titles of the figures whose panel failed (``View.panel`` writes ``⚠ message`` there)."""
    return bp.page.evaluate("""() => [...Bokeh.documents[0].all_models]
        .filter((m) => m.title && m.title.text && String(m.title.text).startsWith('⚠')).map((m) => m.title.text)""")


def every_tab_draws(bp, name: str) -> None:
    """Timeline, Attention and Trajectory each drawn: no banner, no failed panel, no console error."""
    for tab in TABS[:3]:
        show_tab(bp, tab)
        bp.page.wait_for_timeout(500)
    assert banner_text(bp) == "", (name, banner_text(bp))
    assert failed_titles(bp) == [], name
    assert bp.errors == [], bp.errors


def test_word_to_image_shows_the_stored_map_of_a_t5_token(page, runs, artifacts):
    show_tab(page, "Attention")
    page.page.locator(".dv-text-map").wait_for(state="visible")
    page.set_widget("dv:layer", "1")
    # the user's own path: pick the T5 set's "red" in the rendered <select>
    page.widget_element("dv:token", "select").select_option(label="6: red · T5")
    expected = read_bin(runs["a"], "attention/text/layer_1_step_001.bin")[6]  # [T, h, w] -> token 6 (T5 "red")
    raw = page.array(page.wait_values("attention-text", "raw", expected)[0])
    np.testing.assert_array_equal(raw, expected)  # the file's float16 values, as float32
    assert page.column("attention-text", "step") == [1]
    title = page.page.evaluate("() => window.__dv.model('attention-text-figure').title.text")
    assert title == "'red · T5' → image · L1 · step 1", title
    assert page.prop("attention-text-cmap", "high") == pytest.approx(float(expected.max()), rel=1e-6)
    # the CLIP set's "red" is another row, another map
    assert not np.array_equal(expected, read_bin(runs["a"], "attention/text/layer_1_step_001.bin")[2])
    found = problems(measure(page.page))
    page.screenshot(artifacts / "dashboard-joint-attention-1280x720.png")
    assert not found, "Attention on a joint run at 1280x720:\n" + "\n".join(found)
    assert banner_text(page) == "" and failed_titles(page) == []


def test_every_tab_draws_a_joint_run_and_its_comparison(page):
    for tab in TABS:
        show_tab(page, tab)
        page.page.wait_for_timeout(1000)
    page.set_widget("dv:step", 2)
    wait_step(page, "compare-image-a", 2)  # the Compare tab, shown last, follows the step
    assert banner_text(page) == "", banner_text(page)
    assert failed_titles(page) == []
    assert page.errors == [], page.errors


def test_a_unet_run_hides_word_to_image(page, runs):
    show_tab(page, "Attention")
    box = page.widget_element("dv:dataset-url", "input")  # the user's path: type the run, press Enter
    box.fill(str(runs["unet"]))
    box.press("Enter")
    page.wait_column("attention-image", "dw", "v[0] === 16")  # the UNet run's 16x16 image, not the joint run's 16x24
    page.page.locator(".dv-text-map").wait_for(state="hidden")
    assert page.page.locator(".dv-main-row").is_visible()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """2-step non-square runs of the tiny random-weight SD3, Flux, PixArt-Σ, Qwen-Image, FLUX.2 and SANA pipelines,
    recorded by `generate` (PixArt's 48x84 request is binned to 192x336, SANA's 48x80 to 384x640; their final images
    stay at the size asked)."""
    pytest.importorskip("torch")
    from capture.config import GenerateConfig
    from capture.run import generate
    from tests.tiny_families import build_flux2, build_qwen_image, build_sana
    from tests.tiny_pipelines import build_flux, build_pixart, build_sd3

    root = tmp_path_factory.mktemp("generated")
    out = {}
    for name, build, size, res in (("sd3", build_sd3, (32, 48), (12, 4)), ("flux", build_flux, (32, 48), (12, 4)),
                                   ("pixart", build_pixart, (48, 84), (7, 7)),
                                   ("qwen_image", build_qwen_image, (32, 48), (12, 4)),
                                   ("flux2", build_flux2, (32, 48), (12, 6)), ("sana", build_sana, (48, 80), (10, 10))):
        config = GenerateConfig(prompt="a red circle and a blue square", num_steps=2, height=size[0], width=size[1],
                                model=str(build(root / f"tiny-{name}")), output_dir=str(root / f"run-{name}"),
                                device="cpu", attention_resolution=res[0], self_attention_resolution=res[1])
        out[name] = generate(config)
    return out


def test_recorded_sd3_and_flux_runs_open_in_every_tab(page, generated):
    for name in ("sd3", "flux"):
        page.open(f"{page.server.url}?dataset={quote(str(generated[name]))}&step=1", ready_model="attention-text")
        show_tab(page, "Attention")
        page.page.locator(".dv-text-map").wait_for(state="visible")
        page.set_widget("dv:layer", "0")
        row, label = (10, "10: red · T5") if name == "sd3" else (1, "1: red")  # SD3: T5 after 9 CLIP tokens
        page.widget_element("dv:token", "select").select_option(label=label)
        expected = read_bin(generated[name], "attention/text/layer_0_step_001.bin")[row]
        raw = page.array(page.wait_values("attention-text", "raw", expected)[0])
        np.testing.assert_array_equal(raw, expected)
        assert raw.shape == (8, 12)  # 32x48 pixels: SD3 16x24 image tokens pooled by 2, Flux 8x12 as they are
        every_tab_draws(page, name)


def test_a_recorded_pixart_run_opens_in_every_tab(page, generated):
    """A cross-attention DiT run (layer kind cross-dit): the cross map drawn is the file's, every tab draws."""
    page.open(f"{page.server.url}?dataset={quote(str(generated['pixart']))}&step=1", ready_model="attention-image")
    show_tab(page, "Attention")
    page.page.locator(".dv-text-map").wait_for(state="hidden")   # no text->image maps in a cross-attention run
    page.set_widget("dv:layer", "0")
    page.widget_element("dv:token", "select").select_option(label="1: red")
    expected = read_bin(generated["pixart"], "attention/cross/layer_0_step_001.bin")[1]   # [T, 4, 7] -> "red"
    raw = page.array(page.wait_values("attention-heat", "raw", expected)[0])
    np.testing.assert_array_equal(raw, expected)
    every_tab_draws(page, "pixart")


@pytest.mark.parametrize("name, label, row, text", [("qwen_image", "1: red", 1, True), ("flux2", "1: red", 1, True),
                                                    ("sana", "2: red", 2, False)])
def test_recorded_qwen_image_flux2_and_sana_runs_open_in_every_tab(page, generated, name, label, row, text):
    """Qwen-Image and FLUX.2 (joint/single, the prompt's tokens taken out of a chat template) and SANA (kind linear,
    <bos> first): the drawn cross map of "red" (and its word → image map) is the file's, every tab draws."""
    ready = "attention-text" if text else "attention-image"
    page.open(f"{page.server.url}?dataset={quote(str(generated[name]))}&step=1", ready_model=ready)
    show_tab(page, "Attention")
    page.page.locator(".dv-text-map").wait_for(state="visible" if text else "hidden")
    page.set_widget("dv:layer", "0")
    page.widget_element("dv:token", "select").select_option(label=label)
    expected = read_bin(generated[name], "attention/cross/layer_0_step_001.bin")[row]
    raw = page.array(page.wait_values("attention-heat", "raw", expected)[0])
    np.testing.assert_array_equal(raw, expected)
    if text:
        expected = read_bin(generated[name], "attention/text/layer_0_step_001.bin")[row]
        np.testing.assert_array_equal(page.array(page.wait_values("attention-text", "raw", expected)[0]), expected)
    every_tab_draws(page, name)
