"""Benchmark: the dashboard under ``panel serve``, measured in Chromium.

    python tests/bench/bench_dashboard.py            # what `make bench` runs
    python tests/bench/bench_dashboard.py --quick    # fewer samples
    python tests/bench/bench_dashboard.py --part sd  # only the SD-1.5-shaped run (4); --part toy: only 1-3

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

4. An SD-1.5-shaped synthetic run (``--part sd``): 64x64 latents (512x512 images), 16 attention layers stored as
   Stable Diffusion 1.5's would be with cross maps capped at 32x32 and self maps at 16x16 (cross 32, 32, 32, 32,
   16, 16, 8, 16, 16, 16, 32 x 6; self 16, or 8 in the mid block), a 77-key context (9 prompt tokens stored),
   30 steps. Measured with the Attention tab shown, the app as it runs:
   - step change -> image + heat map, all layers (the default) and one 32x32 layer; goal <= 50 ms median;
   - the word grid: from the click on its checkbox to ``attention-grid`` holding the picture (first open, reopen);
   - A | B | difference: a step change with a second run loaded, until ``attention-heat``, ``attention-heat-b`` and
     ``attention-heat-diff`` all hold the new step;
   - memory: server RSS over a walk of every layer and step (every third step with ``--quick``) under a
     :data:`SD_CACHE_MB` cache cap, next to the decoded size of the maps the walk touched.
   The word grid and A|B|diff parts say "skipped" when the app has no such models.
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
#: Stored cross-attention grid of each of SD 1.5's 16 attention layers (native 64, 32, 16, 8 capped at 32).
SD_LAYERS = [32] * 4 + [16] * 2 + [8] + [16] * 3 + [32] * 6
SD_PROMPT = "a photo of a red circle and a blue square"
#: Cache cap of the SD-shaped run's server (below the decoded size of its maps, so eviction works during the walk).
SD_CACHE_MB = 32

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
    response = page.goto(url, wait_until="domcontentloaded")
    if response is None or response.status != 200:  # a broken app: say so now, not after a long wait
        raise RuntimeError(f"{url} answered {response and response.status}")
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


GRID_JS = r"""
async () => {
  // click the word-grid checkbox as a user would; resolve when the grid's source holds a picture
  const doc = Bokeh.documents[0];
  const tagged = (t) => { for (const m of doc.all_models) if (m.tags && m.tags.includes(t)) return m; };
  const src = doc.get_model_by_name('attention-grid');
  const view = Bokeh.index.find_one(tagged('dv:grid'));
  const input = (view.shadow_el || view.el).querySelector('input');
  return await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('word grid not filled within 120 s')), 120000);
    const dw = () => { const d = src.data; return (d instanceof Map ? d.get('dw') : d.dw)[0]; };
    const t0 = performance.now();
    const conn = () => {
      if (!(dw() > 1)) return;
      src.change.disconnect(conn);
      const model_ms = performance.now() - t0;
      requestAnimationFrame(() => { clearTimeout(timer); resolve([model_ms, performance.now() - t0]); });
    };
    src.change.connect(conn);
    input.click();
  });
}
"""


def has_model(page, name: str) -> bool:
    return page.evaluate("(n) => !!Bokeh.documents[0].get_model_by_name(n)", name)


def widget_value(page, tag: str, attr: str = "value"):
    return page.evaluate("([t, a]) => { for (const m of Bokeh.documents[0].all_models) if (m.tags && m.tags.includes(t)) return m[a]; }",
                         [tag, attr])


def wait_layer(page, layer: int, figure: str = "attention-overlay-figure") -> None:
    page.wait_for_function("([n, l]) => Bokeh.documents[0].get_model_by_name(n).title.text.includes('L' + l + ' ')",
                           arg=[figure, layer], timeout=60_000)


def frames_state(page, limit_s: float = 60.0) -> str:
    """Wait (up to ``limit_s``) until each of the attention view's frame sources is filled or off; describe them."""
    js = """() => ['attention-image-frames', 'attention-heat-frames'].map((name) => {
              const m = Bokeh.documents[0].get_model_by_name(name);
              if (!m) return [name, -1, 0];
              const d = m.data; const r = Array.from(d instanceof Map ? d.get('ready') : d.ready);
              return [name, r.length, r.filter((v) => v === 1).length]; })"""
    deadline = time.monotonic() + limit_s
    while True:
        states = page.evaluate(js)
        if all(n <= 0 or ready == n for _name, n, ready in states) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(250)
    return ", ".join(f"{name}: {'off' if n <= 0 else f'{ready}/{n} steps'}" for name, n, ready in states)


