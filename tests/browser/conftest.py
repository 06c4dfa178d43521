"""Shared fixtures for the browser tests (dashboard, static site, bridge).

* Chromium is Debian's ``/usr/bin/chromium`` (``DIFFVIZ_CHROMIUM`` overrides), launched by
  pytest-playwright through ``browser_type_launch_args``; ``playwright install`` is never needed.
* ``panel_server(app, env=..., args=...)`` starts ``panel serve`` on 127.0.0.1 with a free port and
  returns its base URL; it is stopped (terminate, then kill) when the requesting scope ends.
* ``static_server(directory)`` serves a folder over HTTP (with a permissive CORS header) for
  dataset-URL and static-site tests.
* ``artifacts`` is the ``test-artifacts/`` folder for screenshots.
* ``bokeh(page)`` wraps a page with helpers that read Bokeh models from ``Bokeh.documents[0]``
  by ``name`` (Bokeh draws on a canvas, so state is read from the models, not the DOM).
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.loopback import free_port, serving

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # ``tests.synthetic`` and the project packages
    sys.path.insert(0, str(ROOT))

CHROMIUM = os.environ.get("DIFFVIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts"
#: Seconds to wait for ``panel serve`` to answer (2 shared cores: imports alone take a while).
SERVER_START_TIMEOUT = float(os.environ.get("DIFFVIZ_SERVER_TIMEOUT", "120"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)


# --------------------------------------------------------------------------- Chromium


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make chromium` (apt-get install chromium) or set DIFFVIZ_CHROMIUM")
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS, "headless": True}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict) -> dict:
    return {**browser_context_args, "viewport": {"width": 1500, "height": 1000}}


# --------------------------------------------------------------------------- servers


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log's tail) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s ({last})")


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Terminate ``proc``; ``panel serve`` may ignore SIGTERM for a while, so fall back to kill."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


class PanelServer:
    """A running ``panel serve`` subprocess."""

    def __init__(self, proc: subprocess.Popen, port: int, app_name: str, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/{app_name}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def run_panel_server(app: str | Path, *, env: dict[str, str] | None = None, args: list[str] | None = None,
                     log_dir: Path | None = None, timeout: float = SERVER_START_TIMEOUT) -> Iterator[PanelServer]:
    """``panel serve APP`` on 127.0.0.1 and a free port, for the duration of the ``with``."""
    app = Path(app)
    port = free_port()
    log_dir = Path(log_dir or ARTIFACTS)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"panel-serve-{app.stem}-{port}.log"
    cmd = [sys.executable, "-m", "panel", "serve", str(app), "--address", "127.0.0.1", "--port", str(port),
           "--allow-websocket-origin", f"127.0.0.1:{port}", "--num-procs", "1",
           "--websocket-max-message-size", str(512 * 2**20), "--liveness", *(args or [])]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = PanelServer(proc, port, app.stem, log)
    failed = True
    try:
        # /liveness answers once the server listens, without building a session (which takes seconds)
        wait_http(f"{server.base}/liveness", timeout, proc, log)
        yield server
        failed = False
    finally:
        stop_process(proc)
        if not failed and "Traceback" not in server.log_text():
            log.unlink(missing_ok=True)  # keep the server's log only when something went wrong


@pytest.fixture(scope="module")
def panel_server(artifacts: Path) -> Iterator[Callable[..., PanelServer]]:
    """Factory: ``panel_server(app, env={...}, args=[...])`` -> a :class:`PanelServer`, stopped at module end."""
    with contextlib.ExitStack() as stack:
        def start(app: str | Path = ROOT / "app" / "main.py", **kwargs: Any) -> PanelServer:
            return stack.enter_context(run_panel_server(app, log_dir=artifacts, **kwargs))

        yield start


class _QuietCORSHandler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def run_static_server(directory: str | Path) -> contextlib.AbstractContextManager[str]:
    return serving(functools.partial(_QuietCORSHandler, directory=str(directory)))


@pytest.fixture(scope="module")
def static_server() -> Iterator[Callable[[str | Path], str]]:
    """Factory: ``static_server(directory)`` -> base URL ``http://127.0.0.1:PORT`` serving it (module scope)."""
    with contextlib.ExitStack() as stack:
        yield lambda directory: stack.enter_context(run_static_server(directory))


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


