"""POST /v1/classify: the Hugging Face Inference API's image-classification task, on our server.

    from huggingface_hub import InferenceClient
    InferenceClient(model="http://127.0.0.1:7860/v1/classify").image_classification("digit.png", top_k=3)
    # [ImageClassificationOutputElement(label='7', score=0.998), ...]

    curl --data-binary @digit.png -H 'Content-Type: image/png' 'http://127.0.0.1:7860/v1/classify?top_k=3'
    [{"label": "7", "score": 0.998}, {"label": "2", "score": 0.001}, {"label": "1", "score": 0.0004}]

The request is one image, in either of the two shapes the Inference API takes:
- the raw image bytes, with any Content-Type but JSON and multipart (image/png, image/jpeg,
  application/octet-stream, or none: what huggingface_hub 2.4's InferenceClient sends when it
  has no parameters); parameters may go in the query string (`?top_k=3&function_to_apply=none`);
- JSON `{"inputs": "<base64 image>", "parameters": {"top_k": k, "function_to_apply": f}}` with
  Content-Type application/json: what the InferenceClient sends once a parameter is given.
  `inputs` may also be a `data:<type>;base64,...` URL. A URL to fetch is refused, never fetched.

The answer is `[{"label": ..., "score": ...}, ...]`, most likely first, `top_k` of them (default
`HF_DEFAULT_TOP_K`, transformers' pipeline default, or every class if the model has fewer; more
than the classes means all of them). Everything else is `/v1/predict`'s: the body limits of
`serve.limits` (the raw image is one file of at most `--max-file-mb`; its base64 in JSON may be
4/3 of that), the same decoding threads, the same micro-batcher (classify and predict requests
share forward passes), and the same refusals, a 4xx with `{"error": ...}`.

`function_to_apply` (the Inference API's names). Every format serves probabilities (the ONNX
graph ends in its softmax), so raw logits are not available on every backend; scores are derived
from the probabilities instead, identically for every `--format`:
- the model's own activation (`softmax` for single-label models, `sigmoid` for multi-label ones):
  the probabilities themselves, the default, equal to /v1/predict's confidences;
- a sigmoid model: its logits are recovered exactly, logit(p) = log p - log(1 - p), so `none`
  gives them and `softmax` gives their softmax;
- a softmax model: softmax forgets one constant per image, so `none` gives log p, the logits
  shifted so that their log-sum-exp is 0 (softmax of these is the probabilities again, and their
  differences are the logits' differences); `sigmoid` needs the lost constant and is refused, 422.
Scores are floored at float32's smallest normal number (log: -87.3; a sigmoid model's logits
within +-16.6), where a probability has underflowed to 0 or rounded to 1: JSON has no infinity.
"""
from __future__ import annotations

import asyncio
import binascii
import json
from typing import Callable

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from models.imageio import ImageError
from serve.api import TOP_K_DIGITS, FastJSONResponse, RequestError, _status_for, parse_top_k

__all__ = ["PATH", "HF_DEFAULT_TOP_K", "FUNCTIONS", "add_classify_route", "max_json_bytes", "json_text", "load_json",
           "parse_json_body", "scores"]

PATH = "/v1/classify"
HF_DEFAULT_TOP_K = 5  # transformers' ImageClassificationPipeline answers 5 classes unless told otherwise
FUNCTIONS = ("softmax", "sigmoid", "none")
# Room for what surrounds the base64 in a JSON body: the keys, the parameters, a `data:` prefix,
# whitespace. The InferenceClient's envelope is under 100 bytes.
JSON_SLACK = 64_000  # bytes
_TINY = torch.finfo(torch.float32).tiny  # the floor of every probability, so that no log is -inf
_ONE = 1.0 - torch.finfo(torch.float32).eps / 2  # the largest float32 below 1: logit(p) stays finite
_MAX_TOP_K = 10 ** TOP_K_DIGITS - 1


