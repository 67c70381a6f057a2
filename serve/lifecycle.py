"""What the server is doing (starting, ready, stopping), and the ASGI app in front that says so.

    GET /v1/health/live    200 while the process serves HTTP (from its first moment)
    GET /v1/health/ready   200 once the app is built and one warm-up forward pass has run;
                           503 before, and again from the moment shutdown begins
    GET /metrics           Prometheus' text format (serve/metrics.py)

`Lifecycle` is the ASGI app uvicorn runs. It answers the three routes above itself (so they
answer while the app is still being built, and while it stops), counts every request on the
metrics, and hands the rest to the app once it is ready. Before that, a request gets 503 with
Retry-After; once shutdown has begun, 503 with `Connection: close`, except the GETs of Gradio's
event streams (under /gradio_api/), which carry the answers of work accepted before.

The model is loaded before HTTP is served (a bad folder still fails in seconds, with one line);
what follows takes seconds too (Gradio's import, the UI, a warm-up pass), and runs while the
probes answer: a process manager sees the process live at once, and ready when it is.

`GracefulServer` is uvicorn's server with the shutdown an orchestrator expects. On SIGTERM or
Ctrl-C: readiness turns 503 and new requests get 503, while the listener stays open and the
requests already received run to their answers; when none is left (or `grace_s` has passed),
uvicorn's own graceful shutdown (`timeout_graceful_shutdown`: what is left of the grace) closes
the listener and the connections, waits for responses still streaming, runs the app's lifespan
shutdown, and returns: the process exits 0. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import threading
import time
from typing import Awaitable, Callable

import uvicorn

from serve.limits import RETRY_AFTER_S
from serve.metrics import CONTENT_TYPE, Metrics, endpoint_of

__all__ = ["Lifecycle", "GracefulServer", "LIVE", "READY", "METRICS"]

log = logging.getLogger(__name__)

LIVE, READY, METRICS = "/v1/health/live", "/v1/health/ready", "/metrics"
STARTING, SERVING, STOPPING = "starting", "ready", "stopping"


def _json(status: int, payload: dict, *, retry_after: int | None = None, close: bool = False):
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if close:  # uvicorn ends the connection after this response
        headers.append((b"connection", b"close"))
    return status, headers, body


def _freeze_heap() -> None:
    """Move what start-up left alive (torch's, fastai's, onnxruntime's and Gradio's modules: ~450,000
    objects) into the garbage collector's permanent generation, which it never scans.
    Without this, a digit request's p99 under load was a full collection's pause: every ~4 s at
    1,000 req/s one ran over the whole heap for ~240 ms, holding the event loop (p50 14 ms, p99
    208 ms, against LitServe's 45 ms; bench/serve_photos.py). The objects made while serving are
    still collected as before; only these are kept for the process's life, as they would be anyway."""
    gc.collect()  # what is garbage now goes first, never into the permanent generation
    gc.freeze()
    log.info("garbage collector: %d objects of start-up set aside", gc.get_freeze_count())


class Lifecycle:
    """The ASGI app in front of the server's app (see the module's docstring).

    `build()` makes the app (a FastAPI app with `state.batcher`); it runs in a thread of its own
    at lifespan startup, then the app's own lifespan starts, then `warm_up(app)` runs, and then
    the state is "ready". `pending` counts the requests handed to the app and not yet answered
    (response not started): what a shutdown waits for."""

    def __init__(self, metrics: Metrics, build: Callable[[], object],
                 warm_up: Callable[[object], Awaitable] | None = None):
        self.metrics, self._build, self._warm_up = metrics, build, warm_up
        self.app = None
        self.state = STARTING
        self.pending = 0
        self.failed: BaseException | None = None
        self.on_failure: Callable[[], None] = lambda: None  # the server's: stop
        self._routes = frozenset((LIVE, READY, METRICS))
        self._starting: asyncio.Task | None = None
        self._inner: tuple | None = None  # the app's lifespan: (task, to_app, from_app)
        self._lifespan_state: dict = {}

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        if kind != "http":  # websockets: only to an app that is serving
            if self.state != SERVING:
                await send({"type": "websocket.close", "code": 1013})  # 1013: try again later
                return
            return await self.app(scope, receive, send)
        path, started = scope["path"], time.perf_counter()
        endpoint = endpoint_of(path, self._routes)
        status = 500  # what uvicorn answers if the app fails before it does
        answered = False

        async def counted(message):
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                if not answered:
                    answered = True
                    self.pending -= 1
            await send(message)

        self.pending += 1
        try:
            own = self._own(scope)
            if own is not None:
                await self._send(counted, *own)
            else:
                if self._lifespan_state:
                    scope["state"] = {**scope.get("state", {}), **self._lifespan_state}
                await self.app(scope, receive, counted)
        finally:
            if not answered:
                self.pending -= 1
            self.metrics.observe_request(endpoint, status, time.perf_counter() - started)

    def _own(self, scope):
        """(status, headers, body) for what this front answers itself, else None (to the app)."""
        path, method = scope["path"], scope["method"]
        if path in (LIVE, READY, METRICS):
            if method not in ("GET", "HEAD"):
                return _json(405, {"error": f"{path} answers GET only"})
            if path == LIVE:
                return _json(200, {"status": "live", "state": self.state})
            if path == METRICS:
                body = self.metrics.render()
                return 200, [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())], body
            if self.state == SERVING:
                return _json(200, {"status": "ready"})
            return _json(503, {"error": self._not_serving(), "state": self.state})
        if self.state == SERVING:
            return None
        if self.state == STOPPING:
            if method in ("GET", "HEAD") and path.startswith("/gradio_api/") and self.app is not None:
                return None  # an event stream: the answer of work accepted before the shutdown
            self.metrics.reject("shutting_down")
            return _json(503, {"error": self._not_serving()}, retry_after=RETRY_AFTER_S, close=True)
        self.metrics.reject("starting")
        return _json(503, {"error": self._not_serving()}, retry_after=RETRY_AFTER_S)

    def _not_serving(self) -> str:
        if self.state == STOPPING:
            return "server shutting down: send the request to another instance, or retry"
        return f"server starting: the model is being warmed up; retry in {RETRY_AFTER_S} s"

    @staticmethod
    async def _send(send, status, headers, body):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # ------------------------------------------------------------------ state

    def begin_shutdown(self) -> None:
        if self.state != STOPPING:
            self.state = STOPPING
            log.warning("shutting down: readiness 503, new requests refused, %d in progress", self.pending)

    async def _start(self):
        """Build the app (in a daemon thread: a shutdown meanwhile need not wait for it), start
        its lifespan, warm it up, and serve."""
        loop = asyncio.get_running_loop()
        built = loop.create_future()

        def build():
            try:
                app = self._build()
            except BaseException as e:  # handed to the loop, which reports it
                # bound now: Python unbinds `e` when this block ends, before the loop runs the callback
                loop.call_soon_threadsafe(lambda err=e: built.done() or built.set_exception(err))
            else:
                loop.call_soon_threadsafe(lambda: built.done() or built.set_result(app))

        threading.Thread(target=build, name="build-app", daemon=True).start()
        try:
            app = await built
            await self._start_inner(app)
            self.app = app
            self._routes = self._routes | {getattr(r, "path", "") for r in getattr(app, "routes", ())} - {""}
            if self._warm_up is not None:
                t = time.perf_counter()
                await self._warm_up(app)
                log.info("warm-up forward pass: %.0f ms", (time.perf_counter() - t) * 1e3)
            if self.state == STARTING:
                _freeze_heap()
                self.state = SERVING
                log.info("ready")
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            log.exception("the app failed to start")
            self.failed = e
            self.on_failure()

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._starting = asyncio.get_running_loop().create_task(self._start(), name="start-app")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                log.info("connections closed; stopping the app")
                self.begin_shutdown()
                if self._starting is not None and not self._starting.done():
                    self._starting.cancel()
                await self._stop_inner()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # The app's own lifespan (FastAPI's, Gradio's queue, the batcher's end), driven through the
    # ASGI lifespan protocol as a server would drive it.

    async def _start_inner(self, app):
        to_app, from_app = asyncio.Queue(), asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self._lifespan_state}
        task = asyncio.get_running_loop().create_task(app(scope, to_app.get, from_app.put), name="app-lifespan")
        self._inner = (task, to_app, from_app)
        await to_app.put({"type": "lifespan.startup"})
        reply = await self._reply(task, from_app)
        if reply is None or reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app's lifespan startup failed: {(reply or {}).get('message', 'it ended')}")

    async def _stop_inner(self, timeout: float = 10.0):
        if self._inner is None:
            return
        task, to_app, from_app = self._inner
        self._inner = None
        await to_app.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._reply(task, from_app), timeout)
        except asyncio.TimeoutError:
            log.warning("the app's lifespan shutdown took over %g s; leaving it", timeout)
            task.cancel()

    @staticmethod
    async def _reply(task: asyncio.Task, from_app: asyncio.Queue) -> dict | None:
        get = asyncio.ensure_future(from_app.get())
        done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if task.exception() is not None:
            raise task.exception()
        return None