# --------------------------------------------------------------------------- reading Bokeh models

JS_HELPERS = r"""
() => {
  if (window.__dv) return true;
  const model = (name) => {
    for (const doc of (window.Bokeh ? Bokeh.documents : [])) {
      const m = doc.get_model_by_name(name);
      if (m) return m;
    }
    return null;
  };
  const tagged = (tag) => {
    for (const doc of (window.Bokeh ? Bokeh.documents : [])) {
      for (const m of doc.all_models) { if (m.tags && m.tags.includes(tag)) return m; }
    }
    return null;
  };
  const plain = (v) => {
    if (v == null) return v;
    if (ArrayBuffer.isView(v)) {
      const out = Array.from(v, (x) => (typeof x === 'bigint' ? Number(x) : x));
      if (v.shape && v.shape.length > 1) return {shape: Array.from(v.shape), values: out};
      return out;
    }
    if (Array.isArray(v)) return v.map(plain);
    if (typeof v === 'object' && v.constructor === Object) {
      const o = {}; for (const k in v) o[k] = plain(v[k]); return o;
    }
    return v;
  };
  const column = (name, col) => {
    const m = model(name);
    if (!m) return undefined;
    const data = m.data instanceof Map ? Object.fromEntries(m.data) : m.data;
    return plain(data[col]);
  };
  window.__dv = {model, tagged, plain, column};
  return true;
}
"""


