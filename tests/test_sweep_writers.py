"""``diffviz sweep`` against kills, a second writer and a full disk (issue 25): one writer per OUT (a lock naming
its holder, taken over from a dead one), an index write that a kill leaves old or new, temp files tidied, an
index rebuilt from the runs when it is missing or broken, and a full disk reported in one line.

Real processes throughout: ``diffviz sweep`` subprocesses of two toy runs (32x32, 2 steps), SIGKILL, a file-size
limit (``RLIMIT_FSIZE``, as ``prlimit --fsize``) and, where this user may mount one, a small tmpfs.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from capture.sweep import cli
from capture.sweep.lock import LOCK_FILE
from export import sweep as S
from export.validate_sweep import check_sweep

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--prompt", "a {colour} circle", "--set", "colour=red,green", "--num-steps", "2", "--height", "32",
        "--width", "32", "--threads", "1"]


def env() -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    out.pop("PYTHONUTF8", None)
    return out


def sweep_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "diffviz.py"), "sweep", *ARGS, "--out", str(out), *extra]


def wait_for(test, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not test():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited first ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def lock_pid(out: Path) -> int | None:
    try:
        return json.loads((out / LOCK_FILE).read_text()).get("pid")
    except (OSError, ValueError):
        return None


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def assert_whole(out: Path, runs: int = 2) -> None:
    """The sweep is complete and valid: every run done, checked (strict), nothing else left in OUT."""
    problems, doc = check_sweep(out, strict=True)
    assert not problems, problems.report()
    assert [r["status"] for r in doc["runs"]] == ["done"] * runs
    assert sorted(os.listdir(out)) == sorted([S.SWEEP_FILE] + [r["name"] for r in doc["runs"]])


# ============================================================================ one writer per OUT
def test_a_second_sweep_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "sweep"
    first = subprocess.Popen(sweep_cmd(out, "--quiet"), env=env(), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: lock_pid(out) == first.pid, 60, "the first sweep's lock", first)
        second = subprocess.run(sweep_cmd(out, "--quiet"), env=env(), capture_output=True, text=True, timeout=60)
        assert first.poll() is None, "the first sweep ended before the second was checked"
        line = one_error_line(second.stderr)
        assert second.returncode == 2 and "is being written by another diffviz sweep" in line
        assert f"(pid {first.pid} on {socket.gethostname()} since " in line
        # a SIGKILL mid-sweep: the next sweep takes the lock over, says so, and finishes every run
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert lock_pid(out) == first.pid  # the dead process's record is still there
    third = subprocess.run(sweep_cmd(out), env=env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"note: took over the lock of a sweep that is gone (pid {first.pid} on " in third.stderr
    assert_whole(out)


def test_the_lock_refuses_a_live_holder_and_is_released(tmp_path):
    from capture.sweep.lock import SweepLock, SweepLocked

    with SweepLock(tmp_path) as held:
        assert held.note is None and lock_pid(tmp_path) == os.getpid()
        with pytest.raises(SweepLocked, match=f"pid {os.getpid()} on "):
            SweepLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    os.mkfifo(tmp_path / LOCK_FILE)
    with pytest.raises(SweepLocked, match="not a regular file"):
        SweepLock(tmp_path).acquire()


# ============================================================================ kills during the index write
WRITER = textwrap.dedent("""
    import copy, sys
    from export import sweep as S
    doc = S.index_document("a {c}", [{"name": "c", "values": ["red", "green"]}], {"height": 32},
        [{"name": f"r{i}", "params": {"c": c}, "prompt": f"a {c}", "status": "pending", "error": None,
          "headline": None, "thumbnail": None} for i, c in enumerate(["red", "green"])])
    print("ready", flush=True)
    k = 0
    while True:  # the index alternates between two states, padded so that a write takes a while
        d = copy.deepcopy(doc)
        d["runs"][k % 2]["status"] = "failed"
        d["runs"][k % 2]["error"] = "x" * 900
        S.write_index(sys.argv[1], d)
        k += 1
