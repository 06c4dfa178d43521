"""Benchmark: the dashboard under ``panel serve``, measured in Chromium.

    python tests/bench/bench_dashboard.py            # what `make bench` runs
    python tests/bench/bench_dashboard.py --quick    # fewer samples

1. Step-change latency: from setting the step slider's value in the page to both the attention view's
   image and its heat map holding the new step's data in BokehJS (and to the next painted frame), with
   the attention tab shown. Median over many changes. Goal: <= 50 ms. Measured three ways:
   - the app as it runs: steps whose frames are already in the browser are drawn there (app.views.frames);
   - the server path alone (frames off): slider -> Python -> one held patch, no debounce;
   - the server path with Panel's default 50 ms change debounce.
2. Playback: steps shown per second at a requested 30 fps and at the default 8 fps.
3. Memory: peak RSS of the server after stepping through every step of every layer (each step also
   reads the layer's self map for the probe) of a 30-step, 12-layer run, with a 16 MB cache bound,
   next to the decoded size of all the maps the walk touched (the cache holds at most 16 MB of them).

The run is ``datasets/default`` when present (timing), else a synthetic run of the same size
(30 steps, 32x32 images, 16x16 and 8x8 layers); the memory run is always synthetic.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, run_panel_server  # noqa: E402
from tests.synthetic import write_synthetic_run  # noqa: E402

GOAL_MS = 50.0

MEASURE_JS = r"""
async ([step, names]) => {
  const doc = Bokeh.documents[0];
  const tagged = (t) => { for (const m of doc.all_models) if (m.tags && m.tags.includes(t)) return m; };
  const models = names.map((n) => doc.get_model_by_name(n));
  const stepOf = (m) => { const d = m.data; const s = d instanceof Map ? d.get('step') : d.step; return s[0]; };
  const slider = tagged('dv:step');
  return await new Promise((resolve, reject) => {
    const got = models.map(() => null);
    const t0 = performance.now();
    const timer = setTimeout(() => reject(new Error('no update within 20 s')), 20000);
    const done = () => {
      if (got.some((g) => g === null)) return;
      const model_ms = Math.max(...got) - t0;
      requestAnimationFrame(() => { clearTimeout(timer); resolve([model_ms, performance.now() - t0]); });
    };
    models.forEach((m, i) => m.change.connect(() => {
      if (got[i] === null && stepOf(m) === step) { got[i] = performance.now(); done(); }
    }));
    slider.value = step;
  });
}
"""

COUNT_JS = r"""
async ([name, ms]) => {
  // steps shown: changes of the shown step (a frame drawn in the browser and the server's update of the
  // same step count once)
  const src = Bokeh.documents[0].get_model_by_name(name);
  const stepOf = () => { const d = src.data; return (d instanceof Map ? d.get('step') : d.step)[0]; };
  let n = 0, last = stepOf();
  const conn = () => { const s = stepOf(); if (s !== last) { n += 1; last = s; } };
  src.change.connect(conn);
  await new Promise((r) => setTimeout(r, ms));
  src.change.disconnect(conn);
  return n;
}
"""


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1500, "height": 1200})
    page.set_default_timeout(120_000)
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length && Bokeh.documents[0].get_model_by_name('attention-heat')")
    page.wait_for_timeout(1000)
    page.get_by_text("Attention", exact=True).first.click()
    page.wait_for_timeout(1500)
    return page


def set_widget(page, tag: str, value, attr: str = "value") -> None:
    page.evaluate("([t, v, a]) => { for (const m of Bokeh.documents[0].all_models) if (m.tags && m.tags.includes(t)) m[a] = v; }",
                  [tag, value, attr])


def latency(page, n_steps: int, samples: int) -> tuple[list[float], list[float]]:
    model, painted = [], []
    step = 0
    for i in range(samples + 3):
        step = (step + 1) % n_steps
        m, p = page.evaluate(MEASURE_JS, [step, ["attention-image", "attention-heat"]])
        if i >= 3:  # warm-up: first reads of each file
            model.append(m)
            painted.append(p)
        page.wait_for_timeout(30)
    return model, painted


def settle(page, quiet_ms: int = 600, limit_s: float = 30.0) -> None:
    """Wait until the shown step stops changing (updates queued during fast playback drain first)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and page.evaluate(COUNT_JS, ["attention-image", quiet_ms]):
        pass


def playback(page, fps: int, seconds: float) -> float:
    """Steps shown per second while playing at ``fps`` (after a 1 s run-in)."""
    set_widget(page, "dv:fps", fps)
    page.wait_for_timeout(300)
    set_widget(page, "dv:play", True, "active")  # the Play toggle
    page.wait_for_timeout(1000)
    changes = page.evaluate(COUNT_JS, ["attention-image", int(seconds * 1000)])
    set_widget(page, "dv:play", False, "active")
    settle(page)
    return changes / seconds


def rss_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split(":")[1].strip() for line in status.splitlines() if ":" in line}
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def timing_run(tmp: Path) -> Path:
    default = ROOT / "datasets" / "default"
    if (default / "metadata.json").exists():
        return default
    return write_synthetic_run(tmp / "default_size", steps=30, layers=4, layer_resolutions=[16, 16, 8, 8], tokens=8,
                               r=16, s=16, image_size=32, prompt="a red circle and a blue square")