def sd_run(path: Path, seed: int) -> Path:
    return write_synthetic_run(path, steps=30, layers=len(SD_LAYERS), layer_resolutions=SD_LAYERS, tokens=9, pad=68,
                               s=16, image_size=512, latent_shape=(4, 64, 64), prompt=SD_PROMPT, seed=seed)


def report(label: str, model: list[float], painted: list[float]) -> float:
    med = statistics.median(model)
    print(f"{label}: median {med:.1f} ms in BokehJS, {statistics.median(painted):.1f} ms to the next frame "
          f"(p90 {sorted(model)[max(int(0.9 * len(model)) - 1, 0)]:.1f} ms, n={len(model)}; goal {GOAL_MS:.0f} ms: "
          f"{'met' if med <= GOAL_MS else 'NOT met'})")
    return med


def latency_of(page, n_steps: int, samples: int, names: list[str]) -> tuple[list[float], list[float]]:
    """Like :func:`latency`, waiting for every source in ``names`` to hold the new step."""
    model, painted = [], []
    step = int(widget_value(page, "dv:step"))
    for i in range(samples + 3):
        step = (step + 1) % n_steps
        m, p = page.evaluate(MEASURE_JS, [step, names])
        if i >= 3:
            model.append(m)
            painted.append(p)
        page.wait_for_timeout(30)
    return model, painted


