"""``panel serve app/main.py`` with no settings opens the shipped ``datasets/default`` run (and compares it
with ``datasets/compare``), or, when that folder is missing, says so in the banner and stays usable."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from analysis.divergence import map_js_divergence
from tests.browser.conftest import ROOT

DEFAULT = ROOT / "datasets" / "default"
COMPARE = ROOT / "datasets" / "compare"


def packed(run, step: int) -> np.ndarray:
    rgb = np.asarray(Image.open(run / "images" / f"step_{step:03d}.png").convert("RGB"), dtype=np.uint32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16) | (np.uint32(255) << 24)


def cross(run, layer: int, step: int) -> np.ndarray:
    rel = f"attention/cross/layer_{layer}_step_{step:03d}.bin"
    shape = json.loads((run / "metadata.json").read_text())["files"][rel]["shape"]
    return np.fromfile(run / rel, dtype="<f2").reshape(shape).astype(np.float32)


def test_opens_on_the_default_run_or_says_it_is_missing(panel_server, browser, bokeh, artifacts, monkeypatch):
    monkeypatch.delenv("DIFFVIZ_DATASET", raising=False)
    server = panel_server()  # cwd is the checkout, as for `panel serve app/main.py`
    context = browser.new_context(viewport={"width": 1500, "height": 1400})
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        query = "?compare=datasets/compare" if (COMPARE / "metadata.json").exists() else ""
        bp = bokeh(page).open(server.url + query, ready_model="timeline-image")
        if not (DEFAULT / "metadata.json").exists():
            banner = page.locator(".dv-error")
            banner.wait_for()
            assert "datasets/default" in banner.inner_text() and "no such folder" in banner.inner_text()
            page.get_by_text("No run loaded").first.wait_for()
            bp.screenshot(artifacts / "dashboard-default-missing.png")
            return
        (artifacts / "dashboard-default-missing.png").unlink(missing_ok=True)
        meta = json.loads((DEFAULT / "metadata.json").read_text())
        page.get_by_text(f"“{meta['run']['prompt']}”").first.wait_for()
        last = len(meta["timesteps"]) - 1  # a session opens at the last step
        shown = bp.wait_values("timeline-image", "image", packed(DEFAULT, last))
        assert np.array_equal(bp.array(shown[0]), packed(DEFAULT, last))
        assert bp.widget("dv:step", "end") == len(meta["timesteps"]) - 1
        bp.set_widget("dv:step", 12)
        page.wait_for_timeout(500)
        for tab, name in (("Timeline", "default-timeline"), ("Attention", "default-attention"),
                          ("Trajectory", "default-trajectory")):
            page.get_by_text(tab, exact=True).first.click()
            page.wait_for_timeout(1500)
            bp.screenshot(artifacts / f"dashboard-{name}.png")
        if query:
            page.get_by_text("Compare runs", exact=True).first.click()
            cross_layers = [l["index"] for l in meta["layers"] if l.get("cross_shape")]
            n = len(meta["timesteps"])
            js = bp.wait_column("compare-js", "js", f"v.length === {n * len(cross_layers)}")
            steps, layers = bp.column("compare-js", "step"), bp.column("compare-js", "layer_index")
            words = [not t["special"] for t in meta["tokens"]]
            names_b = [l["name"] for l in json.loads((COMPARE / "metadata.json").read_text())["layers"]]
            in_b = {i: names_b.index(meta["layers"][i]["name"]) for i in cross_layers}  # layers match by name
            for k in range(0, len(js), 7):  # a spread of cells: analysis' JS of the two runs' files
                expected = map_js_divergence(cross(DEFAULT, layers[k], steps[k]), cross(COMPARE, in_b[layers[k]], steps[k]))
                assert abs(js[k] - expected[words].mean()) < 1e-9
            page.wait_for_timeout(1000)
            bp.screenshot(artifacts / "dashboard-default-compare.png")
    finally:
        context.close()