class GracefulServer(uvicorn.Server):
    """uvicorn's Server, draining through `lifecycle` on SIGTERM / Ctrl-C (the module's docstring)
    and then shutting down within what is left of `grace_s`."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace_s: float):
        super().__init__(config)
        self.lifecycle, self.grace_s = lifecycle, grace_s
        self._drain_until: float | None = None
        lifecycle.on_failure = self.stop

    def stop(self) -> None:
        """Begin the graceful shutdown, as a SIGTERM does (callable from the event loop's thread)."""
        if self._drain_until is None:
            self._drain_until = time.monotonic() + self.grace_s
            self.lifecycle.begin_shutdown()

    def handle_exit(self, sig, frame) -> None:
        # Not uvicorn's: that records the signal and raises it again once the server has stopped,
        # and SIGTERM's default action then ends the process with status 143 instead of 0.
        if self._drain_until is None:
            log.warning("%s: draining for at most %g s (--grace)", signal.Signals(sig).name, self.grace_s)
            self.stop()
        elif sig == signal.SIGINT:  # a second Ctrl-C: now
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and not self.should_exit:
            left = self._drain_until - time.monotonic()
            if self.lifecycle.pending == 0 or left <= 0:
                # uvicorn's own graceful shutdown, for responses still streaming: bounded by the rest of the grace
                log.info("drained (%d request(s) unanswered); closing connections within %.1f s",
                         self.lifecycle.pending, max(0.0, left))
                self.config.timeout_graceful_shutdown = max(0.1, left)
                self.should_exit = True
        return await super().on_tick(counter)
