"""One server for a model folder: the Gradio UI at `/` and the JSON API at `/v1`, on one FastAPI app.

    from serve.app import build_app, launch
    app, blocks = build_app("models/mnist")         # nothing listens yet; `app` is an ASGI app
    launch("models/mnist", host="0.0.0.0", port=7860)  # blocks, like `python -m serve`

Importing this module loads no model and starts nothing. The model is loaded once, by
`build_app`, and shared by the UI, the API and their batchers through one `Predictor`.
`launch` and `start_in_thread` serve it behind `serve.lifecycle.Lifecycle` (health probes,
/metrics, the warm-up, the graceful shutdown on SIGTERM / Ctrl-C within `grace_s`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from models.contract import EXAMPLES_DIR, ModelFolder
from serve.api import build_api
from serve.batcher import MicroBatcher
from serve.limits import Limits
from serve.metrics import Metrics
from serve.predictor import Predictor

__all__ = ["build_app", "launch", "start_in_thread", "RunningServer", "Limits"]

log = logging.getLogger(__name__)


# Seconds a Gradio upload is kept. Its request decodes it as it joins the queue, a moment after
# the upload; later it is only the preview of an open page. An hour keeps that preview for a
# person who comes back; anyone's uploads are gone within two.
UPLOAD_TTL = 3600
_PREFIX = "serve-uploads-"
# Seconds from SIGTERM / Ctrl-C to exit, at most. Under `docker stop`'s 10 s before its SIGKILL
# (Kubernetes gives 30 s, systemd 90 s), and over what a request received needs to finish: a wait
# in the model's queue of at most --timeout (5 s) plus its forward passes.
GRACE_S = 8.0


def _predictor(model, device) -> Predictor:
    if isinstance(model, Predictor):
        return model
    if isinstance(model, ModelFolder):
        return Predictor(model, device=device)
    return Predictor.load(Path(model), device=device)


def build_app(model: Path | str | ModelFolder | Predictor, device: str = "auto", *, limits: Limits = Limits(),
              top_k: int | None = None, gradio_batch: int | None = None, gradio_concurrency: int | None = 1,
              queue_size: int | None = None, noop: bool = False, upload_ttl: int = UPLOAD_TTL,
              metrics: Metrics | None = None):
    """Load the model (unless given a `Predictor`) and build the app: returns (fastapi_app, gradio_blocks).

    `limits` bounds each HTTP request (files, MB per file), each forward pass and the model's
    queue; Gradio uploads get the same per-file limit. `queue_size` bounds Gradio's queue (default
    `limits.max_queue`: a Gradio request is one image, so Gradio holds at most as many as the
    model's queue, and more get Gradio's "queue full" instead of growing memory). `metrics`
    (serve.metrics) counts the forward passes and refusals. `noop` serves the same app with functions that do nothing,
    as the benchmark's baseline. Raises `ModelFolderError` for an unusable model folder.

    Gradio's uploads go to a folder of this app's own (see `_upload_folder`), removed when the
    server stops; each upload is deleted `upload_ttl` to 2 x `upload_ttl` seconds after it came.
    One app per process: Gradio reads that folder from `GRADIO_TEMP_DIR`, which this sets."""
    predictor = _predictor(model, device)
    uploads = _upload_folder()  # before Gradio's first import: some of its modules read the folder then
    import gradio as gr
    from serve.ui import CSS, GRADIO_BATCH, build_ui

    metrics = metrics or Metrics(predictor.name, predictor.format, str(predictor.device))
    batcher = MicroBatcher(predictor.probabilities, limits.max_batch, limits.max_wait_ms, max_queue=limits.max_queue,
                           timeout_s=limits.queue_timeout_s, metrics=metrics)
    api = build_api(predictor, limits, batcher=batcher, metrics=metrics)
    blocks = build_ui(predictor, top_k=top_k, max_batch=gradio_batch or GRADIO_BATCH, batcher=batcher,
                      concurrency=gradio_concurrency, noop=noop, upload_dir=uploads,
                      max_file_bytes=limits.max_file_bytes, delete_cache=(upload_ttl, upload_ttl))
    # api_open=False: `/gradio_api/run/predict` would run the endpoint beside the queue, skipping
    # its validator (the per-request refusal) and its bound on waiting requests.
    blocks.queue(default_concurrency_limit=1, max_size=queue_size or limits.max_queue, api_open=False)
    examples = predictor.folder.path / EXAMPLES_DIR
    app = gr.mount_gradio_app(api, blocks, path="/", max_file_size=limits.max_file_bytes, show_error=True, css=CSS,
                              allowed_paths=[str(examples.resolve())] if examples.is_dir() else None)
    # Gradio checks that a request names only uploaded files, but only in an app that has
    # "launched": `launch()` sets the flag, `mount_gradio_app` does not, so without this any path
    # on the server's disk is opened and copied into the cache.
    blocks.has_launched = True
    _remove_at_shutdown(app, uploads)
    return app, blocks


def _upload_folder() -> Path:
    """A fresh folder for this app's Gradio uploads, under `GRADIO_TEMP_DIR` (or the system's
    temp folder), which then names it for Gradio. Not Gradio's shared /tmp/gradio: that grows
    across runs and apps, and every file in it may be served by any of them."""
    import os
    import tempfile
    parent = os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()
    if Path(parent).name.startswith(_PREFIX):  # set by an earlier app of this process: its sibling
        parent = str(Path(parent).parent)
    Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent)).resolve()
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


def _remove_at_shutdown(app, folder: Path) -> None:
    """Delete `folder` when the server stops (the app's lifespan ends) or, failing that, when
    the process exits normally."""
    import atexit
    import contextlib
    import shutil
    atexit.register(shutil.rmtree, folder, True)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a):
        try:
            async with inner(a) as state:
                yield state
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    app.router.lifespan_context = lifespan


def _uvicorn_config(app, host: str, port: int, log_level: str = "warning", limits: Limits = Limits(),
                    metrics: Metrics | None = None, grace_s: float = GRACE_S):
    import uvicorn
    from serve.limits import guarded_protocol
    # No access log: a line per request costs more than a 28x28 forward pass. uvicorn's own
    # keep-alive closes idle connections; the guarded protocol adds the request-head deadline and
    # the connection cap that uvicorn lacks (see serve/limits.py).
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_keep_alive=limits.keep_alive_s, lifespan="on", timeout_graceful_shutdown=grace_s,
                          http=guarded_protocol(limits.max_connections, limits.keep_alive_s,
                                                on_refuse=metrics.reject if metrics is not None else None))


def build_server(model, host: str = "127.0.0.1", port: int = 7860, device: str = "auto", *,
                 log_level: str = "warning", limits: Limits = Limits(), grace_s: float = GRACE_S, **build_kwargs):
    """The uvicorn server of `launch`, not started: a `serve.lifecycle.GracefulServer` whose app is
    a `Lifecycle` that builds the app (`build_app`) once HTTP is served, then warms it up with one
    forward pass of a full batch (the largest pass's memory is taken before traffic, not during it)."""
    from PIL import Image
    from serve.lifecycle import GracefulServer, Lifecycle
    predictor = _predictor(model, device)
    metrics = Metrics(predictor.name, predictor.format, str(predictor.device))
    built = {}

    def build():
        built["app"], built["blocks"] = build_app(predictor, limits=limits, metrics=metrics, **build_kwargs)
        return built["app"]

    async def warm_up(app):
        blank = predictor.prepare(Image.new("RGB", (8, 8)))
        await app.state.batcher.submit([blank] * min(limits.max_batch, limits.max_queue), max_wait_ms=0)

    front = Lifecycle(metrics, build, warm_up)
    server = GracefulServer(_uvicorn_config(front, host, port, log_level, limits, metrics, grace_s), front, grace_s)
    server.built = built  # the app and the Gradio blocks, once built (start_in_thread's `stop` closes them)
    return server


def launch(model, host: str = "127.0.0.1", port: int = 7860, device: str = "auto", *, log_level: str = "warning",
           limits: Limits = Limits(), grace_s: float = GRACE_S, **build_kwargs) -> None:
    """Build the app and serve it until SIGTERM or Ctrl-C (what `python -m serve` runs), then
    drain and return within `grace_s` seconds (serve/lifecycle.py)."""
    server = build_server(model, host, port, device, log_level=log_level, limits=limits, grace_s=grace_s,
                          **build_kwargs)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    log.info("serving on http://%s:%d  (UI at /, API at /v1/predict, docs at /v1/docs, metrics at /metrics)",
             shown, port)
    server.run()
    if server.lifecycle.failed is not None:
        raise SystemExit(1)  # the reason is logged already, with its traceback
    log.info("stopped")


@dataclass
class RunningServer:
    """A server started by `start_in_thread`: `url`, and `stop()`."""
    url: str
    server: object
    thread: threading.Thread

    @property
    def app(self):
        return self.server.built.get("app")

    @property
    def blocks(self):
        return self.server.built.get("blocks")

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        try:
            self.blocks.close()  # stops Gradio's queue workers
        except Exception:  # already closed, or never started
            pass


def start_in_thread(model, host: str = "127.0.0.1", port: int = 0, device: str = "auto",
                    startup_timeout: float = 60.0, limits: Limits = Limits(), **build_kwargs) -> RunningServer:
    """Serve in a background thread (tests, notebooks); port 0 picks a free port. Returns once
    the server is ready (built and warmed up)."""
    import socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = build_server(model, host, port, device, limits=limits, **build_kwargs)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while server.lifecycle.state != "ready":
        if not thread.is_alive() or server.lifecycle.failed is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.05)
    return RunningServer(f"http://{host}:{port}", server, thread)
