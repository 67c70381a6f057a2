"""The one prediction path shared by the web UI, the HTTP API and the CLI.

`Predictor` wraps an exported learner (see `models/contract.py`) and runs it on batches directly:

    decode   the learner's own input-type step (`RGBImage.create` -> `models.imageio.open_image`)
    item     the learner's `after_item` pipeline (Resize, ToTensor), validation split
    batch    the learner's `after_batch` pipeline (IntToFloatTensor, Normalize), validation split
    model    one forward pass under `torch.inference_mode`, then the loss function's activation

Nothing here re-types a size, a mean or a class list: all of it is read from the learner, so the
server preprocesses exactly as training did (a prototype that assumed ImageNet statistics scored
55% on MNIST instead of 98.7%). It skips `learn.predict`, which builds a DataLoader per call.

    from serve.predictor import Predictor
    p = Predictor.load("models/mnist")
    p.predict("digit.png").as_dict()   # {"label": "7", "confidences": [{"label": "7", "confidence": 0.99}, ...]}
"""
from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from PIL import Image

from models.contract import ModelFolder, load_model_folder
from models.device import pick_device
from models.imageio import ImageError

__all__ = ["Prediction", "Predictor", "pick_device", "configure_threads", "available_cpus", "DEFAULT_TOP_K"]

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 3  # classes shown per prediction, unless the model has fewer
DECODE_AHEAD = 2   # batches decoded ahead of the one in the model (predict_many)


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most likely first."""
    label: str
    confidences: tuple[tuple[str, float], ...]

    def as_dict(self) -> dict:
        """The JSON shape of the HTTP API and the CLI."""
        return {"label": self.label,
                "confidences": [{"label": c, "confidence": p} for c, p in self.confidences]}

    def as_label(self) -> dict[str, float]:
        """The value `gr.Label` takes: class name -> confidence."""
        return dict(self.confidences)


def available_cpus() -> int:
    """CPU cores this process may run on (taskset and container limits included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def configure_threads(other_busy_threads: int, threads: int | None = None) -> int:
    """Set torch's intra-op threads so that they and `other_busy_threads` (decoders, the event
    loop) fit the cores, and return the number. Called by entry points, never on import.

    Oversubscribed cores are the worst case for OpenMP: a parallel region waits for its slowest
    thread, and a thread descheduled by a decoder stalls the whole forward pass. On 2 cores, torch's
    default (2 threads) beside one decoding thread ran slower than fastai's serial `get_preds`."""
    n = threads or max(1, available_cpus() - max(0, other_busy_threads))
    torch.set_num_threads(n)
    return n


def _optimize_for_inference(model: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, bool]:
    """Fold each BatchNorm into the convolution before it and use channels-last memory: the same
    function (logits agree to ~1e-6), fewer kernels, and oneDNN's fastest CPU layout.
    Returns (model, channels_last); any model torch.fx cannot trace is served unchanged."""
    try:
        from torch.fx.experimental.optimization import fuse
        fused = fuse(copy.deepcopy(model))
    except Exception as e:  # a custom layer fx cannot trace: correct beats fast
        log.info("serving the model unfused (torch.fx could not trace it: %s)", e)
        return model, False  # moved to the device, learner and all, by the caller
    return fused.to(device=device, memory_format=torch.channels_last), True


class Predictor:
    """An exported learner, ready to classify images on one device. Thread-safe: forward passes
    are serialised by a lock (each already uses every intra-op thread), decoding is not."""

    def __init__(self, folder: ModelFolder, device: str | torch.device = "auto", optimize: bool = True):
        self.folder = folder
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        learn = folder.learner
        dls = learn.dls
        self.classes: list[str] = [str(c) for c in dls.vocab]
        if self.classes != [str(c) for c in folder.classes]:
            raise ValueError(f"{folder.path}: the learner's classes {self.classes} differ from metadata.json's "
                             f"{folder.classes}: re-export the model")

        # The learner's own pipelines, on the validation split (split_idx=1: no augmentation).
        # The input-type step is found the way fastai's `test_dl` finds it: the first transform
        # whose declared input types accept a PIL image (it also takes paths and bytes).
        from fasttransform import Pipeline
        type_tl = dls.valid_ds.tls[0]
        start = type_tl.infer_idx(Image.new("RGB", (1, 1)))
        self._decode = Pipeline(type_tl.tfms.fs[start:], split_idx=1)
        self._item_tfms = Pipeline(dls.valid.after_item.fs, split_idx=1)
        batch_fs = copy.deepcopy(list(dls.valid.after_batch.fs))
        for tfm in batch_fs:  # as fastai's `DataLoader.device` setter does: Normalize's stats to the device
            for name in getattr(tfm, "parameters", None) or ():
                if hasattr(getattr(tfm, name), "to"):
                    setattr(tfm, name, getattr(tfm, name).to(self.device))
        self._batch_tfms = Pipeline(batch_fs, split_idx=1)
        from fastai.torch_core import TensorImage
        self._tensor_image = TensorImage

        activation = getattr(learn.loss_func, "activation", None)
        self._activation = activation if callable(activation) else (lambda x: torch.softmax(x, dim=-1))
        model, self._channels_last = learn.model.eval(), False
        if optimize:  # a fused copy: the learner itself stays as loaded, on the CPU
            model, self._channels_last = _optimize_for_inference(model, self.device)
        self.model = model.to(self.device).eval()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path, device: str | torch.device = "auto", optimize: bool = True) -> "Predictor":
        """Load a model folder (`models.contract.load_model_folder`: raises `ModelFolderError`)."""
        return cls(load_model_folder(Path(path)), device=device, optimize=optimize)

    # ------------------------------------------------------------------ metadata

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def metadata(self) -> dict:
        return self.folder.metadata

    @property
    def default_top_k(self) -> int:
        return min(DEFAULT_TOP_K, len(self.classes))

    def examples(self) -> list[Path]:
        return self.folder.examples()

    # ------------------------------------------------------------------ the pipeline

    def prepare(self, src) -> torch.Tensor:
        """Decode one image and apply the learner's item transforms: a uint8 (3, H, W) tensor.

        `src` is a path, bytes, a binary file object, a PIL image or an array. Raises `ImageError`
        for anything that is not a usable image. Safe to call from many threads at once."""
        if isinstance(src, (bytearray, memoryview)):
            src = bytes(src)
        elif hasattr(src, "read"):
            src = src.read()
        elif isinstance(src, Path):
            src = str(src)
        img = self._decode(src)
        if not isinstance(img, Image.Image):  # the type step passes through types it does not take
            raise ImageError(f"cannot read an image from a {type(src).__name__}")
        return self._item_tfms(img)

    def probabilities(self, items: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """One forward pass over prepared items (a list of them, or already stacked into one
        uint8 (N, 3, H, W) tensor): a float32 (N, n_classes) CPU tensor. Thread-safe: passes run
        one at a time, each with all of torch's intra-op threads."""
        with self._lock:
            return self._forward(items)

    def _forward(self, items) -> torch.Tensor:
        with torch.inference_mode():
            x = items.as_subclass(torch.Tensor) if isinstance(items, torch.Tensor) else _stack(items)
            x = x.to(self.device, non_blocking=True)
            x = self._batch_tfms(self._tensor_image(x)).as_subclass(torch.Tensor)
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self._activation(self.model(x)).float().cpu()

    def top_k(self, probs: torch.Tensor, k: int | None = None) -> list[Prediction]:
        """Rows of probabilities -> one `Prediction` each, with the k most likely classes."""
        k = max(1, min(k or self.default_top_k, len(self.classes)))
        values, indices = probs.topk(k, dim=-1)
        out = []
        for vs, ix in zip(values.tolist(), indices.tolist()):
            conf = tuple((self.classes[i], float(v)) for v, i in zip(vs, ix))
            out.append(Prediction(conf[0][0], conf))
        return out

    # ------------------------------------------------------------------ conveniences

    def predict(self, src, top_k: int | None = None) -> Prediction:
        """One image in, one `Prediction` out (the low-latency path: no threads, no DataLoader)."""
        return self.top_k(self.probabilities([self.prepare(src)]), top_k)[0]

    def predict_batch(self, srcs: Sequence, top_k: int | None = None) -> list[Prediction]:
        """Several images, one forward pass. Raises `ImageError` on the first bad one."""
        return self.top_k(self.probabilities([self.prepare(s) for s in srcs]), top_k)

    def predict_many(self, srcs: Iterable, top_k: int | None = None, batch_size: int = 64, workers: int = 1,
                     processes: int = 0, forward_threads: int = 1) -> Iterator[tuple[object, Prediction | ImageError]]:
        """Classify a long stream of images: yields (source, Prediction or ImageError) in order.
        A bad image is yielded as its `ImageError`, and the rest carry on.

        Decoding overlaps with the forward pass of the batch before, `DECODE_AHEAD` batches ahead:
        - `processes` > 0: in that many worker processes (a torch DataLoader, forked). Decoding is
          mostly fastai's Python, which holds the GIL: only processes spread it over cores. Then
          `forward_threads` forward passes run at once (give each one intra-op thread).
        - else `workers` > 0: in that many threads (no start-up cost; the GIL caps them near one core).
        - else inline.
        See `configure_threads` for sharing the cores between decoding and torch."""
        if processes > 0 and "fork" in multiprocessing.get_all_start_methods():
            yield from self._predict_many_processes(list(srcs), top_k, batch_size, processes, forward_threads)
            return

        def finish(chunk, prepared):
            good = [t for t in prepared if not isinstance(t, ImageError)]
            preds = iter(self.top_k(self.probabilities(good), top_k)) if good else iter(())
            for src, t in zip(chunk, prepared):
                yield src, (t if isinstance(t, ImageError) else next(preds))

        chunks = _chunked(srcs, batch_size)
        if workers <= 0:
            for chunk in chunks:
                yield from finish(chunk, self._prepare_all(chunk))
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
            pending: deque = deque()

            def collect(chunk, parts):
                return chunk, [t for part in parts for t in part.result()]

            for chunk in chunks:
                step = -(-len(chunk) // workers)  # one task per worker and batch: few futures
                pending.append((chunk, [pool.submit(self._prepare_all, chunk[i:i + step])
                                        for i in range(0, len(chunk), step)]))
                if len(pending) > DECODE_AHEAD:
                    yield from finish(*collect(*pending.popleft()))
            while pending:
                yield from finish(*collect(*pending.popleft()))

    def _prepare_all(self, srcs) -> list:
        out = []
        for src in srcs:
            try:
                out.append(self.prepare(src))
            except ImageError as e:
                out.append(e)
        return out

    def _predict_many_processes(self, srcs: list, top_k, batch_size: int, processes: int, forward_threads: int):
        from torch.utils.data import DataLoader
        # Forked workers inherit this Predictor (nothing is pickled on the way in); each batch
        # comes back as one stacked uint8 tensor (one shared-memory block) plus its errors.
        loader = DataLoader(_PrepareDataset(self, srcs), batch_size=batch_size, num_workers=processes,
                            collate_fn=_collate_prepared, multiprocessing_context="fork",
                            prefetch_factor=DECODE_AHEAD, pin_memory=self.device.type == "cuda")

        def run(batch):
            stacked, errors, n = batch
            return (self.top_k(self._forward(stacked), top_k) if stacked is not None else []), errors, n

        # `forward_threads` batches in the model at once, each pass on its own thread (torch
        # releases the GIL): with one intra-op thread each, they fill the cores the decoders leave
        # idle without OpenMP's barriers, which stall whenever a decoder takes a thread's core.
        start = 0
        with ThreadPoolExecutor(forward_threads, thread_name_prefix="forward") as pool:
            pending: deque = deque()
            batches = iter(loader)
            while True:
                while len(pending) < 2 * forward_threads:
                    batch = next(batches, None)
                    if batch is None:
                        break
                    pending.append(pool.submit(run, batch))
                if not pending:
                    return
                preds, errors, n = pending.popleft().result()
                preds = iter(preds)
                for i, src in enumerate(srcs[start:start + n]):
                    yield src, (errors[i] if i in errors else next(preds))
                start += n


class _PrepareDataset:
    """`Predictor.prepare` over a list, as a map-style dataset for torch's DataLoader."""

    def __init__(self, predictor: Predictor, srcs: list):
        self.predictor, self.srcs = predictor, srcs

    def __len__(self):
        return len(self.srcs)

    def __getitem__(self, i):
        try:
            return self.predictor.prepare(self.srcs[i])
        except ImageError as e:
            return e


def _stack(items) -> torch.Tensor:
    return torch.stack([t.as_subclass(torch.Tensor) for t in items])


def _collate_prepared(items):
    good = [t for t in items if not isinstance(t, ImageError)]
    errors = {i: t for i, t in enumerate(items) if isinstance(t, ImageError)}
    return (_stack(good) if good else None), errors, len(items)


def _chunked(items: Iterable, n: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
