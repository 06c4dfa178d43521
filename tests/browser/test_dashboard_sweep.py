"""The Sweep tab in a real Chromium against ``panel serve`` opened on a sweep folder (as ``diffviz serve --dataset
SWEEP`` does): the small multiples read back from the Bokeh models (one cell per run, at its params' row and
column, the thumbnail's pixels equal to the file's), then two cells clicked open the two runs in Compare.

The sweep is 2 colours x 2 seeds of synthetic runs (``tests.test_app_sweep.write_sweep``); expected values come
from sweep.json and the runs' files, never from the app.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_app_sweep import packed, write_sweep

TIMEOUT = 60_000
GRID = {"colour": ["red", "green"], "seed": [0, 1]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    sweep = write_sweep(root / "colours", GRID, steps=3)
    return {"a": sweep, "root": root, "index": json.loads((sweep / "sweep.json").read_text())}


@pytest.fixture(scope="module")
def page(browser, server, bokeh):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        p = context.new_page()
        p.set_default_timeout(TIMEOUT)
        yield bokeh(p).open(server.url, ready_model="sweep-cells")
    finally:
        context.close()


def test_small_multiples_show_every_run_at_its_cell(page, runs, artifacts):
    index = runs["index"]["runs"]
    cells = page.wait_column("sweep-cells", "run", "v.length === 4")
    rows, cols = page.column("sweep-cells", "row"), page.column("sweep-cells", "col")
    for name, row, col in zip(cells, rows, cols):
        params = next(r["params"] for r in index if r["name"] == name)
        assert (params["colour"], params["seed"]) == (GRID["colour"][row], GRID["seed"][col])  # rows: colour
    assert sorted(zip(rows, cols)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    thumbs = page.wait_column("sweep-thumbs", "run", "v.length === 4")
    for k in (0, 3):
        shown = page.array(page.column("sweep-thumbs", "image")[k])
        np.testing.assert_array_equal(shown, packed(runs["a"] / thumbs[k] / "images/final.png"))
    # the headline plot holds the index's own figures
    norms = dict(zip(page.column("sweep-norm", "run"), page.column("sweep-norm", "y")))
    assert norms == pytest.approx({r["name"]: r["headline"]["final_latent_norm"] for r in index})
    page.screenshot(artifacts / "dashboard-sweep-1280x900.png", full_page=True)


def test_two_picked_cells_open_in_compare(page, runs):
    cells = page.column("sweep-cells", "run")
    xs, ys = page.column("sweep-cells", "x"), page.column("sweep-cells", "y")
    a, b = 1, 2  # (red, seed 1) and (green, seed 0)
    page.click_data("sweep-grid-figure", xs[a], ys[a])
    page.wait_column("sweep-picked", "x", "v.length === 1")
    page.click_data("sweep-grid-figure", xs[b], ys[b])
    status = page.page.locator(".dv-compare-status")
    status.wait_for(state="visible")
    text = " ".join(status.inner_text().split())
    assert cells[a] in text and cells[b] in text
    for key, name in (("a", cells[a]), ("b", cells[b])):
        step = page.wait_column(f"compare-image-{key}", "step", "v[0] >= 0")[0]
        shown = page.array(page.column(f"compare-image-{key}", "image")[0])
        np.testing.assert_array_equal(shown, packed(runs["a"] / name / f"images/step_{step:03d}.png"))
    assert page.page.url.count(cells[a]) == 1 and cells[b] in page.page.url and "sweep=" in page.page.url
    assert not page.page.locator(".dv-error").is_visible()


# ============================================================================ hostile and large sweeps (issue 25)
def _rehash(run, rel):
    import hashlib

    meta = json.loads((run / "metadata.json").read_text())
    data = (run / rel).read_bytes()
    meta["files"][rel].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (run / "metadata.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def hostile(runs):
    """Three more sweeps beside the module's: one whose axis has values that read the same (1 and 1.0), one at
    the run cap (10,000 runs, all done; only the first two pages of cells have folders), one of white images."""
    import shutil

    from PIL import Image

    from export import sweep as S
    from tests.synthetic import write_synthetic_run
    from tests.test_app_sweep import H, W, agree

    root = runs["root"]
    dup = root / "dup"
    shutil.copytree(runs["a"], dup)
    doc = json.loads((dup / "sweep.json").read_text())
    doc["grid"][1]["values"] = [0, 0.0]
    for run in doc["runs"]:
        run["params"]["seed"] = float(run["params"]["seed"]) if run["params"]["seed"] == 1 else 0
    (dup / "sweep.json").write_text(json.dumps(doc))

    cap = root / "cap"
    seeds = list(range(S.MAX_RUNS))
    template = write_synthetic_run(root / "cap-template", steps=3, layers=2, tokens=5, prompt="a red circle",
                                   image_hw=(H, W), grid=(4, 6))
    entries = []
    for seed in seeds:
        name = f"r{seed:05d}-colour-red-seed-{seed}"
        entries.append({"name": name, "params": {"colour": "red", "seed": seed}, "prompt": "a red circle",
                        "status": "done", "error": None, "thumbnail": f"{name}/images/final.png",
                        "headline": {"final_latent_norm": 1.0 + seed / S.MAX_RUNS, "word_share": {"red": 0.3, "circle": 0.2}}})
        if seed < 24:
            shutil.copytree(template, cap / name)
            agree(cap / name, {"seed": seed})
    S.write_index(cap, S.index_document("a {colour} circle", [{"name": "colour", "values": ["red"]},
                                                              {"name": "seed", "values": seeds}], {}, entries))
    white = root / "white"
    shutil.copytree(runs["a"], white)
    for run in json.loads((white / "sweep.json").read_text())["runs"]:
        Image.new("RGB", (W, H), (255, 255, 255)).save(white / run["thumbnail"])
        _rehash(white / run["name"], "images/final.png")
    return {"dup": dup, "cap": cap, "white": white}


@pytest.fixture()
def fresh(browser, bokeh):
    """A page of its own, with the console's errors collected."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    try:
        p = context.new_page()
        p.set_default_timeout(TIMEOUT)
        p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        p.on("pageerror", lambda e: errors.append(str(e)))
        yield bokeh(p), errors
    finally:
        context.close()


