"""The local generator bridge's HTTP API, against a real bridge (tornado on a free loopback port, on a
thread of this process) with the embedded default model.

Generations are kept short (2-4 steps, one recorded layer, small maps) so the file runs in about a
minute on two shared cores; the browser test drives a longer one.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("torch")

from capture import bridge as bridge_mod  # noqa: E402
from capture import pipeline as pipeline_mod  # noqa: E402
from capture.bridge import Bridge, BridgeServer, ModelAllowList, Origins, RequestError  # noqa: E402
from capture.toyworld.world import VOCABULARY  # noqa: E402
from export import reader, validate  # noqa: E402
from export.writer import RunWriter  # noqa: E402
from tests.loopback import free_port  # noqa: E402
from tests.synthetic import write_synthetic_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Small but complete runs: every kind of file, one layer, strict-valid.
FAST = {"max_layers": 1, "attention_resolution": 8, "self_attention_resolution": 4, "device": "cpu"}
JOB_TIMEOUT = 300.0


# --------------------------------------------------------------------------- helpers


class Client:
    def __init__(self, base: str):
        self.base = base

    def call(self, method: str, path: str, body=None, *, headers=None, raw: bytes | None = None, timeout: float = 30):
        """(status, headers, decoded JSON or bytes)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, h, payload = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            status, h, payload = exc.code, exc.headers, exc.read()
        ctype = h.get("Content-Type", "")
        return status, h, (json.loads(payload) if ctype.startswith("application/json") and payload else payload)

    def raw_get(self, path: str, headers=None) -> tuple[int, bytes]:
        """GET with the path sent exactly as written (no client-side normalisation)."""
        host, port = self.base.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", f"{host}:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        out = resp.status, resp.read()
        conn.close()
        return out

    def submit(self, **settings) -> dict:
        status, _h, job = self.call("POST", "/jobs", {**FAST, **settings})
        assert status == 202, job
        return job

    def job(self, job_id: str) -> dict:
        status, _h, job = self.call("GET", f"/jobs/{job_id}")
        assert status == 200, job
        return job

    def wait(self, job_id: str, *, until=("done", "failed", "cancelled"), timeout: float = JOB_TIMEOUT,
             seen: list | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if seen is not None:
                seen.append(job)
            if job["state"] in until:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not reach {until} in {timeout} s: {job}")

    def wait_step(self, job_id: str, step: int) -> dict:
        """Wait until the job is denoising at ``step`` or later."""
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["stage"] == "denoising" and job["step"] >= step or job["state"] != "running" and job["state"] != "queued":
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached step {step}")


def leftovers(root: Path, name: str) -> list[str]:
    """The run folder and any temporary/backup folder the writer could have left for ``name``."""
    return sorted(p.name for p in root.iterdir() if p.name == name or p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bridge-datasets")


@pytest.fixture(scope="module")
def server(datasets: Path):
    srv = BridgeServer(Bridge(datasets, show_progress=False, log=lambda message: None), port=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: BridgeServer) -> Client:
    return Client(server.url)


@pytest.fixture(scope="module")
def first_run(client: Client, datasets: Path) -> dict:
    """One complete job, shared by the tests that read its run."""
    seen: list[dict] = []
    job = client.submit(prompt="a red circle and a blue square", num_steps=4, name="first", seed=3)
    done = client.wait(job["id"], seen=seen)
    return {"job": done, "seen": seen, "path": datasets / "first"}


# --------------------------------------------------------------------------- the API


def test_info_lists_the_default_model_and_limits(client: Client, datasets: Path) -> None:
    status, _h, info = client.call("GET", "/")
    assert status == 200
    assert info["service"] == "diffviz-bridge"
    assert info["datasets"] == str(datasets.resolve())
    assert [m["value"] for m in info["models"]] == ["default"]
    assert info["models"][0]["vocabulary"] == list(VOCABULARY) and "purple" not in VOCABULARY
    from capture import config

    assert info["limits"]["max_steps"] == config.MAX_STEPS
    assert info["defaults"]["num_steps"] == config.GenerateConfig(prompt="x").num_steps


def test_submit_poll_to_completion_gives_a_strictly_valid_run(client: Client, first_run: dict) -> None:
    job, seen, path = first_run["job"], first_run["seen"], first_run["path"]
    assert job["state"] == "done", job
    assert job["error"] is None and job["run"] == "first" and job["fraction"] == 1.0
    assert validate.validate_run(path, strict=True) == []
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["run"]["prompt"] == "a red circle and a blue square"
    assert meta["run"]["num_steps"] == 4 and meta["run"]["seed"] == 3
    assert len(meta["layers"]) == 1
    # the progress seen by polling only moves forward, through the denoising steps
    fractions = [j["fraction"] for j in seen]
    assert fractions == sorted(fractions)
    steps = {j["step"] for j in seen if j["stage"] == "denoising"}
    assert steps and max(steps) <= 4
    assert all(j["total"] == 4 for j in seen if j["stage"] == "denoising")
    eta = [j["eta_s"] for j in seen if j["stage"] == "denoising" and j["step"] >= 1]
    assert all(e is not None and e >= 0 for e in eta)


def test_runs_are_listed_and_served_byte_for_byte(client: Client, first_run: dict) -> None:
    path = first_run["path"]
    status, _h, listing = client.call("GET", "/runs")
    assert status == 200
    names = {r["name"]: r for r in listing["runs"]}
    assert names["first"]["prompt"] == "a red circle and a blue square"
    assert names["first"]["valid"] is True and names["first"]["url"] == "/runs/first/"
    manifest = json.loads((path / "metadata.json").read_text())["files"]
    some_bin = next(p for p in manifest if p.endswith(".bin"))
    for rel in ("metadata.json", "images/step_000.png", some_bin):
        status, headers, body = client.call("GET", f"/runs/first/{rel}")
        assert status == 200, rel
        data = body if isinstance(body, bytes) else json.dumps(body)
        if isinstance(body, bytes):
            assert data == (path / rel).read_bytes()
        else:
            assert body == json.loads((path / rel).read_text())
    assert client.call("GET", "/runs/first/images/step_000.png")[1]["Content-Type"] == "image/png"
    # the dashboard's URL reader opens the run straight from the bridge
    run = reader.open_run(f"{client.base}/runs/first/")
    assert run.metadata["run"]["prompt"] == "a red circle and a blue square"
    assert (run.image(3) == reader.open_run(str(path)).image(3)).all()


def test_a_queue_of_two_runs_in_order_with_the_model_loaded_once(client: Client, datasets: Path, monkeypatch) -> None:
    loads = []
    from diffusers import StableDiffusionPipeline

    original = StableDiffusionPipeline.from_pretrained

    def counting(*args, **kwargs):
        loads.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", counting)
    a = client.submit(prompt="a green square", num_steps=2, name="queue-a")
    b = client.submit(prompt="a blue circle", num_steps=2, name="queue-b")
    assert b["state"] == "queued" and b["position"] >= 1
    seen_b: list[dict] = []
    while True:
        ja, jb = client.job(a["id"]), client.job(b["id"])
        seen_b.append(jb)
        assert not (ja["state"] == "running" and jb["state"] == "running"), "two jobs ran at once"
        if jb["state"] == "running":
            assert ja["state"] == "done"
        if jb["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    ja, jb = client.job(a["id"]), client.job(b["id"])
    assert ja["state"] == jb["state"] == "done", (ja, jb)
    assert ja["finished"] <= jb["started"]
    assert any(j["state"] == "queued" for j in seen_b)
    for name, prompt in (("queue-a", "a green square"), ("queue-b", "a blue circle")):
        assert validate.validate_run(datasets / name, strict=True) == []
        assert json.loads((datasets / name / "metadata.json").read_text())["run"]["prompt"] == prompt
    assert len(loads) <= 1, f"the model was loaded {len(loads)} times for two jobs"
    # GET /jobs lists both, newest first
    listed = [j["id"] for j in client.call("GET", "/jobs")[2]["jobs"]]
    assert listed.index(b["id"]) < listed.index(a["id"])


def test_cancel_mid_run_leaves_nothing_behind(client: Client, datasets: Path) -> None:
    job = client.submit(prompt="a red circle", num_steps=40, name="cancel-me")
    waiting = client.submit(prompt="a red circle", num_steps=40, name="cancel-queued")
    running = client.wait_step(job["id"], 1)
    assert running["state"] == "running" and running["stage"] == "denoising" and running["step"] >= 1
    assert leftovers(datasets, "cancel-me"), "a running job builds its temporary folder beside the target"
    # a queued job is cancelled at once and never starts
    status, _h, q = client.call("DELETE", f"/jobs/{waiting['id']}")
    assert status == 200 and q["state"] == "cancelled"
    status, _h, c = client.call("DELETE", f"/jobs/{job['id']}")
    assert status == 200 and c["cancel_requested"] is True
    final = client.wait(job["id"])
    assert final["state"] == "cancelled", final
    assert final["step"] < 40
    assert client.job(waiting["id"])["started"] is None
    assert leftovers(datasets, "cancel-me") == []
    assert leftovers(datasets, "cancel-queued") == []


def test_a_failed_job_reports_its_error_and_leaves_no_half_written_run(client: Client, datasets: Path,
                                                                       monkeypatch) -> None:
    original = RunWriter.write_step

    def disk_full_at_step_1(self, step, *args, **kwargs):
        if step >= 1:
            raise OSError(28, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "write_step", disk_full_at_step_1)
    job = client.submit(prompt="a red circle", num_steps=3, name="fails")
    final = client.wait(job["id"])
    assert final["state"] == "failed"
    assert "No space left on device" in final["error"] and final["error_type"] == "OSError"
    assert "\n" not in final["error"]
    assert leftovers(datasets, "fails") == []


def test_a_client_that_disconnects_does_not_kill_the_job(server: BridgeServer, client: Client, datasets: Path) -> None:
    body = json.dumps({**FAST, "prompt": "a red circle", "num_steps": 2, "name": "orphan"}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    sock.close()  # gone before reading the answer
    deadline = time.monotonic() + 30
    job = None
    while job is None and time.monotonic() < deadline:
        job = next((j for j in client.call("GET", "/jobs")[2]["jobs"] if j["run"] == "orphan"), None)
        time.sleep(0.1)
    assert job is not None, "the job of the vanished client was never queued"
    assert client.wait(job["id"])["state"] == "done"
    assert validate.validate_run(datasets / "orphan", strict=True) == []


def test_a_cancel_is_honoured_at_every_event_before_the_final_rename() -> None:
    """The bridge turns a cancel into ``Cancelled`` at any progress event up to ("validating", 0), while
    ``RunWriter`` can still drop the temporary folder; after the rename it only records that it came too late."""
    from capture.config import GenerateConfig
    from capture.progress import Cancelled, Progress

    events = [Progress("loading model", 0, 1), Progress("loading model", 1, 1), Progress("denoising", 0, 3),
              Progress("denoising", 2, 3), Progress("analysis", 0, 1), Progress("writing", 1, 1),
              Progress("validating", 0, 1)]
    for event in events:
        job = bridge_mod.Job(id="x", name="x", config=GenerateConfig(prompt="x"))
        job.on_progress(event)  # no cancel: recorded
        assert (job.stage, job.step, job.total) == (event.stage, event.step, event.total)
        job.cancel.set()
        with pytest.raises(Cancelled):
            job.on_progress(event)
    for event in (Progress("validating", 1, 1), Progress("done", 1, 1)):
        job = bridge_mod.Job(id="x", name="x", config=GenerateConfig(prompt="x"))
        job.cancel.set()
        job.on_progress(event)
        assert job.cancel_too_late


#: A prompt the toy model takes, for requests refused for some other setting.
OK = "a red circle"
BAD = [
    ({"prompt": OK, "cfg_scale": 1000}, "cfg_scale"),
    ({"prompt": OK, "cfg_scale": "high"}, "cfg_scale"),
    ({"prompt": OK, "num_steps": 0}, "num_steps"),
    ({"prompt": OK, "num_steps": 5000}, "num_steps"),
    ({"prompt": OK, "num_steps": 2.5}, "num_steps"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a " * 1001}, "prompt"),
    ({"negative_prompt": "y"}, "prompt"),
    ({"prompt": OK, "attention_resolution": 999}, "attention_resolution"),
    ({"prompt": OK, "self_attention_resolution": 0}, "self_attention_resolution"),
    ({"prompt": OK, "seed": -1}, "seed"),
    ({"prompt": OK, "height": 64, "width": 36}, "width"),
    ({"prompt": OK, "height": 30}, "height"),
    ({"prompt": OK, "device": "tpu"}, "device"),
    ({"prompt": OK, "layers": "no_such_block.*"}, "layers"),
    ({"prompt": OK, "bogus": 1}, "bogus"),
    ({"prompt": "a purple dog"}, "prompt"),
    ({"prompt": OK, "negative_prompt": "blurry"}, "negative_prompt"),
    ({"prompt": OK, "name": "../escape"}, "name"),
    ({"prompt": OK, "name": ".hidden"}, "name"),
    ({"prompt": OK, "output_dir": "/tmp/elsewhere"}, "output_dir"),
    ({"prompt": OK, "name": "first"}, "name"),  # exists, no overwrite
    ({"prompt": OK, "num_steps": 500, "max_dataset_mb": 0.01, "enforce_size_limit": True}, "max_dataset_mb"),
]


@pytest.mark.parametrize("settings, field", BAD, ids=[f for _s, f in BAD])
def test_bad_parameters_get_400_naming_the_field(client: Client, datasets: Path, first_run: dict,
                                                 settings: dict, field: str) -> None:
    before = sorted(p.name for p in datasets.iterdir())
    status, _h, answer = client.call("POST", "/jobs", settings)
    assert status == 400, answer
    assert answer["field"] == field
    assert field.split("_")[0] in answer["error"].replace("-", "_")
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
    assert sorted(p.name for p in datasets.iterdir()) == before


def test_unknown_words_for_the_toy_model_get_one_line_and_touch_nothing(client: Client, datasets: Path,
                                                                        first_run: dict) -> None:
    from tests.test_cli_generate import snapshot

    before, jobs = snapshot(datasets), _jobs_count(client)
    for body in ({"prompt": "A purple dog.", "name": "purple"},
                 {"prompt": "a purple dog", "name": "first", "overwrite_output": True}):
        status, _h, answer = client.call("POST", "/jobs", {**FAST, **body})
        assert status == 400 and answer["field"] == "prompt", answer
        assert answer["error"].startswith("--prompt: unknown words for the toy model: purple, dog (it knows: a, and, ")
        assert "\n" not in answer["error"]
    assert snapshot(datasets) == before and _jobs_count(client) == jobs


def test_bodies_that_are_not_json_objects_or_too_big_are_refused(client: Client) -> None:
    status, _h, answer = client.call("POST", "/jobs", raw=b"{not json")
    assert status == 400 and answer["field"] == "body"
    status, _h, answer = client.call("POST", "/jobs", [1, 2])
    assert status == 400 and answer["field"] == "body"
    status, _h, answer = client.call("POST", "/jobs", raw=json.dumps({"prompt": "x" * 100_000}).encode())
    assert status == 413 and answer["field"] == "body"
    status, _h, answer = client.call("POST", "/jobs", raw=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
    assert status == 415
    status, _h, answer = client.call("GET", "/jobs/0123456789ab")
    assert status == 404 and "no job" in answer["error"]


def test_paths_that_escape_the_datasets_folder_are_refused(client: Client, datasets: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_synthetic_run(outside / "secret-run", prompt="secret")
    (outside / "secret.txt").write_text("secret")
    write_synthetic_run(datasets / "synth", prompt="synthetic")
    (datasets / "synth" / "leak.txt").symlink_to(outside / "secret.txt")
    (datasets / "linked-run").symlink_to(outside / "secret-run", target_is_directory=True)
    assert client.raw_get("/runs/synth/metadata.json")[0] == 200
    for path in [
        "/runs/synth/../../etc/passwd",
        "/runs/synth/..%2F..%2Fetc%2Fpasswd",
        "/runs/synth/%2e%2e/%2e%2e/etc/passwd",
        "/runs/synth//etc/passwd",
        "/runs/synth/%2Fetc%2Fpasswd",
        "/runs/..%2F..%2Fetc/passwd",
        "/runs/%2e%2e/metadata.json",
        "/runs/synth/images/..%5C..%5Cmetadata.json",
        "/runs/synth/leak.txt",                # a symlink inside the run that points outside
        "/runs/linked-run/metadata.json",      # a run folder that is a symlink out
        "/runs/synth/no-such-file.bin",
        "/runs/nope/metadata.json",
    ]:
        status, body = client.raw_get(path)
        assert status in (400, 404), (path, status)
        assert b"secret" not in body and b"root:" not in body, path
    names = [r["name"] for r in client.call("GET", "/runs")[2]["runs"]]
    assert "synth" in names and "linked-run" not in names


def test_cors_only_for_allowed_origins(client: Client) -> None:
    for origin in ("http://localhost:5006", "http://127.0.0.1:41234", "http://localhost"):
        _s, headers, _b = client.call("GET", "/", headers={"Origin": origin})
        assert headers.get("Access-Control-Allow-Origin") == origin
    for origin in ("http://evil.example", "https://localhost.evil.example:5006", "null", "http://localhost.:80x"):
        status, headers, _b = client.call("GET", "/", headers={"Origin": origin})
        assert status == 200 and headers.get("Access-Control-Allow-Origin") is None, origin
    # the preflight
    status, headers, _b = client.call("OPTIONS", "/jobs", headers={
        "Origin": "http://localhost:5006", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type", "Access-Control-Request-Private-Network": "true"})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "http://localhost:5006"
    assert "POST" in headers["Access-Control-Allow-Methods"] and "DELETE" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"].lower() == "content-type"
    assert headers["Access-Control-Allow-Private-Network"] == "true"
    status, headers, _b = client.call("OPTIONS", "/jobs", headers={"Origin": "http://evil.example",
                                                                   "Access-Control-Request-Method": "POST"})
    assert status == 403 and headers.get("Access-Control-Allow-Origin") is None
    # a disallowed origin cannot start or cancel jobs even without a preflight
    before = len(client.call("GET", "/jobs")[2]["jobs"])
    status, headers, answer = client.call("POST", "/jobs", {**FAST, "prompt": "x"}, headers={"Origin": "http://evil.example"})
    assert status == 403 and headers.get("Access-Control-Allow-Origin") is None
    assert len(client.call("GET", "/jobs")[2]["jobs"]) == before
    # errors still carry the header for allowed origins, so the page can read them
    status, headers, answer = client.call("POST", "/jobs", {"prompt": ""}, headers={"Origin": "http://localhost:5006"})
    assert status == 400 and headers["Access-Control-Allow-Origin"] == "http://localhost:5006"
    # DNS rebinding: a foreign Host header is refused
    status, body = client.raw_get("/", headers={})  # Host is 127.0.0.1:PORT
    assert status == 200
    host, port = client.base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/runs", headers={"Host": f"evil.example:{port}"})
    assert conn.getresponse().status == 403
    conn.close()


def test_origin_lists() -> None:
    custom = Origins(["https://me.github.io"])
    assert custom.allows("https://me.github.io") and custom.allows("https://me.github.io/")
    assert not custom.allows("http://localhost:5006") and not custom.allows("https://you.github.io")
    os.environ[bridge_mod.PAGES_ORIGIN_ENV] = "https://pages.example.org"
    try:
        default = Origins.default()
    finally:
        del os.environ[bridge_mod.PAGES_ORIGIN_ENV]
    assert default.allows("https://pages.example.org") and default.allows("http://127.0.0.1:1")
    assert not default.allows("http://pages.example.org") and not default.allows("https://127.0.0.1:5006")
    with pytest.raises(ValueError):
        Origins(["ftp://x"])


def test_model_paths_need_the_allow_list(client: Client, datasets: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(pipeline_mod.DEFAULT_MODEL_DIR, tmp_path / "mymodel"))
    for model in (str(copy), "/tmp", "someone/some-model", str(ROOT)):
        status, _h, answer = client.call("POST", "/jobs", {"prompt": "x", "model": model})
        assert status in (400, 403) and answer["field"] == "model", (model, answer)
    assert leftovers(datasets, "x") == []
    # the default model is always allowed, by name or by its folder
    assert ModelAllowList().resolve("default") is None
    assert ModelAllowList().resolve(str(pipeline_mod.DEFAULT_MODEL_DIR)) is None
    alias = tmp_path / "alias"
    alias.symlink_to(pipeline_mod.DEFAULT_MODEL_DIR, target_is_directory=True)
    assert ModelAllowList().resolve(str(alias)) is None  # resolves to the default folder
    # a bridge started with --allow-model accepts that folder (checked with the CLI's rules too)
    allowed = Bridge(datasets, models=[str(copy)], show_progress=False, log=lambda m: None)
    try:
        job = allowed.make_job({**FAST, "prompt": "a red circle", "model": str(copy), "name": "allowed-model"})
        assert job.config.model == str(copy) and job.config.output_dir == str(datasets.resolve() / "allowed-model")
        with pytest.raises(RequestError) as info:
            allowed.make_job({"prompt": "x", "model": "/tmp"})
        assert info.value.field == "model"
        assert [m["value"] for m in allowed.info()["models"]] == ["default", str(copy)]
        # the copy is the toy model: listed with its vocabulary, and held to it
        assert allowed.info()["models"][1]["vocabulary"] == list(VOCABULARY)
        with pytest.raises(RequestError) as info:
            allowed.make_job({"prompt": "a purple dog", "model": str(copy)})
        assert info.value.status == 400 and info.value.field == "prompt" and "purple, dog" in str(info.value)
    finally:
        allowed.jobs.stop()


# --------------------------------------------------------------------------- hostile requests and runs (issue 14)


def _jobs_count(client: Client) -> int:
    status, _h, answer = client.call("GET", "/jobs", timeout=5)
    assert status == 200, answer
    return len(answer["jobs"])


def test_a_fifo_in_a_run_freezes_no_client(client: Client, datasets: Path) -> None:
    run = write_synthetic_run(datasets / "fifo-run", prompt="fifo")
    (run / "validation.json").unlink()
    os.mkfifo(run / "validation.json")   # opened the old way, this read would wait for a writer forever
    os.mkfifo(run / "images" / "trap.png")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        runs = pool.submit(client.call, "GET", "/runs", timeout=5)
        info = pool.submit(client.call, "GET", "/", timeout=5)
        status, _h, listing = runs.result()
        assert info.result()[0] == 200
    assert status == 200
    fifo = next(r for r in listing["runs"] if r["name"] == "fifo-run")
    assert fifo["prompt"] == "fifo" and fifo["valid"] is None
    for rel in ("validation.json", "images/trap.png"):
        status, _h, answer = client.call("GET", f"/runs/fifo-run/{rel}", timeout=5)
        assert status == 404 and "not a regular file" in answer["error"], answer
    assert client.call("GET", "/runs/fifo-run/", timeout=5)[2]["valid"] is None


def test_a_metadata_json_linked_out_of_its_run_is_neither_listed_nor_served(client: Client, datasets: Path,
                                                                             tmp_path: Path) -> None:
    secret = write_synthetic_run(tmp_path / "outside" / "secret-run", prompt="the secret prompt")
    sibling = write_synthetic_run(datasets / "meta-source", prompt="a sibling's prompt")
    for name, target in (("meta-out", secret), ("meta-sibling", sibling)):  # out of datasets; out of the run
        (datasets / name / "images").mkdir(parents=True)
        (datasets / name / "metadata.json").symlink_to(target / "metadata.json")
        shutil.copy(target / "images" / "step_000.png", datasets / name / "images" / "step_000.png")
    status, _h, listing = client.call("GET", "/runs")
    names = [r["name"] for r in listing["runs"]]
    assert status == 200 and "meta-source" in names
    assert "meta-out" not in names and "meta-sibling" not in names
    others = json.dumps([r for r in listing["runs"] if r["name"] != "meta-source"])
    assert "the secret prompt" not in others and "a sibling's prompt" not in others
    for name in ("meta-out", "meta-sibling"):
        for path in (f"/runs/{name}/", f"/runs/{name}/metadata.json", f"/runs/{name}/images/step_000.png"):
            status, body = client.raw_get(path)
            assert status == 404 and b"secret" not in body and b"prompt" not in body, (path, body)


def test_the_cost_of_a_job_is_checked_before_it_is_queued(server: BridgeServer, client: Client, datasets: Path) -> None:
    from capture import run
    from capture.bridge.policy import job_cost
    from capture.config import GenerateConfig

    big = {"prompt": "a red circle", "height": 512, "width": 512, "self_attention_resolution": 256,
           "max_layers": 1, "device": "cpu"}
    before, jobs = sorted(p.name for p in datasets.iterdir()), _jobs_count(client)
    status, _h, answer = client.call("POST", "/jobs", {**big, "name": "too-big"})
    assert status == 400, answer
    assert answer["field"] in ("height", "width", "self_attention_resolution"), answer
    assert answer["field"].split("_")[0] in answer["error"] and "GB" in answer["error"]
    assert "--max-job-gb" in answer["error"] and "cap of 2 GB" in answer["error"]
    assert _jobs_count(client) == jobs and sorted(p.name for p in datasets.iterdir()) == before
    # the estimate itself: the one recorded layer (up_blocks.0, 64x64 native, 8 heads) keeps its self keys,
    # so the recorder holds scores and softmax of [8, 4096, 4096] float32, and writes 30 maps of 4096^2 halfs
    config, prepared = run.check(GenerateConfig(**big), size_warning=False)
    cost = job_cost(prepared, config)
    assert cost.peak_bytes >= 2 * 8 * 4096 ** 2 * 4 and cost.map_bytes >= 30 * 4096 ** 2 * 2
    assert cost.total > 2e9 and cost.limiting[0] == answer["field"]
    # the default request is accepted, well within the cap; a bridge with a larger cap takes the big one
    default = server.bridge.make_job({"prompt": "a red circle"})
    assert default.cost is not None and default.cost.total < 0.1e9 and default.prepared is not None
    roomy = Bridge(datasets, show_progress=False, log=lambda m: None, max_job_gb=20)
    try:
        assert roomy.make_job({**big, "name": "fits-here"}).cost.total == cost.total
    finally:
        roomy.jobs.stop()


def test_the_job_runs_on_the_checked_plan_and_still_warns(client: Client, monkeypatch) -> None:
    """The Prepared of the request's checks goes into the job: the model's configs are peeked once."""
    from capture import pipeline as pipeline_mod

    peeks = []
    original = pipeline_mod.peek_model
    monkeypatch.setattr(pipeline_mod, "peek_model", lambda model: peeks.append(model) or original(model))
    job = client.submit(prompt="a red circle", num_steps=2, name="planned-once", max_dataset_mb=0.001)
    final = client.wait(job["id"])
    assert final["state"] == "done", final
    assert len(peeks) == 1, peeks
    # the plan's size warning (which the silent request check did not give) is the job's, as from generate
    assert any("projected" in w and "max-dataset-mb" in w for w in final["warnings"]), final["warnings"]


SURROGATE_BODIES = [
    ({"prompt": "x", "negative_prompt": "bad \ud800 text"}, "negative_prompt"),
    ({"prompt": "a \udfff"}, "prompt"),
    ({"prompt": "x", "model": "/tmp/\ud800"}, "model"),
    ({"prompt": "x", "name": "run\udc80"}, "name"),
    ({"prompt": "x", "layers": ["down_blocks.*", "\ud83d"]}, "layers"),
    ({"prompt": "x", "device": "cpu\x00"}, "device"),
    ({"prompt": "x", "\ud800": 1}, "body"),
]


def test_lone_surrogates_get_400_and_nothing_is_queued(client: Client, datasets: Path) -> None:
    before, jobs = sorted(p.name for p in datasets.iterdir()), _jobs_count(client)
    for body, field in SURROGATE_BODIES:
        status, _h, answer = client.call("POST", "/jobs", raw=json.dumps(body).encode())  # \\ud800 escapes
        assert status == 400 and answer["field"] == field, (body, answer)
        assert _jobs_count(client) == jobs  # GET /jobs answers 200, and nothing was added
    assert sorted(p.name for p in datasets.iterdir()) == before
    # a job that cannot be described in full is still listed
    broken = bridge_mod.Job(id="x", name="x", config=object())
    assert broken.snapshot()["id"] == "x" and broken.snapshot()["snapshot_error"] == "AttributeError"


def test_bodies_too_deep_or_with_numbers_out_of_range_get_400(client: Client) -> None:
    jobs = _jobs_count(client)
    status, _h, answer = client.call("POST", "/jobs", raw=b"[" * 20000 + b"]" * 20000)
    assert status == 400 and answer["field"] == "body" and "nested deeper" in answer["error"], answer
    deep = b'{"prompt": "x", "layers": ' + b"[" * 100 + b"]" * 100 + b"}"
    assert client.call("POST", "/jobs", raw=deep)[2]["field"] == "body"
    status, _h, answer = client.call("POST", "/jobs", raw=b'{"prompt": "x", "cfg_scale": 1' + b"0" * 399 + b"}")
    assert status == 400 and answer["field"] == "cfg_scale" and "400-digit" in answer["error"], answer
    status, _h, answer = client.call("POST", "/jobs", raw=b'{"prompt": "x", "seed": 1' + b"0" * 30 + b"}")
    assert status == 400 and answer["field"] == "seed", answer
    status, _h, answer = client.call("POST", "/jobs", raw=b'{"prompt": "x", "cfg_scale": 1e999}')
    assert status == 400 and "overflows" in answer["error"], answer
    assert _jobs_count(client) == jobs


def test_long_paths_get_4xx_without_an_absolute_path(client: Client, datasets: Path) -> None:
    write_synthetic_run(datasets / "paths-run", prompt="paths")
    root = str(datasets.resolve()).encode()
    for path in ("/runs/paths-run/" + "a/" * 3000 + "x.bin", "/runs/paths-run/" + "b" * 300 + ".bin",
                 "/runs/" + "c" * 3000 + "/metadata.json", "/runs/" + "d" * 3000 + "/", "/nope/" + "e/" * 3000):
        status, body = client.raw_get(path)
        assert 400 <= status < 500, (path[:40], status, body[:200])
        assert root not in body and len(body) < 2000, body[:200]


def test_an_unexpected_error_is_a_500_without_paths(server: BridgeServer, client: Client, datasets: Path,
                                                    monkeypatch) -> None:
    def broken() -> list:
        raise OSError(f"cannot read {datasets.resolve()}/secret")

    monkeypatch.setattr(server.bridge, "runs", broken)
    status, _h, answer = client.call("GET", "/runs")
    assert status == 500 and answer["status"] == 500 and "OSError" in answer["error"]
    assert str(datasets.resolve()) not in answer["error"] and "secret" not in answer["error"]


def test_stale_partial_folders_are_removed_at_start_up(tmp_path: Path, capsys) -> None:
    ds = tmp_path / "ds"
    keep = write_synthetic_run(ds / "keep", prompt="keep me")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    stale = [ds / f".keep.partial-{dead.pid}-0123abcd", ds / f".run-20260101-000000-ab12.partial-{dead.pid}-00ff00ff"]
    for folder in stale:
        (folder / "attention").mkdir(parents=True)
        (folder / "metadata.json").write_text("{}")
    backup = ds / f".gone.old-{dead.pid}-0badf00d"   # a swap killed between its two renames
    shutil.copytree(keep, backup)
    alive = ds / f".busy.partial-{os.getpid()}-feedface"   # a live writer's (this process)
    other = ds / ".keep.partial-not-a-writer"
    alive.mkdir()
    other.mkdir()
    bridge = Bridge(ds, show_progress=False)   # the default log: stderr
    bridge.jobs.stop()
    assert not any(folder.exists() for folder in stale)
    assert alive.is_dir() and other.is_dir() and not backup.exists()
    assert validate.validate_run(keep, strict=True) == []
    assert json.loads((ds / "gone" / "metadata.json").read_text())["run"]["prompt"] == "keep me"
    err = capsys.readouterr().err
    assert all(f"removed {folder.name}" in err for folder in stale) and f"restored {backup.name}" in err, err
    assert sorted(bridge.tidied) == sorted([backup.name, *(f.name for f in stale)])


# --------------------------------------------------------------------------- the command


def test_command_line_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, needle in (
        (["--port", "70000"], "--port"),
        (["--port", "x"], "--port"),
        (["--datasets", str(a_file)], "--datasets"),
        (["--allow-origin", "ftp://x"], "--allow-origin"),
        (["--allow-model", str(tmp_path / "missing" / "model")], "--allow-model"),
        (["--max-job-gb", "0"], "--max-job-gb"),
        (["--max-job-gb", "nan"], "--max-job-gb"),
        (["--bogus"], "--bogus"),
    ):
        assert bridge_mod.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("diffviz bridge: error:") and needle in err and "\n" not in err, err
    assert not (tmp_path / "missing").exists()


def test_the_command_listens_on_loopback_only_and_stops_on_sigterm(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    port = free_port()
    log = tmp_path / "bridge.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "diffviz", "bridge", "--port", str(port), "--datasets",
                                 str(tmp_path / "ds"), "--quiet"], cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        info = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    info = json.loads(resp.read())
                break
            except OSError:
                time.sleep(0.3)
        assert info is not None, log.read_text()
        assert info["datasets"] == str((tmp_path / "ds").resolve())
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        # the port is not reachable on any other address of this machine
        others = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")}
        for address in others:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((address, port)) != 0, address
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        assert "listening on http://127.0.0.1:" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
