"""What a client may make the server hold, and for how long: the one home of the server's limits.

- `Limits`: every limit in one frozen dataclass, filled by `python -m serve`'s flags and shown by
  `/v1/health`. Per request (files, MB per file, MB per body), server-wide (bytes of request bodies
  in flight, open connections), and in time (a request head, a request body, an idle connection).
- `RequestLimits`: an ASGI middleware, in front of every route of the app (the /v1 API and Gradio's
  routes mounted beside it), that counts the body bytes of every request in flight against one
  budget and times the body. Refusals: 413 (one body over `max_request_mb`), 503 with Retry-After
  (the budget is full), 408 (the body is too slow), each as JSON `{"error": ...}`.
- `DecodeBudget`: the pixels being decoded at once, server-wide, by the API's decoding threads and
  the web UI's alike (decoding, not the bodies, is what a request costs most: ~8 bytes per pixel of
  an 8-bit RGB image, ~16 of WebP, RGBA, CMYK or 16-bit ones, ~20 of a float TIFF). A decode waits,
  first come first served, until its pixels fit.
- `return_freed_memory`: glibc's malloc keeps what a thread frees for that thread's next use, so
  decodes spread over threads would each leave their image's memory held; the budget gives it back
  after each large decode.
- `guarded_protocol`: uvicorn's own HTTP protocol with two things uvicorn lacks: a deadline for the
  request head (uvicorn waits for headers forever once a byte has arrived) and a cap on open
  connections (uvicorn's `limit_concurrency` still accepts every connection and answers 503 only
  once a full request head has arrived, so idle and half-sent connections are not bounded by it).

Bytes are counted as they arrive, not as a client declares them: a client that declares 100 MB and
sends 1 byte a second holds 1 byte a second of the budget (and is cut off by the body deadline),
so a few slow clients cannot fill the budget for everyone.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import threading
from dataclasses import dataclass

from models.imageio import MAX_PIXELS

__all__ = ["Limits", "RequestLimits", "InflightBudget", "DecodeBudget", "return_freed_memory", "guarded_protocol", "BODY_MIN_RATE",
           "RETRY_AFTER_S"]

log = logging.getLogger(__name__)

# A body's deadline grows by 1 s for every BODY_MIN_RATE bytes received (Apache mod_reqtimeout's
# rule): 64 kB/s is a slow mobile uplink (512 kbit/s), so any real client keeps up, while a
# slow-loris client, sending a byte now and then, meets the deadline after `body_timeout_s`.
BODY_MIN_RATE = 64_000   # bytes/s
RETRY_AFTER_S = 2        # s: a typical request is answered in milliseconds, so a budget full of them frees in ~1 s


@dataclass(frozen=True)
class Limits:
    """Every limit of the server; said in every refusal, in `--help` and in /v1/health.
    Defaults are measured by bench/serve_memory.py on 2 cores (the README's Benchmarks)."""
    max_files: int = 64          # images per API request
    max_file_mb: float = 20.0    # per file, in MB (10^6 bytes): a 24-megapixel JPEG is ~12 MB
    max_batch: int = 64          # images per forward pass across concurrent requests
    max_wait_ms: float = 2.0     # how long a lone request waits for company before its forward pass
    # One request body, any route: 5 files at the per-file limit, or 64 photos of 1.5 MB. The worst
    # such request (5 files decoding to the pixel limit) peaks at +1.8 GB RSS, mostly decoding.
    max_request_mb: float = 100.0
    # Bodies held at once, server-wide: each MB held costs 0.95-1.1 MB of RSS; with the decoding
    # above, the worst case measured is 3.1 GB (1.0 GB of it the loaded server).
    max_inflight_mb: float = 300.0
    # Open connections: an idle one costs 2.8 kB, so the bound is file descriptors (a common soft
    # limit is 1,024), with room for 16x the load bench's 16 keep-alive clients.
    max_connections: int = 256
    # An idle connection, or one still sending its request head, is closed after this: uvicorn's
    # default, which every Gradio app on Spaces runs with (gradio's launch keeps it).
    keep_alive_s: float = 5.0
    # A request body may take this long, plus 1 s per BODY_MIN_RATE bytes received (the 100 MB
    # limit arrives over loopback in under a second).
    body_timeout_s: float = 10.0
    # Images waiting for the model (serve/batcher.py); more: 503 with Retry-After. Four full
    # passes, room for the largest request (--max-files); the MNIST model ran 160-320 images/s
    # on 2 busy cores under bench/serve_load.py's overload, so the last image waits 1-2 s.
    max_queue: int = 256
    # Seconds a request may wait in that queue for its first forward pass; longer: 503 (the
    # client would rather retry than read a late answer). Over the queue's own wait above, so
    # it acts for slower models and devices; under --grace, so that what is queued at a
    # SIGTERM is answered before the process exits.
    queue_timeout_s: float = 5.0
    # Megapixels being decoded at once, server-wide (`DecodeBudget`): two images at the pixel limit,
    # what the API's two decoding threads held before the budget; 0.5 GB each for 8-bit RGB, up to
    # ~1.3 GB (a float TIFF). Before it, the UI's validators decoded in Gradio's pool of 40 threads,
    # as many at once: 32 web-UI requests of one 64 MP PNG (0.2 MB each) took the server from 1.4
    # to 11.6 GB (bench/serve_memory.py's ui_burst); with it, ~+1 GB.
    max_decode_mp: float = 128.0

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1_000_000)

    def __post_init__(self):
        if self.max_inflight_mb < self.max_request_mb:
            raise ValueError(f"--max-inflight-mb ({self.max_inflight_mb:g}) must be at least --max-request-mb "
                             f"({self.max_request_mb:g}): else the largest request allowed could never be served")
        if self.max_decode_mp * 1_000_000 < MAX_PIXELS:
            raise ValueError(f"--max-decode-mp ({self.max_decode_mp:g}) must be at least the pixel limit "
                             f"({MAX_PIXELS / 1e6:g}): else the largest image allowed could never be decoded")
        if self.max_queue < self.max_files:
            raise ValueError(f"--max-queue ({self.max_queue}) must be at least --max-files ({self.max_files}): "
                             f"else the largest request allowed could never be queued")

    @property
    def max_body_bytes(self) -> int:
        # every file at its limit plus room for the multipart headers, within the per-request limit
        return min(self.max_files * self.max_file_bytes + 1_000_000, self.max_request_bytes)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1_000_000)

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * 1_000_000)

    @property
    def max_decode_pixels(self) -> int:
        return int(self.max_decode_mp * 1_000_000)

    def as_dict(self) -> dict:
        return {"max_files": self.max_files, "max_file_mb": self.max_file_mb, "max_pixels": MAX_PIXELS,
                "max_batch": self.max_batch, "max_request_mb": self.max_request_mb,
                "max_inflight_mb": self.max_inflight_mb, "max_connections": self.max_connections,
                "keep_alive_s": self.keep_alive_s, "body_timeout_s": self.body_timeout_s,
                "body_min_rate_kb_s": BODY_MIN_RATE / 1000, "max_queue": self.max_queue,
                "queue_timeout_s": self.queue_timeout_s, "max_decode_mp": self.max_decode_mp}


