"""Benchmark: a 16-run toy sweep (4 colours x 4 seeds, 10 steps, 32x32) on the local executor (one process)
against the Ray executor (a local cluster, 2 workers), one torch thread per worker on both; then the index at
its caps (see INDEX below).

    python tests/bench/bench_sweep.py [--runs-per-axis 4] [--num-steps 10] [--workers 2] [--index-only]
    python tests/bench/bench_sweep.py --server-memory      # panel serve's RSS around refused and large indexes

Prints, for each executor, runs/s and the overhead per run: wall time / runs minus one run's generate time
measured in this process with the pipeline already loaded (so model loads, cluster start, actor start, the
index and the progress bar are the overhead; Ray's cluster start is timed apart). Ray's is divided over its workers before subtracting, since
they run side by side. Then Ray's throughput over local's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
# Ray's workers import diffviz from the repo too; and Ray must not phone home
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

COLOURS = ["red", "green", "yellow", "blue"]
PROMPT = "a {colour} circle and a blue square"


def sweep_args(n: int, steps: int) -> list[str]:
    return ["--prompt", PROMPT, "--set", "colour=" + ",".join(COLOURS[:n]), "--seeds", f"0-{n - 1}",
            "--num-steps", str(steps), "--height", "32", "--width", "32", "--threads", "1", "--quiet"]


def single_run_seconds(steps: int, tmp: Path, repeats: int = 3) -> float:
    """One run's generate time, pipeline loaded and warmed, one thread (the median of ``repeats``)."""
    import torch

    from capture import pipeline as pipeline_mod
    from capture import run as run_mod
    from capture.config import GenerateConfig

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = GenerateConfig(prompt=PROMPT.format(colour="red"), num_steps=steps, height=32, width=32,
                                output_dir=str(tmp / "single"), overwrite_output=True)
        prepared = run_mod.prepare(config)
        pipe = pipeline_mod.load_pipeline(config.model, config.device, config.dtype)
        run_mod.generate(config, pipeline=pipe, prepared=prepared)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run_mod.generate(config, pipeline=pipe, prepared=prepared)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times)


#: The index at its caps, each read in a fresh process (time, and peak RSS from the kernel): the largest valid index
#: (10,000 runs, 64 of 1,024 words each, 1,700-character prompts: 32 MB) through read_index and the dashboard's
#: open_sweep, layout and plot series; and the worst refusals (a 32 MiB file of escaped quotes for the scan, 700,000
#: settings for a parse refused after it).
INDEX = r"""
import itertools, json, os, resource, sys, time
from export import sweep as S
kind, folder = sys.argv[1], sys.argv[2]
if kind == "write-valid":
    axes = {"colour": [f"c{i}" for i in range(10)], "seed": list(range(100)), "cfg_scale": [1.5 + i for i in range(10)]}
    template = "x" * 1700 + " {colour}"
    runs = []
    for i, combo in enumerate(itertools.product(*axes.values())):
        params = dict(zip(axes, combo))
        name = f"r{i:05d}-" + "-".join(f"{k}-{v}" for k, v in params.items())
        share = {f"word{(i * 7 + k) % 1024:04d}": 0.01 for k in range(64)}
        runs.append({"name": name, "params": params, "prompt": template.format(**params), "status": "done", "error": None,
                     "headline": {"final_latent_norm": 12.3, "word_share": share}, "thumbnail": f"{name}/images/final.png"})
    S.write_index(folder, S.index_document(template, [{"name": k, "values": v} for k, v in axes.items()], {}, runs))
    raise SystemExit(0)
if kind == "write-quotes":
    open(os.path.join(folder, "sweep.json"), "wb").write(b'["' + b'\\"' * ((S.MAX_INDEX_BYTES - 8) // 2) + b'"]')
    raise SystemExit(0)
if kind == "write-settings":
    body = ",".join(f'"k{i:09d}":"v{i:09d}"' for i in range(700_000))
    open(os.path.join(folder, "sweep.json"), "w").write('{"sweep_version": 1, "base": {' + body + '}}')
    raise SystemExit(0)
t = time.perf_counter()
try:
    if kind == "dashboard":
        from app.sweepstore import open_sweep
        sweep = open_sweep(folder)
        sweep.layout(*sweep.default_axes())
        sweep.series("cfg_scale", "word_share", sweep.default_word())
    else:
        S.read_index(folder)
    what = "read"
except Exception as exc:
    what = "refused: " + str(exc)[:70]
print(json.dumps({"seconds": time.perf_counter() - t, "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "what": what}))
"""


