"""``diffviz sweep --executor ray`` on a local Ray cluster started once for this module (2 CPUs).

One sweep of two toy runs (32x32, 2 steps) on two workers, one of which is killed mid-run by the test-only
hook in capture.sweep.runner: the sweep still finishes, its maps equal the local executor's (same seeds,
one thread each) to 2e-3, and nothing half-written is listed in sweep.json or left in the folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from capture.sweep import cli  # noqa: E402
from capture.sweep.runner import DIE_ONCE_ENV  # noqa: E402
from export import sweep as S  # noqa: E402
from export.reader import open_run  # noqa: E402
from export.validate import validate_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--prompt", "a {colour} circle and a blue square", "--set", "colour=red", "--seeds", "0,1",
        "--num-steps", "2", "--height", "32", "--width", "32", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local cluster whose workers inherit the kill-once marker (set before ray.init) and the repo path."""
    marker = tmp_path_factory.mktemp("ray_marker") / "died"
    saved = {k: os.environ.get(k) for k in (DIE_ONCE_ENV, "RAY_USAGE_STATS_ENABLED", "PYTHONPATH")}
    os.environ[DIE_ONCE_ENV] = str(marker)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=100 * 2**20)
    # the driver itself must not die through the hook when the local reference runs in this process
    os.environ.pop(DIE_ONCE_ENV)
    try:
        yield marker
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _maps(folder: Path) -> dict[str, np.ndarray]:
    """Every cross and self map of a run, by (kind, layer, step)."""
    run = open_run(folder)
    assert run.has_cross and run.has_self
    maps = {}
    for layer in range(run.num_layers):
        for step in range(run.num_steps):
            maps[f"cross {layer} {step}"] = np.asarray(run.cross(layer, step), dtype=np.float64)
            maps[f"self {layer} {step}"] = np.asarray(run.self_attention(layer, step), dtype=np.float64)
    return maps


def test_ray_sweep_survives_a_killed_worker_and_matches_local(cluster, tmp_path):
    marker = cluster
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli.main(ARGS + ["--out", str(local)]) == 0
    assert not marker.exists()  # the hook is off in this process

    assert cli.main(ARGS + ["--out", str(remote), "--executor", "ray", "--workers", "2"]) == 0
    assert marker.exists()  # a worker really was killed at step 2 of a run

    doc = S.read_index(remote)
    names = [r["name"] for r in doc["runs"]]
    assert len(names) == 2 and [r["status"] for r in doc["runs"]] == ["done", "done"]
    assert sorted(p.name for p in remote.iterdir()) == sorted(names + ["sweep.json"])  # no dot-prefixed temp left
    for run in doc["runs"]:
        assert validate_run(remote / run["name"], strict=True) == []
        assert run["headline"] == S.headline(remote / run["name"])

    for name in names:
        want, got = _maps(local / name), _maps(remote / name)
        assert want and set(got) == set(want)
        worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
        assert worst <= 2e-3, f"{name}: maps differ by {worst}"
    # the two seeds differ, so the comparison above is not trivially equal
    a, b = (_maps(local / n) for n in names)
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) > 1e-4
