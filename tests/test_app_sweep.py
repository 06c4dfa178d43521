"""The Sweep tab's data and view without a browser: which run sits at which grid cell, the headline series against
sweep.json's own values, thumbnails equal to the files, word maps equal to the store's aggregate, the bounds on
what is read, and the shell opening a sweep (first finished run shown; two picks open Compare).

``write_sweep`` builds a small sweep of synthetic runs (``tests.synthetic``) with an index written by
``export.sweep`` (the browser and site tests use it too).
"""
from __future__ import annotations

import itertools
import os
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export import sweep as S
from export.contract import DatasetError
from tests.synthetic import write_synthetic_run

H, W = 16, 24


def write_sweep(root: Path, grid: dict[str, list], *, pending: tuple[int, ...] = (), failed: tuple[int, ...] = (),
                steps: int = 3, template: str = "a {colour} circle") -> Path:
    """A sweep in ``root``: one synthetic run per grid point (grid order, last axis fastest), sweep.json written
    by ``export.sweep``. Runs listed in ``pending`` / ``failed`` (by index) get no folder."""
    root.mkdir(parents=True, exist_ok=True)
    axes = [{"name": k, "values": list(v)} for k, v in grid.items()]
    runs = []
    for i, combo in enumerate(itertools.product(*grid.values())):
        params = dict(zip(grid, combo))
        name = f"r{i:04d}-" + "-".join(f"{k}-{v}" for k, v in params.items())
        prompt = template.format(**params)
        status = "pending" if i in pending else "failed" if i in failed else "done"
        entry = {"name": name, "params": params, "prompt": prompt, "status": status,
                 "error": "out of memory" if status == "failed" else None, "headline": None, "thumbnail": None}
        if status == "done":
            run = write_synthetic_run(root / name, steps=steps, layers=2, tokens=5, prompt=prompt,
                                      seed=int(params.get("seed", i)) + 17 * i, image_hw=(H, W), grid=(4, 6))
            agree(run, params)
            entry["headline"] = S.headline(run)
            entry["thumbnail"] = f"{name}/images/final.png"
        runs.append(entry)
    S.write_index(root, S.index_document(template, axes, {"height": H, "width": W}, runs))
    return root


def agree(run: Path, params: dict) -> None:
    """Record the run's swept settings in its metadata.json as the generator does (the synthetic run's random data
    comes from a seed of its own, so that runs of one seed still differ)."""
    meta_path = run / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["run"].update({k: params[k] for k in S.RUN_FIELDS if k in params})
    meta_path.write_text(json.dumps(meta))


def packed(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16) | (np.uint32(255) << 24)


GRID = {"colour": ["red", "green"], "seed": [0, 1, 2], "cfg_scale": [3.0, 7.5]}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    # run 1 (red, seed 0, cfg 7.5) pending, run 8 (green, seed 1, cfg 3.0) failed
    return write_sweep(tmp_path_factory.mktemp("sweep") / "colours", GRID, pending=(1,), failed=(8,), steps=2)


@pytest.fixture(scope="module")
def sweep(sweep_dir):
    from app.sweepstore import open_sweep

    return open_sweep(str(sweep_dir))


