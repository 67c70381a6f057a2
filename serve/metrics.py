"""The server's Prometheus metrics, served at `GET /metrics` in Prometheus' text format.

    curl http://127.0.0.1:7860/metrics

Every metric of the server lives here, on a registry of the app's own (not prometheus_client's
global one), so that two apps in one process (tests, notebooks) count apart:

    serve_requests_total{endpoint, status}     counter: every HTTP request, the API's and Gradio's
    serve_request_duration_seconds{endpoint}   histogram: request in, response out (a Gradio event
                                               stream lasts as long as the stream)
    serve_forward_seconds                      histogram: one forward pass of the model
    serve_batch_images                         histogram: images per forward pass
    serve_queue_images                         gauge: images waiting for the model
    serve_decode_pixels                        gauge: pixels being decoded now (--max-decode-mp's budget)
    serve_decode_pixels_peak                   gauge: the most decoded at once since the server started
    serve_rejected_total{reason}               counter: requests refused by a limit (the reasons
                                               are `REASONS`)
    serve_model_info{name, format, device}     the model served
    python_gc_collections_total{generation}    prometheus_client's GC collector: collections run, and
    python_gc_objects_collected_total{...}     objects they freed, per generation
    python_gc_frozen_objects                   gauge: objects of start-up kept out of every collection
                                               (serve/lifecycle.py's `_freeze_heap`)

`endpoint` is a route of the app or a fixed prefix of Gradio's (`endpoint_of`), never the raw
path: a stranger's made-up paths all count as "other" and cannot grow the label set.
"""
from __future__ import annotations

import gc

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, GCCollector, Gauge, Histogram, Info,
                               generate_latest)

__all__ = ["Metrics", "REASONS", "CONTENT_TYPE", "endpoint_of"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Why a request was refused, one label value each (serve/limits.py, serve/api.py, serve/batcher.py,
# serve/lifecycle.py say which): kept to this fixed set so the counter's series are known upfront.
REASONS = (
    "too_large",        # 413: a body over --max-request-mb, a file over --max-file-mb, an image over the pixel limit
    "too_many_files",   # 413: more than --max-files in one request
    "body_timeout",     # 408: a body slower than --body-timeout
    "uploads_busy",     # 503: --max-inflight-mb of bodies already held
    "connections",      # 503: --max-connections open
    "queue_full",       # 503: --max-queue images already waiting for the model
    "queue_timeout",    # 503: waited longer than --timeout for the model
    "starting",         # 503: the app is not built or warmed up yet
    "shutting_down",    # 503: a SIGTERM or Ctrl-C came; the server is draining
)

# Seconds: a 28 px digit is answered in milliseconds, a request of 12 MP photos in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # images; --max-batch caps a pass (default 64)

# Gradio's routes, counted by prefix (first match wins): the HTTP layer's view of the UI's traffic.
GRADIO_PREFIXES = ("/gradio_api/upload", "/gradio_api/queue/join", "/gradio_api/queue/data", "/gradio_api/call/",
                   "/gradio_api/heartbeat/", "/gradio_api/file=", "/gradio_api/info", "/gradio_api/",
                   "/assets/", "/config", "/theme.css", "/static/")


def endpoint_of(path: str, routes: frozenset[str] = frozenset()) -> str:
    """The `endpoint` label of a request path: the path itself if it is one of `routes` (the
    app's own, e.g. /v1/predict), else the Gradio prefix it starts with, "/" for the page, or "other"."""
    if path in routes:
        return path
    for prefix in GRADIO_PREFIXES:
        if path.startswith(prefix):
            return prefix
    return "/" if path == "/" else "other"


class Metrics:
    """The server's metrics on a registry of their own; `render()` is the body of GET /metrics."""

    def __init__(self, name: str, format: str, device: str):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("serve_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("serve_request_duration_seconds", "HTTP request to the end of its response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.forward = Histogram("serve_forward_seconds", "one forward pass of the model",
                                 buckets=FORWARD_BUCKETS, registry=r)
        self.batch = Histogram("serve_batch_images", "images per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge("serve_queue_images", "images waiting for the model", registry=r)
        self.rejected = Counter("serve_rejected", "requests refused by a limit, by reason", ["reason"], registry=r)
        for reason in REASONS:  # every series exists from the start, at 0: a rate() over it is defined
            self.rejected.labels(reason)
        Info("serve_model", "the model served", registry=r).info({"name": name, "format": format, "device": device})
        GCCollector(registry=r)
        Gauge("python_gc_frozen_objects", "objects in the garbage collector's permanent generation",
              registry=r).set_function(gc.get_freeze_count)

    def reject(self, reason: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}: add it to serve.metrics.REASONS")
        self.rejected.labels(reason).inc()

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_forward(self, seconds: float, images: int) -> None:
        self.forward.observe(seconds)
        self.batch.observe(images)

    def watch_queue(self, depth) -> None:
        """Read the queue gauge from `depth()` at every scrape (no update to forget)."""
        self.queue.set_function(depth)

    def watch_decoding(self, budget) -> None:
        """Pixels decoding now and at the peak, read from `budget` (serve.limits.DecodeBudget) at every scrape."""
        Gauge("serve_decode_pixels", "pixels being decoded now, server-wide",
              registry=self.registry).set_function(lambda: budget.in_use)
        Gauge("serve_decode_pixels_peak", "the most pixels decoded at once since the server started",
              registry=self.registry).set_function(lambda: budget.peak)

    def render(self) -> bytes:
        return generate_latest(self.registry)
