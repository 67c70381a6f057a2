"""The Gradio web UI: an image in (upload, paste, webcam; a sketch pad for digit models), the top
classes out (a multi-label model: every class above its threshold, and a line naming them), the
model folder's examples to click, and a description built from its metadata.

`build_ui(predictor)` returns the Blocks; `serve.app` mounts it on the same FastAPI app as the
HTTP API. Its endpoint `predict` (`gradio_client`: `client.predict(handle_file(p), api_name="/predict")`)
is batched: images queued together share one forward pass.

Bad input is refused per request, before it reaches a batch: a batched Gradio function that raises
fails every request in its batch, so the decoding happens in the event's validator, which Gradio
runs for each request as it joins the queue. The validator answers a bad image with
`gr.validate(False, reason)`: Gradio refuses that request alone (HTTP 422 on `/queue/join`), the
page shows the reason on the image box, and `gradio_client` raises `ValidationError(reason)`.

A request names its image by a server path (Gradio's `FileData`), so every input here reads only
files this app was given: uploads in the app's upload folder (`upload_dir`) and the model's own
examples, after resolving `..` and symlinks. Anything else (`/etc/passwd`, an image elsewhere on
disk, a URL) is refused with one message that does not say whether the file exists, before it is
opened or copied. Gradio's own check of the same rule only runs in a launched app; `serve.app`
turns it on for the mounted one. Image data sent inline (a `data:` URL) obeys the per-file limit.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
from fastapi import HTTPException
from PIL import Image

from models.imageio import ImageError
from serve.batcher import Overloaded
from serve.predictor import Predictor

__all__ = ["build_ui", "describe", "is_digit_model", "sketch_to_digit", "image_input", "InputFiles", "Refused"]

log = logging.getLogger(__name__)

GRADIO_BATCH = 32          # requests per batched call of the `predict` endpoint
# Threads that decode the UI's images (the validator's), as the API has its own two. Not Gradio's
# shared pool of 40: a decode may wait its turn in the server's decoding budget, and 40 waiting
# there would leave none for Gradio's uploads and files. Requests beyond wait as futures, on the loop.
UI_DECODE_THREADS = 2
SKETCH_CANVAS = (280, 280)  # px; 10x MNIST's 28, so the brush below becomes a ~2 px MNIST stroke
SKETCH_BRUSH = 14           # px brush radius on that canvas: a ~2.5 px stroke once the digit is 20 px tall
DIGIT_FILL = 20 / 28        # MNIST centres each digit in a 20x20 box inside its 28x28 frame
SKETCH_MAX_SIDE = 8 * SKETCH_CANVAS[0]  # px; the pad sends its 280 px canvas (x devicePixelRatio at most)
SKETCH_MAX_BLOBS = 64       # drawings sent to the pad's blob endpoint and not yet classified, kept at most
SKETCH_MAX_LAYERS = 4       # layer slots one drawing may fill (the pad has one: `layers=False`)
# Small images (a 28x28 digit) are shown filling the image box, with sharp pixels.
CSS = "#image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


class Refused(ValueError):
    """A Gradio input refused before it was opened; `str(err)` is the reason. The image input's
    preprocessing returns it instead of raising, for the validator to report to that request."""


class InputFiles:
    """Which files a Gradio input may read, and how large one may be.

    `upload_dir` is the folder Gradio stores this app's uploads in; `examples` are the model's
    bundled example files. `max_bytes` bounds a file sent inline as a `data:` URL (an upload's
    size is bounded by Gradio's upload route, with the same limit)."""

    NOT_UPLOADED = ("refused: not a file uploaded to this app; upload the image first "
                    "(the page does; gradio_client: handle_file(path); HTTP: POST /gradio_api/upload)")
    NO_URLS = "refused: images are not fetched from URLs; upload the file instead"

    def __init__(self, upload_dir, examples=(), max_bytes: int | None = None):
        self.upload_dir = Path(os.path.realpath(upload_dir))
        self.examples = frozenset(os.path.realpath(p) for p in examples)
        self.max_bytes = max_bytes

    def path(self, path) -> str:
        """`path` resolved (symlinks, `..`), if it is an upload or an example; else `Refused`.
        Nothing outside is looked at, so the answer is the same whether the file exists or not."""
        text = str(path)
        if "://" in text:
            raise Refused(self.NO_URLS)
        real = os.path.realpath(text)
        if real in self.examples or (Path(real).is_relative_to(self.upload_dir) and real != str(self.upload_dir)):
            return real
        raise Refused(self.NOT_UPLOADED)

    def data_url(self, url: str) -> bytes:
        """The bytes of a `data:[<mime>][;base64],<data>` URL, refused unread when too large."""
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise Refused("refused: an inline image must be a base64 data URL (data:image/png;base64,...)")
        # 4 base64 characters carry 3 bytes: compare before decoding, so a huge URL costs no copy.
        if self.max_bytes is not None and (len(data) - data.count("=")) * 3 // 4 > self.max_bytes:
            mb = self.max_bytes / 1e6
            raise Refused(f"file too large: more than {mb:g} MB (the limit per file is {mb:g} MB)")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise Refused("refused: the image's data URL is not valid base64") from None


def _file_data_paths(payload):
    """Every `path` in a Gradio payload (FileData, EditorData, or pydantic models of them)."""
    if payload is None:
        return
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump()
    if isinstance(payload, dict):
        if isinstance(payload.get("path"), str):
            yield payload["path"]
        for v in payload.values():
            if isinstance(v, (dict, list)):
                yield from _file_data_paths(v)
    elif isinstance(payload, list):
        for v in payload:
            yield from _file_data_paths(v)


def _raw_file(payload, files: InputFiles):
    """The uploaded file untouched: its resolved path, or bytes for a data URL; a `Refused` for
    anything this app may not read (the validator reports it, so it fails only its own request)."""
    if payload is None:
        return None
    try:
        if payload.url and payload.url.startswith("data:"):
            return files.data_url(payload.url)
        if not payload.path:
            raise Refused("refused: no file named")
        return files.path(payload.path)
    except Refused as e:
        return e


def image_input(files: InputFiles, **kwargs) -> gr.Image:
    """`gr.Image` that hands our function the uploaded file untouched. Gradio's own preprocessing
    would open it with PIL first: a decompression bomb or a non-image would then fail inside Gradio
    with a generic error, and 16-bit, CMYK or EXIF-rotated images would be converted its way
    rather than by `models.imageio`, the one home of decoding.

    It reads only what `files` allows (see `InputFiles`) and copies nothing into Gradio's cache.

    The overrides are set on the instance: a subclass of a Gradio component would make Gradio
    write a `.pyi` stub next to this module at import time."""
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    image.preprocess = lambda payload: _raw_file(payload, files)
    _copy_only_uploads(image)
    return image


def _copy_only_uploads(block) -> None:
    """Gradio moves each request's FileData into the cache before preprocessing, and fetches an
    `http(s)://` path from the web to do so (unbounded in size). Here it copies nothing: an upload
    is in the cache already, and anything else is passed on unchanged for the input's own check
    to refuse (in the validator, so the client is told why)."""
    move = block.async_move_resource_to_block_cache

    async def only_uploads(path):
        if path is None or "://" in str(path) or not _inside(path, block.GRADIO_CACHE):
            return None if path is None else str(path)
        return await move(path)

    block.async_move_resource_to_block_cache = only_uploads


def _inside(path, folder) -> bool:
    return Path(os.path.realpath(str(path))).is_relative_to(os.path.realpath(folder))


def sketch_input(files: InputFiles, **kwargs) -> gr.Sketchpad:
    """`gr.Sketchpad` that reads only this app's uploads and bounds what it keeps.

    The pad sends its drawing either as FileData (paths: checked like `image_input`'s) or as blobs
    to the component's `accept_blobs` endpoint, which Gradio keeps in memory until the drawing is
    classified. Here each blob is an image of at most `SKETCH_MAX_SIDE` px a side (checked from
    its header, before decoding) and of at most the per-file limit, in at most
    `SKETCH_MAX_LAYERS` slots, and at most `SKETCH_MAX_BLOBS` unclassified drawings are kept
    (the oldest go first)."""
    sketch = gr.Sketchpad(**kwargs)
    preprocess = sketch.preprocess

    def guarded(payload):
        if payload is None:
            return None
        try:
            for p in _file_data_paths(payload):
                files.path(p)
            if getattr(payload, "id", None) is None:  # blobs were checked as they came
                for p in _file_data_paths(payload):
                    _check_sketch_image(p, files.max_bytes)
        except Refused as e:
            raise gr.Error(str(e), print_exception=False) from None
        return preprocess(payload)

    accept = sketch.accept_blobs
    storage: OrderedDict = OrderedDict()
    sketch.blob_storage = storage
    lock = threading.Lock()

    def accept_blobs(data):
        # Called by Gradio's /gradio_api/component_server route: an HTTPException is its answer.
        kind = data.data.get("type")
        index = data.data.get("index")
        if kind not in ("background", "composite", "layer") or len(data.files) != 1:
            raise HTTPException(400, "refused: not a drawing")
        if kind == "layer" and not (isinstance(index, str) and index.isdecimal() and int(index) < SKETCH_MAX_LAYERS):
            raise HTTPException(400, f"refused: a drawing has at most {SKETCH_MAX_LAYERS} layers")
        try:
            _check_sketch_image(data.files[0][1], files.max_bytes)
        except Refused as e:
            raise HTTPException(413 if "too large" in str(e) else 400, str(e)) from None
        with lock:
            accept(data)
            storage.move_to_end(data.data["id"])
            while len(storage) > SKETCH_MAX_BLOBS:
                storage.popitem(last=False)

    accept_blobs._is_server_fn = True  # what Gradio's component_server route asks of a server function
    accept_blobs.__name__ = "accept_blobs"
    sketch.accept_blobs = accept_blobs
    sketch.preprocess = guarded
    _copy_only_uploads(sketch)
    return sketch


def _check_sketch_image(src, max_bytes: int | None) -> None:
    """Refuse (`Refused`) a drawing that is no image, larger than the per-file limit or than
    `SKETCH_MAX_SIDE` px a side, reading only its header."""
    size = len(src) if isinstance(src, (bytes, bytearray)) else os.path.getsize(src)
    if max_bytes is not None and size > max_bytes:
        raise Refused(f"file too large: more than {max_bytes / 1e6:g} MB (the limit per file is {max_bytes / 1e6:g} MB)")
    too_large = Refused(f"refused: a drawing is too large, at most {SKETCH_MAX_SIDE} px a side")
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
            w, h = im.size
    except Image.DecompressionBombError:  # past Pillow's pixel limit (models.imageio sets it)
        raise too_large from None
    except Exception:
        raise Refused("refused: the drawing is not an image") from None
    if max(w, h) > SKETCH_MAX_SIDE:
        raise too_large


def labels_line(pred, threshold: float) -> str:
    """A multi-label prediction in words: every class above the threshold, or that there is none."""
    if not pred.labels:
        return f"No label above the threshold {threshold:g}."
    return f"Labels above {threshold:g}: " + ", ".join(f"**{c}**" for c in pred.labels)


def is_digit_model(classes) -> bool:
    return list(classes) == [str(i) for i in range(10)]


def describe(predictor: Predictor) -> str:
    """A few lines of Markdown from the model folder's metadata."""
    meta = predictor.metadata
    classes = predictor.classes
    shown = ", ".join(f"`{c}`" for c in classes[:20]) + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")
    d = meta.data
    if predictor.multi_label:
        m = meta.metrics
        lines = [f"## {meta.name}",
                 f"A {meta.arch} multi-label image classifier for {len(classes)} classes: {shown}. It shows every "
                 f"class whose probability is above {predictor.threshold:g}.",
                 f"Validation: accuracy_multi **{m.valid_accuracy:.1%}**"
                 + (f", F1 **{m.f1:.3f}**" if m.f1 is not None else "") + f" on {m.n_valid} held-out images."]
    else:
        lines = [f"## {meta.name}",
                 f"A {meta.arch} image classifier for {len(classes)} classes: {shown}.",
                 f"Validation accuracy **{meta.metrics.valid_accuracy:.1%}** on {meta.metrics.n_valid} held-out images."]
    trained = f"Trained on {d['n_train']:,} images" if "n_train" in d else "Trained"
    if d.get("source"):  # the data set's name, not the trainer's local path
        trained += f" from `{Path(str(d['source'])).name or d['source']}`"
    trained += f", {meta.image_size}x{meta.image_size} px"
    if meta.created:
        trained += f", on {meta.created[:10]}"
    if meta.versions.get("fastai"):
        trained += f" with fastai {meta.versions['fastai']}"
    lines.append(trained + ".")
    how = "Upload, paste or photograph an image" + (", or draw a digit" if is_digit_model(classes) else "")
    lines.append(f"{how}. Runs on `{predictor.device}`. "
                 "The same model answers `POST /v1/predict` ([API docs](/v1/docs)).")
    return "\n\n".join(lines)


def sketch_to_digit(value) -> Image.Image:
    """The sketch pad's drawing as an MNIST-like image: a white digit on black, in MNIST's
    framing (its box fills 20 of 28 px, its centre of mass at the centre). The pad draws black on a transparent canvas; MNIST digits are white on black,
    so the ink is composited over white and inverted. The learner's own Resize does the rest.
    Raises `gr.Error` for an empty drawing."""
    if isinstance(value, dict):
        value = value.get("composite")
    if value is None:
        raise gr.Error("nothing drawn: draw a digit on the pad first")
    im = value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value))
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3] / 255.0
    luminance = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    ink = alpha * (255.0 - luminance)  # = 255 - (drawing composited over white)
    rows, cols = np.nonzero(ink > 32)
    if rows.size == 0:
        raise gr.Error("nothing drawn: draw a digit on the pad first")
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = ink.shape
    side = int(np.ceil(max(h, w) / DIGIT_FILL))
    # MNIST puts a digit's centre of mass, not its box, at the centre of the frame; a model
    # trained without augmentation reads a 7 moved up by 2 px as a 2.
    com_y, com_x = (np.indices(ink.shape) * ink).reshape(2, -1).sum(1) / ink.sum()
    top = int(np.clip(round(side / 2 - com_y), 0, side - h))
    left = int(np.clip(round(side / 2 - com_x), 0, side - w))
    frame = np.zeros((side, side), dtype=np.float32)
    frame[top:top + h, left:left + w] = ink
    return Image.fromarray(frame.clip(0, 255).round().astype(np.uint8), mode="L")