def index_at_caps(tmp: Path) -> list[str]:
    """One line per case of :data:`INDEX`: seconds and peak RSS of a fresh process reading it."""
    import json
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-c", INDEX, *args], env=env, check=True,  # noqa: E731
                                       capture_output=True, text=True).stdout
    lines = []
    for case, reader in (("valid", "read_index"), ("valid", "dashboard"), ("quotes", "read_index"),
                         ("settings", "read_index")):
        folder = tmp / f"index-{case}"
        if not folder.is_dir():
            folder.mkdir(parents=True)
            run(f"write-{case}", str(folder))
        got = json.loads(run(reader, str(folder)))
        size = (folder / "sweep.json").stat().st_size / 1e6
        lines.append(f"{case:9s} {size:5.1f} MB  {reader:10s}: {got['seconds']:5.2f} s, peak RSS {got['mb']:4.0f} MB"
                     f"  ({got['what']})")
    return lines


#: The page has answered: a banner says the load failed, or the Sweep tab drew its cells, or (a plain session) the
#: first frame is there.
ANSWERED = """() => {
  if (!window.Bokeh || !Bokeh.documents.length) return false;
  for (const d of Bokeh.documents) for (const m of d.all_models)
    if (typeof m.text === 'string' && m.text.includes('Could not load')) return true;
  const c = Bokeh.documents[0].get_model_by_name(WANT);
  if (!c) return false;
  const v = c.data instanceof Map ? c.data.get(COLUMN) : c.data[COLUMN];
  return !!(v && v.length);
}"""


