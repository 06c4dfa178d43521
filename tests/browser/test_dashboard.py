"""The dashboard in a real Chromium against a real ``panel serve``.

One server for the module, started on a small synthetic run A (6 steps, 3 layers at 8/8/4 cross
resolution, 6 tokens, 16x16 images). Most tests share one page and set what they need first; the
expected values are read straight from the run's files with numpy and PIL (never through the app).
"""
from __future__ import annotations

import contextlib

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis.divergence import map_js_divergence
from tests.synthetic import write_synthetic_run

STEPS = 6
RESOLUTIONS = [8, 8, 4]
PROMPT_A = "a red circle and square"
PROMPT_B = "a blue circle and square"
TIMEOUT = 60_000


# --------------------------------------------------------------------------- reference values from the files


def metadata(run: Path) -> dict:
    return json.loads((run / "metadata.json").read_text())


def read_bin(run: Path, rel: str) -> np.ndarray:
    shape = metadata(run)["files"][rel]["shape"]
    return np.fromfile(run / rel, dtype="<f2").reshape(shape).astype(np.float32)


def cross_file(run: Path, layer: int, step: int) -> np.ndarray:
    return read_bin(run, f"attention/cross/layer_{layer}_step_{step:03d}.bin")


def packed_image(run: Path, step: int) -> np.ndarray:
    """The step's PNG as Bokeh ``image_rgba`` data: uint32 RGBA, little-endian."""
    rgb = np.asarray(Image.open(run / f"images/step_{step:03d}.png").convert("RGB"), dtype=np.uint32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16) | (np.uint32(255) << 24)


def bp_array(value) -> np.ndarray:
    """A column value as read in the browser (list, or ``{shape, values}``) as numpy."""
    if isinstance(value, dict) and "shape" in value:
        return np.asarray(value["values"]).reshape(value["shape"])
    return np.asarray(value)


def bilinear(m: np.ndarray, size: int) -> np.ndarray:
    """Reference upsampling for the all-layer mean: PIL's bilinear resize (pixel-centre aligned)."""
    return np.asarray(Image.fromarray(np.asarray(m, np.float32), mode="F").resize((size, size), Image.BILINEAR))


