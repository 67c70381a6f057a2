"""The micro-batcher: concurrent requests share forward passes, and wait in a bounded queue.

    batcher = MicroBatcher(predictor.probabilities, max_batch=64, max_queue=256, timeout_s=5)
    probs = await batcher.submit(tensors)   # rows of probabilities, or raises `Overloaded`

Back-pressure lives here, in front of the model, for every caller (the HTTP API and Gradio's
batches): a request whose images would take the queue past `max_queue` is refused at once
(`Overloaded`, reason "queue_full"); one that waits longer than `timeout_s` for its first pass is
refused then (reason "queue_timeout"), and its images are dropped, never computed. The HTTP API
answers both with 503 and Retry-After.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from serve.limits import RETRY_AFTER_S

__all__ = ["MicroBatcher", "Overloaded"]

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0  # refusals are logged at most this often, as a count (each is counted in /metrics)


class Overloaded(Exception):
    """The model's queue refused a request: `reason` ("queue_full" or "queue_timeout", as
    serve.metrics counts them) and `retry_after` seconds for the Retry-After header."""

    def __init__(self, message: str, reason: str, retry_after: int = RETRY_AFTER_S):
        super().__init__(message)
        self.reason, self.retry_after = reason, retry_after


class _Pending:
    """One submitted request: its images, how many were taken into passes, their rows so far."""
    __slots__ = ("items", "future", "wait", "taken", "rows", "timer")

    def __init__(self, items: list, future: asyncio.Future, wait: float):
        self.items, self.future, self.wait, self.taken, self.rows, self.timer = items, future, wait, 0, [], None

    @property
    def left(self) -> int:  # images not yet taken into a pass: what the queue holds of this request
        return len(self.items) - self.taken


class MicroBatcher:
    """Group the tensors of concurrent requests into forward passes of at most `max_batch` images.

    `submit` queues a request's prepared images and awaits their rows of probabilities. One worker
    task takes the first waiting request, then everything else queued within `max_wait_ms`, and
    runs `run_batch` on up to `max_batch` of their images, oldest request first, in a single
    dedicated thread (the event loop keeps accepting requests meanwhile; those join the next pass).
    A request with more images than a pass holds spans several passes, and so may the last request
    that fits only in part: `max_batch` is a cap on every pass, which bounds the memory of a pass
    (activations grow with the batch). Under load the passes fill by themselves; a lone request
    waits at most `max_wait_ms`.

    `max_queue` bounds the images waiting (submitted, not yet in a pass; None: unbounded) and
    `timeout_s` how long a request may wait for its first pass (None: as long as it takes); see
    the module's docstring. `metrics` (a `serve.metrics.Metrics`) is told of every pass, the
    queue's depth and every refusal."""

    def __init__(self, run_batch: Callable[[Sequence[torch.Tensor]], torch.Tensor], max_batch: int = 64,
                 max_wait_ms: float = 2.0, *, max_queue: int | None = None, timeout_s: float | None = None,
                 metrics=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self.max_queue, self.timeout_s, self.metrics = max_queue, timeout_s, metrics
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.batches = 0  # forward passes run, images through them, the largest pass: for /v1/health and tests
        self.images = 0
        self.largest = 0
        self.queued = 0  # images submitted and not yet taken into a pass (nor dropped)
        self.peak_queue = 0
        self._unlogged: dict[str, int] = {}  # refusals since the last log line, by reason
        self._logged_at = float("-inf")
        if metrics is not None:
            metrics.watch_queue(lambda: self.queued)

    async def submit(self, items: Sequence[torch.Tensor], max_wait_ms: float | None = None) -> torch.Tensor:
        """Queue one request's prepared images; returns their rows of probabilities, in order. A
        pass that this request opens waits `max_wait_ms` (default: the batcher's) for company.
        Raises `Overloaded` when the queue is full, or when the request waited past `timeout_s`."""
        items = list(items)
        if not items:
            raise ValueError("no images to run")
        self.admit(len(items))
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():  # started lazily, inside the server's event loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._work(), name="micro-batcher")
        future = loop.create_future()
        wait = self.max_wait if max_wait_ms is None else max_wait_ms / 1000
        entry = _Pending(items, future, wait)
        self.queued += len(items)
        self.peak_queue = max(self.peak_queue, self.queued)
        # However the future ends (answered, failed, timed out, or cancelled because its client
        # left), what is left of it leaves the queue's count at once.
        future.add_done_callback(lambda _: self._forget(entry))
        if self.timeout_s is not None:
            entry.timer = loop.call_later(self.timeout_s, self._expire, entry)
        self._queue.put_nowait(entry)
        return await future

    def admit(self, n: int) -> None:
        """Raise `Overloaded` ("queue_full") if `n` more images would take the queue past
        `max_queue`. `submit` checks; a caller may check first too, before it decodes the images:
        under overload, decoding requests only to refuse them costs the model's own CPU."""
        if self.max_queue is not None and self.queued + n > self.max_queue:
            self._refuse("queue_full")
            raise Overloaded(f"server busy: {self.queued} images already wait for the model (--max-queue "
                             f"{self.max_queue}); retry in {RETRY_AFTER_S} s", "queue_full")

    def _forget(self, entry: _Pending) -> None:
        self.queued -= entry.left
        entry.taken = len(entry.items)
        if entry.timer is not None:
            entry.timer.cancel()

    def _expire(self, entry: _Pending) -> None:
        if entry.taken == 0 and not entry.future.done():  # still waiting for its first pass
            self._refuse("queue_timeout")
            entry.future.set_exception(Overloaded(
                f"server busy: waited {self.timeout_s:g} s for the model (--timeout); retry in {RETRY_AFTER_S} s",
                "queue_timeout"))

    def _refuse(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.reject(reason)
        # A line per refusal would flood the log just when the server is overloaded (and a log
        # written to a pipe nobody reads would block the event loop): one line per LOG_EVERY_S.
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning("refused %s (--max-queue %s, --timeout %s s)",
                        ", ".join(f"{n} request(s): {r.replace('_', ' ')}" for r, n in self._unlogged.items()),
                        self.max_queue, self.timeout_s)
            self._unlogged, self._logged_at = {}, now

    async def _work(self):
        loop = asyncio.get_running_loop()
        waiting: list[_Pending] = []  # requests with images still to run, oldest first
        while True:
            if not waiting:
                waiting.append(await self._queue.get())
                deadline = loop.time() + waiting[0].wait
            else:
                deadline = loop.time()  # leftovers of a request run at once; only what is queued joins
            n = sum(r.left for r in waiting)
            while n < self.max_batch:
                try:
                    entry = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        entry = await asyncio.wait_for(self._queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                waiting.append(entry)
                n += entry.left
            waiting = [r for r in waiting if not r.future.done()]  # drop cancelled and timed-out requests
            if not waiting:
                continue
            taken, room = [], self.max_batch  # (request, how many of its images)
            for r in waiting:
                k = min(room, r.left)
                taken.append((r, r.taken, k))
                room -= k
                if room == 0:
                    break
            flat = [t for r, start, k in taken for t in r.items[start:start + k]]
            for r, _, k in taken:  # in a pass now: out of the queue, and past its timeout
                r.taken += k
                self.queued -= k
            started = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self._thread, self.run_batch, flat)
            except Exception as e:  # a failed forward pass fails its requests, never the worker
                log.exception("forward pass over %d images failed", len(flat))
                for r, _, _ in taken:
                    if not r.future.done():
                        r.future.set_exception(e)
                waiting = [r for r in waiting if not r.future.done()]
                continue
            if self.metrics is not None:
                self.metrics.observe_forward(time.perf_counter() - started, len(flat))
            self.batches += 1
            self.images += len(flat)
            self.largest = max(self.largest, len(flat))
            i = 0
            for r, _, k in taken:
                r.rows.append(probs[i:i + k])
                i += k
                if r.left == 0 and not r.future.done():
                    r.future.set_result(r.rows[0] if len(r.rows) == 1 else torch.cat(r.rows))
            waiting = [r for r in waiting if r.left and not r.future.done()]

    def close(self):
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)