def server_memory(tmp: Path) -> list[str]:
    """``panel serve``'s resident memory (psutil) as Chromium sessions open and close: plain sessions, an index the
    scan refuses (two million entries, 16 MB), one refused after its parse (700,000 settings, 18 MB), and a
    10,000-run index (no run folders: only the index's cost). Sessions are dropped 1 s after their page closes."""
    import subprocess

    import psutil
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, stop_process, wait_http
    from tests.loopback import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for case in ("valid", "settings"):
        folder = tmp / f"index-{case}"
        if not folder.is_dir():
            folder.mkdir(parents=True)
            subprocess.run([sys.executable, "-c", INDEX, f"write-{case}", str(folder)], env=env, check=True)
    scan = tmp / "index-entries"
    scan.mkdir(exist_ok=True)
    (scan / "sweep.json").write_text('{"sweep_version": 1, "runs": [' + ",".join(['{"n":1}'] * 2_000_000) + "]}")
    plain = ("", "timeline-image", "step")
    visits = [("a plain session", plain), ("a plain session", plain),
              ("refused by the scan (2M entries)", (f"?sweep={scan}", "sweep-cells", "run")),
              ("the same again", (f"?sweep={scan}", "sweep-cells", "run")),
              ("refused after its parse (700,000 settings)", (f"?sweep={tmp / 'index-settings'}", "sweep-cells", "run")),
              ("10,000-run index", (f"?sweep={tmp / 'index-valid'}", "sweep-cells", "run")),
              ("the same again", (f"?sweep={tmp / 'index-valid'}", "sweep-cells", "run")),
              ("a plain session", plain)]
    port = free_port()
    with open(tmp / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "panel", "serve", "app/main.py", "--address", "127.0.0.1",
                                 "--port", str(port), "--allow-websocket-origin", f"127.0.0.1:{port}", "--num-procs", "1",
                                 "--liveness", "--check-unused-sessions", "1000", "--unused-session-lifetime", "1000"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    rss = lambda: psutil.Process(proc.pid).memory_info().rss / 2**20  # noqa: E731
    lines = []
    try:
        wait_http(f"http://127.0.0.1:{port}/liveness", 180, proc)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            for label, (query, model, column) in visits:
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                peak, sampling = [0.0], threading.Event()

                def sample() -> None:  # the load starts while the page's first request is still being answered
                    while not sampling.is_set():
                        peak[0] = max(peak[0], rss())
                        time.sleep(0.02)

                sampler = threading.Thread(target=sample)
                sampler.start()
                start = time.perf_counter()
                page.goto(f"http://127.0.0.1:{port}/main{query}")
                answered = ANSWERED.replace("WANT", repr(model)).replace("COLUMN", repr(column))
                while time.perf_counter() - start < 300:
                    try:
                        if page.evaluate(answered):
                            break
                    except Exception:  # noqa: BLE001 - the page is still loading
                        pass
                    time.sleep(0.2)
                took = time.perf_counter() - start
                sampling.set()
                sampler.join()
                peak = peak[0]
                context.close()
                time.sleep(5)
                lines.append(f"{label:44s}: answered in {took:5.1f} s, peak {peak:5.0f} MB, "
                             f"{rss():5.0f} MB 5 s after its page closed")
    finally:
        stop_process(proc)
    return lines


def timed_sweep(argv: list[str]) -> float:
    from capture.sweep import cli

    t = time.perf_counter()
    code = cli.main(argv)
    wall = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"bench_sweep: the sweep exited {code}: {' '.join(argv)}")
    return wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-per-axis", type=int, default=4, choices=range(1, 5))
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--index-only", action="store_true", help="only the index at its caps")
    p.add_argument("--server-memory", action="store_true", help="only panel serve's memory around index loads")
    a = p.parse_args()
    runs = a.runs_per_axis ** 2
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        if a.server_memory:
            print("panel serve's resident memory (psutil), Chromium sessions opened and closed:")
            for line in server_memory(tmp):
                print("  " + line)
            return 0
        print("sweep.json at its caps (a fresh process each):")
        for line in index_at_caps(tmp):
            print("  " + line)
        if a.index_only:
            return 0
        single = single_run_seconds(a.num_steps, tmp)
        base = sweep_args(a.runs_per_axis, a.num_steps)
        local = timed_sweep(base + ["--out", str(tmp / "local")])
        import ray

        # the cluster is started here so its start-up is timed apart; the sweep then joins it (as in a test)
        t = time.perf_counter()
        ray.init(num_cpus=max(os.cpu_count() or 1, a.workers), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", object_store_memory=100 * 2**20)
        start = time.perf_counter() - t
        try:
            remote = timed_sweep(base + ["--out", str(tmp / "ray"), "--executor", "ray", "--workers", str(a.workers)])
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"toy sweep: {runs} runs, {a.num_steps} steps, 32x32, 1 torch thread per worker, {os.cpu_count()} CPUs")
    print(f"one run's generate (in-process, loaded): {single:.3f} s")
    print(f"local, 1 process : wall {local:7.2f} s  {runs / local:6.3f} runs/s  overhead/run {local / runs - single:+.3f} s")
    per_run_ray = remote * a.workers / runs  # worker-seconds per run
    print(f"ray, {a.workers} workers   : wall {remote:7.2f} s  {runs / remote:6.3f} runs/s  "
          f"overhead/run {per_run_ray - single:+.3f} s (worker-seconds per run minus one run)")
    print(f"ray cluster start (not in the wall above): {start:.2f} s; with it: {runs / (remote + start):.3f} runs/s")
    print(f"ray / local throughput: {local / remote:.2f}x, {local / (remote + start):.2f}x with the cluster start  "
          f"(ideal {a.workers}x with {a.workers} free cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