def sd_section(browser, tmp: Path, quick: bool) -> None:
    samples = 12 if quick else 30
    started = time.perf_counter()
    a = sd_run(tmp / "sd_a", seed=0)
    b = sd_run(tmp / "sd_b", seed=1)
    n = len(json.loads((a / "metadata.json").read_text())["timesteps"])
    print(f"\nSD-1.5-shaped run: {describe(a)}, self maps 16x16 (8x8 mid), 77-key context; two runs written in "
          f"{time.perf_counter() - started:.0f} s")
    env = {"DIFFVIZ_DATASET": str(a), "DIFFVIZ_CACHE_MB": str(SD_CACHE_MB)}

    # ---- step change and word grid, run A alone
    with run_panel_server(ROOT / "app" / "main.py", env=env, log_dir=tmp) as server:
        page = open_page(browser, server.url)
        print(f"frames in the browser: {frames_state(page)}")
        report("SD step change -> image + heat map [all layers, mean]", *latency_of(page, n, samples, ["attention-image", "attention-heat"]))
        set_widget(page, "dv:layer", "0")
        wait_layer(page, 0)
        print(f"frames in the browser: {frames_state(page)}")
        report("SD step change -> image + heat map [layer 0, 32x32]", *latency_of(page, n, samples, ["attention-image", "attention-heat"]))
        if has_model(page, "attention-grid-figure") and has_model(page, "attention-grid") and widget_value(page, "dv:grid", "active") is not None:
            opens = []
            for _ in range(2 if quick else 4):
                opens.append(page.evaluate(GRID_JS))
                page.wait_for_timeout(500)
                set_widget(page, "dv:grid", False, "active")  # close it again (the next open recomputes the picture)
                page.wait_for_timeout(1000)
            shape = page.evaluate("() => { const d = Bokeh.documents[0].get_model_by_name('attention-grid').data;"
                                  " const g = (k) => (d instanceof Map ? d.get(k) : d[k])[0]; return [g('dw'), g('dh')]; }")
            rest = [m for m, _p in opens[1:]]
            print(f"word grid (click -> attention-grid filled, {shape[0]}x{shape[1]} px picture): first open "
                  f"{opens[0][0]:.0f} ms ({opens[0][1]:.0f} ms to the next frame); reopen median {statistics.median(rest):.0f} ms "
                  f"(n={len(rest)})")
        else:
            print("word grid: skipped (the app has no attention-grid-figure / attention-grid / dv:grid models)")
        page.close()

    # ---- A | B | difference: step change with run B loaded
    with run_panel_server(ROOT / "app" / "main.py", env=env, log_dir=tmp) as server:
        page = open_page(browser, f"{server.url}?compare={b}")
        names = ["attention-heat", "attention-heat-b", "attention-heat-diff"]
        if all(has_model(page, m) for m in ("attention-b-figure", "attention-diff-figure", *names[1:])):
            page.wait_for_function("() => { const d = Bokeh.documents[0].get_model_by_name('attention-heat-b').data;"
                                   " return (d instanceof Map ? d.get('step') : d.step)[0] >= 0; }", timeout=120_000)
            print(f"frames in the browser: {frames_state(page)}")
            report("SD step change -> A | B | A-B heat maps [run B loaded, all layers]", *latency_of(page, n, samples, names))
        else:
            print("A | B | difference: skipped (the app has no attention-b-figure / attention-diff-figure / "
                  "attention-heat-b / attention-heat-diff models)")
        page.close()

    # ---- memory under the cache cap
    meta = json.loads((a / "metadata.json").read_text())
    every = 3 if quick else 1
    layers = range(len(SD_LAYERS))
    touched = [rel for rel in meta["files"] if rel.endswith(".bin") and int(rel.split("_step_")[1][:3]) % every == 0]
    decoded = sum(4 * (int(meta["files"][rel]["bytes"]) // 2) for rel in touched)
    images = len(range(0, n, every)) * 512 * 512 * 4
    with run_panel_server(ROOT / "app" / "main.py", env=env, log_dir=tmp) as server:
        page = open_page(browser, server.url)
        rss_before, _ = rss_mb(server.pid)
        started = time.perf_counter()
        views = 0
        for layer in layers:
            set_widget(page, "dv:layer", str(layer))
            wait_layer(page, layer)
            for step in range(0, n, every):
                page.evaluate(MEASURE_JS, [step, ["attention-heat", "attention-probe"]])
                views += 1
        walk_s = time.perf_counter() - started
        rss_after, peak = rss_mb(server.pid)
        page.close()
    growth = rss_after - rss_before
    print(f"SD memory: cache cap {SD_CACHE_MB} MB; the walk ({views} step x layer views in {walk_s:.0f} s) read maps of "
          f"{decoded / 2**20:.0f} MB decoded (+ {images / 2**20:.0f} MB of decoded 512x512 images)")
    print(f"SD server RSS: {rss_before:.0f} MB after opening the page, {rss_after:.0f} MB after the walk, peak {peak:.0f} MB; "
          f"growth {growth:.0f} MB = {growth / SD_CACHE_MB:.2f} of the cache cap "
          f"({'within' if growth <= SD_CACHE_MB else 'OVER'} the cap)")


def toy_section(browser, tmp: Path, quick: bool) -> None:
    samples = 12 if quick else 30
    run = timing_run(tmp)
    n_steps = len(json.loads((run / "metadata.json").read_text())["timesteps"])
    print(f"run: {describe(run)}")
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
                    got = playback(page, fps, 3.0 if quick else 5.0)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--part", choices=("all", "toy", "sd"), default="all",
                        help="toy: measurements 1-3 (datasets/default and the 12-layer run); sd: the SD-1.5-shaped run (4)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmpdir, sync_playwright() as p:
        tmp = Path(tmpdir)
        print(f"load average {load:.1f} on {os.cpu_count()} CPUs")
        browser = launch(p)
        if args.part in ("all", "toy"):
            toy_section(browser, tmp, args.quick)
        if args.part in ("all", "sd"):
            sd_section(browser, tmp, args.quick)
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