# --------------------------------------------------------------------------- pixels decoding

class DecodeBudget:
    """Pixels being decoded at once, across threads. `hold(pixels)` is `models.imageio.open_image`'s
    `gate`: it blocks until the pixels fit, in arrival order (a large image is not passed over by a
    stream of small ones), and gives them back when the decode is done. One image larger than the
    whole budget waits for the budget to empty, then decodes alone. `in_use` and `peak` are read by
    /metrics."""

    def __init__(self, pixels: int):
        self.capacity = int(pixels)
        self.in_use = 0
        self.peak = 0
        self._turns: collections.deque = collections.deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        pixels = min(int(pixels), self.capacity)
        turn = object()
        with self._changed:
            self._turns.append(turn)
            try:
                while self._turns[0] is not turn or self.in_use + pixels > self.capacity:
                    self._changed.wait()
            except BaseException:  # interrupted while waiting (Ctrl-C): give the turn up, or it blocks every later one
                self._turns.remove(turn)
                self._changed.notify_all()
                raise
            self._turns.popleft()
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
            self._changed.notify_all()  # the next in line may fit beside this one
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= pixels
                self._changed.notify_all()
            if pixels >= TRIM_PIXELS:
                return_freed_memory()


def return_freed_memory() -> bool:
    """Give the memory glibc's malloc holds free back to the system (`malloc_trim(0)`).

    glibc keeps what a thread frees in that thread's arena, for its next use: a decode in each of
    Gradio's threads left its image's memory held, and the next decodes, in other arenas, piled up
    on top (32 requests of one 64 MP PNG: +10 GB at the peak, +5.9 GB held after). `DecodeBudget`
    calls this after each large decode (~1-10 ms, against the ~0.5-1 s of such a decode). False where
    the C library is not glibc (macOS, musl): nothing is done there."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, looked up once; None without it."""
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


