"""export.validate / `diffviz validate`: a good run passes; each corruption gives one line and exit 1."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export import contract
from export.validate import check_run, main, schema_errors, validate_run
from tests.synthetic import write_synthetic_run

REPO = Path(__file__).resolve().parents[1]
CROSS = contract.cross_path(1, 2)
SELF = contract.self_path(0, 1)
IMAGE = contract.image_path(1)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("good") / "run", steps=3, layers=2, tokens=5, r=8, s=4)


@pytest.fixture
def run(good, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(good, copy, symlinks=True)
    return copy


def load_meta(root: Path) -> dict:
    return json.loads((root / "metadata.json").read_text())


def save_meta(root: Path, meta: dict) -> None:
    (root / "metadata.json").write_text(json.dumps(meta))


def replace_file(root: Path, rel: str, data: bytes) -> None:
    """Write new content and update the manifest to match, so only the content checks can object."""
    (root / rel).write_bytes(data)
    meta = load_meta(root)
    meta["files"][rel].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    save_meta(root, meta)


def read_map(root: Path, rel: str) -> np.ndarray:
    shape = load_meta(root)["files"][rel]["shape"]
    return np.frombuffer((root / rel).read_bytes(), "<f2").reshape(shape).astype(np.float64)


def cli(*args: str) -> tuple[int, str, str]:
    """`diffviz validate ...` through the real dispatcher, in a subprocess (to see any traceback)."""
    out = subprocess.run([sys.executable, "-c", "import sys, diffviz; sys.exit(diffviz.main(sys.argv[1:]))",
                          "validate", *args], cwd=REPO, capture_output=True, text=True)
    return out.returncode, out.stdout, out.stderr


# ---------------------------------------------------------------- valid runs
def test_good_run_is_valid_strictly(good, capsys):
    assert validate_run(good) == [] and validate_run(good, strict=True) == []
    assert main([str(good), "--strict"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


@pytest.mark.parametrize("kwargs", [
    dict(cross=False), dict(self_attention=False), dict(steps=1), dict(tokens=1, pad=0),
    dict(pad=0), dict(save_latents=False), dict(layer_resolutions=[8, 4, 2], layers=3),
    dict(schema_version=1), dict(schema_version=1, layer_resolutions=[8, 4], s=8),
    dict(per_head=True, pad=0), dict(per_head=True, cross=False), dict(grid=(6, 4), self_attention=False),
])
def test_variants_are_valid(tmp_path, kwargs):
    assert validate_run(write_synthetic_run(tmp_path / "run", **kwargs), strict=True) == []


# ---------------------------------------------------------------- corruptions: one line each
def flip_byte(root: Path) -> None:
    p = root / CROSS
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def truncate(root: Path) -> None:
    p = root / CROSS
    p.write_bytes(p.read_bytes()[:-6])


def nan_in_map(root: Path) -> None:
    a = read_map(root, CROSS).astype("<f2")
    a[0, 3, 3] = np.nan
    replace_file(root, CROSS, a.tobytes())


def inf_in_self(root: Path) -> None:
    a = read_map(root, SELF).astype("<f2")
    a[2, 2] = np.inf
    replace_file(root, SELF, a.tobytes())


def cross_sum_over_one(root: Path) -> None:
    a = read_map(root, CROSS)
    a[:, 1, 1] = 0.5  # 5 tokens x 0.5 = 2.5 at one position
    replace_file(root, CROSS, a.astype("<f2").tobytes())


def self_rows_off(root: Path) -> None:
    replace_file(root, SELF, (read_map(root, SELF) * 0.9).astype("<f2").tobytes())


def negative_values(root: Path) -> None:
    a = read_map(root, CROSS)
    a[0, 0, 0] = -0.2
    replace_file(root, CROSS, a.astype("<f2").tobytes())


def dotdot_in_manifest(root: Path) -> None:
    meta = load_meta(root)
    meta["files"]["../outside.bin"] = dict(meta["files"][CROSS])
    save_meta(root, meta)


def absolute_in_manifest(root: Path) -> None:
    meta = load_meta(root)
    meta["files"]["/etc/hostname"] = dict(meta["files"][IMAGE])
    save_meta(root, meta)


def url_in_manifest(root: Path) -> None:
    meta = load_meta(root)
    meta["files"]["https://example.invalid/x.png"] = dict(meta["files"][IMAGE])
    save_meta(root, meta)


def symlink_outside(root: Path) -> None:
    outside = root.parent / "outside.bin"
    shutil.copy(root / CROSS, outside)
    (root / CROSS).unlink()
    (root / CROSS).symlink_to(outside)


def unknown_schema(root: Path) -> None:
    meta = load_meta(root)
    meta["schema_version"] = 99
    save_meta(root, meta)


def bad_json(root: Path) -> None:
    (root / "metadata.json").write_text('{"schema_version": 1, "files": ')


def bad_metrics_json(root: Path) -> None:
    replace_file(root, "metrics.json", b'{"steps": [0, 1, 2], NaN}')


def missing_file(root: Path) -> None:
    (root / CROSS).unlink()


def wrong_shape_in_manifest(root: Path) -> None:
    meta = load_meta(root)
    meta["files"][CROSS]["shape"] = [5, 8, 9]
    save_meta(root, meta)


def image_wrong_size(root: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    replace_file(root, IMAGE, buf.getvalue())


def image_garbage(root: Path) -> None:
    replace_file(root, IMAGE, b"not a png at all")


def full_distribution_claimed(root: Path) -> None:
    meta = load_meta(root)
    meta["attention"]["cross"]["full_distribution"] = True
    meta["context_length"] = len(meta["tokens"])
    save_meta(root, meta)


def metrics_wrong_length(root: Path) -> None:
    m = json.loads((root / "metrics.json").read_text())
    m["latent_norm"] = m["latent_norm"][:-1]
    replace_file(root, "metrics.json", json.dumps(m).encode())


def pca_wrong_length(root: Path) -> None:
    p = json.loads((root / "latent_pca.json").read_text())
    p["coords"].append([0.0, 0.0])
    replace_file(root, "latent_pca.json", json.dumps(p).encode())


def latents_nan(root: Path) -> None:
    with np.load(root / contract.LATENTS_FILE) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["noise"][0, 0, 0, 0] = np.nan
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    replace_file(root, contract.LATENTS_FILE, buf.getvalue())


def step_missing_from_manifest(root: Path) -> None:
    meta = load_meta(root)
    del meta["files"][CROSS]
    save_meta(root, meta)
    (root / CROSS).unlink()


def schema_violation(root: Path) -> None:
    meta = load_meta(root)
    del meta["run"]["prompt"]
    save_meta(root, meta)


CORRUPTIONS = {
    flip_byte: "sha256 mismatch",
    truncate: "size 634 bytes != manifest bytes 640",
    nan_in_map: "1 non-finite values (NaN/Inf)",
    inf_in_self: "non-finite",
    cross_sum_over_one: "sum over tokens reaches 2.5",
    self_rows_off: "rows sum to",
    negative_values: "negative attention values",
    dotdot_in_manifest: "'..'",
    absolute_in_manifest: "absolute paths are not allowed",
    url_in_manifest: "URLs",
    symlink_outside: "outside the run folder",
    unknown_schema: "schema_version 99 is not known",
    bad_json: "metadata.json: not valid JSON",
    bad_metrics_json: "metrics.json: not valid JSON",
    missing_file: "listed in the manifest but missing",
    wrong_shape_in_manifest: "needs 720",
    image_wrong_size: "decodes to 8x8 but the manifest says 16x16",
    image_garbage: "does not decode as an image (no PNG signature and IHDR chunk)",
    metrics_wrong_length: "latent_norm has 2 values, expected 3",
    pca_wrong_length: "coords has 4 points, expected 3",
    latents_nan: "noise has non-finite values",
    step_missing_from_manifest: "1 expected files not in the manifest: " + CROSS,
    schema_violation: "'prompt' is a required property",
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS), ids=lambda f: f.__name__)
def test_each_corruption_gives_one_line_and_exit_1(run, corruption, capsys):
    corruption(run)
    problems = validate_run(run)
    assert len(problems) == 1, problems
    assert CORRUPTIONS[corruption] in problems[0], problems[0]
    assert main([str(run)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == problems


def test_full_distribution_rule_is_checked_in_every_cross_map(run):
    """Claiming the full distribution while storing only the prompt's tokens fails every cross map
    (one line each): their sums over tokens are < 1 where padding took attention."""
    full_distribution_claimed(run)
    problems = validate_run(run)
    cross_files = sorted(k for k, v in load_meta(run)["files"].items() if v["kind"] == "cross")
    assert [p.split(":")[0] for p in problems] == cross_files
    assert all("full_distribution is true but sums over tokens range" in p for p in problems)


def test_full_distribution_run_is_valid_and_partial_sums_are_caught(tmp_path):
    run = write_synthetic_run(tmp_path / "run", pad=0)  # T == context_length: stored maps are the full softmax
    assert load_meta(run)["attention"]["cross"]["full_distribution"] is True
    assert validate_run(run, strict=True) == []
    replace_file(run, CROSS, (read_map(run, CROSS) * 0.9).astype("<f2").tobytes())
    (line,) = validate_run(run)
    assert line.startswith(CROSS + ": full_distribution is true")


@pytest.mark.parametrize("corruption", [flip_byte, bad_json, symlink_outside, schema_violation, unknown_schema],
                         ids=lambda f: f.__name__)
def test_cli_prints_no_traceback_for_bad_data(run, corruption):
    corruption(run)
    rc, out, err = cli(str(run), "--strict")
    assert rc == 1
    assert "Traceback" not in out + err
    assert len(out.strip().splitlines()) == 1


# ---------------------------------------------------------------- warnings and --strict
def test_extra_file_is_a_warning_and_a_problem_under_strict(run, capsys):
    (run / "images" / "notes.txt").write_text("hello")
    assert validate_run(run) == []
    assert validate_run(run, strict=True) == ["images/notes.txt: not listed in the manifest"]
    assert main([str(run)]) == 0
    assert "warning: images/notes.txt" in capsys.readouterr().out
    assert main([str(run), "--strict"]) == 1


def test_missing_or_failing_validation_json_is_a_warning(run):
    (run / "validation.json").unlink()
    assert validate_run(run) == []
    assert validate_run(run, strict=True) == ["validation.json: missing"]
    (run / "validation.json").write_text(json.dumps({"valid": False, "problems": ["x"]}))
    assert validate_run(run, strict=True) == ["validation.json: records the run as not valid"]


def test_pooled_up_maps_are_a_warning(run):
    meta = load_meta(run)
    meta["layers"][0]["native"] = [4, 4]  # stored at 8 > native 4
    save_meta(run, meta)
    assert validate_run(run) == []
    (line,) = validate_run(run, strict=True)
    assert "pooled up" in line


# ---------------------------------------------------------------- usage errors and robustness
def test_usage_errors_exit_2(tmp_path):
    rc, out, err = cli(str(tmp_path / "nope"))
    assert rc == 2 and "no such folder" in err and "Traceback" not in err
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = cli(str(f))
    assert rc == 2 and "not a folder" in err
    rc, _, err = cli()
    assert rc == 2 and "usage" in err


def test_good_run_through_the_cli(good):
    rc, out, err = cli(str(good), "--strict")
    assert rc == 0 and out.startswith("ok: ") and err == ""


MUTATIONS = [
    lambda m: m.update(files=[]),
    lambda m: m.update(layers="x"),
    lambda m: m.update(tokens=[{"index": 0}]),
    lambda m: m.update(timesteps=None),
    lambda m: m["files"][CROSS].update(bytes="many"),
    lambda m: m["files"][CROSS].update(shape=[-1, 2]),
    lambda m: m["files"][CROSS].update(kind="mystery"),
    lambda m: m["layers"][0].update(cross_shape=[5, 8]),
    lambda m: m["layers"][0].update(index=7),
    lambda m: m.update(tokens=m["tokens"][:2]),
    lambda m: m.update(timesteps=m["timesteps"][:1]),
    lambda m: m["attention"]["cross"].update(enabled=False),
    lambda m: m["attention"]["cross"].update(full_distribution=True),
    lambda m: m.update(context_length=2),
    lambda m: m.update(schema_version="1"),
    lambda m: m.clear(),
]


@pytest.mark.parametrize("index", range(len(MUTATIONS)))
def test_malformed_metadata_gives_problems_not_exceptions(run, index):
    meta = load_meta(run)
    MUTATIONS[index](meta)
    save_meta(run, meta)
    report = check_run(run)
    assert report.problems, meta
    assert not any("could not be checked" in p for p in report.problems), report.problems


def test_schema_errors_name_the_field():
    assert schema_errors({"coords": [[0, 0]], "explained_variance_ratio": [0.5, 2.0], "fit_on": "", "method": ""},
                         "latent_pca") == ["explained_variance_ratio/1: 2.0 is greater than the maximum of 1"]


# ---------------------------------------------------------------- schema 2
PH_CROSS = contract.cross_path(0, 1)
HEADS, GRID, SELF_GRID, IMAGE_HW = 3, (4, 8), (2, 4), (16, 24)


@pytest.fixture(scope="module")
def good_v2(tmp_path_factory):
    """Per-head, non-square cross and self grids, a non-square image."""
    return write_synthetic_run(tmp_path_factory.mktemp("good_v2") / "run", steps=2, per_head=True, heads=HEADS,
                               grid=GRID, self_grid=SELF_GRID, image_hw=IMAGE_HW)


@pytest.fixture
def run_v2(good_v2, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(good_v2, copy)
    return copy


def test_v2_per_head_non_square_run_is_valid_strictly(good_v2):
    meta = load_meta(good_v2)
    assert meta["schema_version"] == 2 and meta["attention"]["heads"] == "per_head"
    assert meta["layers"][0]["cross_shape"] == [HEADS, 5, *GRID] and meta["layers"][0]["self_shape"] == [8, 8]
    assert meta["files"][contract.FINAL_IMAGE]["shape"] == [*IMAGE_HW, 3]
    assert validate_run(good_v2, strict=True) == []


@pytest.mark.parametrize("ds", ["default", "compare"])
def test_shipped_schema_1_runs_still_validate(ds):
    root = REPO / "datasets" / ds
    assert load_meta(root)["schema_version"] == 1
    assert validate_run(root, strict=True) == []


def one_head_over_one(root: Path) -> None:
    """Head 1 sums to 1.5 over tokens at one position while the head-mean there stays 0.5."""
    a = read_map(root, PH_CROSS)
    a[:, :, 0, 0] = 0.0
    a[1, :, 0, 0] = 0.3
    replace_file(root, PH_CROSS, a.astype("<f2").tobytes())


def drop_final_image(root: Path) -> None:
    meta = load_meta(root)
    del meta["files"][contract.FINAL_IMAGE]
    save_meta(root, meta)
    (root / contract.FINAL_IMAGE).unlink()


def final_image_wrong_size(root: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    replace_file(root, contract.FINAL_IMAGE, buf.getvalue())
    meta = load_meta(root)
    meta["files"][contract.FINAL_IMAGE]["shape"] = [16, 16, 3]
    save_meta(root, meta)


def edit_v2(change):
    def edit(root: Path) -> None:
        meta = load_meta(root)
        change(meta)
        save_meta(root, meta)
    edit.__name__ = change.__name__
    return edit


def no_family(m):
    del m["family"]


def wrong_head_count(m):
    m["layers"][0]["heads"] = HEADS + 1


def mean_shape_in_per_head_run(m):
    m["attention"]["heads"] = "mean"


def token_set_past_context(m):
    m["token_sets"][0]["offset"] = m["context_length"] - 1


def self_grid_mismatch(m):
    m["layers"][1]["self_grid"] = [2, 2]


def tokens_from_unknown(m):
    m["family"]["tokens_from"] = "tokenizer_9"


V2_CORRUPTIONS = {
    edit_v2(no_family): "metadata.json: (top level): 'family' is a required property",
    drop_final_image: "1 expected files not in the manifest: images/final.png",
    final_image_wrong_size: "images/final.png: shape [16, 16, 3] differs from [run.height, run.width, 3] [16, 24, 3]",
    edit_v2(wrong_head_count): f"layers[0].cross_shape has {HEADS} heads but layers[0].heads is {HEADS + 1}",
    one_head_over_one: f"{PH_CROSS}: head 1: sum over tokens reaches 1.5",
    edit_v2(token_set_past_context): "token_sets[0]: offset 7 + length 5 exceeds context_length 8",
    edit_v2(self_grid_mismatch): "layers[1].self_shape [8, 8] is not [sh*sw, sh*sw] = [4, 4] for self_grid [2, 2]",
    edit_v2(tokens_from_unknown): "family.tokens_from 'tokenizer_9' is not a tokenizer",
}


@pytest.mark.parametrize("corruption", list(V2_CORRUPTIONS), ids=lambda f: f.__name__)
def test_each_v2_corruption_gives_one_line(run_v2, corruption):
    corruption(run_v2)
    problems = validate_run(run_v2)
    assert len(problems) == 1, problems
    assert V2_CORRUPTIONS[corruption] in problems[0], problems[0]


def test_v2_head_mode_must_match_the_cross_shape(run_v2):
    edit_v2(mean_shape_in_per_head_run)(run_v2)
    problems = validate_run(run_v2)
    assert problems and all("is not [T, h, w]" in p for p in problems), problems


def test_v1_keeps_its_square_rule(tmp_path):
    root = write_synthetic_run(tmp_path / "run", schema_version=1, layers=1)
    meta = load_meta(root)
    meta["layers"][0]["cross_shape"] = [5, 8, 4]
    save_meta(root, meta)
    assert any("cross_shape [5, 8, 4] is not square" in p for p in validate_run(root))


# --------------------------------------------------------------------------- layer kinds and step masks


def test_an_unknown_layer_kind_is_a_problem_naming_the_known_ones(run):
    meta = load_meta(run)
    meta["layers"][0]["kind"] = "bogus"
    save_meta(run, meta)
    problems = validate_run(run)
    known = ", ".join(contract.LAYER_KINDS)
    assert f"metadata.json: layers[0].kind 'bogus' is not a layer kind this diffviz knows ({known})" in problems


def test_stated_sum_rules_must_be_the_contracts(run):
    meta = load_meta(run)
    meta["attention"]["kinds"] = {"unet": contract.LAYER_KINDS["unet"].to_metadata()}
    save_meta(run, meta)
    assert validate_run(run, strict=True) == []
    meta["attention"]["kinds"]["unet"]["sum_rules"]["self"] = "anything goes"
    save_meta(run, meta)
    assert any("attention.kinds['unet'].sum_rules differ from the contract's" in p for p in validate_run(run))


def test_maps_are_checked_by_their_layers_kind_not_their_file_name(run):
    """A joint layer's self map may sum to < 1 per row; the same map under a unet layer may not."""
    rel = contract.self_path(0, 1)
    halved = (read_map(run, rel) / 2).astype("<f2").tobytes()
    replace_file(run, rel, halved)
    assert any(p.startswith(f"{rel}: rows sum to") for p in validate_run(run))
    meta = load_meta(run)
    meta["layers"][0]["kind"] = "single"
    meta["attention"]["cross"]["full_distribution"] = False
    save_meta(run, meta)
    assert not any(p.startswith(rel) for p in validate_run(run))


def test_a_computed_mask_drops_the_maps_of_skipped_steps(run):
    meta = load_meta(run)
    meta["layers"][1]["computed"] = [True, False, True]
    save_meta(run, meta)
    # the step-1 maps of layer 1 are still listed: a map for a step its layer did not compute
    assert any(p == f"{contract.cross_path(1, 1)}: a map for a step its layer did not compute (layers[].computed is "
                    f"false)" for p in validate_run(run))
    meta["layers"][1]["computed"] = [True, False]
    save_meta(run, meta)
    assert "metadata.json: layers[1].computed has 2 flags for 3 steps" in validate_run(run)
