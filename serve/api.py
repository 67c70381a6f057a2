"""The plain JSON HTTP API, for clients that do not speak Gradio's protocol.

    POST /v1/predict?top_k=3   multipart/form-data, one or more images under the field `files`
        200 -> [{"label": "7", "confidences": [{"label": "7", "confidence": 0.98}, ...]}, ...]
               one object per file, in the order sent; a multi-label model answers
               {"labels": [every class above its threshold], "confidences": [every class, most likely first]}
        4xx -> {"error": "a reason fit for a person", "file": "name.png" (when one file is to blame)}
    GET  /v1/health            model name, classes, device, limits
    (GET /v1/health/live, /v1/health/ready and /metrics are answered in front of this app, by
    serve/lifecycle.py, so that they answer while the app starts and stops too.)

    curl -F files=@digit.png -F files=@other.jpg 'http://127.0.0.1:7860/v1/predict?top_k=3'

Requests that arrive together share forward passes: each request decodes its own files (in a
small thread pool, so a bad file fails only its own request), then queues the decoded tensors on a
`MicroBatcher` (serve/batcher.py), whose worker runs what is queued, at most `max_batch` images a
pass, in a single model thread; past `--max-queue` waiting images, or `--timeout` seconds of
waiting, a request gets 503 with Retry-After. Bodies are bounded before this module sees them by
`serve.limits.RequestLimits`
(413 one request too large, 503 + Retry-After the server's budget for uploads in flight is full,
408 a body too slow), one home for every route of the app.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request  # at module level: FastAPI resolves handler annotations by name
from fastapi.responses import JSONResponse

from models.imageio import ImageError
from serve.batcher import MicroBatcher, Overloaded
from serve.limits import DecodeBudget, InflightBudget, Limits, RequestLimits
from serve.metrics import Metrics
from serve.predictor import Predictor

__all__ = ["Limits", "FastJSONResponse", "MicroBatcher", "RequestError", "Upload", "build_api", "read_uploads"]

log = logging.getLogger(__name__)

FIELD = "files"  # the multipart field name that carries the images
TOP_K_DIGITS = 6  # top_k is 1 .. 999,999 (more than the classes means all of them); longer is refused


class FastJSONResponse(JSONResponse):
    """A JSONResponse encoded by orjson where it is installed: the same bytes as starlette's
    `json.dumps(..., separators=(",", ":"))` for our answers, ~15x faster to make (a digit's answer:
    5 against 80 us on the loaded 2-core machine). Without orjson, starlette's own encoder."""

    def render(self, content) -> bytes:
        return _orjson.dumps(content) if _orjson is not None else super().render(content)


try:
    import orjson as _orjson
except ImportError:  # an optional speed-up (requirements.txt has it)
    _orjson = None


class RequestError(Exception):
    """A request we refuse: an HTTP status and a one-line reason; `reason`, for a refusal by a
    limit, is what serve.metrics counts it as (any 413 is "too_large" unless told otherwise)."""

    def __init__(self, status: int, message: str, file: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.status, self.message, self.file = status, message, file
        self.reason = reason or ("too_large" if status == 413 else None)

    def as_json(self) -> dict:
        return {"error": self.message, **({"file": self.file} if self.file is not None else {})}


# --------------------------------------------------------------------------- multipart upload

@dataclass
class Upload:
    """One uploaded file. `data` is bytes (what the decoder takes without a copy), made once per
    file from its chunks; `size` counts the bytes while they arrive."""
    name: str
    data: bytes | None = None
    size: int = 0
    chunks: list | None = None


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
                                             f"(the limit is {limits.max_files}; send the rest in another)",
                                        reason="too_many_files"))
            return
        name = part["filename"] or f"file {len(uploads) + 1}"
        uploads.append(Upload(name, chunks=[]))
        part.update(skip=False, data=uploads[-1])

    def on_part_data(data, start, end):
        if part["skip"] or refusal:
            return
        up = part["data"]
        up.chunks.append(data[start:end])
        up.size += end - start
        if up.size > limits.max_file_bytes:
            refusal.append(RequestError(413, f"file too large: more than {limits.max_file_mb:g} MB "
                                             f"(the limit per file is {limits.max_file_mb:g} MB)", up.name))
            up.chunks = []

    def on_part_end():
        up = part["data"]
        if not part["skip"] and not refusal and up is not None:
            # One join per file: its chunks are freed at once, so a file is held twice only while
            # it is joined (a bytearray grown chunk by chunk, then copied to bytes, held the whole
            # request twice).
            up.data, up.chunks = b"".join(up.chunks), None

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
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
    for up in uploads:  # a part the parser never saw end (python-multipart ends each before finalize)
        if up.data is None:
            up.data, up.chunks = b"".join(up.chunks or ()), None
    if not uploads:
        raise RequestError(400, f"no files: send one or more images under the multipart field '{FIELD}' "
                                f"(curl -F {FIELD}=@image.png ...)")
    return uploads


# --------------------------------------------------------------------------- the routes

