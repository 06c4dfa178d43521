"""The Attention tab in Chromium: A | B | A − B, the word grid, greyscale, self mode, save tools, and a page
that opens at the last step, asks no other host for anything and logs no warnings.

Expected values come from the runs' files (numpy, PIL) or, for the word grid, from ``export.figure`` (the
paper figure the dashboard must show unchanged; that module is checked against an independent blend in
tests/test_export_figure.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from export import figure
from export import reader
from tests.synthetic import write_synthetic_run

STEPS, TOKENS = 4, 5


def cross_file(run: Path, layer: int, step: int) -> np.ndarray:
    rel = f"attention/cross/layer_{layer}_step_{step:03d}.bin"
    shape = json.loads((run / "metadata.json").read_text())["files"][rel]["shape"]
    return np.fromfile(run / rel, dtype="<f2").reshape(shape).astype(np.float32)


def unpack(value) -> np.ndarray:
    """A packed ``image_rgba`` column value as ``uint8[H, W, 4]``."""
    packed = np.asarray(value["values"], np.uint32).reshape(value["shape"])
    return packed.view(np.uint8).reshape(*packed.shape, 4)


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory, panel_server, browser):
    root = tmp_path_factory.mktemp("attn")
    common = dict(steps=STEPS, layers=2, tokens=TOKENS, r=8, s=4, image_size=16)
    a = write_synthetic_run(root / "a", prompt="a red circle", seed=0, **common)
    b = write_synthetic_run(root / "b", prompt="a blue circle", seed=1, **common)
    server = panel_server()
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    log = {"console": [], "hosts": set()}
    page.on("console", lambda m: log["console"].append(f"{m.type}: {m.text}") if m.type in ("warning", "error") else None)
    page.on("request", lambda r: log["hosts"].add(r.url.split("/")[2]))
    yield page, server, a, b, log
    page.close()


def open_page(bokeh, page_runs, step: int | None = None):
    """The page on runs A and B, the Attention tab shown and drawn (at ``step``, or where the session opens)."""
    page, server, a, b, log = page_runs
    query = "" if step is None else f"&step={step}"
    bp = bokeh(page).open(f"{server.url}?dataset={quote(str(a))}&compare={quote(str(b))}{query}", ready_model="attention-heat-b")
    bp.wait_column("timeline-image", "step", f"v[0] === {STEPS - 1 if step is None else step}")
    page.get_by_text("Attention", exact=True).first.click()
    bp.wait_column("attention-image", "image", "v[0] && v[0].shape && v[0].shape[0] === 16")
    return bp


def test_opens_at_the_last_step_and_shows_a_b_and_their_difference(bokeh, page_runs):
    page, server, a, b, log = page_runs
    bp = open_page(bokeh, page_runs)
    assert bp.column("attention-heat", "step") == [STEPS - 1]  # no ?step in the address: the last step
    bp.set_widget("dv:layer", "1")
    bp.set_widget("dv:step", 2)
    token = 2  # "red" in A, "blue" in B: paired by position
    want_a, want_b = cross_file(a, 1, 2)[token], cross_file(b, 1, 2)[token]
    got_a = bp.array(bp.wait_values("attention-heat-a", "raw", want_a, atol=1e-6)[0])
    got_b = bp.array(bp.column("attention-heat-b", "raw")[0])
    got_d = bp.array(bp.column("attention-heat-diff", "raw")[0])
    np.testing.assert_allclose(got_a, want_a, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, atol=1e-6)
    np.testing.assert_allclose(got_d, want_a - want_b, atol=1e-6)
    # one colour scale for A and B, a symmetric one for the difference
    assert bp.prop("attention-pair-cmap", "high") == pytest.approx(max(want_a.max(), want_b.max()), rel=1e-5)
    assert bp.prop("attention-pair-cmap", "low") == pytest.approx(min(0.0, want_a.min(), want_b.min()), abs=1e-6)
    r = float(np.abs(want_a - want_b).max())
    assert (bp.prop("attention-diff-cmap", "low"), bp.prop("attention-diff-cmap", "high")) == pytest.approx((-r, r), rel=1e-5)
    # the titles name what is drawn
    titles = page.evaluate("""() => ['attention-a-figure', 'attention-b-figure', 'attention-diff-figure']
                                .map((n) => Bokeh.documents[0].get_model_by_name(n).title.text)""")
    assert "'red'" in titles[0] and "'blue'" in titles[1] and all("step 2" in t for t in titles), titles
    assert "L1" in titles[0] and "L1" in titles[1]


def test_word_grid_is_the_export_figure(bokeh, page_runs):
    page, server, a, b, log = page_runs
    bp = open_page(bokeh, page_runs, step=1)
    bp.widget_element("dv:grid", "input").click()  # a user's click
    value = bp.wait_column("attention-grid", "image", "v[0] && v[0].shape && v[0].shape[0] > 8")[0]
    shown = unpack(value)
    want = np.asarray(figure.render_grid(reader.open_run(str(a)), steps=(0, STEPS - 1)).convert("RGBA"))
    assert shown.shape == want.shape
    np.testing.assert_array_equal(shown, want)
    assert page.locator(".dv-main-row").is_hidden()
    bp.widget_element("dv:grid", "input").click()


def test_greyscale_image_and_self_mode(bokeh, page_runs):
    page, server, a, b, log = page_runs
    bp = open_page(bokeh, page_runs, step=1)
    bp.widget_element("dv:grey", "input").click()
    luma = np.asarray(Image.open(a / "images/step_001.png").convert("L"))  # PIL's ITU-R 601-2 luma
    grey = "v[0].values.every((p) => ((p & 0xff) === ((p >>> 8) & 0xff)) && ((p & 0xff) === ((p >>> 16) & 0xff)))"
    shown = unpack(bp.wait_column("attention-image", "image", grey)[0])
    np.testing.assert_array_equal(shown[..., 0], luma)
    np.testing.assert_array_equal(shown[..., 2], luma)
    bp.widget_element("dv:grey", "input").click()
    assert page.locator(".dv-word-controls").is_visible()
    page.get_by_text("self (probe)", exact=True).first.click()
    page.locator(".dv-word-controls").wait_for(state="hidden", timeout=20_000)
    page.get_by_text("cross (word)", exact=True).first.click()
    page.locator(".dv-word-controls").wait_for(state="visible", timeout=20_000)


def test_every_figure_saves_png_and_nothing_leaves_the_origin(bokeh, page_runs):
    page, server, a, b, log = page_runs
    open_page(bokeh, page_runs)
    for tab in ("Timeline", "Attention", "Trajectory", "Compare runs"):
        page.get_by_text(tab, exact=True).first.click()
        page.wait_for_timeout(1500)
    missing = page.evaluate("""() => {
        const out = [];
        for (const m of Bokeh.documents[0].all_models) {
          if (!('toolbar' in m) || !('renderers' in m) || !m.name) continue;  // our figures are named
          const name = (t) => t.constructor.__name__ || t.constructor.name;
          if (!m.toolbar.tools.some((t) => name(t) === 'SaveTool')) out.push(m.name);
        }
        return out;
      }""")
    assert missing == [], f"figures without a save tool: {missing}"
    assert log["hosts"] == {f"127.0.0.1:{server.port}"}, log["hosts"]
    assert log["console"] == [], log["console"]
