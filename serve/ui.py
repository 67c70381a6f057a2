"""The Gradio web UI: an image in (upload, paste, webcam; a sketch pad for digit models), the top
classes out, the model folder's examples to click, and a description built from its metadata.

`build_ui(predictor)` returns the Blocks; `serve.app` mounts it on the same FastAPI app as the
HTTP API. Its endpoint `predict` (`gradio_client`: `client.predict(handle_file(p), api_name="/predict")`)
is batched: images queued together share one forward pass.

Bad input is refused per request, before it reaches a batch: a batched Gradio function that raises
fails every request in its batch, so the decoding happens in the event's validator, which Gradio
runs for each request as it joins the queue; its `gr.Error` reaches only that user.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from models.imageio import ImageError
from serve.predictor import Predictor

__all__ = ["build_ui", "describe", "is_digit_model", "sketch_to_digit", "image_input"]

log = logging.getLogger(__name__)

GRADIO_BATCH = 32          # requests per batched call of the `predict` endpoint
SKETCH_CANVAS = (280, 280)  # px; 10x MNIST's 28, so the brush below becomes a ~2 px MNIST stroke
SKETCH_BRUSH = 14           # px brush radius on that canvas: a ~2.5 px stroke once the digit is 20 px tall
DIGIT_FILL = 20 / 28        # MNIST centres each digit in a 20x20 box inside its 28x28 frame
# Small images (a 28x28 digit) are shown filling the image box, with sharp pixels.
CSS = "#image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


def _raw_file(payload):
    """The uploaded file untouched: its path, or bytes for a data URL."""
    if payload is None:
        return None
    if payload.url and payload.url.startswith("data:"):
        try:
            return base64.b64decode(payload.url.split(",", 1)[1], validate=False)
        except (ValueError, IndexError):
            raise gr.Error("the image's data URL is not valid base64") from None
    return payload.path


def image_input(**kwargs) -> gr.Image:
    """`gr.Image` that hands our function the uploaded file untouched. Gradio's own preprocessing
    would open it with PIL first: a decompression bomb or a non-image would then fail inside Gradio
    with a generic error, and 16-bit, CMYK or EXIF-rotated images would be converted its way
    rather than by `models.imageio`, the one home of decoding.

    The override is set on the instance: a subclass of a Gradio component would make Gradio write
    a `.pyi` stub next to this module at import time."""
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    image.preprocess = _raw_file
    return image


def is_digit_model(classes) -> bool:
    return list(classes) == [str(i) for i in range(10)]


def describe(predictor: Predictor) -> str:
    """A few lines of Markdown from the model folder's metadata."""
    meta = predictor.metadata
    classes = predictor.classes
    shown = ", ".join(f"`{c}`" for c in classes[:20]) + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")
    d = meta.data
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
             batcher=None, concurrency: int | None = 1, noop: bool = False) -> gr.Blocks:
    """The Gradio Blocks for `predictor`.

    `batcher` (a `serve.api.MicroBatcher`, as `serve.app` passes) runs the forward passes, shared
    with the HTTP API; without one, each Gradio batch runs its own. `concurrency` batches of the
    `predict` endpoint may run at once. `noop=True` builds the same app whose functions do
    nothing (the benchmark's baseline for Gradio's own overhead)."""
    k = max(1, min(top_k or predictor.default_top_k, len(predictor.classes)))
    prepared = _Prepared()

    def check(images):
        """Validator: decode each request's image once, refuse a bad one with its reason."""
        for src in images:
            if src is None:
                raise gr.Error("no image: upload, paste or photograph one first", print_exception=False)
            if noop:
                continue
            try:
                tensor = predictor.prepare(src)
            except ImageError as e:
                raise gr.Error(f"cannot classify this file: {e}", print_exception=False) from None
            if isinstance(src, str):
                prepared.put(src, tensor)
        return ([None] * len(images),)  # a batched validator answers in the batch's shape

    async def classify(images):
        """Top classes of each image (batched: the queued requests share one forward pass)."""
        if noop:
            return [[{predictor.classes[0]: 1.0} for _ in images]]
        tensors = [(prepared.pop(s) if isinstance(s, str) else None) for s in images]
        if any(t is None for t in tensors):  # only if the validator was bypassed
            try:
                tensors = await asyncio.to_thread(
                    lambda: [t if t is not None else predictor.prepare(s) for t, s in zip(tensors, images)])
            except ImageError as e:  # fails this batch alone
                raise gr.Error(f"cannot classify this file: {e}") from None
        if batcher is not None:
            # Gradio's queue has gathered this batch already: no waiting, but HTTP requests
            # queued meanwhile share the forward pass.
            probs = await batcher.submit(tensors, max_wait_ms=0)
        else:
            probs = await asyncio.to_thread(predictor.probabilities, tensors)
        return [[p.as_label() for p in predictor.top_k(probs, k)]]

    def classify_example(path):
        try:
            return predictor.predict(path, k).as_label()
        except ImageError as e:
            raise gr.Error(f"cannot classify this example: {e}") from None

    def classify_sketch(value):
        return predictor.predict(sketch_to_digit(value), k).as_label()

    digits = is_digit_model(predictor.classes)
    with gr.Blocks(title=f"{predictor.name}: image classifier") as demo:
        gr.Markdown(describe(predictor))
        with gr.Row(equal_height=False):
            with gr.Column():
                with gr.Tab("Image"):
                    image = image_input(sources=["upload", "clipboard", "webcam"], label="Image", elem_id="image",
                                        height=320)
                    button = gr.Button("Classify", variant="primary", elem_id="classify")
                if digits:
                    with gr.Tab("Draw a digit", elem_id="draw-tab"):
                        sketch = gr.Sketchpad(type="pil", image_mode="RGBA", canvas_size=SKETCH_CANVAS,
                                              fixed_canvas=True, layers=False, label="Draw a digit", elem_id="sketch",
                                              brush=gr.Brush(default_size=SKETCH_BRUSH, colors=["#000000"],
                                                             color_mode="fixed"))
                        sketch_button = gr.Button("Classify drawing", variant="primary", elem_id="classify-sketch")
            with gr.Column():
                label = gr.Label(num_top_classes=k, label="Prediction", elem_id="prediction")
        examples = [str(p) for p in predictor.examples()]
        if examples:
            gr.Examples(examples, inputs=image, outputs=label, fn=classify_example, run_on_click=True,
                        cache_examples=False, examples_per_page=len(examples), label="Examples (click one)",
                        api_visibility="private")
        gr.on([button.click, image.upload], classify, inputs=image, outputs=label, api_name="predict",
              batch=True, max_batch_size=max_batch, validator=check, concurrency_limit=concurrency)
        if digits:
            sketch_button.click(classify_sketch, inputs=sketch, outputs=label, api_visibility="private",
                                concurrency_limit=2)
    return demo
