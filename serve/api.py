"""The plain JSON HTTP API, for clients that do not speak Gradio's protocol.

    POST /v1/predict?top_k=3   multipart/form-data, one or more images under the field `files`
        200 -> [{"label": "7", "confidences": [{"label": "7", "confidence": 0.98}, ...]}, ...]
               one object per file, in the order sent
        4xx -> {"error": "a reason fit for a person", "file": "name.png" (when one file is to blame)}
    GET  /v1/health            model name, classes, device, limits

    curl -F files=@digit.png -F files=@other.jpg 'http://127.0.0.1:7860/v1/predict?top_k=3'

Requests that arrive together share one forward pass: each request decodes its own files (in a
small thread pool, so a bad file fails only its own request), then queues the decoded tensors on a
`MicroBatcher`, whose worker runs whatever is queued as one batch in a single model thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from fastapi import FastAPI, Request  # at module level: FastAPI resolves handler annotations by name
from fastapi.responses import JSONResponse

from models.imageio import ImageError, MAX_PIXELS
from serve.predictor import Predictor

__all__ = ["Limits", "MicroBatcher", "RequestError", "Upload", "build_api", "read_uploads"]

log = logging.getLogger(__name__)

FIELD = "files"  # the multipart field name that carries the images


@dataclass(frozen=True)
class Limits:
    """What one request may carry; said in every refusal and in /v1/health."""
    max_files: int = 64          # images per request
    max_file_mb: float = 20.0    # per file, in MB (10^6 bytes): a 24-megapixel JPEG is ~12 MB
    max_batch: int = 64          # images per forward pass across concurrent requests
    max_wait_ms: float = 2.0     # how long a lone request waits for company before its forward pass

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1_000_000)

    @property
    def max_body_bytes(self) -> int:
        # every file at its limit, plus room for the multipart headers and boundaries
        return self.max_files * self.max_file_bytes + 1_000_000

    def as_dict(self) -> dict:
        return {"max_files": self.max_files, "max_file_mb": self.max_file_mb, "max_pixels": MAX_PIXELS,
                "max_batch": self.max_batch}


class RequestError(Exception):
    """A request we refuse: an HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str, file: str | None = None):
        super().__init__(message)
        self.status, self.message, self.file = status, message, file

    def as_json(self) -> dict:
        return {"error": self.message, **({"file": self.file} if self.file is not None else {})}


# --------------------------------------------------------------------------- multipart upload

@dataclass
class Upload:
    name: str
    data: bytearray


