"""Hostile runs against a real ``panel serve``: one user's bad run never stalls another session, and
every rejected or broken run shows the banner.

One server, opened on a small good run A. Session 2 opens with ``?dataset=`` naming a run with ``1e999``
in metrics.json: the banner, and run A stays. Then session 1 keeps stepping (its step latency is the time from
setting the slider in the browser to the server's update of the timeline marker, read from the Bokeh
models) while session 2 loads pathological runs by URL: a manifest of 200,000 bad entries and one of
90,000 entries with two schema errors each. Session 1's latency during those loads must stay within a
bound derived from its own baseline; the server's memory must come back after each failed load. Last,
a run with a NaN cross map opens, and its Attention tab shows the banner naming the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

import psutil
import pytest

from tests.synthetic import write_synthetic_run

STEPS = 6
TIMEOUT = 60_000
#: Session 1 may be this much slower than its own baseline median while another session loads a bad run.
SLACK_MS = 1000.0
#: Server memory may stay this much above where it was before a failed load: the allocator keeps some freed
#: pages (about +30..50 MiB after the first such load here, none more after later ones); the issue's load kept
#: 2.2 GB. That nothing of a failed run stays referenced is checked exactly in tests/test_app_shell.py.
RSS_SLACK = 96 * 2**20
NAN_MAP = "attention/cross/layer_1_step_000.bin"

#: One step of session 1: the slider moves to the next step (as a user's input would, synced to Python); the
#: time until the server's update of the timeline marker arrives, in ms (the frames drawn in the browser
#: on a step change do not move the marker: only the server does).
STEP_JS = """
async ([n]) => {
  const slider = window.__dv.tagged('dv:step'), marker = window.__dv.model('timeline-marker-norm');
  const step = (marker.location + 1) % n;
  const t0 = performance.now();
  slider.value = step;
  while (marker.location !== step) {
    if (performance.now() - t0 > 60000) return -1;
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  return performance.now() - t0;
}
"""


# --------------------------------------------------------------------------- the runs


def _meta(run: Path) -> dict:
    return json.loads((run / "metadata.json").read_text())


def _replace(run: Path, rel: str, data: bytes) -> None:
    """Write ``rel`` and keep its manifest entry (bytes, sha256) true, so only the content is wrong."""
    (run / rel).write_bytes(data)
    meta = _meta(run)
    meta["files"][rel].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (run / "metadata.json").write_text(json.dumps(meta))


def _junk_manifest(run: Path, entries: int, entry: dict) -> None:
    meta = _meta(run)
    meta["files"].update({f"junk/f{i:07d}.bin": entry for i in range(entries)})
    (run / "metadata.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    a = write_synthetic_run(root / "run_a", steps=STEPS, layers=2, tokens=5, r=8, s=4, image_size=16, seed=0)
    out = {"root": root, "a": a}

    def copy(name: str) -> Path:
        out[name] = root / name
        shutil.copytree(a, out[name])
        return out[name]

    # over the manifest count cap (100,000): each entry also breaks the schema
    _junk_manifest(copy("many_entries"), 200_000, {"bytes": 1, "sha256": "x", "kind": "nope"})
    # under the count cap, two schema errors per entry (180,000 in all)
    _junk_manifest(copy("many_errors"), 90_000, {"bytes": 1, "sha256": "x", "kind": "nope"})
    # a number that overflows to infinity
    run = copy("overflow")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["latent_norm"][1] = "@BIG@"
    _replace(run, "metrics.json", json.dumps(metrics).replace('"@BIG@"', "1e999").encode())
    # a cross map full of NaN (the right size, a true manifest entry)
    run = copy("nan_map")
    _replace(run, NAN_MAP, bytes.fromhex("007e") * ((run / NAN_MAP).stat().st_size // 2))  # float16 NaN
    return out


@pytest.fixture(scope="module")
def sessions(browser, server, bokeh, files):
    """Session 1 on run A (it keeps stepping), and session 2 opened by a page address naming the run with
    ``1e999`` in metrics.json (then it loads the others). Both pages start together (each costs seconds)."""
    with contextlib.ExitStack() as stack:
        pages = []
        for url in (server.url, f"{server.url}?dataset={files}/overflow/"):
            context = browser.new_context(viewport={"width": 1500, "height": 1100})
            stack.callback(context.close)
            page = context.new_page()
            page.set_default_timeout(TIMEOUT)
            page.goto(url, wait_until="commit", timeout=TIMEOUT)
            pages.append(bokeh(page))
        for bp in pages:
            bp.wait_model("timeline-image")
            bp.wait_column("timeline-image", "step", "v[0] >= 0")
        yield pages


@pytest.fixture(scope="module")
def first(sessions):
    return sessions[0]


@pytest.fixture(scope="module")
def second(sessions):
    return sessions[1]


def step_ms(bp) -> float:
    ms = bp.page.evaluate(STEP_JS, [STEPS])
    assert ms >= 0, "a step never reached the server's marker"
    return ms


def banner(bp, has_text: str, timeout_ms: float = 30_000) -> str:
    locator = bp.page.locator(".dv-error", has_text=has_text).first
    locator.wait_for(timeout=timeout_ms)
    return locator.inner_text()


def load_by_box(bp, text: str) -> None:
    bp.page.get_by_placeholder("datasets/default or https://…/run/").fill(text)
    bp.page.get_by_role("button", name="Load").click()


def show_tab(bp, name: str) -> None:
    bp.page.get_by_text(name, exact=True).first.click()


# --------------------------------------------------------------------------- tests


def test_an_overflowing_number_by_page_address_shows_the_banner(second, runs, files):
    url = f"{files}/overflow/"
    loaded = second.page.get_by_text(url, exact=True)  # the run info's source row: it loaded after all
    second.page.locator(".dv-error", has_text="overflow").or_(loaded).first.wait_for(timeout=30_000)
    assert not loaded.count(), f"{url} loaded without a banner"
    text = banner(second, "overflow")
    print(f"\noverflow: banner: {text}")
    assert "metrics.json" in text and "overflows" in text.lower() and "Traceback" not in text
    second.page.get_by_text(str(runs["a"]), exact=True).first.wait_for()  # back to the run still shown
    second.page.wait_for_function("(a) => new URLSearchParams(window.location.search).get('dataset') === a",
                                  arg=str(runs["a"]))


@pytest.mark.parametrize("name", ["many_entries", "many_errors"])
def test_a_pathological_run_never_stalls_another_session(name, first, second, server, runs, files):
    rss = psutil.Process(server.pid).memory_info
    baseline = [step_ms(first) for _ in range(7)]
    before = rss().rss
    url = f"{files}/{name}/"
    load_by_box(second, url)
    shown = second.page.locator(".dv-error", has_text=name)
    during, peak, start = [], before, time.monotonic()
    while not shown.count():
        assert time.monotonic() - start < 60, f"no banner for {url} after 60 s"
        during.append(step_ms(first))
        peak = max(peak, rss().rss)
    elapsed = time.monotonic() - start
    after = rss().rss
    text = shown.first.inner_text()
    median = statistics.median(baseline)
    print(f"\n{name}: session 1 step latency: baseline median {median:.0f} ms (max {max(baseline):.0f}); "
          f"during session 2's load ({elapsed:.1f} s, {len(during)} steps): "
          f"{', '.join(f'{v:.0f}' for v in during)} ms")
    print(f"{name}: server RSS before {before / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, "
          f"after the failed load {after / 2**20:.0f} MiB")
    print(f"{name}: banner: {text}")
    assert text.startswith("⚠ Could not load run") and "metadata.json" in text and "Traceback" not in text
    assert during, "session 1 made no step while session 2 loaded"
    assert max(during) <= median + SLACK_MS, (during, median)
    assert after <= before + RSS_SLACK, f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB after a failed load"
    # session 2 still shows run A and still works
    second.page.get_by_text(str(runs["a"]), exact=True).first.wait_for()
    assert step_ms(second) >= 0


def test_a_nan_cross_map_shows_the_banner_on_the_attention_tab(second, runs):
    show_tab(second, "Timeline")
    load_by_box(second, str(runs["nan_map"]))
    second.page.get_by_text(str(runs["nan_map"]), exact=True).first.wait_for()  # it opens: maps are read when shown
    show_tab(second, "Attention")
    second.set_widget("dv:step", 0)  # the broken map's step: a map is read, and refused, when its step is shown
    text = banner(second, NAN_MAP, timeout_ms=15_000)
    print(f"\nnan_map: banner: {text}")
    assert "Traceback" not in text