""")


def test_a_kill_at_any_moment_leaves_the_old_or_the_new_index(tmp_path):
    rng = random.Random(25)
    seen_temp = 0
    for trial in range(12):
        out = tmp_path / f"t{trial}"
        out.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], env=env(), stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        temps = [p for p in os.listdir(out) if p.startswith(S.TEMP_PREFIX)]
        seen_temp += bool(temps)
        if (out / S.SWEEP_FILE).exists():
            doc = S.read_index(out)  # whole: one of the two states, never half a file
            assert sorted(r["status"] for r in doc["runs"]) == ["failed", "pending"]
        assert S.tidy_temps(out) == temps and not [p for p in os.listdir(out) if p.startswith(".")]


def test_a_kill_during_the_first_index_write_does_not_block_the_resume(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    # what a SIGKILL in the first write leaves: half a temp file, no sweep.json, and the dead sweep's lock record
    (out / f"{S.TEMP_PREFIX}99999999-0a1b2c3d").write_text('{"sweep_version": 1, "gener')
    (out / LOCK_FILE).write_text(json.dumps({"pid": 99999999, "host": socket.gethostname(), "started": "then"}))
    assert cli.main(ARGS + ["--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: took over the lock of a sweep that is gone (pid 99999999 on " in err
    assert f"note: removed 1 temp file(s) of an index write that was killed ({S.TEMP_PREFIX}99999999-0a1b2c3d)" in err
    assert_whole(out)


# ============================================================================ a missing or broken index
def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.name != S.SWEEP_FILE}


def test_resume_rebuilds_a_missing_or_broken_index_from_the_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(ARGS + ["--out", str(out), "--quiet"]) == 0
    index = S.read_index(out)
    files = _mtimes(out)
    for damage, said in ((lambda p: p.unlink(), "sweep.json was missing"),
                         (lambda p: p.write_text('{"runs": [1e999]}'), "sweep.json was unreadable (sweep.json: not "
                                                                         "valid JSON (number 1e999 overflows")):
        damage(out / S.SWEEP_FILE)
        capsys.readouterr()
        assert cli.main(ARGS + ["--out", str(out), "--quiet"]) == 0
        assert said in capsys.readouterr().err
        rebuilt = S.read_index(out)
        assert rebuilt["runs"] == index["runs"] and _mtimes(out) == files  # no run redone or touched
    # a broken index beside a finished run of other settings (another sweep's): refused, nothing touched
    other = json.loads((out / index["runs"][0]["name"] / "metadata.json").read_text())
    other["run"]["seed"] = 5
    (out / index["runs"][0]["name"] / "metadata.json").write_text(json.dumps(other))
    (out / S.SWEEP_FILE).write_text("{")
    before = _mtimes(out)
    capsys.readouterr()
    assert cli.main(ARGS + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"holds {index['runs'][0]['name']}, a finished run of other settings" in err and err.count("\n") == 1
    assert _mtimes(out) == before and (out / S.SWEEP_FILE).read_text() == "{"


# ============================================================================ a full disk
def test_a_file_size_limit_on_the_index_write_is_one_line(tmp_path):
    out = tmp_path / "sweep"

    def limit():  # as prlimit --fsize=1000: the first index (about 1.6 kB) cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    r = subprocess.run(sweep_cmd(out, "--quiet"), env=env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=limit)
    line = one_error_line(r.stderr)
    assert r.returncode == 1 and f"cannot write {out / S.SWEEP_FILE} (File too large)" in line, r.stderr
    assert "0 of 2 runs are done and kept" in line and "run the same command again to resume" in line
    assert not out.exists()  # nothing was written: no index, no temp file, no lock, not even the folder


DISK_FULL = textwrap.dedent("""
    import json, os, subprocess, sys, time
    mount, cmd = sys.argv[1], json.loads(sys.argv[2])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mount], check=True)
    out = os.path.join(mount, "sweep")
    proc = subprocess.Popen(cmd + ["--out", out], stderr=subprocess.PIPE, text=True)
    while not any(not n.startswith(".") and n != "sweep.json" for n in (os.listdir(out) if os.path.isdir(out) else [])):
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    with open(os.path.join(mount, "filler"), "wb") as fh:   # the disk fills up once the first run has landed
        try:
            while True:
                fh.write(b"x" * 65536)
                fh.flush()
        except OSError:
            pass
    err = proc.communicate()[1]
    from export.validate_sweep import check_sweep
    problems, doc = check_sweep(out, strict=True)
    first = {"code": proc.returncode, "stderr": err, "problems": problems.report(),
             "statuses": [r["status"] for r in doc["runs"]] if doc else None}
    os.unlink(os.path.join(mount, "filler"))
    again = subprocess.run(cmd + ["--out", out], capture_output=True, text=True)
    problems, doc = check_sweep(out, strict=True)
    print(json.dumps({"first": first, "again": again.returncode, "again_stderr": again.stderr[-2000:],
                      "problems": problems.report(), "statuses": [r["status"] for r in doc["runs"]] if doc else None,
                      "left": sorted(os.listdir(out))}))
""")


def test_a_full_disk_is_one_line_and_the_same_command_resumes(tmp_path):
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("no unshare/mount here")
    probe = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this user may not mount a tmpfs in a mount namespace")
    mount = tmp_path / "disk"
    mount.mkdir()
    cmd = [sys.executable, str(ROOT / "diffviz.py"), "sweep", *ARGS, "--set", "colour=red,green,yellow", "--quiet"]
    cmd.remove("colour=red,green")
    cmd.remove("--set")
    r = subprocess.run(["unshare", "-m", sys.executable, "-c", DISK_FULL, str(mount), json.dumps(cmd)], env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    first = got["first"]
    line = one_error_line(first["stderr"])
    assert first["code"] == 1 and "(No space left on device)" in line and "sweep.json" in line, first["stderr"]
    assert "runs are done and kept" in line and "run the same command again to resume" in line
    assert first["problems"] == [] and first["statuses"] is not None  # the index on disk is whole, its runs valid
    assert got["again"] == 0 and got["problems"] == [] and got["statuses"] == ["done"] * 3, got
    assert got["left"] == sorted(["sweep.json"] + [n for n in got["left"] if n.startswith("r")]) and len(got["left"]) == 4
