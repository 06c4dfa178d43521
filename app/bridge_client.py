"""The dashboard's side of the local generator bridge (``diffviz bridge``): a small JSON-over-HTTP client.

The dashboard never imports ``capture``: it talks to the generator only through this client.

* Under ``panel serve`` (CPython) a request is a ``urllib`` call, run in a worker thread so the
  server's event loop keeps serving while the bridge answers.
* In the static site's Pyodide worker (``sys.platform == "emscripten"``) it is
  ``pyodide.http.pyfetch`` (the browser's ``fetch``): the page's origin must be one the bridge allows
  (``--allow-origin``; localhost origins and the Pages origin by default).

Every method is a coroutine (Panel runs ``async`` callbacks and periodic callbacks in both places).
Failures raise :class:`BridgeError` with a one-line message; a 400 from ``POST /jobs`` carries the
name of the bad setting in ``field``.
"""
from __future__ import annotations

import asyncio
import json
import sys
from typing import Any
from urllib.parse import quote, urlsplit

from export.protocol import CANCELLED, DONE, FAILED, FINAL_STATES, QUEUED  # noqa: F401 - FINAL_STATES re-exported

#: Where ``diffviz bridge`` listens unless told otherwise.
DEFAULT_BRIDGE_URL = "http://127.0.0.1:8765"
IN_BROWSER = sys.platform == "emscripten"
#: Seconds before a request to the bridge counts as unanswered (CPython only; fetch has no timeout).
TIMEOUT = 30.0


class BridgeError(Exception):
    """A failed bridge request: ``status`` (None when unreachable), ``field`` (the bad setting, if any)."""

    def __init__(self, message: str, status: int | None = None, field: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.status = status
        self.field = field

    @property
    def unreachable(self) -> bool:
        return self.status is None


def normalise_base(url: str) -> str:
    """``http://127.0.0.1:8765/`` -> ``http://127.0.0.1:8765``; BridgeError unless it is an http(s) URL."""
    text = (url or "").strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BridgeError(f"bridge address {url!r}: give an http URL such as {DEFAULT_BRIDGE_URL}")
    return text


def _error_from(status: int, text: str) -> BridgeError:
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("error"):
        return BridgeError(str(data["error"]), status, data.get("field"))
    return BridgeError(f"HTTP {status}: {text[:200]}", status)


def _request_urllib(url: str, method: str, body: bytes | None, timeout: float) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BridgeError(f"bridge at {urlsplit(url).netloc} unreachable: {reason}") from None


async def _request_pyodide(url: str, method: str, body: bytes | None) -> tuple[int, str]:
    from pyodide.http import pyfetch  # type: ignore[import-not-found]

    kwargs: dict[str, Any] = {"method": method, "headers": {"Accept": "application/json"}}
    if body is not None:
        kwargs["headers"]["Content-Type"] = "application/json"
        kwargs["body"] = body.decode("utf-8")
    try:
        resp = await pyfetch(url, **kwargs)
        text = await resp.string()
    except Exception as exc:  # noqa: BLE001 - fetch rejects on network errors and CORS refusals alike
        raise BridgeError(f"bridge at {urlsplit(url).netloc} unreachable (not running, or this page's origin "
                          f"is not allowed: start it with --allow-origin): {exc}") from None
    return int(resp.status), text


class BridgeClient:
    """The bridge at ``base`` (``http://127.0.0.1:8765``)."""

    def __init__(self, base: str = DEFAULT_BRIDGE_URL, timeout: float = TIMEOUT):
        self.base = normalise_base(base)
        self.timeout = timeout

    def url(self, path: str) -> str:
        return self.base + path

    def run_url(self, name: str) -> str:
        """The URL of a run's folder on the bridge, as the dashboard's URL source reads it."""
        return f"{self.base}/runs/{quote(name)}/"

    async def request(self, method: str, path: str, payload: Any = None) -> Any:
        """``method path`` with an optional JSON ``payload``; the decoded JSON answer, or BridgeError."""
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        url = self.url(path)
        if IN_BROWSER:
            status, text = await _request_pyodide(url, method, body)
        else:
            loop = asyncio.get_running_loop()
            status, text = await loop.run_in_executor(None, _request_urllib, url, method, body, self.timeout)
        if not 200 <= status < 300:
            raise _error_from(status, text)
        try:
            return json.loads(text)
        except ValueError:
            raise BridgeError(f"{url}: the answer is not JSON; is this a diffviz bridge?", status) from None

    async def info(self) -> dict[str, Any]:
        data = await self.request("GET", "/")
        if not isinstance(data, dict) or data.get("service") != "diffviz-bridge":
            raise BridgeError(f"{self.base} answers, but is not a diffviz bridge")
        return data

    async def submit(self, settings: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", "/jobs", settings)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/jobs/{quote(job_id)}")

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self.request("DELETE", f"/jobs/{quote(job_id)}")

    async def runs(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/runs")).get("runs", [])


def describe(job: dict[str, Any]) -> str:
    """One line for a job snapshot: ``denoising · step 12/30 · ETA 8 s``."""
    state, stage = job.get("state"), job.get("stage") or ""
    if state == QUEUED:
        pos = job.get("position")
        return f"queued (position {pos})" if pos else "queued"
    if state == DONE:
        return f"done · run {job.get('run')}"
    if state == FAILED:
        return f"failed: {job.get('error')}"
    if state == CANCELLED:
        return "cancelled · nothing was written"
    parts = [stage]
    if stage == "denoising" and job.get("total"):
        parts.append(f"step {job.get('step', 0)}/{job['total']}")
    eta = job.get("eta_s")
    if eta is not None:
        parts.append(f"ETA {eta:.0f} s")
    if job.get("cancel_requested"):
        parts.append("cancelling…")
    return " · ".join(parts)
