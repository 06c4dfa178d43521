"""The dashboard shell and views in-process (no browser): loading, the banner, one state for all views, serve CLI."""
from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import json
import shutil
import tracemalloc
import weakref

import numpy as np
import pytest

from app import serve, shell
from app.shell import Dashboard
from app.state import State
from app.store import Store
from app.views.attention import OVERLAY_PX
from app.views.common import rgba
from app.views.timeline import IMAGE_PX
from export import reader
from tests.synthetic import write_synthetic_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shell")
    common = dict(layers=2, tokens=5, r=8, s=4, image_size=16)
    a = write_synthetic_run(root / "a", steps=6, prompt="a red circle", seed=0, **common)
    b = write_synthetic_run(root / "b", steps=3, prompt="a blue square", seed=1, **common)
    bad = root / "bad"
    shutil.copytree(a, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    meta["schema_version"] = 7
    (bad / "metadata.json").write_text(json.dumps(meta))
    return {"a": a, "b": b, "bad": bad}


def make(dataset: str, **state) -> Dashboard:
    dash = Dashboard(state=State(dataset=dataset, **state), store=Store(cache_mb=8), sync_url=False)
    dash.main()  # builds the tabs; the first tab (timeline) is the shown one
    return dash


def test_missing_default_shows_the_banner_and_empty_views(tmp_path):
    dash = make(str(tmp_path / "nowhere"))
    assert dash.banner.visible and "no such folder" in dash.banner.object
    assert dash.store.run is None
    assert list(dash.timeline.curve_source.data["step"]) == []
    assert "No run loaded" in dash.run_info.object


def test_failed_load_keeps_the_previous_run(runs):
    dash = make(str(runs["a"]))
    assert not dash.banner.visible
    dash.state.step = 4
    dash.state.dataset = str(runs["bad"])
    assert dash.banner.visible and "schema_version 7 is not known" in dash.banner.object
    assert dash.state.dataset == str(runs["a"])  # back to the run still shown
    assert dash.store.run.label == str(runs["a"])
    dash.state.step = 5
    assert dash.timeline.image_source.data["step"] == [5]


def test_loading_a_shorter_run_clamps_the_step(runs):
    dash = make(str(runs["a"]))
    dash.state.step = 5
    dash.submit(str(runs["b"]))
    assert dash.store.run.n_steps == 3 and dash.state.step == 2
    assert dash.timeline.image_source.data["step"] == [2]
    assert dash.timeline.slider.end == 2 and dash.timeline.slider.value == 2
    assert "a blue square" in dash.run_info.object


def test_one_state_moves_every_view_and_hidden_views_catch_up(runs):
    dash = make(str(runs["a"]))
    dash.state.step = 3
    assert dash.timeline.image_source.data["step"] == [3]
    # the attention tab is hidden: it skipped the update and refreshes when shown
    assert dash.attention.image_source.data["step"] != [3]
    dash.tabs.active = 1
    assert dash.attention.image_source.data["step"] == [3]
    assert dash.timeline.slider.value == 3  # the step controls always follow
    dash.state.step = 1
    assert dash.attention.image_source.data["step"] == [1]
    assert dash.timeline.image_source.data["step"] == [3]
    dash.tabs.active = 0
    assert dash.timeline.image_source.data["step"] == [1]
    dash.tabs.active = 2
    assert dash.trajectory.current.data["step"] == [1]


def test_slider_and_taps_write_the_state(runs):
    dash = make(str(runs["a"]))
    dash.timeline.slider.value = 2
    assert dash.state.step == 2

    class Tap:  # a bokeh Tap event's data coordinates
        x, y = 4.2, 0.0

    dash.timeline._on_tap(Tap)
    assert dash.state.step == 4
    coords = dash.store.run.pca_coords()
    Tap.x, Tap.y = coords[1]
    dash.tabs.active = 2
    dash.trajectory._on_tap(Tap)
    assert dash.state.step == 1


def test_comparison_loads_and_clears(runs):
    dash = make(str(runs["a"]), compare=str(runs["b"]))
    assert dash.store.comparison is not None and not dash.store.comparison.ok
    dash.tabs.active = 3
    assert "step count differs: 6 vs 3" in dash.compare.status.object
    dash.state.compare = ""
    assert dash.store.comparison is None and "Load a second run" in dash.compare.status.object
    dash.state.compare = "/definitely/not/here"
    assert dash.banner.visible and "comparison run" in dash.banner.object and dash.state.compare == ""


def test_bad_values_from_the_page_address_are_named(runs):
    dash = make(str(runs["a"]))
    dash._on_url_error({"step": -3, "token": 2, "layer": 1})  # the query parser turns "1" into a number
    # a session opens at the last step; the refused step=-3 leaves it there
    assert dash.state.token == 2 and dash.state.step == dash.store.run.n_steps - 1 and dash.state.layer == "1"
    assert "step=-3" in dash.banner.object


def test_a_broken_generator_panel_does_not_break_the_dashboard(runs, monkeypatch):
    def broken():
        raise RuntimeError("no bridge module")

    monkeypatch.setattr(shell, "_generator_panel_class", broken)
    dash = make(str(runs["a"]))
    assert dash.generator is None and "Local generator panel unavailable" in dash.banner.object
    assert [name for name, _ in dash.sections()] == ["Timeline", "Attention", "Trajectory", "Compare runs"]


def test_playback_advances_and_stops(runs):
    dash = make(str(runs["a"]))
    dash.state.step = 0
    dash.state.playing = True
    dash.timeline._tick()
    dash.timeline._tick()
    assert dash.state.step == 2 and dash.timeline.image_source.data["step"] == [2]
    dash.state.playing = False
    dash.timeline._tick()
    assert dash.state.step == 2


def test_prefetch_warms_the_cache_for_the_next_step(runs):
    data = Store(cache_mb=8).open(str(runs["a"]))
    data.prefetch(3, "mean", "cross")
    misses = data.run.cache_stats()["misses"]
    data.image(3)
    for layer in data.cross_layers:
        data.run.cross(layer, 3)
    assert data.run.cache_stats()["misses"] == misses and misses == 1 + len(data.cross_layers)


def test_frames_hold_each_step_as_the_server_would_send_it(runs):
    dash = make(str(runs["a"]))
    dash.tabs.active = 1
    dash.state.param.update(layer="1", token=2)
    frames = dash.attention.heat_frames
    assert frames.enabled and sorted(frames._ready) == list(range(6))  # filled at once without an event loop
    rows = frames.source.data
    for step in (0, 4):
        dash.state.step = step
        shown = dash.attention.heat_source.data
        np.testing.assert_array_equal(rows["raw"][step], shown["raw"][0])
        np.testing.assert_array_equal(rows["image"][step], shown["image"][0])
        assert (rows["low"][step], rows["high"][step]) == (dash.attention.mapper.low, dash.attention.mapper.high)
        np.testing.assert_array_equal(dash.attention.image_frames.source.data["image"][step],
                                      dash.attention.image_source.data["image"][0])
    dash.state.token = 3  # a new selection drops the frames and refills them
    assert frames.key[1].token == 3 and sorted(frames._ready) == list(range(6))
    np.testing.assert_array_equal(frames.source.data["raw"][4], dash.attention.heat_source.data["raw"][0])
    dash.state.aggregate = True  # the DAAM map does not change with the step: no frames
    assert not frames.enabled and frames.source.data["ready"] == []


# --------------------------------------------------------------------------- diffviz serve


def test_serve_usage_errors_exit_2(tmp_path, capsys):
    for argv in (["--port", "abc"], ["--port", "70000"], ["--dataset", str(tmp_path / "missing")], ["--cache-mb", "0"]):
        with pytest.raises(SystemExit) as info:
            serve.main(argv)
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "Traceback" not in err


def test_serve_builds_the_panel_command():
    args = serve._parser().parse_args(["--port", "5123", "--address", "127.0.0.1"])
    cmd = serve.command(args)
    assert cmd[1:4] == ["-m", "panel", "serve"] and cmd[4].endswith("app/main.py")
    assert cmd[cmd.index("--port") + 1] == "5123" and "127.0.0.1:5123" in cmd
    assert int(cmd[cmd.index("--websocket-max-message-size") + 1]) >= 256 * 2**20


def test_playing_state_survives_a_missing_image(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs["a"], broken)
    (broken / "images/step_002.png").unlink()
    dash = make(str(broken))
    dash.state.step = 2
    assert dash.banner.visible and "images/step_002.png" in dash.banner.object
    dash.state.step = 3
    assert dash.timeline.image_source.data["step"] == [3]
    assert np.asarray(dash.timeline.image_source.data["image"][0]).shape == (16, 16)


def test_clicking_the_js_heat_map_selects_step_and_layer(runs, tmp_path):
    other = write_synthetic_run(tmp_path / "c", steps=6, layers=2, tokens=5, r=8, s=4, image_size=16, seed=5)
    dash = make(str(runs["a"]), compare=str(other))
    dash.tabs.active = 3
    assert list(dash.compare.js_fig.y_range.factors) == ["L1", "L0"]  # L0 drawn at the top

    class Tap:  # categorical y: factor k spans [k, k + 1]
        x, y = 3.2, 0.5

    dash.compare._on_js_tap(Tap)
    assert dash.state.step == 3 and dash.state.layer == "1"
    Tap.x, Tap.y = 4.9, 1.5
    dash.compare._on_js_tap(Tap)
    assert dash.state.step == 5 and dash.state.layer == "0"
    assert dash.compare.figures.visible
    dash.state.compare = ""
    assert not dash.compare.figures.visible


@pytest.mark.parametrize("kind", ["cross", "self"])
def test_runs_recording_only_one_kind_work_without_errors(kind, tmp_path):
    run = write_synthetic_run(tmp_path / kind, steps=4, layers=2, tokens=5, r=8, s=4, image_size=16,
                              cross=kind == "cross", self_attention=kind == "self")
    dash = make(str(run))
    dash.tabs.active = 1
    for k in ("cross", "self"):
        dash.state.kind = k
        for step in range(4):
            dash.state.step = step
    assert not dash.banner.visible, dash.banner.object
    missing = "self" if kind == "cross" else "cross"
    dash.state.kind = missing
    assert dash.attention.overlay.title.text == f"this run recorded no {missing}-attention maps"
    dash.state.kind = kind
    assert dash.attention.overlay.title.text.startswith(kind)
    if kind == "self":
        assert list(dash.attention.share_source.data["share"]) == []


def test_compare_run_from_a_picked_folder(runs):
    dash = make(str(runs["a"]))
    root = runs["b"]
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    dash.compare.folder.filename = [f"b/{p.relative_to(root).as_posix()}" for p in paths]
    dash.compare.folder.value = [p.read_bytes() for p in paths]
    assert dash.state.compare == "upload:b"
    assert dash.store.other is not None and dash.store.other.prompt == "a blue square"


def test_per_head_non_square_run_in_the_views(runs, tmp_path):
    wide = write_synthetic_run(tmp_path / "wide", steps=3, layers=2, tokens=5, seed=6, per_head=True, heads=2,
                               grid=(4, 8), image_hw=(16, 32))
    dash = make(str(wide), head="7")  # a head this run does not have: fitted to the mean when the run opens
    assert dash.state.head == "mean" and not dash.banner.visible, dash.banner.object
    run = dash.store.run.run
    # the timeline's figures take the image's aspect ratio; the final image is shown beside the preview
    fig = dash.timeline.image_fig
    assert (fig.frame_width, fig.frame_height) == (IMAGE_PX, IMAGE_PX // 2) and (fig.x_range.end, fig.y_range.start) == (32, 16)
    final = run.final_image()
    assert final is not None and dash.timeline.final_pane.visible
    np.testing.assert_array_equal(dash.timeline.final_source.data["image"][0], rgba(final))
    dash.tabs.active = 1
    view = dash.attention
    assert view.head.visible and list(view.head.options.values()) == ["mean", "0", "1"]
    view.layer.value, view.token.value = "1", 3
    view.head.value = "1"  # the widget writes the state; the store gives that head's map
    assert dash.state.head == "1"
    dash.state.step = 2
    np.testing.assert_array_equal(view.heat_source.data["raw"][0], run.cross_heads(1, 2)[1][3])
    assert "head 1" in view.overlay.title.text
    assert view.heat_source.data["image"][0].shape == (32, 64)  # display grid, H and W apart
    assert (view.overlay.frame_width, view.overlay.frame_height) == (OVERLAY_PX, OVERLAY_PX // 2)
    dash.state.head = "mean"
    np.testing.assert_array_equal(view.heat_source.data["raw"][0], run.cross(1, 2)[3])
    # a schema-1 run (mean over heads, square, no final image) hides the selector and puts the state back on the mean
    v1 = write_synthetic_run(tmp_path / "v1", steps=3, layers=2, tokens=5, image_size=16, schema_version=1)
    dash.state.head = "1"
    dash.submit(str(v1))
    assert not dash.banner.visible, dash.banner.object
    assert dash.state.head == "mean" and not view.head.visible
    dash.tabs.active = 0  # the hidden timeline catches up when shown
    assert not dash.timeline.final_pane.visible and (fig.frame_width, fig.frame_height) == (IMAGE_PX, IMAGE_PX)
    np.testing.assert_array_equal(view.heat_source.data["raw"][0], dash.store.run.run.cross(1, 2)[3])


# --------------------------------------------------------------------------- loading off the server's loop


def replace_file(run, rel: str, data: bytes) -> None:
    """Write ``rel`` and keep its manifest entry true (bytes, sha256): only the content is wrong."""
    (run / rel).write_bytes(data)
    meta = json.loads((run / "metadata.json").read_text())
    meta["files"][rel].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (run / "metadata.json").write_text(json.dumps(meta))


def junk_manifest(run, entries: int) -> None:
    """``entries`` manifest entries that break the schema twice each."""
    meta = json.loads((run / "metadata.json").read_text())
    meta["files"].update({f"junk/f{i:06d}.bin": {"bytes": 1, "sha256": "x", "kind": "nope"} for i in range(entries)})
    (run / "metadata.json").write_text(json.dumps(meta))


class Deferred:
    """A runner like ``background_runner``'s: the work runs in a worker thread, and the result waits until the
    test plays the session's loop (``apply``)."""

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.pending: list = []

    def __call__(self, work, done) -> None:
        self.pending.append((self.pool.submit(work), done))

    def apply(self, count: int | None = None) -> None:
        for _ in range(len(self.pending) if count is None else count):
            future, done = self.pending.pop(0)
            done(future.result(timeout=60))


def test_no_server_session_means_inline_loading():
    assert shell.background_runner() is None  # tests, scripts (and the Pyodide worker) open runs inline


def test_a_deferred_load_keeps_the_run_shown_until_it_is_done(runs):
    runner = Deferred()
    dash = Dashboard(state=State(dataset=str(runs["a"])), store=Store(cache_mb=8), sync_url=False, runner=runner)
    dash.main()
    assert dash.store.run is None and dash.loading.visible and "Loading run" in dash.loading.object
    runner.apply()
    assert dash.store.run.label == str(runs["a"]) and not dash.loading.visible and not dash.banner.visible
    assert dash.timeline.image_source.data["step"] == [5]  # a session opens at the last step

    dash.state.step = 5
    dash.state.dataset = str(runs["b"])
    assert dash.store.run.label == str(runs["a"]) and dash.loading.visible  # still shown while B opens
    dash.state.step = 4  # and still usable
    assert dash.timeline.image_source.data["step"] == [4]
    runner.apply()
    assert dash.store.run.label == str(runs["b"]) and dash.state.step == 2  # clamped to B's 3 steps
    assert dash.timeline.image_source.data["step"] == [2] and dash.timeline.slider.end == 2

    dash.state.dataset = str(runs["bad"])
    runner.apply()
    assert dash.banner.visible and "schema_version 7 is not known" in dash.banner.object
    assert dash.state.dataset == str(runs["b"]) and dash.store.run.label == str(runs["b"]) and not dash.loading.visible


def test_the_latest_request_wins_and_older_results_are_dropped(runs):
    runner = Deferred()
    dash = Dashboard(state=State(dataset=str(runs["a"])), store=Store(cache_mb=8), sync_url=False, runner=runner)
    dash.main()
    dash.state.dataset = str(runs["bad"])  # asked for while A is still opening: it waits
    assert len(runner.pending) == 1
    runner.apply()  # nothing shown yet: A is applied all the same, then the waiting request starts
    assert dash.store.run.label == str(runs["a"]) and len(runner.pending) == 1
    runner.apply()
    assert "schema_version 7" in dash.banner.object and dash.state.dataset == str(runs["a"])

    dash.state.dataset = str(runs["b"])
    dash.state.dataset = str(runs["bad"])  # replaces B before B is done
    dash.state.dataset = str(runs["a"])  # and back to the run shown: nothing left to open
    runner.apply()  # B's result is dropped
    assert dash.store.run.label == str(runs["a"]) and not runner.pending and not dash.loading.visible
    assert dash.state.dataset == str(runs["a"])

    dash.submit(str(runs["b"]))
    dash.submit(str(runs["b"]))  # Load pressed twice: one result serves both
    runner.apply()
    assert dash.store.run.label == str(runs["b"]) and not runner.pending

    dash.state.compare = str(runs["a"])  # the comparison run loads the same way, on its own
    assert dash.store.other is None
    runner.apply()
    assert dash.store.other.label == str(runs["a"]) and dash.store.comparison is not None


def test_a_failed_open_keeps_nothing_of_the_half_opened_run(runs, tmp_path):
    bad = tmp_path / "errors"
    shutil.copytree(runs["a"], bad)
    junk_manifest(bad, 20_000)
    opened = []

    def opener(source, cache_mb):
        run = reader.open_run(source, cache_mb=cache_mb)
        opened.append(weakref.ref(run))
        return run

    dash = Dashboard(state=State(dataset=str(runs["a"])), store=Store(cache_mb=8, opener=opener), sync_url=False)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        data, message = dash._open(str(bad))
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data is None and "metadata.json fails validation" in message and "more schema errors" in message
    assert opened[-1]() is None, "the half-opened run is still referenced"
    print(f"traced memory: {before / 2**20:.1f} MiB before, peak {peak / 2**20:.1f}, after {after / 2**20:.1f}")
    assert peak - before > 8 * 2**20 and after - before < 2**20


@pytest.mark.parametrize("case", ["overflow", "nan_map", "latents_not_zip", "broken_later_step"])
def test_every_broken_run_shows_the_banner(case, runs, tmp_path):
    run = tmp_path / case
    shutil.copytree(runs["a"], run)
    if case == "overflow":  # at open
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["latent_norm"][1] = "@BIG@"
        replace_file(run, "metrics.json", json.dumps(metrics).replace('"@BIG@"', "1e999").encode())
        dash = make(str(runs["a"]))
        dash.submit(str(run))
        assert "metrics.json" in dash.banner.object and "overflows" in dash.banner.object.lower()
        assert dash.store.run.label == str(runs["a"])
        return
    if case == "latents_not_zip":  # read by the comparison
        replace_file(run, "latents_noise_fp16.npz", bytes(range(256)) * 16)
        dash = make(str(runs["a"]), compare=str(run))
        dash.tabs.active = 3
        assert dash.banner.visible and "latents_noise_fp16.npz" in dash.banner.object
        return
    rel = "attention/cross/layer_1_step_000.bin" if case == "nan_map" else "attention/cross/layer_1_step_004.bin"
    size = (run / rel).stat().st_size
    replace_file(run, rel, bytes.fromhex("007e") * (size // 2) if case == "nan_map" else (run / rel).read_bytes()[: size // 2])
    dash = make(str(runs["a"]))
    dash.submit(str(run))
    assert dash.store.run.label == str(run) and not dash.banner.visible  # maps are read when shown
    dash.tabs.active = 1
    broken = 0 if case == "nan_map" else 4
    dash.state.param.update(layer="1", step=broken)  # the broken map is read when its step is shown
    assert dash.banner.visible and rel in dash.banner.object, dash.banner.object
    view = dash.attention
    assert rel in view.overlay.title.text and view.heat_source.data["raw"][0].shape == (1, 1)  # only that panel blanks
    assert view.share_source.data["share"] == [] and view.probe_source.data["step"] == [broken]
    dash.state.step = 2  # good data again: the banner clears and the title names what is drawn
    assert not dash.banner.visible and "step 2" in view.overlay.title.text and "L1" in view.overlay.title.text


def test_a_page_address_naming_a_broken_run_opens_the_sessions_run_and_says_why(runs, monkeypatch):
    # the address is applied before the first load (sync_url), as under panel serve
    monkeypatch.setattr(Dashboard, "sync_url", lambda self: setattr(self.state, "dataset", str(runs["bad"])))
    dash = Dashboard(state=State(dataset=str(runs["a"])), store=Store(cache_mb=8))
    dash.main()
    assert dash.store.run is not None and dash.store.run.label == str(runs["a"]) and dash.state.dataset == str(runs["a"])
    assert dash.banner.visible and str(runs["bad"]) in dash.banner.object and "schema" in dash.banner.object.lower()