def parse_top_k(value: str | None) -> int | None:
    """The `top_k` query parameter: None (the default), or 1 .. 999,999 written in ASCII digits.
    (`str.isdigit` also passes `²` and Arabic-Indic digits, and `int` refuses over 4,300 digits.)
    More than the model's classes means all of them (`Predictor.top_k` clamps)."""
    if value is None:
        return None
    if not (0 < len(value) <= TOP_K_DIGITS and value.isascii() and value.isdigit()) or int(value) < 1:
        shown = value if len(value) <= 20 else value[:20] + f"... ({len(value)} characters)"
        raise RequestError(422, f"top_k must be a whole number from 1 to {10 ** TOP_K_DIGITS - 1:,}, not {shown!r}")
    return int(value)


def _status_for(err: ImageError) -> int:
    # open_image says "too large" for images over the pixel limit (decompression bombs included):
    # that is a payload the server refuses by size (413); anything else is an unusable image (422).
    return 413 if "too large" in str(err) else 422


def build_api(predictor: Predictor, limits: Limits = Limits(), decode_workers: int = 2,
              batcher: MicroBatcher | None = None, metrics: Metrics | None = None):
    """A FastAPI app with the /v1 routes. The Gradio UI is mounted on it by `serve.app`, and
    shares `batcher` (made here if not given) so that UI and API requests share forward passes.
    `RequestLimits` sits in front of the whole app, so it bounds the bodies of Gradio's routes too.
    Refusals by a limit are counted on `metrics` (serve.metrics; made here if not given)."""
    metrics = metrics or Metrics(predictor.name, predictor.format, str(predictor.device))
    batcher = batcher or MicroBatcher(predictor.probabilities, limits.max_batch, limits.max_wait_ms,
                                      max_queue=limits.max_queue, timeout_s=limits.queue_timeout_s, metrics=metrics)
    budget = InflightBudget(limits.max_inflight_bytes)
    decoder = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")
    # Every decode for this predictor, these threads' and the Gradio UI's mounted beside (its
    # validators run in up to 40 threads), shares one budget of pixels.
    decoding = DecodeBudget(limits.max_decode_pixels)
    predictor.decode_gate = decoding.hold
    metrics.watch_decoding(decoding)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"{predictor.name} image classifier", docs_url="/v1/docs", redoc_url=None,
                  openapi_url="/v1/openapi.json", lifespan=lifespan)
    app.state.predictor, app.state.batcher, app.state.limits, app.state.metrics = predictor, batcher, limits, metrics
    app.add_middleware(RequestLimits, limits=limits, budget=budget, on_refuse=metrics.reject)
    started = time.time()

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        if err.reason is not None:
            metrics.reject(err.reason)
        return FastJSONResponse(err.as_json(), status_code=err.status)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, err: Overloaded):  # counted by the batcher, which refused it
        return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": str(err.retry_after)})

    async def prepare(upload: Upload) -> torch.Tensor:
        data, upload.data = upload.data, None  # dropped once decoded, while the others still decode
        try:
            return await asyncio.get_running_loop().run_in_executor(decoder, predictor.prepare, data)
        except ImageError as e:
            raise RequestError(_status_for(e), f"{upload.name}: {e}", upload.name) from None
        finally:
            del data

    @app.post("/v1/predict", summary="Classify one or more images", openapi_extra={
        "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
                        "description": f"classes per image (default {predictor.default_top_k})"}],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [FIELD],
            "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def predict(request: Request):
        top_k = parse_top_k(request.query_params.get("top_k"))
        uploads = await read_uploads(request, limits)
        batcher.admit(len(uploads))  # a full queue refuses before the decoding, not after
        items = await asyncio.gather(*(prepare(u) for u in uploads))
        probs = await batcher.submit(items)
        preds = predictor.top_k(probs, top_k)
        return FastJSONResponse([p.as_dict() for p in preds])

    @app.get("/v1/health", summary="The model served, and the limits of /v1/predict")
    async def health():
        meta = predictor.metadata
        return {"status": "ok", "name": predictor.name, "classes": predictor.classes, "device": str(predictor.device),
                "arch": meta.arch, "image_size": meta.image_size, "format": predictor.format,
                "valid_accuracy": meta.metrics.valid_accuracy, "created": meta.created,
                "default_top_k": predictor.default_top_k, "multi_label": predictor.multi_label,
                "threshold": predictor.threshold, "limits": limits.as_dict(),
                "uptime_s": round(time.time() - started, 1),
                "batches": batcher.batches, "images": batcher.images, "largest_batch": batcher.largest,
                "queued_images": batcher.queued, "peak_queued_images": batcher.peak_queue,
                "inflight_mb": round(budget.held / 1e6, 3), "peak_inflight_mb": round(budget.peak / 1e6, 3)}

    from serve.hf_inference import add_classify_route  # POST /v1/classify, the Hugging Face Inference API's
    add_classify_route(app, predictor, limits, batcher, decoder)
    return app
