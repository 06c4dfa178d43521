"""``diffviz sweep`` with the local executor, and the sweep.json format (export.sweep).

Grid parsing and its one-line errors; the index's checks; four toy runs end to end (32x32, 2 steps), a
resume that leaves them byte for byte and mtime for mtime as they were, a different grid refused, and
``--overwrite-output`` replacing only the runs that land.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from capture.sweep import cli
from capture.sweep.grid import GridError, parse_floats, parse_ints, parse_seeds, parse_set, placeholders, run_name
from export import sweep as S
from export.contract import DatasetError
from export.validate import validate_run


# ============================================================================ grid parsing
def test_seeds_lists_and_ranges():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,5,9") == [1, 5, 9]
    assert parse_seeds("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_seeds("7") == [7]


@pytest.mark.parametrize("text, fragment", [
    ("3-1", "runs backwards"), ("0-2,2", "appears twice"), ("a", "not a seed"), ("1,,2", "empty item"),
    ("-1", "not a seed"), ("0-20000", "more than 10000 seeds"),
])
def test_seeds_errors(text, fragment):
    with pytest.raises(GridError, match=fragment):
        parse_seeds(text)


def test_lists_and_set():
    assert parse_floats("--cfg-scale", "3,7.5") == [3.0, 7.5]
    assert parse_ints("--num-steps", "10, 30") == [10, 30]
    assert parse_set(["colour=red,green", "shape=circle"]) == [("colour", ["red", "green"]), ("shape", ["circle"])]
    assert placeholders("a {colour} {shape} and a {colour} {{x}}") == ["colour", "shape"]
    for bad, fragment in [(["colour"], "NAME=v1"), (["9x=a"], "placeholder name"), (["seed=1,2"], "--seeds"),
                          (["c=a", "c=b"], "given twice"), (["c=a,{b}"], "brace"), (["c=a,a"], "twice")]:
        with pytest.raises(GridError, match=fragment):
            parse_set(bad)
    with pytest.raises(GridError, match="not a number"):
        parse_floats("--cfg-scale", "3,x")
    with pytest.raises(GridError, match="not a placeholder"):
        placeholders("a {colour!r} circle")


def test_run_names_are_safe_and_bounded():
    name = run_name(3, 4, {"colour": "light blue/../x", "seed": 1, "cfg_scale": 7.0, "num_steps": 30})
    assert name == "r0003-colour-light_blue_.._x-seed-1-cfg_scale-7-num_steps-30"
    assert S.check_run_name(name) == name
    long = run_name(12, 5, {"colour": "x" * 300, "seed": 1})
    assert len(long) == S.MAX_RUN_NAME_CHARS and long.startswith("r00012-colour-xxx")


@pytest.mark.parametrize("argv, fragment", [
    (["--prompt", "a {colour} circle", "--out", "o"], "placeholder {colour} has no values"),
    (["--prompt", "a red circle", "--set", "colour=red", "--out", "o"], "no {colour} placeholder"),
    (["--prompt", "a {colour} circle", "--set", "colour=red,purple", "--out", "o"],
     "run r0001-colour-purple-seed-0-cfg_scale-7.5-num_steps-30: --prompt: unknown word for the toy model: purple"),
    (["--prompt", "a {colour} circle", "--set", "colour=red", "--num-steps", "2,0", "--out", "o"],
     "run r0001-colour-red-seed-0-cfg_scale-7.5-num_steps-0: --num-steps: must be an integer in [1, 1000]"),
    (["--prompt", "a red circle", "--cfg-scale", "3,200", "--out", "o"], "run r0001-seed-0-cfg_scale-200-num_steps-30"),
    (["--prompt", "a red circle", "--seeds", "0-x", "--out", "o"], "--seeds"),
    (["--prompt", "a red circle", "--out", "o", "--ray-address", "auto"], "--ray-address: needs --executor ray"),
    (["--prompt", "a red circle", "--out", "o", "--workers", "0"], "--workers"),
    (["--prompt", "a red circle"], "--out"),
])
def test_bad_flags_are_one_line_and_write_nothing(argv, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and err.startswith("diffviz sweep: error: ")
    assert list(tmp_path.iterdir()) == []


def test_sweep_takes_every_generate_flag():
    sweep_flags = {s for a in cli.build_sweep_parser()._actions for s in a.option_strings}
    from capture.cli import build_parser

    generate_flags = {s for a in build_parser()._actions for s in a.option_strings}
    assert generate_flags - sweep_flags == set()
    assert {"--set", "--seeds", "--out", "--executor", "--workers", "--threads", "--ray-address"} <= sweep_flags


# ============================================================================ the index
def _doc(**change):
    runs = [{"name": f"r000{i}-c-{c}", "params": {"c": c, "seed": 0}, "prompt": f"a {c}", "status": "pending",
             "error": None, "headline": None, "thumbnail": None} for i, c in enumerate(["red", "green"])]
    doc = {"sweep_version": 1, "template": "a {c}", "grid": [{"name": "c", "values": ["red", "green"]},
                                                             {"name": "seed", "values": [0]}],
           "base": {"height": 32}, "runs": runs}
    doc.update(change)
    return doc


def _run(**change):
    doc = _doc()
    doc["runs"][0].update(change)
    return doc


@pytest.mark.parametrize("doc, fragment", [
    ([], "must be a JSON object"),
    (_doc(sweep_version=9), "sweep_version 9 is not known"),
    (_doc(extra=1), "unknown keys extra"),
    (_doc(grid=[]), "grid: must be a list of 1 to 16 axes"),
    (_doc(runs=[]), "must list every run of the grid (2)"),
    (_run(name="../up"), "runs[0].name"),
    (_run(name=".hidden"), "runs[0].name"),
    (_run(name="sweep.json"), "runs[0].name"),
    (_run(name="r0001-c-green"), "appears twice"),
    (_run(thumbnail="/etc/passwd"), "absolute paths"),
    (_run(thumbnail="r0001-c-green/images/final.png"), "not inside the run's folder"),
    (_run(status="running"), "status: must be one of"),
    (_run(error="two\nlines"), "must be one line"),
    (_run(params={"c": "blue", "seed": 0}), "not one of the axis's values"),
    (_run(params={"seed": 0, "c": "red"}), "exactly the grid's axes in order"),
    (_run(params={"c": "green", "seed": 0}, name="r0000-x"), "not in grid order"),
    (_run(headline={"final_latent_norm": -1}), "final_latent_norm"),
    (_run(headline={"final_latent_norm": 1.0, "word_share": {"red": 3}}), "share in [0, 1]"),
])
def test_check_index_refuses_in_one_line(doc, fragment):
    with pytest.raises(DatasetError) as info:
        S.check_index(doc)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_index_round_trip_and_bounded_read(tmp_path):
    doc = S.index_document("a {c}", _doc()["grid"], {"height": 32}, _doc()["runs"])
    S.write_index(tmp_path, doc)
    assert S.read_index(tmp_path) == doc == S.read_index(tmp_path / "sweep.json")
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]  # the temp file was renamed, not left
    assert S.run_location(tmp_path, "r0000-c-red") == str(tmp_path / "r0000-c-red")
    assert S.run_location("https://host/s/", "r0000-c-red") == "https://host/s/r0000-c-red/"
    (tmp_path / "sweep.json").write_text('{"sweep_version": 1, "sweep_version": 1}')
    with pytest.raises(DatasetError, match="duplicate key"):
        S.read_index(tmp_path)
    with pytest.raises(DatasetError, match="over the cap"):
        S.parse_index(b" " * (S.MAX_INDEX_BYTES + 1))


# ============================================================================ end to end (local executor)
ARGS = ["--prompt", "a {colour} circle and a blue square", "--set", "colour=red,green", "--seeds", "0-1",
        "--num-steps", "2", "--height", "32", "--width", "32", "--quiet"]


def _state(out: Path) -> dict[str, tuple[int, str]]:
    """Every run's metadata.json: mtime and sha256."""
    return {p.parent.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(out.glob("*/metadata.json"))}


