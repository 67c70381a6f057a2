"""One server for a model folder: the Gradio UI at `/` and the JSON API at `/v1`, on one FastAPI app.

    from serve.app import build_app, launch
    app, blocks = build_app("models/mnist")         # nothing listens yet; `app` is an ASGI app
    launch("models/mnist", host="0.0.0.0", port=7860)  # blocks, like `python -m serve`

Importing this module loads no model and starts nothing. The model is loaded once, by
`build_app`, and shared by the UI, the API and their batchers through one `Predictor`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from models.contract import EXAMPLES_DIR, ModelFolder
from serve.api import MicroBatcher, build_api
from serve.limits import Limits
from serve.predictor import Predictor

__all__ = ["build_app", "launch", "start_in_thread", "RunningServer", "Limits"]

log = logging.getLogger(__name__)


# Seconds a Gradio upload is kept. Its request decodes it as it joins the queue, a moment after
# the upload; later it is only the preview of an open page. An hour keeps that preview for a
# person who comes back; anyone's uploads are gone within two.
UPLOAD_TTL = 3600
_PREFIX = "serve-uploads-"


def _predictor(model, device) -> Predictor:
    if isinstance(model, Predictor):
        return model
    if isinstance(model, ModelFolder):
        return Predictor(model, device=device)
    return Predictor.load(Path(model), device=device)


def build_app(model: Path | str | ModelFolder | Predictor, device: str = "auto", *, limits: Limits = Limits(),
              top_k: int | None = None, gradio_batch: int | None = None, gradio_concurrency: int | None = 1,
              queue_size: int = 1024, noop: bool = False, upload_ttl: int = UPLOAD_TTL):
    """Load the model (unless given a `Predictor`) and build the app: returns (fastapi_app, gradio_blocks).

    `limits` bounds each HTTP request (files, MB per file) and each forward pass; Gradio uploads
    get the same per-file limit. `queue_size` bounds Gradio's queue (more waiting requests get a
    503 instead of growing memory). `noop` serves the same app with functions that do nothing,
    as the benchmark's baseline. Raises `ModelFolderError` for an unusable model folder.

    Gradio's uploads go to a folder of this app's own (see `_upload_folder`), removed when the
    server stops; each upload is deleted `upload_ttl` to 2 x `upload_ttl` seconds after it came.
    One app per process: Gradio reads that folder from `GRADIO_TEMP_DIR`, which this sets."""
    predictor = _predictor(model, device)
    uploads = _upload_folder()  # before Gradio's first import: some of its modules read the folder then
    import gradio as gr
    from serve.ui import CSS, GRADIO_BATCH, build_ui

    batcher = MicroBatcher(predictor.probabilities, limits.max_batch, limits.max_wait_ms)
    api = build_api(predictor, limits, batcher=batcher)
    blocks = build_ui(predictor, top_k=top_k, max_batch=gradio_batch or GRADIO_BATCH, batcher=batcher,
                      concurrency=gradio_concurrency, noop=noop, upload_dir=uploads,
                      max_file_bytes=limits.max_file_bytes, delete_cache=(upload_ttl, upload_ttl))
    # api_open=False: `/gradio_api/run/predict` would run the endpoint beside the queue, skipping
    # its validator (the per-request refusal) and its bound on waiting requests.
    blocks.queue(default_concurrency_limit=1, max_size=queue_size, api_open=False)
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


def _uvicorn_config(app, host: str, port: int, log_level: str = "warning", limits: Limits = Limits()):
    import uvicorn
    from serve.limits import guarded_protocol
    # No access log: a line per request costs more than a 28x28 forward pass. uvicorn's own
    # keep-alive closes idle connections; the guarded protocol adds the request-head deadline and
    # the connection cap that uvicorn lacks (see serve/limits.py).
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_keep_alive=limits.keep_alive_s, lifespan="on",
                          http=guarded_protocol(limits.max_connections, limits.keep_alive_s))


def launch(model, host: str = "127.0.0.1", port: int = 7860, device: str = "auto", *, log_level: str = "warning",
           limits: Limits = Limits(), **build_kwargs) -> None:
    """Build the app and serve it until interrupted (what `python -m serve` runs)."""
    import uvicorn
    app, _ = build_app(model, device, limits=limits, **build_kwargs)
    server = uvicorn.Server(_uvicorn_config(app, host, port, log_level, limits))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    log.info("serving on http://%s:%d  (UI at /, API at /v1/predict, docs at /v1/docs)", shown, port)
    server.run()


@dataclass
class RunningServer:
    """A server started by `start_in_thread`: `url`, and `stop()`."""
    url: str
    server: object
    thread: threading.Thread
    app: object
    blocks: object

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        try:
            self.blocks.close()  # stops Gradio's queue workers
        except Exception:  # already closed, or never started
            pass


def start_in_thread(model, host: str = "127.0.0.1", port: int = 0, device: str = "auto",
                    startup_timeout: float = 60.0, limits: Limits = Limits(), **build_kwargs) -> RunningServer:
    """Serve in a background thread (tests, notebooks); port 0 picks a free port."""
    import socket
    import uvicorn
    app, blocks = build_app(model, device, limits=limits, **build_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(_uvicorn_config(app, host, port, limits=limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.05)
    return RunningServer(f"http://{host}:{port}", server, thread, app, blocks)