def first_image(bp, source: str) -> np.ndarray:
    return bp_array(bp.column(source, "image")[0])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    common = dict(steps=STEPS, layers=3, tokens=6, r=8, s=4, layer_resolutions=RESOLUTIONS, image_size=16)
    out = {
        "a": write_synthetic_run(root / "run_a", prompt=PROMPT_A, seed=0, **common),
        "b": write_synthetic_run(root / "run_b", prompt=PROMPT_B, seed=1, **common),
        "short": write_synthetic_run(root / "run_short", prompt=PROMPT_B, seed=2, **{**common, "steps": 4}),
    }
    # an unknown schema version
    bad = root / "bad_schema"
    shutil.copytree(out["a"], bad)
    meta = metadata(bad)
    meta["schema_version"] = 99
    (bad / "metadata.json").write_text(json.dumps(meta))
    out["bad_schema"] = bad
    # a truncated attention file (found only when that map is read)
    trunc = root / "truncated_bin"
    shutil.copytree(out["a"], trunc)
    rel = "attention/cross/layer_0_step_004.bin"
    data = (trunc / rel).read_bytes()
    (trunc / rel).write_bytes(data[: len(data) // 2])
    out["truncated"] = trunc
    out["root"] = root
    return out


@contextlib.contextmanager
def dashboard(browser, bokeh, url: str):
    """A page on the dashboard at ``url``, in a context of its own, once its first frame is drawn."""
    context = browser.new_context(viewport={"width": 1500, "height": 1400})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        if "step=" not in url:  # these tests start at step 0; a session opens at the last step otherwise
            url += ("&" if "?" in url else "?") + "step=0"
        bp = bokeh(page).open(url, ready_model="timeline-image")
        bp.wait_column("timeline-image", "step", "v[0] === 0")
        yield bp
    finally:
        context.close()


@pytest.fixture(scope="module")
def dash(browser, server, bokeh):
    """One page for the module's tests, opened on run A."""
    with dashboard(browser, bokeh, server.url) as bp:
        yield bp


def show_tab(bp, name: str) -> None:
    bp.page.get_by_text(name, exact=True).first.click()


def wait_title(bp, figure: str, prefix: str) -> str:
    bp.page.wait_for_function("([n, p]) => window.__dv.model(n).title.text.startsWith(p)", arg=[figure, prefix])
    return bp.page.evaluate("(n) => window.__dv.model(n).title.text", figure)


def wait_step(bp, source: str, step: int) -> None:
    bp.wait_column(source, "step", f"v[0] === {step}")


def banner_text(bp) -> str:
    locator = bp.page.locator(".dv-error")
    return locator.first.inner_text() if locator.count() else ""


# --------------------------------------------------------------------------- tests


def test_step_slider_changes_the_image(dash, runs, artifacts):
    show_tab(dash, "Timeline")
    dash.set_widget("dv:step", 0)
    wait_step(dash, "timeline-image", 0)
    assert np.array_equal(first_image(dash, "timeline-image"), packed_image(runs["a"], 0))

    dash.focus_slider("dv:step")
    dash.page.keyboard.press("ArrowRight")  # the user's own input path: noUiSlider -> Bokeh -> Python
    wait_step(dash, "timeline-image", 1)
    shown = first_image(dash, "timeline-image")
    assert np.array_equal(shown, packed_image(runs["a"], 1))
    assert not np.array_equal(shown, packed_image(runs["a"], 0))
    assert dash.widget("dv:step") == 1
    dash.screenshot(artifacts / "dashboard-timeline.png")


def test_clicking_a_curve_jumps_to_that_step(dash, runs):
    show_tab(dash, "Timeline")
    norms = json.loads((runs["a"] / "metrics.json").read_text())["latent_norm"]
    dash.click_data("timeline-norm-figure", 4, norms[4])
    wait_step(dash, "timeline-image", 4)
    assert dash.widget("dv:step") == 4
    assert dash.prop("timeline-marker-norm", "location") == 4
    assert np.array_equal(first_image(dash, "timeline-image"), packed_image(runs["a"], 4))


def test_play_advances_steps_and_pause_stops(dash):
    show_tab(dash, "Timeline")
    dash.set_widget("dv:step", 0)
    wait_step(dash, "timeline-image", 0)
    dash.set_widget("dv:fps", 10)
    dash.page.get_by_role("button", name="▶ Play").click()
    seen = [dash.wait_column("timeline-image", "step", "v[0] >= 2")[0]]
    seen.append(dash.wait_column("timeline-image", "step", f"v[0] !== {seen[0]}")[0])
    dash.page.get_by_role("button", name="❚❚ Pause").click()
    dash.page.get_by_role("button", name="▶ Play").wait_for()
    stopped = dash.column("timeline-image", "step")[0]
    dash.page.wait_for_timeout(800)  # 8 frames at 10 fps: it would have moved
    assert dash.column("timeline-image", "step")[0] == stopped
    # the page address leaves the step out while playing and has it back after the pause
    dash.page.wait_for_function("(s) => new URLSearchParams(window.location.search).get('step') === String(s)", arg=stopped)
    assert seen[0] >= 2 and seen[1] != seen[0]


def test_token_choice_changes_the_heat_map_to_the_file_values(dash, runs, artifacts):
    show_tab(dash, "Attention")
    dash.set_widget("dv:step", 2)
    wait_step(dash, "attention-image", 2)
    dash.set_widget("dv:layer", "1")
    dash.set_widget("dv:token", "1")  # a Select's model value is the option's key as a string
    expected = cross_file(runs["a"], 1, 2)
    first = bp_array(dash.wait_values("attention-heat", "raw", expected[1])[0])
    np.testing.assert_array_equal(first, expected[1])  # token "a" is its own word

    dash.set_widget("dv:token", "3")  # "circle"
    second = bp_array(dash.wait_values("attention-heat", "raw", expected[3])[0])
    np.testing.assert_array_equal(second, expected[3])
    assert not np.array_equal(first, second)
    # the displayed map is the same map upsampled for display: same mass pattern, image-sized extent
    shown = bp_array(dash.column("attention-heat", "image")[0])
    assert shown.shape[0] > second.shape[0]
    assert dash.column("attention-heat", "dw")[0] == 16
    # per-map colour scale (the default): the shown map's own range; shared: 0 .. the largest value of any
    # token's map at this layer/step
    assert dash.prop("attention-cmap", "low") == pytest.approx(float(expected[3].min()), rel=1e-6)
    assert dash.prop("attention-cmap", "high") == pytest.approx(float(expected[3].max()), rel=1e-6)
    dash.widget_element("dv:scale", "button:nth-of-type(2)").click()
    dash.page.wait_for_function(f"() => Math.abs(window.__dv.model('attention-cmap').high - {float(expected.max())}) < 1e-6")
    assert dash.prop("attention-cmap", "low") == 0
    dash.widget_element("dv:scale", "button:nth-of-type(1)").click()
    dash.page.wait_for_function(f"() => Math.abs(window.__dv.model('attention-cmap').high - {float(expected[3].max())}) < 1e-6")
    # token share bars: each token's share of the stored mass at this layer/step
    share = np.asarray(dash.column("attention-share", "share"))
    mass = expected.sum(axis=(1, 2))
    np.testing.assert_allclose(share, mass / mass.sum(), rtol=1e-6)
    dash.screenshot(artifacts / "dashboard-attention.png")


def test_all_layers_mean_and_aggregate_mode(dash, runs):
    show_tab(dash, "Attention")
    dash.set_widget("dv:step", 3)
    wait_step(dash, "attention-image", 3)
    dash.set_widget("dv:token", "3")
    dash.set_widget("dv:layer", "mean")
    # all layers at one resolution (8x8): the 4x4 layer upsampled bilinearly, then the mean over layers
    maps = [cross_file(runs["a"], layer, 3)[3] for layer in range(3)]
    expected = np.mean([bilinear(m, 8) for m in maps], axis=0)
    raw = bp_array(dash.wait_values("attention-heat", "raw", expected, atol=1e-6)[0])
    np.testing.assert_allclose(raw, expected, rtol=1e-5, atol=1e-7)

    dash.widget_element("dv:aggregate", "input").click()
    title = wait_title(dash, "attention-overlay-figure", "DAAM")
    assert f"steps 0–{STEPS - 1}" in title
    daam = np.mean([np.mean([bilinear(cross_file(runs["a"], layer, s)[3], 8) for layer in range(3)], axis=0)
                    for s in range(STEPS)], axis=0)
    raw = bp_array(dash.wait_values("attention-heat", "raw", daam, atol=1e-6)[0])
    np.testing.assert_allclose(raw, daam, rtol=1e-5, atol=1e-7)
    dash.widget_element("dv:aggregate", "input").click()
    wait_title(dash, "attention-overlay-figure", "cross")


def test_self_attention_probe_follows_the_click(dash, runs):
    show_tab(dash, "Attention")
    dash.set_widget("dv:layer", "0")
    dash.set_widget("dv:step", 1)
    wait_step(dash, "attention-image", 1)
    # click the image's pixel (x=13.5, y=2.5): on layer 0's 4x4 self grid that is query row 0, column 3
    dash.click_data("attention-overlay-figure", 13.5, 2.5)
    query = dash.wait_column("attention-probe", "query", "v[0][0] === 0 && v[0][1] === 3")
    assert query[0] == [0, 3]
    self_map = read_bin(runs["a"], "attention/self/layer_0_step_001.bin")
    probe = bp_array(dash.column("attention-probe", "raw")[0])
    np.testing.assert_array_equal(probe, self_map[0 * 4 + 3].reshape(4, 4))


def test_clicking_a_pca_point_sets_the_step(dash, runs, artifacts):
    show_tab(dash, "Trajectory")
    dash.set_widget("dv:step", 0)
    wait_step(dash, "trajectory-current", 0)
    coords = json.loads((runs["a"] / "latent_pca.json").read_text())["coords"]
    xs = dash.column("trajectory-points", "x")
    np.testing.assert_allclose(xs, [c[0] for c in coords])
    # hovering a point shows that step's image beside the plot
    dash.page.mouse.move(*dash.screen_xy("trajectory-figure", *coords[5]))
    wait_step(dash, "trajectory-preview", 5)
    assert np.array_equal(first_image(dash, "trajectory-preview"), packed_image(runs["a"], 5))
    assert dash.widget("dv:step") == 0  # hovering does not select
    dash.click_data("trajectory-figure", *coords[3])
    wait_step(dash, "trajectory-current", 3)
    assert dash.widget("dv:step") == 3
    show_tab(dash, "Timeline")
    wait_step(dash, "timeline-image", 3)  # every view follows the one state
    assert np.array_equal(first_image(dash, "timeline-image"), packed_image(runs["a"], 3))
    show_tab(dash, "Trajectory")
    dash.screenshot(artifacts / "dashboard-trajectory.png")


def test_second_run_fills_the_comparison_with_analysis_js(dash, runs, files, artifacts):
    show_tab(dash, "Compare runs")
    box = dash.page.get_by_placeholder("datasets/compare or https://…/run/")
    box.fill(f"{files}/run_b/")
    dash.page.get_by_role("button", name="Compare").click()
    js = dash.wait_column("compare-js", "js", f"v.length === {STEPS * 3}")
    steps = dash.column("compare-js", "step")
    layers = dash.column("compare-js", "layer_index")
    # reference: analysis' JS divergence of every token's map, mean over the prompt's word tokens
    special = [t["special"] for t in metadata(runs["a"])["tokens"]]
    for value, step, layer in zip(js, steps, layers):
        per_token = map_js_divergence(cross_file(runs["a"], layer, step), cross_file(runs["b"], layer, step))
        assert value == pytest.approx(per_token[[not s for s in special]].mean(), rel=1e-9, abs=1e-12)
    dash.set_widget("dv:step", 2)
    dash.set_widget("dv:layer", "1")
    expected = map_js_divergence(cross_file(runs["a"], 1, 2), cross_file(runs["b"], 1, 2))
    token_js = dash.wait_column("compare-token-js", "js", f"Math.abs(v[2] - {expected[2]}) < 1e-9")
    np.testing.assert_allclose(token_js, expected, rtol=1e-9)
    assert dash.column("compare-token-js", "token")[2] == "2:red/blue"
    wait_step(dash, "compare-image-b", 2)
    assert np.array_equal(first_image(dash, "compare-image-b"), packed_image(runs["b"], 2))
    assert len(dash.column("compare-pca-a", "x")) == STEPS and len(dash.column("compare-pca-b", "x")) == STEPS
    assert "Comparable" in dash.page.locator(".dv-compare-status.dv-ok").inner_text()
    dash.screenshot(artifacts / "dashboard-compare.png")


def test_incomparable_runs_say_what_differs(dash, runs):
    show_tab(dash, "Compare runs")
    box = dash.page.get_by_placeholder("datasets/compare or https://…/run/")
    box.fill(str(runs["short"]))
    box.press("Enter")
    warning = dash.page.locator(".dv-compare-status.dv-warn")
    warning.wait_for()
    assert "step count differs: 6 vs 4" in warning.inner_text()
    dash.wait_column("compare-js", "js", "v.length === 0")


def test_corrupt_datasets_show_the_banner_and_keep_the_run(dash, runs, files):
    show_tab(dash, "Timeline")
    box = dash.page.get_by_placeholder("datasets/default or https://…/run/")
    box.fill(f"{files}/bad_schema/")
    dash.page.get_by_role("button", name="Load").click()
    dash.page.locator(".dv-error").wait_for()
    assert "schema_version 99 is not known" in banner_text(dash)
    # the previous run is still shown and still works
    dash.set_widget("dv:step", 5)
    wait_step(dash, "timeline-image", 5)
    assert np.array_equal(first_image(dash, "timeline-image"), packed_image(runs["a"], 5))
    assert "Traceback" not in banner_text(dash)

    # a run whose JSON is fine but one attention file is truncated: found when that map is read
    box.fill(str(runs["truncated"]))
    dash.page.get_by_role("button", name="Load").click()
    dash.page.get_by_text(str(runs["truncated"]), exact=True).first.wait_for()
    show_tab(dash, "Attention")
    dash.set_widget("dv:layer", "0")
    dash.set_widget("dv:step", 4)
    dash.page.locator(".dv-error", has_text="layer_0_step_004").wait_for()
    text = banner_text(dash)
    assert "attention/cross/layer_0_step_004.bin" in text and "Traceback" not in text
    # other steps of that run still display
    dash.set_widget("dv:step", 3)
    wait_step(dash, "attention-image", 3)


def test_loading_by_url_and_by_folder(dash, runs, files):
    show_tab(dash, "Timeline")
    box = dash.page.get_by_placeholder("datasets/default or https://…/run/")
    box.fill(f"{files}/run_b/")
    dash.page.get_by_role("button", name="Load").click()
    dash.page.get_by_text(f"{files}/run_b/", exact=True).first.wait_for()  # the run info's source row
    assert dash.page.get_by_text(f"“{PROMPT_B}”", exact=True).count() >= 1
    dash.set_widget("dv:step", 1)
    shown = dash.wait_values("timeline-image", "image", packed_image(runs["b"], 1))
    assert np.array_equal(bp_array(shown[0]), packed_image(runs["b"], 1))

    # a local folder, picked with the browser's folder chooser, travels as files and opens the same way
    dash.widget_element("dv:dataset-folder", "input[type=file]").set_input_files(runs["a"])
    dash.page.get_by_text("upload:run_a", exact=True).first.wait_for()  # the run info's source row
    dash.page.wait_for_function("() => decodeURIComponent(window.location.search).includes('dataset=upload:run_a')")
    dash.set_widget("dv:step", 2)
    shown = dash.wait_values("timeline-image", "image", packed_image(runs["a"], 2))
    assert np.array_equal(bp_array(shown[0]), packed_image(runs["a"], 2))


def test_page_address_sets_run_step_layer_and_token(browser, server, bokeh, runs, files):
    context = browser.new_context(viewport={"width": 1500, "height": 1400})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        bp = bokeh(page).open(f"{server.url}?dataset={files}/run_b/&step=3&layer=1&token=3", ready_model="timeline-image")
        page.get_by_text(f"{files}/run_b/", exact=True).first.wait_for()  # the run info's source row
        shown = bp.wait_values("timeline-image", "image", packed_image(runs["b"], 3))
        assert np.array_equal(bp_array(shown[0]), packed_image(runs["b"], 3))
        assert bp.widget("dv:step") == 3
        show_tab(bp, "Attention")
        expected = cross_file(runs["b"], 1, 3)[3]
        raw = bp_array(bp.wait_values("attention-heat", "raw", expected)[0])
        np.testing.assert_array_equal(raw, expected)
        assert bp.widget("dv:layer") == "1" and bp.widget("dv:token") == "3"
        assert wait_title(bp, "attention-overlay-figure", "cross").endswith("step 3")
        # and the address keeps mirroring the state
        bp.set_widget("dv:step", 4)
        page.wait_for_function("() => window.location.search.includes('step=4')")
    finally:
        context.close()