def _accept_batched_verdicts() -> None:
    """Let a batched validator refuse. Gradio 6.31 hands a batched validator's answer (one entry
    per input) to `queueing.process_validation_response` as a tuple, which that function reads
    as "valid" whatever it holds (it looks for a list): the request joins the queue and its bad
    image fails the whole batch. Passing it on as the list it is restores the designed path
    (HTTP 422 for that request, `gradio_client.ValidationError`). Installed once per process;
    only that tuple case changes."""
    from gradio import queueing
    original = queueing.process_validation_response
    if getattr(original, "_accepts_tuples", False):
        return

    def process_validation_response(validation_response, fn=None):
        if isinstance(validation_response, tuple):
            validation_response = list(validation_response)
        return original(validation_response, fn)

    process_validation_response._accepts_tuples = True
    queueing.process_validation_response = process_validation_response


class _Prepared:
    """Tensors decoded by the validator, handed to the batched function by file path (Gradio's
    upload paths are content hashes, so a path names one content). Bounded: an event validated
    but never run (its client left) is evicted, not kept."""

    def __init__(self, size: int = 512):
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def put(self, key, value):
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self._size:
                self._d.popitem(last=False)

    def pop(self, key):
        with self._lock:
            return self._d.pop(key, None)


def build_ui(predictor: Predictor, top_k: int | None = None, max_batch: int = GRADIO_BATCH,
             batcher=None, concurrency: int | None = 1, noop: bool = False, *,
             upload_dir: str | Path | None = None, max_file_bytes: int | None = None,
             delete_cache: tuple[int, int] | None = None) -> gr.Blocks:
    """The Gradio Blocks for `predictor`.

    `batcher` (a `serve.api.MicroBatcher`, as `serve.app` passes) runs the forward passes, shared
    with the HTTP API; without one, each Gradio batch runs its own. `concurrency` batches of the
    `predict` endpoint may run at once. `noop=True` builds the same app whose functions do
    nothing (the benchmark's baseline for Gradio's own overhead).

    `upload_dir` is where Gradio keeps this app's uploads (default: Gradio's, `GRADIO_TEMP_DIR`
    or /tmp/gradio); the inputs read nothing else but the model's examples. `max_file_bytes`
    bounds an image sent inline. `delete_cache` is Gradio's (every, age) in seconds."""
    k = max(1, min(top_k or predictor.default_top_k, len(predictor.classes)))
    multi = predictor.multi_label  # a second output: the line naming every label above the threshold

    def shown(preds):
        """Per output, the values of a batch: the gr.Label's, and for a multi-label model the lines."""
        if not multi:
            return [[p.as_label() for p in preds]]
        return [[p.as_label() for p in preds], [labels_line(p, predictor.threshold) for p in preds]]

    def one(pred):
        values = shown([pred])
        return values[0][0] if not multi else (values[0][0], values[1][0])

    _accept_batched_verdicts()
    prepared = _Prepared()
    examples = [str(p) for p in predictor.examples()]
    from gradio.utils import get_upload_folder
    files = InputFiles(upload_dir or get_upload_folder(), examples, max_file_bytes)

    def verdict(src):
        """None for an image fit to classify (decoded now, kept for `classify`), else the reason."""
        if src is None:
            return "no image: upload, paste or photograph one first"
        if isinstance(src, Refused):
            return str(src)
        if noop:
            return None
        try:
            tensor = predictor.prepare(src)
        except ImageError as e:
            return f"cannot classify this file: {e}"
        if isinstance(src, str):
            prepared.put(src, tensor)
        return None

    decoder = ThreadPoolExecutor(UI_DECODE_THREADS, thread_name_prefix="ui-decode")

    async def check(images):
        """Validator: decode each request's image once; a bad one gets `gr.validate(False, reason)`,
        which refuses that request alone and tells its client why."""
        reasons = await asyncio.get_running_loop().run_in_executor(decoder, lambda: [verdict(src) for src in images])
        # A batched validator answers in the batch's shape: one list per input, one entry per request.
        return ([None if r is None else gr.validate(False, r) for r in reasons],)

    async def classify(images):
        """Top classes of each image (batched: the queued requests share one forward pass)."""
        if noop:
            return [[{predictor.classes[0]: 1.0} for _ in images]] + ([["" for _ in images]] if multi else [])
        tensors = [(prepared.pop(s) if isinstance(s, str) else None) for s in images]
        if any(t is None for t in tensors):  # only if the validator was bypassed (or its entry evicted)
            refused = next((s for s in images if s is None or isinstance(s, Refused)), False)
            if refused is not False:  # fails this batch alone
                raise gr.Error(str(refused) if refused is not None else "no image", print_exception=False)
            try:
                tensors = await asyncio.get_running_loop().run_in_executor(
                    decoder, lambda: [t if t is not None else predictor.prepare(s) for t, s in zip(tensors, images)])
            except ImageError as e:
                raise gr.Error(f"cannot classify this file: {e}") from None
        if batcher is not None:
            # Gradio's queue has gathered this batch already: no waiting, but HTTP requests
            # queued meanwhile share the forward pass.
            try:
                probs = await batcher.submit(tensors, max_wait_ms=0)
            except Overloaded as e:  # the queue is full or waited too long: say so, as the API's 503 does
                raise gr.Error(str(e), print_exception=False) from None
        else:
            probs = await asyncio.to_thread(predictor.probabilities, tensors)
        return shown(predictor.top_k(probs, k))

    def classify_example(path):
        if path is None or isinstance(path, Refused):
            raise gr.Error(str(path) if path is not None else "no example picked", print_exception=False)
        try:
            return one(predictor.predict(path, k))
        except ImageError as e:
            raise gr.Error(f"cannot classify this example: {e}") from None

    def classify_sketch(value):
        return one(predictor.predict(sketch_to_digit(value), k))

    digits = is_digit_model(predictor.classes)
    with gr.Blocks(title=f"{predictor.name}: image classifier", delete_cache=delete_cache) as demo:
        gr.Markdown(describe(predictor))
        with gr.Row(equal_height=False):
            with gr.Column():
                with gr.Tab("Image"):
                    image = image_input(files, sources=["upload", "clipboard", "webcam"], label="Image", elem_id="image",
                                        height=320)
                    button = gr.Button("Classify", variant="primary", elem_id="classify")
                if digits:
                    with gr.Tab("Draw a digit", elem_id="draw-tab"):
                        sketch = sketch_input(files, type="pil", image_mode="RGBA", canvas_size=SKETCH_CANVAS,
                                              fixed_canvas=True, layers=False, label="Draw a digit", elem_id="sketch",
                                              brush=gr.Brush(default_size=SKETCH_BRUSH, colors=["#000000"],
                                                             color_mode="fixed"))
                        sketch_button = gr.Button("Classify drawing", variant="primary", elem_id="classify-sketch")
            with gr.Column():
                label = gr.Label(num_top_classes=k, label="Labels above the threshold" if multi else "Prediction",
                                 elem_id="prediction")
                outputs = [label, gr.Markdown(elem_id="labels")] if multi else label
        if examples:
            gr.Examples(examples, inputs=image, outputs=outputs, fn=classify_example, run_on_click=True,
                        cache_examples=False, examples_per_page=len(examples), label="Examples (click one)",
                        api_visibility="private")
        gr.on([button.click, image.upload], classify, inputs=image, outputs=outputs, api_name="predict",
              batch=True, max_batch_size=max_batch, validator=check, concurrency_limit=concurrency)
        if digits:
            sketch_button.click(classify_sketch, inputs=sketch, outputs=outputs, api_visibility="private",
                                concurrency_limit=2)
    return demo