async def read_uploads(request, limits: Limits) -> list[Upload]:
    """Stream-parse a multipart body into the files under `files`, enforcing the limits as the
    bytes arrive: a 2 GB upload is refused after 20 MB, not after it has filled the disk.

    After a refusal the rest of the body (up to `max_body_bytes`) is read and dropped, so that the
    client, still sending, reads our 413 instead of a reset connection."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise RequestError(415, f"send the images as multipart/form-data, under the field '{FIELD}' "
                                f"(curl -F {FIELD}=@image.png ...)")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_body_bytes:
        raise RequestError(413, f"request too large ({int(length) / 1e6:.1f} MB): at most {limits.max_files} files "
                                f"of {limits.max_file_mb:g} MB each")

    uploads: list[Upload] = []
    refusal: list[RequestError] = []   # the first limit broken; parsing continues only to drain
    part = {"headers": [], "name": None, "filename": None, "data": None, "skip": True}
    header = [b"", b""]

    def on_part_begin():
        part.update(headers=[], name=None, filename=None, data=None, skip=True)

    def on_header_field(data, start, end):
        header[0] += data[start:end]

    def on_header_value(data, start, end):
        header[1] += data[start:end]

    def on_header_end():
        if header[0].lower() == b"content-disposition":
            _, opts = parse_options_header(header[1])
            part["name"] = opts.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in opts:
                part["filename"] = opts[b"filename"].decode("utf-8", "replace")
        header[0] = header[1] = b""

    def on_headers_finished():
        if part["name"] != FIELD or refusal:
            return  # other fields are ignored; after a refusal everything is
        if len(uploads) >= limits.max_files:
            refusal.append(RequestError(413, f"too many files: more than {limits.max_files} in one request "
                                             f"(the limit is {limits.max_files}; send the rest in another)"))
            return
        name = part["filename"] or f"file {len(uploads) + 1}"
        uploads.append(Upload(name, bytearray()))
        part.update(skip=False, data=uploads[-1])

    def on_part_data(data, start, end):
        if part["skip"] or refusal:
            return
        up = part["data"]
        up.data += data[start:end]
        if len(up.data) > limits.max_file_bytes:
            refusal.append(RequestError(413, f"file too large: more than {limits.max_file_mb:g} MB "
                                             f"(the limit per file is {limits.max_file_mb:g} MB)", up.name))
            up.data = bytearray()

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data})
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_body_bytes:
                raise refusal[0] if refusal else RequestError(
                    413, f"request too large: at most {limits.max_files} files of {limits.max_file_mb:g} MB each")
            if not refusal:
                parser.write(chunk)
        if not refusal:
            parser.finalize()
    except RequestError:
        raise
    except Exception as e:  # python-multipart's parse errors, a client that went away mid-body
        raise RequestError(400, f"malformed multipart body ({type(e).__name__}: {e})") from None
    if refusal:
        raise refusal[0]
    if not uploads:
        raise RequestError(400, f"no files: send one or more images under the multipart field '{FIELD}' "
                                f"(curl -F {FIELD}=@image.png ...)")
    return uploads


# --------------------------------------------------------------------------- batching

class MicroBatcher:
    """Group the tensors of concurrent requests into one forward pass.

    `submit` queues a request's prepared images and awaits their rows of probabilities. One worker
    task takes the first waiting request, then everything else queued within `max_wait_ms`, up to
    `max_batch` images, and runs `run_batch` on them in a single dedicated thread (the event loop
    keeps accepting requests meanwhile; those then form the next batch). Under load the batch
    grows by itself; a lone request waits at most `max_wait_ms`."""

    def __init__(self, run_batch: Callable[[Sequence[torch.Tensor]], torch.Tensor], max_batch: int = 64,
                 max_wait_ms: float = 2.0):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.batches = 0  # forward passes run, and images through them: for /v1/health and tests
        self.images = 0

    async def submit(self, items: Sequence[torch.Tensor], max_wait_ms: float | None = None) -> torch.Tensor:
        """Queue one request's prepared images; returns their rows of probabilities. A batch that
        this request opens waits `max_wait_ms` (default: the batcher's) for company."""
        if self._task is None or self._task.done():  # started lazily, inside the server's event loop
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._work(), name="micro-batcher")
        future = asyncio.get_running_loop().create_future()
        wait = self.max_wait if max_wait_ms is None else max_wait_ms / 1000
        await self._queue.put((list(items), future, wait))
        return await future

    async def _work(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            n = len(batch[0][0])
            deadline = loop.time() + batch[0][2]
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
                batch.append(entry)
                n += len(entry[0])
            batch = [(items, fut) for items, fut, _ in batch if not fut.done()]  # drop cancelled requests
            if not batch:
                continue
            flat = [t for items, _ in batch for t in items]
            try:
                probs = await loop.run_in_executor(self._thread, self.run_batch, flat)
            except Exception as e:  # a failed forward pass fails its requests, never the worker
                log.exception("forward pass over %d images failed", len(flat))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.images += len(flat)
            i = 0
            for items, fut in batch:
                if not fut.done():
                    fut.set_result(probs[i:i + len(items)])
                i += len(items)

    def close(self):
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- the routes

def _status_for(err: ImageError) -> int:
    # open_image says "too large" for images over the pixel limit (decompression bombs included):
    # that is a payload the server refuses by size (413); anything else is an unusable image (422).
    return 413 if "too large" in str(err) else 422


def build_api(predictor: Predictor, limits: Limits = Limits(), decode_workers: int = 2,
              batcher: MicroBatcher | None = None):
    """A FastAPI app with the /v1 routes. The Gradio UI is mounted on it by `serve.app`, and
    shares `batcher` (made here if not given) so that UI and API requests share forward passes."""
    batcher = batcher or MicroBatcher(predictor.probabilities, limits.max_batch, limits.max_wait_ms)
    decoder = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"{predictor.name} image classifier", docs_url="/v1/docs", redoc_url=None,
                  openapi_url="/v1/openapi.json", lifespan=lifespan)
    app.state.predictor, app.state.batcher, app.state.limits = predictor, batcher, limits
    started = time.time()

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        return JSONResponse(err.as_json(), status_code=err.status)

    async def prepare(upload: Upload) -> torch.Tensor:
        try:
            return await asyncio.get_running_loop().run_in_executor(decoder, predictor.prepare, bytes(upload.data))
        except ImageError as e:
            raise RequestError(_status_for(e), f"{upload.name}: {e}", upload.name) from None

    @app.post("/v1/predict", summary="Classify one or more images", openapi_extra={
        "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
                        "description": f"classes per image (default {predictor.default_top_k})"}],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [FIELD],
            "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def predict(request: Request):
        top_k = request.query_params.get("top_k")
        if top_k is not None and not (top_k.isdigit() and int(top_k) >= 1):
            raise RequestError(422, f"top_k must be a whole number >= 1, not {top_k!r}")
        uploads = await read_uploads(request, limits)
        items = await asyncio.gather(*(prepare(u) for u in uploads))
        probs = await batcher.submit(items)
        preds = predictor.top_k(probs, int(top_k) if top_k else None)
        return JSONResponse([p.as_dict() for p in preds])

    @app.get("/v1/health", summary="The model served, and the limits of /v1/predict")
    async def health():
        meta = predictor.metadata
        return {"status": "ok", "name": predictor.name, "classes": predictor.classes, "device": str(predictor.device),
                "arch": meta.arch, "image_size": meta.image_size, "format": predictor.format,
                "valid_accuracy": meta.metrics.valid_accuracy, "created": meta.created,
                "default_top_k": predictor.default_top_k, "limits": limits.as_dict(),
                "uptime_s": round(time.time() - started, 1),
                "batches": batcher.batches, "images": batcher.images}

    return app
