"""sweep.json under hostile input (issue 25): numbers, labels, counts, words, links, file URLs, and the sweep check
that ``diffviz validate SWEEP`` and ``build-site`` share. No torch: sweeps of synthetic runs (tests.test_app_sweep).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest

from export import sweep as S
from export import validate
from export.contract import DatasetError
from tests.test_app_sweep import write_sweep

GRID = {"colour": ["red", "green"], "seed": [0, 1]}
BIG = int("9" * 4000)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("sweep") / "colours", GRID, pending=(1,), steps=2)


@pytest.fixture()
def copy_of(sweep_dir, tmp_path):
    dest = tmp_path / "colours"
    shutil.copytree(sweep_dir, dest, symlinks=True)
    return dest


def doc_of(folder: Path) -> dict:
    return json.loads((folder / S.SWEEP_FILE).read_text())


def small_doc() -> dict:
    runs = [{"name": f"r{i}", "params": {"c": c, "seed": 0}, "prompt": f"a {c}", "status": "done", "error": None,
             "headline": {"final_latent_norm": 1.0, "word_share": {c: 0.5}}, "thumbnail": None}
            for i, c in enumerate(["red", "green"])]
    return {"sweep_version": 1, "generator": {"name": "diffviz", "version": "0"}, "template": "a {c}",
            "grid": [{"name": "c", "values": ["red", "green"]}, {"name": "seed", "values": [0]}],
            "base": {"height": 32, "layers": ["*attn2*"]}, "runs": runs}


def refused(doc_or_bytes) -> str:
    data = doc_or_bytes if isinstance(doc_or_bytes, bytes) else json.dumps(doc_or_bytes).encode()
    with pytest.raises(DatasetError) as info:
        S.parse_index(data)
    text = str(info.value)
    assert "\n" not in text and text.startswith("sweep.json")
    return text


# ============================================================================ defect 1: a 4000-digit integer
def _big_at(where: str) -> dict:
    doc = small_doc()
    if where == "headline":
        doc["runs"][0]["headline"]["final_latent_norm"] = BIG
    elif where == "share":
        doc["runs"][1]["headline"]["word_share"]["green"] = BIG
    elif where == "axis":
        doc["grid"][1]["values"] = [BIG]
        for run in doc["runs"]:
            run["params"]["seed"] = BIG
    elif where == "base":
        doc["base"]["height"] = BIG
    elif where == "base_list":
        doc["base"]["layers"] = [BIG]
    elif where == "generator":
        doc["generator"]["version"] = BIG
    elif where == "version":
        doc["sweep_version"] = BIG
    return doc


@pytest.mark.parametrize("where, field", [
    ("headline", "runs[0].headline.final_latent_norm"), ("share", "runs[1].headline.word_share['green']"),
    ("axis", "grid[1].values[0]"), ("base", "base.height"), ("base_list", "base.layers[0]"),
    ("generator", "generator.version"), ("version", "sweep_version"),
])
def test_a_4000_digit_integer_anywhere_is_one_line_naming_its_field(where, field):
    text = refused(_big_at(where))
    assert field in text, text
    assert "9999999999" not in text  # the number is described, not printed


def test_a_4000_digit_integer_is_refused_by_every_reader(copy_of, tmp_path):
    doc = doc_of(copy_of)
    doc["runs"][0]["headline"]["final_latent_norm"] = BIG
    (copy_of / S.SWEEP_FILE).write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"runs\[0\]\.headline\.final_latent_norm: .*4000 digits"):
        S.read_index(copy_of)
    from app.sitebuild.base import SiteError
    from app.sitebuild.inputs import check_inputs

    with pytest.raises(SiteError, match="invalid sweep: .*final_latent_norm"):
        check_inputs(tmp_path / "site", [copy_of])
    from app.sweepstore import open_sweep

    with pytest.raises(DatasetError, match="final_latent_norm"):
        open_sweep(str(copy_of))


# ============================================================================ defect 2: values that read the same
@pytest.mark.parametrize("values", [[1, 1.0], ["1", 1], [7.5, "7.5"], ["red", "blue", "red"]])
def test_axis_values_that_read_the_same_are_refused(values):
    doc = small_doc()
    doc["grid"][1] = {"name": "seed", "values": values}
    doc["runs"] = [dict(run, name=f"r{i}-{k}", params={"c": run["params"]["c"], "seed": v})
                   for i, run in enumerate(small_doc()["runs"]) for k, v in enumerate(values)]
    text = refused(doc)
    assert "grid[1].values[" in text and ("read the same" in text or "repeats a value" in text)


def test_value_labels_are_the_dashboards():
    from app.sweepstore import value_text

    assert value_text is S.value_label
    assert [S.value_label(v) for v in (7.5, 3.0, 3, "red", 1e16)] == ["7.5", "3", "3", "red", "1e+16"]


# ============================================================================ defect 4: bounded before parsing
def test_an_index_of_two_million_values_is_refused_before_it_is_parsed():
    data = b'{"sweep_version": 1, "base": {"x": [' + b",".join([b"{}"] * 2_000_000) + b"]}}"
    tracemalloc.start()
    try:
        text = refused(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"more than {S.MAX_INDEX_ITEMS} values, over the cap" in text
    # parsing it would build two million dicts (over 100 MB); the count is a few arrays over the bytes
    assert peak < 48 * 2**20, peak


def test_the_caps_stop_a_grid_over_the_run_cap_and_a_file_over_the_byte_cap():
    doc = small_doc()
    doc["grid"][1]["values"] = list(range(S.MAX_RUNS // 2 + 1))
    assert "more than 10000 runs" in refused(doc)
    assert "over the cap" in refused(b" " * (S.MAX_INDEX_BYTES + 1))


# ============================================================================ defect 5: words across runs
def test_words_are_bounded_per_run_and_across_runs():
    doc = small_doc()
    doc["runs"][0]["headline"]["word_share"] = {f"w{k}": 0.001 for k in range(S.MAX_HEADLINE_WORDS + 1)}
    assert f"at most {S.MAX_HEADLINE_WORDS} words" in refused(doc)
    axis = [f"v{i}" for i in range(S.MAX_SWEEP_WORDS // S.MAX_HEADLINE_WORDS + 1)]
    doc = small_doc()
    doc["template"] = "a {c}"
    doc["grid"][0]["values"] = axis
    doc["runs"] = [{"name": f"r{i}", "params": {"c": v, "seed": 0}, "prompt": f"a {v}", "status": "done",
                    "error": None, "thumbnail": None,
                    "headline": {"final_latent_norm": 1.0, "word_share": {f"{v}-{k}": 0.01 for k in range(64)}}}
                   for i, v in enumerate(axis)]
    assert f"more than {S.MAX_SWEEP_WORDS} distinct words" in refused(doc)


def test_the_ledger_keeps_the_index_within_the_word_caps(tmp_path):
    from capture.config import GenerateConfig
    from capture.sweep.grid import Grid
    from capture.sweep.ledger import Ledger

    values = [f"v{i}" for i in range(20)]
    grid = Grid.build("a {c}", [("c", values)], seeds=[0], cfg_scales=[7.5], num_steps=[2],
                      base=GenerateConfig(prompt=""))
    specs = grid.expand(tmp_path)
    ledger = Ledger(tmp_path, grid, specs)
    for spec in specs:  # 20 runs x 64 distinct words: 1280 > the index's 1024
        share = {f"{spec.params['c']}-{k}": 0.01 for k in range(S.MAX_HEADLINE_WORDS)}
        ledger.record({"name": spec.name, "status": "done", "headline": {"final_latent_norm": 1.0, "word_share": share}})
    doc = S.read_index(tmp_path)
    words = {w for run in doc["runs"] for w in run["headline"]["word_share"]}
    assert len(words) == S.MAX_SWEEP_WORDS and ledger.words_left_out
    assert len(doc["runs"][0]["headline"]["word_share"]) == S.MAX_HEADLINE_WORDS


def test_the_headline_keeps_the_largest_shares_in_prompt_order(tmp_path):
    from tests.synthetic import write_synthetic_run

    words = [f"w{k}" for k in range(70)]
    run = write_synthetic_run(tmp_path / "run", steps=2, layers=1, tokens=72, r=4, s=2, prompt=" ".join(words))
    metrics = json.loads((run / "metrics.json").read_text())
    last = metrics["token_dominance"]["share"][-1]
    headline = S.headline(run)["word_share"]
    assert len(headline) == S.MAX_HEADLINE_WORDS
    labels = [label for label in headline]
    assert labels == sorted(labels, key=lambda w: int(w[1:]))  # prompt order
    kept = min(headline.values())
    assert all(v <= kept + 1e-6 for w, v in zip(words, last[1:71]) if w not in headline)


# ============================================================================ defect 10 and links: bounded reads
@contextmanager
def deadline(seconds: int):
    def hung(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_file_url_goes_through_the_bounded_reader(tmp_path, sweep_dir, capsys):
    fifo_sweep = tmp_path / "fifo-sweep"
    fifo_sweep.mkdir()
    os.mkfifo(fifo_sweep / S.SWEEP_FILE)
    fifo_run = tmp_path / "fifo-run"
    fifo_run.mkdir()
    os.mkfifo(fifo_run / "metadata.json")
    from export import figure
    from export.reader import open_run

    with deadline(5):
        with pytest.raises(DatasetError, match="not a regular file"):
            S.read_index(fifo_sweep.as_uri() + "/")
        with pytest.raises(DatasetError, match="not a regular file"):
            S.read_index(fifo_sweep.as_uri() + "/sweep.json")
        with pytest.raises(DatasetError, match="not a regular file"):
            open_run(fifo_run.as_uri())
        assert figure.main([fifo_run.as_uri() + "/", "--out", str(tmp_path / "grid.png")]) == 2
    assert "metadata.json: not a regular file (a FIFO)" in capsys.readouterr().err
    assert S.read_index(sweep_dir.as_uri()) == S.read_index(sweep_dir)
    with pytest.raises(DatasetError, match="another host"):
        S.read_index("file://elsewhere/x/")


def test_a_looped_or_outside_sweep_json_is_one_line(tmp_path):
    loop = tmp_path / "loop"
    loop.mkdir()
    os.symlink(S.SWEEP_FILE, loop / S.SWEEP_FILE)
    with pytest.raises(DatasetError, match="sweep.json: unreadable \\(a symlink loop\\)"):
        S.read_index(loop)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink("/dev/zero", out / S.SWEEP_FILE)
    with pytest.raises(DatasetError, match="outside"):
        S.read_index(out)


# ============================================================================ the check of a sweep
def _validate(folder: Path, capsys, *args: str) -> tuple[int, list[str], str]:
    code = validate.main([str(folder), *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_validate_takes_a_sweep_folder(sweep_dir, capsys):
    code, out, err = _validate(sweep_dir, capsys, "--strict")
    assert code == 0 and out == [f"ok: sweep {sweep_dir} (4 runs: 3 done and checked, 1 pending, 0 failed, strict)"]


def test_validate_finds_swapped_overwritten_linked_and_broken_runs(copy_of, tmp_path, capsys):
    doc = doc_of(copy_of)
    a, b, c, d = (run["name"] for run in doc["runs"])  # b is pending
    os.rename(copy_of / a, tmp_path / "a")                     # a and c swapped
    os.rename(copy_of / c, copy_of / a)
    os.rename(tmp_path / "a", copy_of / c)
    meta = json.loads((copy_of / d / "metadata.json").read_text())
    meta["run"]["seed"] = 99                                   # d overwritten by another job's run
    (copy_of / d / "metadata.json").write_text(json.dumps(meta))
    code, out, err = _validate(copy_of, capsys)
    assert code == 1 and len(out) == 3, out
    assert out[0].startswith(f"{a}: sweep.json says prompt 'a red circle', its metadata.json 'a green circle'")
    assert out[1].startswith(f"{c}: sweep.json says prompt 'a green circle'")
    assert out[2] == f"{d}: sweep.json says seed 1, its metadata.json 99"
    assert err == f"invalid: 3 problem(s) in sweep {copy_of}\n"

    shutil.rmtree(copy_of / d)                                 # d: a link to a run outside the sweep
    outside = tmp_path / "elsewhere"
    shutil.copytree(copy_of / c, outside)
    os.symlink(outside, copy_of / d)
    shutil.rmtree(copy_of / a)                                 # a: gone
    code, out, err = _validate(copy_of, capsys)
    assert out[0] == f"{a}: sweep.json calls it done, but its folder is missing"
    assert out[-1].startswith(f"{d}: sweep.json calls it done, but its folder is a symlink (to {outside})")


def test_validate_a_sweep_prints_20_problems_then_a_count(tmp_path, capsys):
    folder = write_sweep(tmp_path / "many", {"colour": ["red"], "seed": list(range(24))}, steps=2)
    for run in doc_of(folder)["runs"]:
        (folder / run["name"] / "metrics.json").write_text("{}")
    code, out, err = _validate(folder, capsys)
    assert code == 1 and len(out) == 21 and out[-1] == "… and 4 more problems"
    assert err == f"invalid: 24 problem(s) in sweep {folder}\n"


def test_validate_a_broken_sweep_json(copy_of, capsys):
    (copy_of / S.SWEEP_FILE).write_text('{"sweep_version": 1, "sweep_version": 1}')
    code, out, err = _validate(copy_of, capsys)
    assert code == 1 and out == ["sweep.json: not valid JSON (duplicate key 'sweep_version')"]


def test_build_site_refuses_a_run_folder_that_links_out_or_disagrees(copy_of, tmp_path):
    from app.sitebuild.base import SiteError
    from app.sitebuild.inputs import check_inputs

    doc = doc_of(copy_of)
    name = doc["runs"][3]["name"]
    outside = tmp_path / "outside-run"
    os.rename(copy_of / name, outside)
    os.symlink(outside, copy_of / name)
    with pytest.raises(SiteError, match=f"invalid run {name}: sweep.json calls it done, but its folder is a symlink"):
        check_inputs(tmp_path / "site", [copy_of])
    os.unlink(copy_of / name)
    shutil.copytree(copy_of / doc["runs"][0]["name"], copy_of / name)  # a copy of another run, mislabelled
    with pytest.raises(SiteError, match=f"invalid run {name}: sweep.json says prompt"):
        check_inputs(tmp_path / "site", [copy_of])


# ============================================================================ writing
def test_the_index_is_written_one_run_per_line_and_reads_back(tmp_path):
    doc = S.index_document("a {c}", small_doc()["grid"], {"height": 32}, small_doc()["runs"])
    S.write_index(tmp_path, doc)
    text = (tmp_path / S.SWEEP_FILE).read_text()
    assert json.loads(text) == doc == S.read_index(tmp_path)
    lines = text.splitlines()
    assert [json.loads(line.rstrip(",")) for line in lines if line.startswith('{"name"')] == doc["runs"]
    assert os.listdir(tmp_path) == [S.SWEEP_FILE]


def test_a_write_that_fails_leaves_the_old_index_and_no_temp_file(tmp_path, monkeypatch):
    doc = S.index_document("a {c}", small_doc()["grid"], {"height": 32}, small_doc()["runs"])
    S.write_index(tmp_path, doc)
    before = (tmp_path / S.SWEEP_FILE).read_bytes()
    newer = copy.deepcopy(doc)
    newer["runs"][0]["status"] = "failed"

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        S.write_index(tmp_path, newer)
    assert (tmp_path / S.SWEEP_FILE).read_bytes() == before and os.listdir(tmp_path) == [S.SWEEP_FILE]


def test_tidy_temps_removes_only_our_temp_files(tmp_path):
    (tmp_path / ".sweep.json.tmp-123-abcd").write_text("{")
    (tmp_path / ".sweep.json.tmp-9-x").mkdir()          # a folder of that name is not ours
    (tmp_path / "notes.txt").write_text("mine")
    assert S.tidy_temps(tmp_path) == [".sweep.json.tmp-123-abcd"]
    assert sorted(os.listdir(tmp_path)) == [".sweep.json.tmp-9-x", "notes.txt"]
