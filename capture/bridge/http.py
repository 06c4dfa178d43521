"""The bridge's HTTP API (tornado, bound to 127.0.0.1): module-level handlers that get the
:class:`~capture.bridge.service.Bridge` through ``initialize``, and :class:`BridgeServer`.

The event loop only parses requests and writes answers: everything that touches the disk (the
request checks, GET /runs, a run's summary, opening and reading its files) runs on a worker thread,
so a slow disk or a FIFO in a run folder never holds up another client. Every error is JSON
``{"error", "field", "status"}``; an unexpected exception is a 500 that names only its type (the
terminal has the traceback), never a path.
"""
from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from capture.bridge.policy import MAX_BODY_BYTES, PROG, RequestError, dumps, parse_body
from capture.bridge.service import Bridge
from export.contract import shown

HOST = "127.0.0.1"
DEFAULT_PORT = 8765
FILE_CHUNK = 1 << 20


async def _off_loop(fn, *args):
    """``fn(*args)`` on the default thread pool; the event loop keeps serving meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class Base(tornado.web.RequestHandler):
    """Loopback ``Host`` only, CORS for the allowed origins, JSON answers and JSON errors."""

    bridge: Bridge

    def initialize(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Server", "diffviz-bridge")

    def prepare(self) -> None:
        host = (self.request.host or "").rsplit(":", 1)[0].strip("[]").lower()
        if host not in ("127.0.0.1", "localhost"):
            raise RequestError(403, f"Host {shown(self.request.host)} is not the loopback; open the bridge as "
                                    "http://127.0.0.1")
        origin = self.request.headers.get("Origin")
        if origin is not None and not self.bridge.origins.allows(origin) \
                and self.request.method not in ("GET", "HEAD", "OPTIONS"):
            raise RequestError(403, f"origin {origin[:200]} is not allowed (start the bridge with --allow-origin "
                                    f"{origin[:200]})")
        self._cors()

    def _cors(self) -> None:
        """``Access-Control-Allow-Origin`` echoing an allowed ``Origin``; nothing for any other origin."""
        origin = self.request.headers.get("Origin")
        if origin is not None and self.bridge.origins.allows(origin):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Vary", "Origin")

    def options(self, *args: Any) -> None:
        origin = self.request.headers.get("Origin")
        if not self.bridge.origins.allows(origin):
            self.set_status(403)
            return self.finish()
        self.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Content-Type")
        self.set_header("Access-Control-Max-Age", "600")
        if self.request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
            self.set_header("Access-Control-Allow-Private-Network", "true")
        self.set_status(204)
        self.finish()

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        field_name = None
        if isinstance(exc, RequestError):
            self.set_status(exc.status)
            status_code, message, field_name = exc.status, exc.message, exc.field
        elif exc is not None and status_code >= 500:
            # the exception's text may hold absolute paths: only its type leaves this machine's terminal
            message = f"internal error ({type(exc).__name__}); the bridge's terminal has the details"
        else:
            message = self._reason
        self._cors()  # send_error cleared the headers; the page must still be able to read the error
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps({"error": message, "field": field_name, "status": status_code}))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, RequestError):
            return
        super().log_exception(typ, value, tb)


class Root(Base):
    def get(self) -> None:
        self.send_json(self.bridge.info())


class Jobs(Base):
    def get(self) -> None:
        self.send_json({"jobs": self.bridge.jobs.snapshots()})

    async def post(self) -> None:
        body = parse_body(self.request.body, self.request.headers.get("Content-Type", ""))
        # the checks read the model's configs from disk: keep the event loop free meanwhile
        job = await _off_loop(self.bridge.make_job, body)
        self.bridge.jobs.submit(job)  # the last step: only a job that passed every check is queued
        self.set_header("Location", f"/jobs/{job.id}")
        self.send_json(self.bridge.jobs.snapshot(job), 202)


class OneJob(Base):
    def _job(self, job_id: str):
        job = self.bridge.jobs.get(job_id)
        if job is None:
            raise RequestError(404, f"no job {shown(job_id, 40)}")
        return job

    def get(self, job_id: str) -> None:
        self.send_json(self.bridge.jobs.snapshot(self._job(job_id)))

    def delete(self, job_id: str) -> None:
        job = self.bridge.jobs.cancel(self._job(job_id).id)
        self.send_json(self.bridge.jobs.snapshot(job))


class Runs(Base):
    async def get(self) -> None:
        runs = await _off_loop(self.bridge.runs)
        self.send_json({"runs": runs, "datasets": str(self.bridge.root)})


class RunFiles(Base):
    async def get(self, name: str, relpath: str) -> None:
        if not relpath:
            return self.send_json(await _off_loop(self.bridge.summary, name))
        fh, size, ctype, closer = await _off_loop(self.bridge.open_file, name, relpath)
        try:
            self.set_header("Content-Type", ctype)
            self.set_header("Cache-Control", "no-cache")
            left = size  # what fstat said at open: a file that grows meanwhile is not read past it
            while left > 0:
                chunk = await _off_loop(fh.read, min(FILE_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                self.write(chunk)
                await self.flush()
        finally:
            closer.close()
        self.finish()


class NotFound(Base):
    def prepare(self) -> None:
        super().prepare()
        raise RequestError(404, f"no such endpoint: {self.request.method} {shown(self.request.path)}")


def make_app(bridge: Bridge) -> tornado.web.Application:
    args = {"bridge": bridge}
    return tornado.web.Application(
        [
            (r"/", Root, args),
            (r"/jobs/?", Jobs, args),
            (r"/jobs/([0-9a-f]+)/?", OneJob, args),
            (r"/runs/?", Runs, args),
            (r"/runs/([^/]+)/(.*)", RunFiles, args),
        ],
        default_handler_class=NotFound,
        default_handler_args=args,
        compress_response=False,
        log_function=_log_request,
    )


def _log_request(handler: Any) -> None:
    """Log only failures (tornado's access log would print every poll of GET /jobs/{id})."""
    status = handler.get_status()
    if status >= 500:
        print(f"{PROG}: {status} {handler.request.method} {handler.request.path[:200]}", file=sys.stderr, flush=True)


class BridgeServer:
    """The bridge's HTTP server on 127.0.0.1:``port`` (0 = any free port).

    ``start()`` runs it on a background thread (tests, embedding) and returns once it listens;
    ``serve_forever()`` runs it on the calling thread until ``stop()`` or Ctrl-C.
    """

    def __init__(self, bridge: Bridge, port: int = DEFAULT_PORT):
        self.bridge = bridge
        self.requested_port = port
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _serve(self, handle_signals: bool = False) -> None:
        import signal

        try:
            sockets = tornado.netutil.bind_sockets(self.requested_port, address=HOST)
            server = tornado.httpserver.HTTPServer(make_app(self.bridge), max_body_size=4 * MAX_BODY_BYTES,
                                                   xheaders=False)
            server.add_sockets(sockets)
            self.port = sockets[0].getsockname()[1]
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            if handle_signals:  # SIGTERM and SIGINT end the server cleanly (the caller then cancels the jobs)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._loop.add_signal_handler(sig, self._stopping.set)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.stop()
            await server.close_all_connections()

    def start(self, timeout: float = 30.0) -> "BridgeServer":
        self._thread = threading.Thread(target=lambda: _quiet_run(self._serve()), name="diffviz-bridge-http", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise self._error
        if self.port is None:
            raise RuntimeError("the bridge did not start listening")
        return self

    def serve_forever(self, handle_signals: bool = False) -> None:
        asyncio.run(self._serve(handle_signals))

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Whether the server listens (or failed to) within ``timeout`` seconds."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self.bridge.jobs.stop(timeout)


def _quiet_run(coro) -> None:
    try:
        asyncio.run(coro)
    except BaseException:  # noqa: BLE001 - start() reports the bind error
        pass