def describe(run: Path) -> str:
    meta = json.loads((run / "metadata.json").read_text())
    grids = sorted({tuple(l["cross_shape"][1:]) for l in meta["layers"] if l.get("cross_shape")})
    return (f"{run.name}: {len(meta['timesteps'])} steps, {meta['run']['height']}x{meta['run']['width']} images, "
            f"{len(meta['layers'])} layers at {', '.join(f'{h}x{w}' for h, w in grids)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args(argv)
    samples = 12 if args.quick else 30
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmpdir, sync_playwright() as p:
        tmp = Path(tmpdir)
        run = timing_run(tmp)
        n_steps = len(json.loads((run / "metadata.json").read_text())["timesteps"])
        print(f"run: {describe(run)}  (load average {load:.1f} on {os.cpu_count()} CPUs)")
        browser = launch(p)
        results = {}
        configs = (("app: frames in the browser", "0", "1"), ("server path, no debounce", "0", "0"),
                   ("server path, Panel's 50 ms debounce", "50", "0"))
        for label, debounce, frames in configs:
            env = {"DIFFVIZ_DATASET": str(run), "DIFFVIZ_STEP_DEBOUNCE_MS": debounce, "DIFFVIZ_FRAMES": frames}
            with run_panel_server(ROOT / "app" / "main.py", env=env, log_dir=tmp) as server:
                page = open_page(browser, server.url)
                if frames == "1":  # wait until every step's frames have reached the browser
                    page.wait_for_function(
                        "(n) => ['attention-image-frames', 'attention-heat-frames'].every((name) => {"
                        " const d = Bokeh.documents[0].get_model_by_name(name).data;"
                        " const r = d instanceof Map ? d.get('ready') : d.ready;"
                        " return r.length === n && Array.from(r).every((v) => v === 1); })", arg=n_steps)
                model, painted = latency(page, n_steps, samples)
                results[label] = (statistics.median(model), statistics.median(painted))
                print(f"step change -> image + heat map [{label}]: median {statistics.median(model):.1f} ms in BokehJS, "
                      f"{statistics.median(painted):.1f} ms to the next frame (p90 {sorted(model)[int(0.9 * len(model)) - 1]:.1f} ms, "
                      f"n={len(model)})")
                if frames == "1":
                    for fps in (30, 8):
                        got = playback(page, fps, 3.0 if args.quick else 5.0)
                        print(f"playback at {fps} fps requested: {got:.1f} steps/s shown ({got / fps:.2f} of requested)")
                page.close()
        ours = results["app: frames in the browser"][0]
        server_path = results["server path, no debounce"][0]
        panels = results["server path, Panel's 50 ms debounce"][0]
        print(f"latency ratios: app / goal ({GOAL_MS:.0f} ms) {ours / GOAL_MS:.2f}; server path / goal {server_path / GOAL_MS:.2f}; "
              f"app / Panel default {ours / panels:.2f}; server path / Panel default {server_path / panels:.2f}")

        # ---- memory: every step of every layer of a 30-step, 12-layer run under a 16 MB cache bound
        big = write_synthetic_run(tmp / "twelve_layers", steps=30, layers=12, tokens=8, r=16, s=16, image_size=32,
                                  layer_resolutions=[16] * 6 + [8] * 6, prompt="a red circle and a blue square")
        meta = json.loads((big / "metadata.json").read_text())
        decoded = sum(4 * (int(e["bytes"]) // 2) for rel, e in meta["files"].items() if rel.endswith(".bin"))
        env = {"DIFFVIZ_DATASET": str(big), "DIFFVIZ_CACHE_MB": "16"}
        with run_panel_server(ROOT / "app" / "main.py", env=env, log_dir=tmp) as server:
            page = open_page(browser, server.url)
            rss_before, _ = rss_mb(server.pid)
            started = time.perf_counter()
            current = 0
            for layer in range(12):
                set_widget(page, "dv:layer", str(layer))
                page.wait_for_function(
                    "(l) => Bokeh.documents[0].get_model_by_name('attention-overlay-figure').title.text.includes('L' + l + ' ')",
                    arg=layer)
                for _ in range(30):  # every step, ending where it started
                    current = (current + 1) % 30
                    page.evaluate(MEASURE_JS, [current, ["attention-heat", "attention-probe"]])
            walk_s = time.perf_counter() - started
            rss_after, peak = rss_mb(server.pid)
            page.close()
        print(f"memory: {describe(big)}; maps decoded during the walk: {decoded / 2**20:.0f} MB, cache bound 16 MB")
        print(f"server RSS: {rss_before:.0f} MB after opening the page, {rss_after:.0f} MB after the walk "
              f"({12 * 30} step x layer views in {walk_s:.0f} s); peak {peak:.0f} MB; "
              f"growth {rss_after - rss_before:.0f} MB = {(rss_after - rss_before) / (decoded / 2**20):.2f} of the decoded maps")
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