TRIM_PIXELS = 4_000_000  # a decode this large is followed by `return_freed_memory` (a 12 MP JPEG at 224 px is 0.76 MP)


# --------------------------------------------------------------------------- bytes in flight

class InflightBudget:
    """Bytes of request bodies held by the requests in flight. Used from the event loop only."""

    def __init__(self, limit: int):
        self.limit, self.held, self.peak = limit, 0, 0

    @property
    def free(self) -> int:
        return self.limit - self.held

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        self.peak = max(self.peak, self.held)
        return True

    def give_back(self, n: int) -> None:
        self.held -= n


class _Refused(Exception):
    """Raised out of `receive` to stop the app reading a body we refuse."""


def _response(status: int, message: str, retry_after: int | None = None) -> tuple[dict, dict]:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # the rest of a refused body is never read: end the connection
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


class RequestLimits:
    """ASGI middleware: bound the request bodies of every route, one by one and all together.

    A body declared (Content-Length) over `max_request_mb` is refused with 413 at once, unread;
    one declared larger than the budget has free is drained unread and refused with 503 and
    Retry-After (drained, so that a client still sending reads the answer rather than a reset
    connection). A chunked body, or one that outgrows the budget while it arrives, is refused
    the moment it does. Every body must arrive by its deadline (`body_timeout_s`, +1 s per
    `BODY_MIN_RATE` bytes), or 408. The bytes stay counted until the app has answered.
    `on_refuse(reason)` hears of each refusal (serve.metrics' reasons: "too_large", ...)."""

    def __init__(self, app, limits: Limits, budget: InflightBudget | None = None, on_refuse=None):
        self.app, self.limits = app, limits
        self.budget = budget or InflightBudget(limits.max_inflight_bytes)
        self.on_refuse = on_refuse or (lambda reason: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length, chunked = None, False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            length = None  # chunked wins over a Content-Length (RFC 9112 6.3); counted as it arrives
        elif length is not None:
            try:
                length = int(length)  # the HTTP parser has checked it is a number
            except ValueError:
                return await self._send(send, *_response(400, "Content-Length is not a number"))
        else:
            length = 0
        if not chunked and length == 0:
            return await self.app(scope, receive, send)  # GET, HEAD, an empty POST: nothing to hold

        limits, loop = self.limits, asyncio.get_running_loop()
        if length is not None and length > limits.max_request_bytes:
            self.on_refuse("too_large")
            return await self._send(send, *_response(413, _too_large(length, limits)))
        deadline = loop.time() + limits.body_timeout_s
        if length is not None and length > self.budget.free:
            # Drain what the client sends (holding none of it) so that it reads our 503.
            received, more = 0, True
            while more and received <= length:
                try:
                    msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if msg["type"] != "http.request":
                    return
                received += len(msg.get("body", b""))
                deadline += len(msg.get("body", b"")) / BODY_MIN_RATE
                more = msg.get("more_body", False)
            self.on_refuse("uploads_busy")
            return await self._send(send, *_busy(self.budget))

        held = 0
        refusal: list[tuple[dict, dict]] = []
        started = False

        async def limited_receive():
            nonlocal held, deadline
            if refusal:
                raise _Refused()
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                refusal.append(_response(408, f"request body too slow: not received within "
                                              f"{limits.body_timeout_s:g} s (+1 s per {BODY_MIN_RATE // 1000} kB)"))
                self.on_refuse("body_timeout")
                raise _Refused() from None
            if msg["type"] == "http.request":
                n = len(msg.get("body", b""))
                deadline += n / BODY_MIN_RATE
                if held + n > limits.max_request_bytes:
                    refusal.append(_response(413, _too_large(held + n, limits, declared=False)))
                    self.on_refuse("too_large")
                    raise _Refused()
                if not self.budget.take(n):
                    refusal.append(_busy(self.budget))
                    self.on_refuse("uploads_busy")
                    raise _Refused()
                held += n
            return msg

        async def guarded_send(message):
            nonlocal started
            if refusal:
                return  # the app's own answer to a body we cut off: ours replaces it
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _Refused:
            pass
        except Exception:
            if not refusal:
                raise
        finally:
            self.budget.give_back(held)
        if refusal and not started:
            await self._send(send, *refusal[0])

    @staticmethod
    async def _send(send, start: dict, body: dict) -> None:
        await send(start)
        await send(body)


def _too_large(n: int, limits: Limits, declared: bool = True) -> str:
    size = f"{n:,} bytes" if declared else f"more than {limits.max_request_mb:g} MB"
    return (f"request too large ({size}): at most {limits.max_request_mb:g} MB per request "
            f"(and {limits.max_file_mb:g} MB per file)")


def _busy(budget: InflightBudget) -> tuple[dict, dict]:
    return _response(503, f"server busy: {budget.limit / 1e6:g} MB of uploads are already in flight; "
                          f"retry in {RETRY_AFTER_S} s", retry_after=RETRY_AFTER_S)


# --------------------------------------------------------------------------- connections

_BUSY_CONNECTION = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                    b"retry-after: %d\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s")


