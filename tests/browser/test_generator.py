"""The "Local generator" panel in the served dashboard, end to end: a real ``diffviz bridge`` process,
``panel serve app/main.py``, and Chromium filling the form, watching the progress bar move, and seeing
the new run open (its prompt shown in the run info)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.browser.conftest import ROOT, stop_process, wait_http
from tests.loopback import free_port
from tests.synthetic import write_synthetic_run

pytest.importorskip("torch")

PROMPT = "a blue square above a red circle"
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


def test_generate_from_the_dashboard_watch_progress_and_open_the_run(page, panel_server, bridge, bokeh,
                                                                     tmp_path: Path, artifacts: Path) -> None:
    (artifacts / "generator-progress.png").unlink(missing_ok=True)
    start = write_synthetic_run(tmp_path / "start-run", prompt="the synthetic start run")
    server = panel_server(env={"DIFFVIZ_DATASET": str(start)})
    view = bokeh(page).open(server.url)
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
