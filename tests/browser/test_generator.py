"""The "Local generator" panel in the served dashboard, end to end: a real ``diffviz bridge`` process,
``panel serve app/main.py``, and Chromium filling the form, watching the progress bar move, and seeing
the new run open (its prompt shown in the run info). Before that, the cheap checks of the form: the
unreachable message said once, no resize grip beside the prompt box, and the toy model's vocabulary
listed with a prompt of other words refused as it is typed."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser.conftest import ROOT, stop_process, wait_http
from tests.loopback import free_port
from tests.synthetic import write_synthetic_run

pytest.importorskip("torch")

PROMPT = "a blue square and a red circle on the right"
STEPS = 30
#: Milliseconds for the whole generation (30 small steps: about a minute on two busy cores).
JOB_TIMEOUT_MS = 400_000


@pytest.fixture(scope="module")
def bridge(tmp_path_factory, artifacts: Path):
    datasets = tmp_path_factory.mktemp("browser-bridge")
    port = free_port()
    log = artifacts / f"bridge-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "diffviz", "bridge", "--port", str(port), "--datasets",
                                 str(datasets), "--quiet"], cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", 240, proc, log)
        yield {"url": url, "datasets": datasets, "log": log}
    finally:
        stop_process(proc, grace=30)


@pytest.fixture(scope="module")
def dashboard(panel_server, tmp_path_factory):
    start = write_synthetic_run(tmp_path_factory.mktemp("gen-start") / "start-run", prompt="the synthetic start run")
    return panel_server(env={"DIFFVIZ_DATASET": str(start)})


#: Every element under the generator tab whose ``resize`` style is not none (each draws a grey grip), and
#: the prompt box's rectangles: the widget's host and its textarea.
_FORM_JS = """() => {
  const resizable = []; let host = null, area = null;
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (getComputedStyle(el).resize !== 'none') resizable.push(el.tagName + '.' + el.className);
      if (el.classList && el.classList.contains('dv-gen-prompt')) {
        host = el.getBoundingClientRect().toJSON();
        const inner = (el.shadowRoot || el).querySelector('textarea');
        area = inner ? inner.getBoundingClientRect().toJSON() : null;
      }
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return {resizable, host, area};
}"""


def test_the_form_says_unreachable_once_has_no_stray_square_and_refuses_unknown_words(
        page, dashboard, bridge, bokeh, artifacts: Path) -> None:
    page.set_viewport_size({"width": 1280, "height": 720})
    bokeh(page).open(dashboard.url)
    page.locator(".dv-runinfo").get_by_text("the synthetic start run").wait_for(timeout=120_000)
    page.get_by_text("Local generator", exact=True).first.click()
    url_box = page.locator(".dv-gen-url input")
    url_box.fill(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    url_box.press("Enter")
    status = page.locator(".dv-gen-status")
    status.get_by_text("unreachable").wait_for(timeout=60_000)
    text = status.locator(".dv-warn").inner_text()  # the pane's HTML lives in its shadow root
    assert text.count("unreachable") == 1, text
    assert page.get_by_text("unreachable").count() == 1  # and nowhere else on the page

    # no resize grip: no element of the tab is resizable, and the prompt box's bottom-right corner has the
    # same colour as its bottom-left one (a grip paints a grey square there)
    form = page.evaluate(_FORM_JS)
    assert form["resizable"] == [] and form["host"] and form["area"], form
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)
    area = form["area"]
    y = int(area["bottom"]) - 6
    right, left = shot[y, int(area["right"]) - 6], shot[y, int(area["left"]) + 6]
    assert (np.abs(right - left) <= 8).all(), (right, left)
    assert form["host"]["right"] - area["right"] < 2  # nothing beside the box inside its widget
    page.screenshot(path=str(artifacts / "generator-form-1280x720.png"))

    # the toy model's vocabulary, once the bridge answers
    url_box.fill(bridge["url"])
    url_box.press("Enter")
    page.get_by_text("Bridge reachable").wait_for(timeout=60_000)
    words = page.locator(".dv-gen-words")
    words.get_by_text("knows only these words").wait_for(timeout=30_000)
    listed = words.locator(".dv-note").inner_text()
    for word in ("a", "and", "red", "green", "blue", "yellow", "circle", "square", "triangle", "left", "small"):
        assert f" {word}," in listed or listed.rstrip().endswith(f" {word}"), (word, listed)
    box = page.locator(".dv-gen-prompt textarea").bounding_box()
    below = words.bounding_box()
    assert 0 <= below["y"] - (box["y"] + box["height"]) < 120, (box, below)  # near the prompt box

    # typing a prompt of other words: one line names them, before anything is sent
    prompt = page.locator(".dv-gen-prompt textarea")
    prompt.click()
    prompt.press_sequentially("a purple dog")
    refusal = words.locator(".dv-warn")
    refusal.get_by_text("unknown words for the toy model: purple, dog").wait_for(timeout=30_000)
    assert refusal.count() == 1 and "\n" not in refusal.inner_text().strip(), refusal.inner_text()
    page.screenshot(path=str(artifacts / "generator-unknown-words-1280x720.png"))
    page.locator(".dv-gen-generate button").click()
    page.locator(".dv-gen-message").get_by_text("Not sent").wait_for(timeout=30_000)
    assert sorted(p.name for p in bridge["datasets"].iterdir() if not p.name.startswith(".")) == []
    prompt.fill("")
    prompt.press("Tab")


def test_generate_from_the_dashboard_watch_progress_and_open_the_run(page, dashboard, bridge, bokeh,
                                                                     artifacts: Path) -> None:
    (artifacts / "generator-progress.png").unlink(missing_ok=True)
    view = bokeh(page).open(dashboard.url)
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=120_000)
    runinfo = page.locator(".dv-runinfo")
    runinfo.get_by_text("the synthetic start run").wait_for(timeout=120_000)

    page.get_by_text("Local generator", exact=True).first.click()
    url_box = page.locator(".dv-gen-url input")
    url_box.fill(bridge["url"])
    url_box.press("Enter")
    page.get_by_text("Bridge reachable").wait_for(timeout=60_000)

    prompt = page.locator(".dv-gen-prompt textarea")
    prompt.fill(PROMPT)
    prompt.press("Tab")
    for css, value in ((".dv-gen-steps", STEPS), (".dv-gen-max-layers", 1), (".dv-gen-cross-res", 8),
                       (".dv-gen-self-res", 4), (".dv-gen-seed", 11)):
        box = page.locator(f"{css} input")
        box.fill(str(value))
        box.press("Tab")
    name_box = page.locator(".dv-gen-name input")
    name_box.fill("from-the-browser")
    name_box.press("Tab")
    # the form reached Python before Generate is pressed
    view.install()
    page.wait_for_function("(n) => window.__dv.tagged('dv:gen-steps').value === n", arg=STEPS, timeout=30_000)
    page.locator(".dv-gen-generate button").click()

    # read the progress bar while the job runs
    values: list[int] = []
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        value = view.widget("dv:gen-progress")
        if value is not None and (not values or value != values[-1]):
            values.append(int(value))
            if 300 < value < 1000 and not (artifacts / "generator-progress.png").exists():
                view.screenshot(artifacts / "generator-progress.png")
        if value == 1000:
            break
        time.sleep(0.15)
    midway = [v for v in values if 0 < v < 1000]
    assert len(midway) >= 2, f"the progress bar was not seen moving: {values}"
    assert midway == sorted(midway) and midway[-1] > midway[0], values
    assert values[-1] == 1000, values

    # the new run opens by itself: its prompt in the run info, its URL in the run box
    runinfo.get_by_text(PROMPT).wait_for(timeout=120_000)
    run_url = f"{bridge['url']}/runs/from-the-browser/"
    page.wait_for_function("(u) => window.__dv.tagged('dv:dataset-url').value === u", arg=run_url, timeout=60_000)
    view.screenshot(artifacts / "generator-done.png")
    meta = json.loads((bridge["datasets"] / "from-the-browser" / "metadata.json").read_text())
    assert meta["run"]["prompt"] == PROMPT and meta["run"]["num_steps"] == STEPS and meta["run"]["seed"] == 11
    from export.validate import validate_run

    assert validate_run(bridge["datasets"] / "from-the-browser", strict=True) == []