def step_answers(page, seconds: float = 1.0) -> float:
    """Seconds from a step-slider key press to the x̂0 preview of the new step (fails past ``seconds``)."""
    import time

    page.page.get_by_text("Timeline", exact=True).first.click()
    page.wait_column("timeline-image", "step", "v.length === 1 && v[0] >= 1")
    before = page.column("timeline-image", "step")[0]
    page.focus_slider("dv:step")
    start = time.monotonic()
    page.page.keyboard.press("ArrowLeft")
    page.wait_column("timeline-image", "step", f"v[0] === {before - 1}", timeout_ms=seconds * 1000)
    return time.monotonic() - start


def test_a_sweep_with_values_that_read_the_same_opens_with_a_banner(fresh, server, runs, hostile):
    page, errors = fresh
    first = json.loads((runs["a"] / "sweep.json").read_text())["runs"][0]["name"]
    page.open(f"{server.url}?dataset={runs['a'] / first}&sweep={hostile['dup']}", ready_model="timeline-image")
    banner = page.page.locator(".dv-error")
    banner.wait_for()
    text = " ".join(banner.inner_text().split())
    assert "sweep.json: grid[1].values[1]: axis 'seed' has two values that read the same (0 and 0.0)" in text
    assert step_answers(page) < 1.0
    assert errors == []


def test_a_sweep_at_the_run_cap_opens_paged_and_the_page_stays_alive(fresh, server, hostile, artifacts):
    page, errors = fresh
    cap = hostile["cap"]
    page.open(f"{server.url}?dataset={cap}/r00000-colour-red-seed-0&sweep={cap}", ready_model="sweep-cells")
    names = page.wait_column("sweep-cells", "run", "v.length === 12 && v[0].startsWith('r00000-')")
    assert names == [f"r{k:05d}-colour-red-seed-{k}" for k in range(12)]
    page.wait_column("sweep-thumbs", "run", "v.length === 12")
    pages = [label for _value, label in page.widget("dv:sweep-col-page", "options")]
    assert len(pages) == 834 and pages[:2] == ["1–12 of 10000", "13–24 of 10000"] and pages[-1] == "9997–10000 of 10000"
    assert page.widget("dv:sweep-col-page", "visible")
    page.widget_element("dv:sweep-col-page", "select").select_option(label=pages[1])  # the next page of seeds
    names = page.wait_column("sweep-cells", "run", "v.length === 12 && v[0].startsWith('r00012-')")
    assert names == [f"r{k:05d}-colour-red-seed-{k}" for k in range(12, 24)]
    status = " ".join(page.page.locator(".dv-sweep-status .dv-note").inner_text().split())
    assert "10000 of 10000 runs finished" in status and "values 13–24 of 10000 of seed" in status
    norm = page.column("sweep-norm", "run")
    assert len(norm) == 100 and norm[-1] == "r00099-colour-red-seed-99"  # the plot's first 100 values
    right = page.page.evaluate("() => Bokeh.index.find_one(window.__dv.model('sweep-grid-figure')).el"
                               ".getBoundingClientRect().right")
    assert right <= 1280  # twelve columns fit the window
    page.screenshot(artifacts / "dashboard-sweep-cap-1280x900.png", full_page=True)
    assert step_answers(page) < 1.0
    assert errors == []


def test_cells_of_white_images_are_separated_by_borders(fresh, server, hostile, artifacts):
    import io

    from PIL import Image

    page, _errors = fresh
    first = json.loads((hostile["white"] / "sweep.json").read_text())["runs"][0]["name"]
    page.open(f"{server.url}?dataset={hostile['white'] / first}&sweep={hostile['white']}", ready_model="sweep-cells")
    page.wait_column("sweep-thumbs", "run", "v.length === 4")
    xs, ys = page.column("sweep-cells", "x"), page.column("sweep-cells", "y")
    page.page.wait_for_timeout(300)  # the canvas paints after the models change
    shot = np.asarray(Image.open(io.BytesIO(page.page.screenshot())).convert("RGB")).astype(int)
    scale = shot.shape[1] / 1280
    # along the line through the first row's centre: white inside each cell, a grey line at every cell edge
    left, y = page.screen_xy("sweep-grid-figure", xs[0] - 0.5, ys[0])
    right, _ = page.screen_xy("sweep-grid-figure", xs[1] + 0.5, ys[0])
    line = shot[round(y * scale), round(left * scale) - 3:round(right * scale) + 4]
    dark = np.flatnonzero(line.max(axis=1) < 200)
    centre0 = round((page.screen_xy("sweep-grid-figure", xs[0], ys[0])[0] - left) * scale) + 3
    assert (line[centre0] == 255).all()  # the image itself is white
    edges = np.split(dark, np.flatnonzero(np.diff(dark) > 1) + 1)
    assert len(edges) == 4, dark  # left and right edge of each of the two cells, each a visible line
    page.screenshot(artifacts / "dashboard-sweep-white-cells.png")