def max_json_bytes(limits) -> int:
    """The largest JSON body taken: the base64 of a file at `--max-file-mb` (4 characters per 3
    bytes) plus `JSON_SLACK`, within `--max-request-mb`."""
    return min(4 * -(-limits.max_file_bytes // 3) + JSON_SLACK, limits.max_request_bytes)


# --------------------------------------------------------------------------- the request

def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _file_too_large(limits) -> RequestError:
    return RequestError(413, f"file too large: more than {limits.max_file_mb:g} MB "
                             f"(the limit per file is {limits.max_file_mb:g} MB)")


async def read_body(request: Request, cap: int, too_large: Callable[[], RequestError]) -> bytes:
    """The whole body, refused (`too_large()`, a fresh error each time: a raised exception keeps
    the frames it passed through) once it passes `cap` bytes: at once when declared so,
    else as the bytes arrive. What follows a refusal is read and dropped (the middleware counts it
    against --max-request-mb), so that a client still sending reads the 413, not a reset."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > cap:
        raise too_large()
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                chunks = None
            elif chunks is not None:
                chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(400, "the client went away before the body arrived") from None
    if chunks is None:
        raise too_large()
    return b"".join(chunks)


def _fail(message: str, status: int = 400) -> RequestError:
    return RequestError(status, message)


def _decode_base64(inputs: str, limits) -> bytes:
    """`inputs` (base64, or a data: URL of base64) -> the image's bytes; the size is checked on
    the text, before anything is decoded."""
    text = inputs.strip()
    low = text[:8].lower()
    if low.startswith(("http://", "https:/")):
        raise _fail("inputs is a URL: this server does not fetch URLs; send the image itself, as the raw body "
                    "or base64 in inputs", 422)
    if low.startswith("data:"):
        head, comma, text = text.partition(",")
        if not comma or not head.lower().endswith(";base64"):
            raise _fail("inputs is a data: URL without ';base64,': send the image as base64", 422)
    if not text:
        raise _fail("inputs is empty: send the image as base64 (or the raw image bytes as the body)")
    if len(text) // 4 * 3 - text[-2:].count("=") > limits.max_file_bytes:
        raise _file_too_large(limits)
    try:
        # strict: the base64 alphabet only, padding only at the end (no junk skipped silently);
        # and from the str itself, without the ASCII copy that base64.b64decode makes first
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as e:  # ValueError: characters outside ASCII
        raise _fail(f"inputs is not valid base64 ({e})") from None


def json_text(body: bytes) -> str:
    """The body as text (JSON over HTTP is UTF-8, RFC 8259), or a 400. Decoded here rather than
    by `json.loads`, so that the caller can drop the bytes before the text is parsed."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(f"the body is not valid JSON (not UTF-8: {e})") from None


def load_json(text: str):
    """The parsed JSON body, or a 400."""
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, an integer of over 4,300 digits
        raise _fail(f"the body is not valid JSON ({e}): send {{\"inputs\": \"<base64 image>\"}} "
                    "or the raw image bytes with an image Content-Type") from None
    except RecursionError:
        raise _fail("the body is not valid JSON (nested too deeply)") from None


def parse_json_body(obj, limits) -> tuple[bytes, dict]:
    """A parsed JSON body -> (the image's bytes, its parameters); `RequestError` for anything else.
    Takes `inputs` out of `obj`, so that the base64 text is freed once decoded."""
    if not isinstance(obj, dict):
        raise _fail("the JSON body must be an object: {\"inputs\": \"<base64 image>\", \"parameters\": {...}}")
    unknown = sorted(set(obj) - {"inputs", "parameters", "options"})  # options: the Inference API's, ignored
    if unknown:
        raise _fail(f"unknown key {unknown[0]!r} in the JSON body: it takes inputs and parameters", 422)
    inputs = obj.pop("inputs", None)
    if not isinstance(inputs, str):
        raise _fail("inputs must be one image as a base64 string" + (
            " (one image per request; /v1/predict takes several)" if isinstance(inputs, list) else ""), 422)
    params = obj.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _fail("parameters must be an object: {\"top_k\": 3, \"function_to_apply\": \"softmax\"}", 422)
    unknown = sorted(set(params) - {"top_k", "function_to_apply"})
    if unknown:
        raise _fail(f"unknown parameter {unknown[0]!r}: image classification takes top_k and function_to_apply", 422)
    data = _decode_base64(inputs, limits)
    return data, {k: v for k, v in params.items() if v is not None}


def _top_k(value) -> int:
    if type(value) is not int or not 1 <= value <= _MAX_TOP_K:
        raise _fail(f"top_k must be a whole number from 1 to {_MAX_TOP_K:,}, not {str(value)[:20]!r}", 422)
    return value


def _function(value, activation: str) -> str:
    """The transform asked for (None: the model's own), refused when the probabilities cannot give it."""
    if value is None:
        return activation
    if value not in FUNCTIONS:
        raise _fail(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, not {str(value)[:20]!r}", 422)
    if activation == "softmax" and value == "sigmoid":
        raise _fail("function_to_apply sigmoid needs the raw logits, which this single-label (softmax) model's "
                    "formats do not all keep: use softmax (the default) or none (log-probabilities)", 422)
    return value


def scores(probs: torch.Tensor, activation: str, function: str) -> torch.Tensor:
    """Rows of probabilities from a model whose outputs end in `activation` -> the scores that
    `function_to_apply=function` gives (see the module's docstring). Order within a row is kept."""
    if function == activation:
        return probs
    p = probs.double().clamp(_TINY, _ONE if activation == "sigmoid" else 1.0)
    if activation == "softmax":  # function "none" (sigmoid is refused by `_function`)
        return p.log()
    logits = p.log() - (-p).log1p()  # activation "sigmoid": exact logits
    return logits if function == "none" else torch.softmax(logits, dim=-1)


# --------------------------------------------------------------------------- the route

def add_classify_route(app, predictor, limits, batcher, decoder) -> None:
    """Register POST /v1/classify on `app` (made by `serve.api.build_api`, whose RequestError
    handler answers the refusals), decoding on `decoder` and running on `batcher`, /v1/predict's own."""
    activation = predictor.metadata.activation
    json_cap = max_json_bytes(limits)

    def too_large_json() -> RequestError:
        return RequestError(413, f"request too large: the JSON body takes one image of at most "
                                 f"{limits.max_file_mb:g} MB as base64 ({json_cap / 1e6:g} MB of JSON)")

    @app.post(PATH, summary="Classify one image, as the Hugging Face Inference API does", openapi_extra={
        "parameters": [{"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
                        "description": f"classes to answer (default {HF_DEFAULT_TOP_K}, or all if fewer)"},
                       {"name": "function_to_apply", "in": "query", "required": False,
                        "schema": {"type": "string", "enum": list(FUNCTIONS)}}],
        "requestBody": {"required": True, "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
                "inputs": {"type": "string", "description": "the image, base64 (or a data: URL)"},
                "parameters": {"type": "object", "properties": {
                    "top_k": {"type": "integer", "minimum": 1},
                    "function_to_apply": {"type": "string", "enum": list(FUNCTIONS)}}}}}}}}})
    async def classify(request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype.split(";", 1)[0].strip().lower().startswith("multipart/"):
            raise RequestError(415, "send one image as the raw body (or JSON {\"inputs\": \"<base64>\"}); "
                                    "multipart/form-data goes to /v1/predict")
        query = request.query_params
        params = {"top_k": parse_top_k(query.get("top_k")), "function_to_apply": query.get("function_to_apply")}
        if _is_json(ctype):
            # Each copy dropped as soon as the next exists, so that at most two are held at once
            # (bench/classify_memory.py): the bytes, their text, the base64 value, the image.
            body = await read_body(request, json_cap, too_large_json)
            text = json_text(body)
            del body
            obj = load_json(text)
            del text
            data, given = parse_json_body(obj, limits)
            del obj
            params.update(given)
        else:
            data = await read_body(request, limits.max_file_bytes, lambda: _file_too_large(limits))
        if not data:
            raise RequestError(400, "empty body: send the image bytes (curl --data-binary @image.png "
                                    "-H 'Content-Type: image/png'), or JSON {\"inputs\": \"<base64 image>\"}")
        k = params["top_k"]
        k = min(_top_k(k) if k is not None else HF_DEFAULT_TOP_K, len(predictor.classes))
        function = _function(params["function_to_apply"], activation)
        batcher.admit(1)  # a full queue refuses (503 + Retry-After) before the decoding, as /v1/predict does
        try:
            item = await asyncio.get_running_loop().run_in_executor(decoder, predictor.prepare, data)
        except ImageError as e:
            raise RequestError(_status_for(e), str(e)) from None
        finally:
            del data
        probs = await batcher.submit([item])
        best = predictor.top_k(scores(probs, activation, function), k)[0]
        return FastJSONResponse([{"label": c, "score": s} for c, s in best.confidences])

    @app.api_route(PATH, methods=["GET", "HEAD", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def wrong_method(request: Request):
        # Without this, the request falls through to the Gradio app mounted at "/".
        return JSONResponse({"error": f"{request.method} is not allowed on {PATH}: POST an image"},
                            status_code=405, headers={"Allow": "POST"})