def index(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


def test_layout_puts_each_run_at_its_params(sweep, sweep_dir):
    from app.sweepstore import NO_AXIS

    assert sweep.default_axes() == ("colour", "seed")
    layout = sweep.layout("seed", "colour", {"cfg_scale": 7.5})
    assert (layout.rows, layout.cols, layout.fixed) == ("seed", "colour", {"cfg_scale": 7.5})
    assert layout.row_values == [0, 1, 2] and layout.col_values == ["red", "green"]
    assert len(layout.cells) == 6
    runs = index(sweep_dir)["runs"]
    for cell in layout.cells:
        want = {"seed": GRID["seed"][cell.row], "colour": GRID["colour"][cell.col], "cfg_scale": 7.5}
        assert runs[cell.index]["params"] == want and cell.run["name"] == runs[cell.index]["name"]
    assert layout.cell(0, 0).name.startswith("r0001-") and layout.cell(0, 0).run["status"] == "pending"
    # the same axis on both sides, or an unknown one: a single row along the columns' axis, the rest held
    one = sweep.layout("seed", "seed", {"colour": "green", "cfg_scale": 3.0})
    assert (one.rows, one.cols, len(one.cells)) == (NO_AXIS, "seed", 3)
    assert [c.run["params"] for c in one.cells] == [{"colour": "green", "seed": s, "cfg_scale": 3.0} for s in (0, 1, 2)]
    assert one.cell(0, 1).run["status"] == "failed"
    odd = sweep.layout("nope", "cfg_scale", {"colour": "blue"})  # an unknown value: the axis's first
    assert odd.rows == "colour" and odd.fixed == {"seed": 0} and len(odd.cells) == 4


def test_headline_series_equal_the_index(sweep, sweep_dir):
    runs = [r for r in index(sweep_dir)["runs"] if r["status"] == "done"]
    norm = sweep.series("cfg_scale", "final_latent_norm")
    assert norm["run"] == [r["name"] for r in runs]
    assert norm["y"] == [r["headline"]["final_latent_norm"] for r in runs]
    assert norm["x"] == [("3" if r["params"]["cfg_scale"] == 3.0 else "7.5") for r in runs]
    assert sweep.default_word() == "circle" and set(sweep.words()) == {"red", "green", "circle"}
    share = sweep.series("colour", "word_share", "red")
    reds = [r for r in runs if "red" in r["headline"]["word_share"]]
    assert share["y"] == [r["headline"]["word_share"]["red"] for r in reds] and set(share["x"]) == {"red"}
    means = sweep.means("colour", sweep.series("colour", "final_latent_norm"))
    for colour, mean in zip(means["x"], means["y"]):
        assert mean == pytest.approx(np.mean([r["headline"]["final_latent_norm"] for r in runs if r["params"]["colour"] == colour]))


def test_thumbnails_and_word_maps_come_from_the_runs(sweep, sweep_dir):
    from app.store import Store

    run = sweep.layout("colour", "seed", {"cfg_scale": 3.0}).cell(0, 0).run
    thumb = sweep.thumbnail(run)
    np.testing.assert_array_equal(thumb, np.asarray(Image.open(sweep_dir / run["thumbnail"]).convert("RGB")))
    data = Store().open(str(sweep_dir / run["name"]))
    token = next(i for i, t in enumerate(data.tokens) if t["text"] == "circle</w>")
    want = data.aggregate_map(token, True, 0, data.n_steps - 1)
    np.testing.assert_allclose(sweep.word_map(run, "circle"), want, rtol=1e-6)
    assert sweep.word_map(run, "green") is None  # a red run's prompt has no "green"


def test_bad_sweeps_are_refused_in_one_line(tmp_path, sweep_dir):
    from app.sweepstore import THUMB_MAX_BYTES, open_sweep

    with pytest.raises(DatasetError, match="no such folder"):
        open_sweep(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    doc = index(sweep_dir)
    doc["runs"][0]["name"] = "../outside"
    (broken / "sweep.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"^sweep\.json: runs\[0\]\.name"):
        open_sweep(str(broken))
    # a thumbnail over the cap is refused before it is read; one whose header claims a huge image before decoding
    big = tmp_path / "big"
    shutil.copytree(sweep_dir, big)
    sweep = open_sweep(str(big))
    run = sweep.done()[0]
    with open(big / run["thumbnail"], "r+b") as fh:
        fh.truncate(THUMB_MAX_BYTES + 1)
    with pytest.raises(DatasetError, match="over"):
        sweep.thumbnail(run)
    other = sweep.done()[1]
    data = bytearray((big / other["thumbnail"]).read_bytes())
    data[16:24] = (60000).to_bytes(4, "big") * 2
    (big / other["thumbnail"]).write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="over the cap of"):
        sweep.thumbnail(other)


def test_the_dashboard_opens_a_sweep_and_compares_two_picks(sweep_dir):
    from app.shell import Dashboard
    from app.state import State

    board = Dashboard(State(dataset=str(sweep_dir)), sync_url=False)
    board.main()
    first = index(sweep_dir)["runs"][0]["name"]
    assert board.state.sweep == str(sweep_dir)
    assert board.state.dataset == f"{sweep_dir}/{first}" and board.store.run.label == f"{sweep_dir}/{first}"
    titles = [t for t, _v in board.sections()]
    assert "Sweep" in titles and board.tabs.active == titles.index("Sweep") and len(board.tabs) == len(titles)
    view = board.sweep
    cells = view.cell_source.data
    assert len(cells["run"]) == 6 and cells["status"] == ["done"] * 4 + ["failed", "done"]  # cfg 3.0: run 8 failed
    assert (cells["row"][4], cells["col"][4], cells["note"][4]) == (1, 1, "failed")
    k = cells["run"].index(first)
    np.testing.assert_array_equal(view.thumb_source.data["image"][view.thumb_source.data["run"].index(first)],
                                  packed(sweep_dir / first / "images/final.png"))
    assert (cells["row"][k], cells["col"][k]) == (0, 0)
    board.state.sweep_show = "word map"
    assert len(view.map_source.data["image"]) == 5 and view.thumb_source.data["image"] == []
    b = cells["run"][5]
    view.pick(first)
    view.pick(b)
    assert board.state.dataset.endswith(first) and board.state.compare.endswith(b)
    assert board.store.comparison is not None and board.store.other.label.endswith(b)
    assert board.tabs.active == titles.index("Compare runs")
    board.state.sweep = ""
    assert "Sweep" not in [t for t, _v in board.sections()] and len(board.tabs) == len(board.sections())


def test_the_address_can_name_the_sweep_and_one_of_its_runs(sweep_dir, tmp_path):
    from app.shell import Dashboard
    from app.state import State

    runs = index(sweep_dir)["runs"]
    shown = f"{sweep_dir}/{runs[5]['name']}"
    board = Dashboard(State(dataset=shown, sweep=str(sweep_dir)), sync_url=False)
    board.main()
    assert board.store.run.label == shown and board.sweeps.sweep is not None  # its run is kept, not the first
    assert "Sweep" in [t for t, _v in board.sections()] and not board.banner.visible
    (tmp_path / "sweep.json").write_text("{")
    board.state.sweep = str(tmp_path)  # a broken index: one line, the open sweep stays
    assert board.banner.visible and "sweep.json: not valid JSON" in board.banner.object
    assert board.state.sweep == str(sweep_dir) and board.sweeps.sweep.text == str(sweep_dir)


# ============================================================================ hostile and large sweeps (issue 25)
def test_a_long_axis_is_paged(tmp_path):
    from app.sweepstore import MAX_COLS, open_sweep

    folder = write_sweep(tmp_path / "long", {"colour": ["red"], "seed": list(range(30))}, pending=tuple(range(30)))
    sweep = open_sweep(str(folder))
    pages = [sweep.layout("", "seed", None, 0, page) for page in range(4)]
    assert [(p.col_page, p.col_pages) for p in pages] == [(0, 3), (1, 3), (2, 3), (2, 3)]  # past the last: the last
    assert [p.col_values for p in pages[:3]] == [list(range(0, 12)), list(range(12, 24)), list(range(24, 30))]
    for page in pages[:3]:
        for cell in page.cells:
            assert cell.run["params"]["seed"] == page.col_values[cell.col] and cell.col < MAX_COLS
    assert pages[1].clipped == "values 13–24 of 30 of seed"
    assert sweep.plot_values("seed") == list(range(30))


def test_the_headline_plots_stop_at_a_hundred_values(tmp_path):
    from app.sweepstore import MAX_PLOT_VALUES, open_sweep

    folder = write_sweep(tmp_path / "plot", {"colour": ["red"], "seed": list(range(MAX_PLOT_VALUES + 5))},
                         pending=tuple(range(3, MAX_PLOT_VALUES + 5)), steps=2)
    doc = index(folder)
    for run in doc["runs"][3:]:  # finished in the index: only their headlines are read here
        run.update(status="done", headline={"final_latent_norm": 1.0, "word_share": {"red": 0.5}})
    S.write_index(folder, doc)
    sweep = open_sweep(str(folder))
    series = sweep.series("seed", "final_latent_norm")
    assert len(series["x"]) == MAX_PLOT_VALUES and series["x"][-1] == str(MAX_PLOT_VALUES - 1)
    assert sweep.means("seed", series)["x"] == [str(v) for v in range(MAX_PLOT_VALUES)]


def test_the_default_word_is_one_pass_and_the_same_as_before(sweep):
    done = sweep.done()
    shares = [set(((r.get("headline") or {}).get("word_share") or {})) for r in done]
    common = [w for w in sweep.words() if all(w in s for s in shares)]  # the old rule, words x runs
    assert sweep.default_word() == common[0] == "circle"


def test_cells_whose_run_disagrees_with_the_index_are_not_drawn_under_its_labels(sweep_dir, tmp_path):
    from app.shell import Dashboard
    from app.state import State
    from app.sweepstore import open_sweep

    swapped = tmp_path / "swapped"
    shutil.copytree(sweep_dir, swapped)
    runs = index(swapped)["runs"]
    a, b = runs[0]["name"], runs[2]["name"]  # (red, seed 0, cfg 3) and (red, seed 1, cfg 3)
    os.rename(swapped / a, swapped / "tmp")
    os.rename(swapped / b, swapped / a)
    os.rename(swapped / "tmp", swapped / b)
    sweep = open_sweep(str(swapped))
    with pytest.raises(DatasetError, match=f"^{a}: sweep.json says seed 0, its metadata.json 1$"):
        sweep.check(runs[0])
    with pytest.raises(DatasetError, match=f"^{a}: sweep.json says seed 0"):
        sweep.word_map(runs[0], "circle")
    sweep.check(runs[3])  # an untouched run agrees
    board = Dashboard(State(dataset=str(swapped), sweep_rows="seed", sweep_cols="colour",
                            sweep_fixed={"cfg_scale": 3.0}), sync_url=False)
    board.main()
    cells = board.sweep.cell_source.data
    notes = dict(zip(cells["run"], cells["note"]))
    assert notes[a] == notes[b] == "unreadable"
    status = board.sweep.status.object
    assert f"2 cell(s) not drawn: {a}: sweep.json says seed 0, its metadata.json 1" in status
    assert board.state.dataset == f"{swapped}/{runs[3]['name']}"  # the other tabs open a run that agrees
    assert a not in board.sweep.thumb_source.data["run"] and runs[4]["name"] in board.sweep.thumb_source.data["run"]


def test_cells_have_borders_on_top_of_their_images(sweep_dir):
    from app.shell import Dashboard
    from app.state import State
    from app.views.sweep import BORDER

    board = Dashboard(State(dataset=str(sweep_dir)), sync_url=False)
    board.main()
    fig = board.sweep.grid_fig
    names = [r.name for r in fig.renderers]
    borders = fig.select_one({"name": "sweep-cell-borders"})
    assert borders.glyph.line_color == BORDER and borders.glyph.fill_alpha == 0
    assert borders.data_source is board.sweep.cell_source
    images = [i for i, r in enumerate(fig.renderers) if type(r.glyph).__name__ in ("ImageRGBA", "Image")]
    assert names.index("sweep-cell-borders") > max(images)  # drawn after (over) the images


MEMORY_PROBE = """
import json, sys, threading
import psutil
from app.sweepstore import open_sweep
from export.contract import DatasetError
rss = lambda: psutil.Process().memory_info().rss
def load():
    try:
        open_sweep(sys.argv[1])
    except DatasetError as exc:
        print(str(exc)[:80], file=sys.stderr)
load()  # imports and first-use caches settle
rest = rss()
for _ in range(3):  # the dashboard loads in a worker thread
    thread = threading.Thread(target=load)
    thread.start()
    thread.join()
print(json.dumps({"rest": rest, "after": rss()}))
"""


def test_a_refused_huge_index_leaves_the_memory_it_took(tmp_path):
    """A 19 MB index of two million entries, refused three times in a worker thread as the dashboard loads it:
    the process goes back to within 20 MB of where it was (glibc kept about 35 MB of the freed blocks before)."""
    import subprocess
    import sys

    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "sweep.json").write_text('{"sweep_version": 1, "base": {"layers": [' + ",".join(['{"n":1}'] * 2_000_000)
                                       + "]}}")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder)], capture_output=True, text=True, timeout=300,
                       cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("values, over the cap") == 4
    got = json.loads(r.stdout)
    assert got["after"] - got["rest"] < 20 * 2**20, got


def test_a_closed_session_drops_its_sweep_without_redrawing(sweep_dir):
    from app.shell import Dashboard
    from app.state import State

    board = Dashboard(State(dataset=str(sweep_dir)), sync_url=False)
    board.main()
    view = board.sweep
    cells = dict(view.cell_source.data)
    view._forget(None)  # what panel serve calls when the session is destroyed
    assert board.sweeps.sweep is None and view._layout is None
    assert view.cell_source.data == cells  # no view update on a document that is going away