class BokehPage:
    """A Playwright page plus helpers to read named Bokeh models."""

    def __init__(self, page: Any, timeout_ms: float = 60_000):
        self.page = page
        self.timeout = timeout_ms

    def open(self, url: str, ready_model: str | None = None) -> "BokehPage":
        self.page.goto(url, wait_until="domcontentloaded", timeout=self.timeout)
        if ready_model:
            self.wait_model(ready_model)
        return self

    def install(self) -> None:
        self.page.evaluate(JS_HELPERS)

    def wait_model(self, name: str) -> None:
        self.page.wait_for_function(
            "(name) => !!(window.Bokeh && Bokeh.documents.length && Bokeh.documents.some((d) => d.get_model_by_name(name)))",
            arg=name, timeout=self.timeout)
        self.install()

    def column(self, name: str, col: str) -> Any:
        self.install()
        return self.page.evaluate("([n, c]) => window.__dv.column(n, c)", [name, col])

    def prop(self, name: str, attr: str) -> Any:
        self.install()
        return self.page.evaluate("([n, a]) => window.__dv.plain(window.__dv.model(n)[a])", [name, attr])

    def wait_column(self, name: str, col: str, predicate_js: str, timeout_ms: float | None = None) -> Any:
        """Wait until ``predicate_js`` (a JS expression over ``v``, the column's plain value) is true;
        return that ``v`` (the value the predicate accepted, not a later re-read)."""
        self.install()
        handle = self.page.wait_for_function(
            f"([n, c]) => {{ const v = window.__dv.column(n, c); return v !== undefined && ({predicate_js}) ? {{v}} : false; }}",
            arg=[name, col], timeout=timeout_ms or self.timeout)
        return handle.json_value()["v"]

    def wait_values(self, name: str, col: str, expected: Any, *, index: int | None = 0, atol: float = 0.0,
                    timeout_ms: float | None = None) -> Any:
        """Wait until column ``col`` (its ``index``-th entry, or the whole column if ``index`` is None) holds
        ``expected`` within ``atol``, then return the column. On timeout the column is returned anyway, so the
        caller's own assertion shows the difference instead of a bare timeout."""
        import numpy as np

        values = np.asarray(expected, dtype=np.float64).ravel().tolist()
        self.install()
        try:
            self.page.wait_for_function(
                """([n, c, i, want, atol]) => {
                     let v = window.__dv.column(n, c);
                     if (v === undefined) return false;
                     if (i !== null) v = v[i];
                     if (v && v.values) v = v.values;
                     if (!v || v.length !== want.length) return false;
                     for (let k = 0; k < want.length; k++) if (!(Math.abs(v[k] - want[k]) <= atol)) return false;
                     return true;
                   }""", arg=[name, col, index, values, atol], timeout=timeout_ms or self.timeout)
        except Exception:  # noqa: BLE001 - the caller asserts and shows the difference
            pass
        return self.column(name, col)

    def wait_prop(self, name: str, attr: str, predicate_js: str, timeout_ms: float | None = None) -> Any:
        self.install()
        self.page.wait_for_function(
            f"([n, a]) => {{ const m = window.__dv.model(n); if (!m) return false; const v = window.__dv.plain(m[a]); return ({predicate_js}); }}",
            arg=[name, attr], timeout=timeout_ms or self.timeout)
        return self.prop(name, attr)

    def set_prop(self, name: str, attr: str, value: Any) -> None:
        """Set a model property in the browser (the change is synced to Python like a user's)."""
        self.install()
        self.page.evaluate("([n, a, v]) => { window.__dv.model(n)[a] = v; }", [name, attr, value])

    def widget(self, tag: str, attr: str = "value") -> Any:
        """A property of the widget model tagged ``tag`` (Panel widgets take ``tags=[...]``)."""
        self.install()
        return self.page.evaluate("([t, a]) => { const m = window.__dv.tagged(t); return m ? window.__dv.plain(m[a]) : undefined; }", [tag, attr])

    def set_widget(self, tag: str, value: Any, attr: str = "value") -> None:
        """Set the widget tagged ``tag`` in the browser, as the user's input would (synced to Python)."""
        self.install()
        self.page.evaluate("([t, a, v]) => { window.__dv.tagged(t)[a] = v; }", [tag, attr, value])

    @staticmethod
    def array(value: Any) -> Any:
        """A value read by :meth:`column` (plain list, or ``{shape, values}`` for an n-d array) as numpy."""
        import numpy as np

        if isinstance(value, dict) and "shape" in value:
            return np.asarray(value["values"]).reshape(value["shape"])
        return np.asarray(value)

    def screen_xy(self, figure: str, x: float, y: float) -> tuple[float, float]:
        """Page coordinates of data point ``(x, y)`` in the figure named ``figure`` (for ``page.mouse.click``)."""
        self.install()
        return tuple(self.page.evaluate(
            """([n, x, y]) => {
                 const view = Bokeh.index.find_one(window.__dv.model(n));
                 const r = view.el.getBoundingClientRect();
                 return [r.left + view.frame.x_scale.compute(x), r.top + view.frame.y_scale.compute(y)];
               }""", [figure, x, y]))

    def click_data(self, figure: str, x: float, y: float) -> None:
        """Click the figure at data point ``(x, y)`` (a Bokeh Tap)."""
        px, py = self.screen_xy(figure, x, y)
        self.page.mouse.click(px, py)

    def widget_element(self, tag: str, css: str = "input") -> Any:
        """The DOM element ``css`` inside the rendered widget tagged ``tag`` (an ElementHandle to click or fill)."""
        self.install()
        return self.page.evaluate_handle(
            """([t, css]) => {
                 const view = Bokeh.index.find_one(window.__dv.tagged(t));
                 return (view.shadow_el || view.el).querySelector(css);
               }""", [tag, css]).as_element()

    def focus_slider(self, tag: str, handle: int = 0) -> None:
        """Give keyboard focus to a slider widget's handle (then ``page.keyboard.press("ArrowRight")``)."""
        self.install()
        self.page.evaluate(
            """([t, i]) => {
                 const view = Bokeh.index.find_one(window.__dv.tagged(t));
                 const root = view.shadow_el || view.el;
                 root.querySelectorAll('.noUi-handle')[i].focus();
               }""", [tag, handle])

    def screenshot(self, path: Path, **kwargs: Any) -> Path:
        self.page.screenshot(path=str(path), **kwargs)
        return path


@pytest.fixture(scope="session")
def bokeh() -> type[BokehPage]:
    """The :class:`BokehPage` class: ``bokeh(page)`` wraps a Playwright page."""
    return BokehPage


def dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))


# For a module whose ``runs`` fixture gives {"a": the run to open first, "root": the folder of all its runs}.
@pytest.fixture(scope="module")
def server(panel_server, runs):
    """``panel serve`` on run A, with a small cache (16 MB) so eviction is exercised."""
    return panel_server(env={"DIFFVIZ_DATASET": str(runs["a"]), "DIFFVIZ_CACHE_MB": "16"})


@pytest.fixture(scope="module")
def files(static_server, runs) -> str:
    """The URL of a static server over ``runs["root"]``."""
    return static_server(runs["root"])