def guarded_protocol(max_connections: int, head_timeout_s: float, base: type | None = None, on_refuse=None):
    """uvicorn's HTTP protocol class (`base`; by default httptools where installed, else h11, as
    uvicorn picks it), extended with a connection cap and a request-head deadline; pass it as
    `uvicorn.Config(http=...)`.

    - A connection beyond `max_connections` is answered 503 (JSON, Retry-After) and closed at once.
    - A connection has `head_timeout_s` from its start, and from each response's end, to deliver a
      complete request head (its headers); else it is closed. Once a request is being served, its
      body is timed by `RequestLimits`, and a long response (Gradio's event stream) is left alone.
    `on_refuse("connections")` hears of each connection refused."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base

    body = json.dumps({"error": f"server busy: {max_connections} connections open; retry in {RETRY_AFTER_S} s"}).encode()
    busy = _BUSY_CONNECTION % (RETRY_AFTER_S, len(body), body)

    class GuardedProtocol(base):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refusing a connection: %d open (--max-connections)", len(self.connections) - 1)
                transport.write(busy)
                transport.close()
                if on_refuse is not None:
                    on_refuse("connections")
                return
            self._arm_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _arm_head_timer(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _head_timed_out(self):
            self._head_timer = None
            transport = self.transport
            if transport.is_closing() or transport.get_protocol() is not self:  # closed, or now a websocket
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being served; its end re-arms the timer
            transport.close()

    return GuardedProtocol