def test_local_sweep_end_to_end_resume_and_refusal(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(ARGS + ["--out", str(out)]) == 0
    doc = S.read_index(out)
    names = [r["name"] for r in doc["runs"]]
    assert names == ["r0000-colour-red-seed-0-cfg_scale-7.5-num_steps-2", "r0001-colour-red-seed-1-cfg_scale-7.5-num_steps-2",
                     "r0002-colour-green-seed-0-cfg_scale-7.5-num_steps-2",
                     "r0003-colour-green-seed-1-cfg_scale-7.5-num_steps-2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["sweep.json"])
    assert [a["name"] for a in doc["grid"]] == ["colour", "seed", "cfg_scale", "num_steps"]
    assert doc["base"]["height"] == 32 and "prompt" not in doc["base"] and "seed" not in doc["base"]
    for run in doc["runs"]:
        folder = out / run["name"]
        assert run["status"] == "done" and validate_run(folder, strict=True) == []
        meta = json.loads((folder / "metadata.json").read_text())
        assert (meta["run"]["prompt"], meta["run"]["seed"], meta["run"]["num_steps"]) == \
            (run["prompt"], run["params"]["seed"], 2)
        assert run["prompt"] == f"a {run['params']['colour']} circle and a blue square"
        assert run["headline"] == S.headline(folder)
        assert run["params"]["colour"] in run["headline"]["word_share"]
        assert (out / run["thumbnail"]).is_file()
    assert doc["runs"][0]["headline"]["final_latent_norm"] != doc["runs"][1]["headline"]["final_latent_norm"]

    before = _state(out)
    index_before = (out / "sweep.json").read_bytes()
    assert cli.main(ARGS + ["--out", str(out)]) == 0          # resume: nothing to do
    assert _state(out) == before and len(before) == 4
    assert json.loads((out / "sweep.json").read_bytes())["runs"] == json.loads(index_before)["runs"]

    # a broken run is redone (and only it); the finished ones stay untouched
    broken = out / names[2]
    (broken / "metrics.json").write_text("{}")
    assert cli.main(ARGS + ["--out", str(out)]) == 0
    after = _state(out)
    assert {k: v for k, v in after.items() if k != names[2]} == {k: v for k, v in before.items() if k != names[2]}
    assert after[names[2]] != before[names[2]] and validate_run(broken, strict=True) == []

    capsys.readouterr()
    other = ["--prompt", "a {colour} circle and a blue square", "--set", "colour=red", "--seeds", "0-1",
             "--num-steps", "2", "--height", "32", "--width", "32", "--no-save-latents-noise", "--quiet"]
    assert cli.main(other + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a different sweep (axis colour was red, green)" in err and err.count("\n") == 1
    assert _state(out) == after

    # --overwrite-output: the new grid's two runs (same names) are replaced as they land; the rest are kept
    assert cli.main(other + ["--out", str(out), "--overwrite-output"]) == 0
    final = _state(out)
    assert final[names[2]] == after[names[2]] and final[names[3]] == after[names[3]]
    for name in names[:2]:
        assert final[name] != after[name] and not (out / name / "latents_noise_fp16.npz").exists()
        assert validate_run(out / name, strict=True) == []
    assert [r["name"] for r in S.read_index(out)["runs"]] == names[:2]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_out_with_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine\n")
    assert cli.main(["--prompt", "a red circle", "--out", str(tmp_path), "--quiet"]) == 2
    assert "holds no sweep.json" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
