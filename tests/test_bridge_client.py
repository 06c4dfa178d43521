"""The dashboard's side of the bridge: ``app.bridge_client`` and the "Local generator" panel, against a
real bridge on a free loopback port (in this process), and the app's promise never to import ``capture``."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import pytest

from app import bridge_client
from app.bridge_client import BridgeClient, BridgeError, describe, normalise_base
from tests.loopback import free_port


def run_async(coro):
    """``asyncio.run`` on a thread of its own: the browser tests' Playwright session keeps an event loop
    running on the main thread for the rest of the pytest process."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


ROOT = Path(__file__).resolve().parents[1]
FAST = {"max_layers": 1, "attention_resolution": 8, "self_attention_resolution": 4}


def test_the_app_side_never_imports_capture_or_torch() -> None:
    code = ("import sys, app.bridge_client, app.views.generator, app.shell; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('capture', 'torch', 'diffusers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_addresses_and_job_descriptions() -> None:
    assert normalise_base(" http://127.0.0.1:8765/ ") == "http://127.0.0.1:8765"
    for bad in ("", "127.0.0.1:8765", "ftp://x", "http://"):
        with pytest.raises(BridgeError):
            normalise_base(bad)
    assert BridgeClient("http://localhost:9/").run_url("my run") == "http://localhost:9/runs/my%20run/"
    running = {"state": "running", "stage": "denoising", "step": 12, "total": 30, "eta_s": 7.6}
    assert describe(running) == "denoising · step 12/30 · ETA 8 s"
    assert describe({"state": "queued", "position": 2}) == "queued (position 2)"
    assert describe({"state": "failed", "error": "boom"}) == "failed: boom"
    assert describe({**running, "cancel_requested": True}).endswith("cancelling…")


def _closed_port() -> int:
    return free_port()


# --------------------------------------------------------------------------- against a real bridge


@pytest.fixture(scope="module")
def bridge_url(tmp_path_factory):
    pytest.importorskip("torch")
    from capture.bridge import Bridge, BridgeServer

    datasets = tmp_path_factory.mktemp("client-datasets")
    srv = BridgeServer(Bridge(datasets, show_progress=False, log=lambda m: None), port=0).start()
    yield srv.url
    srv.stop()


def test_client_talks_to_the_bridge(bridge_url: str) -> None:
    client = BridgeClient(bridge_url)
    info = run_async(client.info())
    assert info["service"] == "diffviz-bridge" and info["models"][0]["value"] == "default"
    with pytest.raises(BridgeError) as refused:
        run_async(client.submit({"prompt": "x", "num_steps": 0}))
    assert refused.value.status == 400 and refused.value.field == "num_steps" and "num" in str(refused.value)
    with pytest.raises(BridgeError) as missing:
        run_async(client.job("0123456789ab"))
    assert missing.value.status == 404
    with pytest.raises(BridgeError) as down:
        run_async(BridgeClient(f"http://127.0.0.1:{_closed_port()}").info())
    assert down.value.unreachable and "unreachable" in str(down.value)
    assert run_async(client.runs()) == []


def test_the_panel_generates_watches_and_opens_the_run(bridge_url: str) -> None:
    pytest.importorskip("torch")
    from app.shell import Dashboard
    from app.state import State
    from app.views.generator import BAR_MAX, GeneratorPanel

    state = State(dataset="")
    dashboard = Dashboard(state=state, sync_url=False)
    panel = dashboard.generator
    assert isinstance(panel, GeneratorPanel), "the shell did not pick up the generator panel"
    assert ("Local generator", panel) in dashboard.sections()

    async def scenario() -> list[dict]:
        # unreachable first
        panel.url_box.value = f"http://127.0.0.1:{_closed_port()}"
        assert await panel.check() is False and panel.reachable is False
        assert "unreachable" in panel.status.object
        panel.url_box.value = bridge_url
        assert await panel.check() is True and panel.reachable is True
        assert "reachable" in panel.status.object and list(panel.model.options.values()) == ["default"]
        # a refused form names the setting
        panel.prompt.value = "a blue square"
        panel.cfg.value = 1000.0
        assert await panel.generate() is None
        assert "cfg_scale" in panel.message.object and panel.generate_button.disabled is False
        # a good one: submit, poll to the end
        panel.cfg.value = 4.0
        panel.steps.value = 3
        panel.seed.value = 5
        panel.max_layers.value = FAST["max_layers"]
        panel.cross_res.value = FAST["attention_resolution"]
        panel.self_res.value = FAST["self_attention_resolution"]
        panel.run_name.value = "from-panel"
        job = await panel.generate()
        assert job is not None and job["run"] == "from-panel"
        assert panel.generate_button.disabled and not panel.cancel_button.disabled
        seen = []
        for _ in range(3000):
            snap = await panel.poll()
            if snap is not None:
                seen.append((snap["fraction"], panel.progress.value, panel.stage.object))
                if snap["state"] in bridge_client.FINAL_STATES:
                    break
            await asyncio.sleep(0.1)
        return seen

    seen = run_async(scenario())
    assert panel.job["state"] == "done", panel.job
    assert panel.progress.value == BAR_MAX
    bars = [bar for _f, bar, _s in seen]
    assert bars == sorted(bars) and all(bar == round(f * BAR_MAX) for f, bar, _s in seen)
    assert "done · run from-panel" in seen[-1][2]
    expected = f"{bridge_url}/runs/from-panel/"
    assert state.dataset == expected
    # the shell opened it from the bridge: the run shown is the new one
    assert dashboard.store.run is not None and dashboard.store.run.prompt == "a blue square"
    assert "a blue square" in dashboard.run_info.object
    meta = json.loads(urllib.request.urlopen(expected + "metadata.json", timeout=30).read())
    assert meta["run"]["cfg_scale"] == 4.0 and meta["run"]["seed"] == 5 and meta["run"]["num_steps"] == 3
    assert panel.generate_button.disabled is False and panel.cancel_button.disabled is True


def test_the_pyodide_branch_uses_pyfetch(bridge_url: str, monkeypatch) -> None:
    """Under Pyodide the client calls ``pyodide.http.pyfetch``; here a stand-in with its interface
    (``await pyfetch(url, method=, headers=, body=)`` -> response with ``.status`` and ``await .string()``)
    performs the request, so the branch's request/response handling is exercised against the real bridge."""
    calls = []

    class Response:
        def __init__(self, status: int, text: str):
            self.status, self._text = status, text

        async def string(self) -> str:
            return self._text

    async def pyfetch(url, method="GET", headers=None, body=None):
        calls.append((method, url, headers, body))
        req = urllib.request.Request(url, data=body.encode() if body is not None else None, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return Response(resp.status, resp.read().decode())
        except urllib.error.HTTPError as exc:
            return Response(exc.code, exc.read().decode())
        except urllib.error.URLError as exc:
            raise OSError(f"TypeError: Failed to fetch ({exc.reason})") from None

    fake = types.ModuleType("pyodide.http")
    fake.pyfetch = pyfetch
    monkeypatch.setitem(sys.modules, "pyodide", types.ModuleType("pyodide"))
    monkeypatch.setitem(sys.modules, "pyodide.http", fake)
    monkeypatch.setattr(bridge_client, "IN_BROWSER", True)

    client = BridgeClient(bridge_url)
    assert run_async(client.info())["service"] == "diffviz-bridge"
    with pytest.raises(BridgeError) as refused:
        run_async(client.submit({"prompt": "x", "seed": -4}))
    assert refused.value.field == "seed" and refused.value.status == 400
    method, url, headers, body = calls[-1]
    assert method == "POST" and url == f"{bridge_url}/jobs" and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"prompt": "x", "seed": -4}
    with pytest.raises(BridgeError) as down:
        run_async(BridgeClient(f"http://127.0.0.1:{_closed_port()}").info())
    assert down.value.unreachable and "--allow-origin" in str(down.value)


# --------------------------------------------------------------------------- the toy model's words

WORD_CASES = ["a purple dog", "a red circle", "A RED Circle, and a blue square!", "the red's circle", "3 red circles",
              "Dog, dog and a PURPLE dog", "naïve Ünïcode words", "snake_case and hy-phens", " ,.;! ", ""]


def test_the_panel_checks_words_as_the_bridge_does() -> None:
    """The app may not import capture: both sides split words with ``export.words``, and the tab must say the
    bridge's line for the same prompt."""
    pytest.importorskip("torch")
    from app.views import generator
    from capture.config import ConfigError, GenerateConfig
    from capture.toyworld import vocabulary

    words = list(vocabulary.VOCABULARY)
    for text in WORD_CASES:
        assert generator.unknown_words(text, words) == vocabulary.unknown_words(text), text
        unknown = vocabulary.unknown_words(text)
        if unknown and text.strip():
            with pytest.raises(ConfigError) as info:
                GenerateConfig(prompt=text).check_words()
            assert generator.refusal("--prompt", unknown, words) == str(info.value)
    assert generator.unknown_words("a purple dog", words) == ["purple", "dog"]


def test_the_panel_lists_the_vocabulary_and_refuses_unknown_words(bridge_url: str) -> None:
    pytest.importorskip("torch")
    from app.state import State
    from app.views.generator import GeneratorPanel
    from capture.toyworld.world import VOCABULARY

    panel = GeneratorPanel(State(dataset=""), check_on_load=False)

    async def scenario() -> dict:
        out = {}
        panel.url_box.value = f"http://127.0.0.1:{_closed_port()}"
        assert await panel.check() is False
        out["down"] = panel.status.object
        assert panel.words.visible is False  # no bridge, no vocabulary known
        panel.url_box.value = bridge_url
        assert await panel.check() is True
        out["vocabulary"] = panel.words.object
        panel.prompt.value_input = "a purple dog"  # as typed, before the box commits its value
        out["typed"] = panel.words.object
        panel.prompt.value = "a purple dog"
        jobs_before = len((await panel.client.request("GET", "/jobs"))["jobs"])
        out["sent"] = await panel.generate()
        out["not_sent"] = panel.message.object
        out["jobs"] = len((await panel.client.request("GET", "/jobs"))["jobs"]) - jobs_before
        panel.prompt.value_input = "a red circle"  # fixed: the note and the "Not sent" go
        out["fixed"] = (panel.words.object, panel.message.object)
        panel.prompt.value = panel.prompt.value_input = "a purple dog"
        # without the client-side list, the bridge's own 400 comes back and is shown
        panel._vocabularies = {}
        panel._on_words()
        out["unlisted"] = panel.words.visible
        out["refused"] = await panel.generate()
        out["bridge_says"] = panel.message.object
        return out

    out = run_async(scenario())
    assert out["down"].count("unreachable") == 1, out["down"]
    assert all(w in out["vocabulary"] for w in VOCABULARY) and "knows only these words" in out["vocabulary"]
    assert "unknown words for the toy model: purple, dog" in out["typed"] and out["typed"].count("dv-warn") == 1
    assert out["sent"] is None and out["jobs"] == 0 and "Not sent" in out["not_sent"]
    assert "dv-warn" not in out["fixed"][0] and "knows only these words" in out["fixed"][0] and out["fixed"][1] == ""
    assert out["unlisted"] is False and out["refused"] is None
    assert "setting <b>prompt</b>" in out["bridge_says"]
    assert "unknown words for the toy model: purple, dog" in out["bridge_says"]
