"""export.writer: streamed writes, manifest, atomic install, refusal and recovery (exception, SIGKILL)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from export import contract
from export.contract import DatasetError
from export.validate import validate_run
from export.writer import RunWriter
from tests.synthetic import write_synthetic_run

REPO = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture
def old_run(tmp_path):
    run = write_synthetic_run(tmp_path / "run", steps=2, seed=1, prompt="an old run")
    return run, tree_digest(run)


# ---------------------------------------------------------------- a complete run
def test_synthetic_run_round_trip(tmp_path):
    run = write_synthetic_run(tmp_path / "run", steps=3, layers=2, tokens=4, r=8, s=4)
    assert validate_run(run, strict=True) == []
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["schema_version"] == contract.SCHEMA_VERSION and meta["generator"]["name"] == "diffviz"
    assert meta["created"].endswith("Z")
    files = meta["files"]
    # the manifest lists every artifact but metadata.json and validation.json, with true sizes and hashes
    on_disk = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"metadata.json", "validation.json"}
    for rel, entry in files.items():
        data = (run / rel).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    entry = files[contract.cross_path(1, 2)]
    assert entry["kind"] == "cross" and entry["dtype"] == "<f2" and entry["shape"] == [4, 8, 8]
    assert entry["bytes"] == 4 * 8 * 8 * 2
    assert files[contract.self_path(0, 0)]["shape"] == [16, 16]
    assert files[contract.image_path(0)]["shape"] == [16, 16, 3]
    assert files[contract.LATENTS_FILE]["arrays"]["latents"]["shape"] == [4, 4, 4, 4]
    report = json.loads((run / "validation.json").read_text())
    assert report["valid"] is True and report["problems"] == []
    assert leftovers(tmp_path, "run") == []


def test_maps_are_float16_little_endian_c_order(tmp_path):
    cross = np.random.default_rng(0).random((3, 4, 4)) / 3
    with RunWriter(tmp_path / "r", validate=False) as w:
        w.write_step(0, cross={0: cross})
        path = w.tmp / contract.cross_path(0, 0)
        assert path.is_file()  # streamed: on disk as soon as write_step returns
        raw = path.read_bytes()
    assert raw == cross.astype("<f2").tobytes(order="C")
    np.testing.assert_array_equal(np.frombuffer(raw, "<f2").reshape(3, 4, 4), cross.astype(np.float16))


def test_write_step_streams_and_keeps_no_arrays(tmp_path):
    rng = np.random.default_rng(0)
    with RunWriter(tmp_path / "r", validate=False) as w:
        for step in range(20):
            w.write_step(step, cross={0: rng.random((2, 8, 8)) / 2}, self_={0: np.full((16, 16), 1 / 16)})
            assert (w.tmp / contract.self_path(0, step)).stat().st_size == 16 * 16 * 2
        # the writer holds manifest entries (small dicts of str/int), never the arrays
        for entry in w._files.values():
            assert all(isinstance(v, (str, int, list)) for v in entry.values())
        assert w.bytes_written == 20 * (2 * 8 * 8 * 2 + 16 * 16 * 2)


def test_bad_writes_are_refused(tmp_path):
    with RunWriter(tmp_path / "r", validate=False) as w:
        w.write_step(0, cross={0: np.zeros((2, 4, 4))})
        with pytest.raises(DatasetError, match="differs from earlier steps"):
            w.write_step(1, cross={0: np.zeros((2, 8, 8))})
        with pytest.raises(DatasetError, match="written twice"):
            w.write_step(0, cross={0: np.zeros((2, 4, 4))})
        with pytest.raises(DatasetError, match=r"\[s\*s, s\*s\]"):
            w.write_step(2, self_={0: np.zeros((4, 5))})
        for bad in ("../x.bin", "/abs.bin", "http://host/x.bin", "a\\b.bin", "metadata.json"):
            with pytest.raises(DatasetError):
                w.write_bytes(bad, b"x", kind="json")
        with pytest.raises(DatasetError, match="uint8"):
            w.write_step(3, image=np.zeros((4, 4, 3), dtype=np.float32))


def test_per_head_maps_and_the_final_image(tmp_path):
    with RunWriter(tmp_path / "r", validate=False) as w:
        w.write_step(0, cross={0: np.full((2, 3, 4, 8), 0.1)})  # [heads, T, h, w], non-square
        with pytest.raises(DatasetError, match=r"\[heads, T, h, w\]"):
            w.write_step(1, cross={1: np.zeros((1, 2, 3, 4, 4))})
        with pytest.raises(DatasetError, match="uint8"):
            w.write_final_image(np.zeros((4, 6, 3), dtype=np.float32))
        entry = w.write_final_image(np.zeros((4, 6, 3), dtype=np.uint8))
    assert w._files[contract.cross_path(0, 0)]["shape"] == [2, 3, 4, 8]
    assert entry["kind"] == "image" and entry["shape"] == [4, 6, 3] and contract.FINAL_IMAGE in w._files


# ---------------------------------------------------------------- refusing and replacing
def test_existing_target_is_refused_without_overwrite(old_run, tmp_path):
    run, digest = old_run
    with pytest.raises(DatasetError, match="overwrite"):
        RunWriter(run)
    with pytest.raises(DatasetError, match="overwrite"):
        write_synthetic_run(run, overwrite=False)
    assert tree_digest(run) == digest
    f = tmp_path / "file"
    f.write_text("keep me")
    with pytest.raises(DatasetError, match="not a folder"):
        RunWriter(f, overwrite=True)
    assert f.read_text() == "keep me"
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(DatasetError, match="symlink"):
        RunWriter(link, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert validate_run(write_synthetic_run(empty, overwrite=False), strict=True) == []


def test_overwrite_replaces_only_when_the_new_run_is_complete(old_run):
    run, digest = old_run
    with RunWriter(run, overwrite=True) as w:
        w.write_step(0, cross={0: np.full((5, 8, 8), 0.1)})
        assert tree_digest(run) == digest  # still the old run while the new one is written
    # the with-block ended without finish(): nothing installed, temp folder gone
    assert tree_digest(run) == digest
    assert leftovers(run.parent, "run") == []
    write_synthetic_run(run, steps=3, seed=5, prompt="a new run", overwrite=True)
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["run"]["prompt"] == "a new run" and validate_run(run, strict=True) == []
    assert leftovers(run.parent, "run") == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_inside_with_leaves_old_run_intact(old_run, exc):
    run, digest = old_run
    with pytest.raises(type(exc)):
        with RunWriter(run, overwrite=True) as w:
            w.write_step(0, cross={0: np.full((5, 8, 8), 0.1)}, image=np.zeros((16, 16, 3), np.uint8))
            raise exc
    assert tree_digest(run) == digest
    assert leftovers(run.parent, "run") == []


def test_exception_without_old_run_leaves_nothing(tmp_path):
    target = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(RuntimeError):
        with RunWriter(target) as w:
            w.write_step(0, cross={0: np.full((2, 4, 4), 0.1)})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # even the parent folders it created are gone


def test_invalid_new_run_is_not_installed(old_run):
    run, digest = old_run
    rng = np.random.default_rng(0)
    with pytest.raises(DatasetError, match="failed validation: .*non-finite"):
        with RunWriter(run, overwrite=True) as w:
            bad = np.full((5, 8, 8), 0.1)
            bad[0, 0, 0] = np.nan
            w.write_step(0, cross={0: bad})
            meta = json.loads((run / "metadata.json").read_text())
            meta.pop("files")
            meta["timesteps"] = [999]
            meta["run"]["num_steps"] = 1
            meta["layers"] = meta["layers"][:1]
            meta["layers"][0]["self_shape"] = meta["layers"][0]["self_grid"] = None
            meta["attention"]["self"]["enabled"] = False
            w.write_step(0, image=rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            w.finish(meta, json.loads((run / "metrics.json").read_text()), json.loads((run / "latent_pca.json").read_text()))
    assert tree_digest(run) == digest
    assert leftovers(run.parent, "run") == []


def test_size_limit_is_enforced_before_install(old_run):
    run, digest = old_run
    with pytest.raises(DatasetError, match="over the .* MB limit"):
        with RunWriter(run, overwrite=True) as w:
            rng = np.random.default_rng(0)
            w.write_step(0, image=rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            w.write_final_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            meta = json.loads((run / "metadata.json").read_text())
            meta.pop("files")
            meta.update(timesteps=[999], layers=[], tokens=meta["tokens"])
            meta["run"]["num_steps"] = 1
            meta["attention"]["cross"]["enabled"] = meta["attention"]["self"]["enabled"] = False
            metrics = {"steps": [0], "latent_norm": [1.0], "latent_cosine_prev": [1.0],
                       "entropy": None, "token_dominance": None, "kl_consecutive": None}
            pca = {"coords": [[0.0, 0.0]], "explained_variance_ratio": [0.0, 0.0], "fit_on": "x", "method": "y"}
            w.finish(meta, metrics, pca, max_bytes=1000)
    assert tree_digest(run) == digest


def test_projected_bytes_bounds_the_real_size(tmp_path):
    steps, layers, tokens, r, s, size = 6, 3, 5, 8, 4, 16
    run = write_synthetic_run(tmp_path / "run", steps=steps, layers=layers, tokens=tokens, r=r, s=s, image_size=size)
    meta = json.loads((run / "metadata.json").read_text())
    maps = sum(e["bytes"] for e in meta["files"].values() if e["kind"] in ("cross", "self"))
    assert maps == steps * layers * (contract.shape_bytes([tokens, r, r]) + contract.shape_bytes([s * s, s * s]))
    projected = contract.projected_bytes(steps, meta["layers"], image_size=(size, size),
                                         latent_shape=meta["latent_shape"], save_latents_noise=True)
    real = contract.dataset_bytes(run)
    assert real <= projected <= real + 64 * 1024, (real, projected)
    without = contract.projected_bytes(steps, meta["layers"], image_size=(size, size))
    assert without < projected


# ---------------------------------------------------------------- a writer killed with SIGKILL
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    import export.writer as W
    from tests.synthetic import write_synthetic_run

    target, mode = sys.argv[1], sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if mode == "mid-steps":
        real = W.RunWriter.write_step
        def slow(self, step, **kw):
            real(self, step, **kw)
            if step == 2:
                print("ready", flush=True)
                time.sleep(120)
        W.RunWriter.write_step = slow
    elif mode == "before-install":
        W.RunWriter._install = lambda self, tmp: die()
    elif mode == "between-renames":
        W._exchange = lambda a, b: False
        real_rename = os.rename
        def rename(a, b):
            real_rename(a, b)
            if ".old-" in os.fspath(b):
                die()
        os.rename = rename
    elif mode == "after-exchange":
        real_exchange = W._exchange
        def exchange(a, b):
            assert real_exchange(a, b)
            die()
        W._exchange = exchange
    write_synthetic_run(target, steps=6, seed=7, prompt="the new run", overwrite=True)
    """
)


