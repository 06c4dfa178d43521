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