def run_child(target: Path, mode: str) -> int:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target), mode], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if mode == "mid-steps":
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    return proc.returncode


@pytest.mark.parametrize("mode", ["mid-steps", "before-install"])
def test_sigkill_while_writing_leaves_old_run_intact(old_run, mode):
    run, digest = old_run
    assert run_child(run, mode) == -signal.SIGKILL
    assert tree_digest(run) == digest
    assert validate_run(run, strict=True) == []
    assert len(leftovers(run.parent, "run")) == 1  # the dead writer's partial folder
    # the next writer for the same target tidies it away
    write_synthetic_run(run, steps=2, seed=1, prompt="an old run", overwrite=True)
    assert leftovers(run.parent, "run") == []


def test_sigkill_between_the_two_renames_is_recovered(old_run):
    """Without renameat2 the swap is two renames; a kill in between leaves the old run in a backup
    folder, and the next writer puts it back before doing anything else."""
    run, digest = old_run
    assert run_child(run, "between-renames") == -signal.SIGKILL
    assert not run.exists()
    assert any(".old-" in name for name in leftovers(run.parent, "run"))
    w = RunWriter(run)
    w.open()
    assert tree_digest(run) == digest
    w.abort()
    assert tree_digest(run) == digest and validate_run(run, strict=True) == []
    assert leftovers(run.parent, "run") == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_sigkill_after_atomic_exchange_leaves_the_new_run(old_run):
    run, _ = old_run
    assert run_child(run, "after-exchange") == -signal.SIGKILL
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["run"]["prompt"] == "the new run" and validate_run(run, strict=True) == []
    assert len(leftovers(run.parent, "run")) == 1  # the swapped-out old run, in the dead writer's folder
    w = RunWriter(run, overwrite=True)
    w.open()  # tidies it away
    w.abort()
    assert leftovers(run.parent, "run") == []
    assert meta == json.loads((run / "metadata.json").read_text())
