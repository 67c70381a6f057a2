"""The one prediction path shared by the web UI, the HTTP API and the CLI, for every model format.

`Predictor` runs a loaded model folder (see `models/contract.py`) on batches directly:

    prepare  `Preprocessing.prepare`: `models.imageio.open_image`, then the training's own Resize
             and ToTensor (`item_transforms`): a uint8 (3, S, S) tensor
    network  one small interface, `probabilities(uint8 (N, 3, S, S)) -> float32 (N, classes)`:
             `TorchNetwork` (the learner's network from model.pkl, or the one rebuilt from
             model.safetensors: normalisation, forward pass, activation) or onnxruntime's
             `models.onnx.OnnxClassifier` (normalisation and softmax inside the graph); a multi-label
             model's activation is a sigmoid in all three (metadata.json's `activation`)

Nothing here re-types a size, a mean or a class list: all of it is read from metadata.json through
`ModelMetadata.preprocessing`, the statistics the exported learner carries too (a test holds the two
pipelines equal), so the server preprocesses exactly as training did (a prototype that assumed
ImageNet statistics scored 55% on MNIST instead of 98.7%). It skips `learn.predict`, which builds a
DataLoader per call.

    from serve.predictor import Predictor
    p = Predictor.load("models/mnist")                          # or format="safetensors" / "onnx"
    p.predict("digit.png").as_dict()   # {"label": "7", "confidences": [{"label": "7", "confidence": 0.99}, ...]}
    # a multi-label model (sigmoid): {"labels": ["even", "big"], "confidences": [every class, most likely first]}
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
from models.contract import ModelFolder, Preprocessing, load_model_folder
from models.device import pick_device
from models.imageio import ImageError

__all__ = ["Prediction", "Predictor", "TorchNetwork", "pick_device", "configure_threads", "available_cpus",
           "DEFAULT_TOP_K"]

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 3  # classes shown per prediction, unless the model has fewer
DECODE_AHEAD = 2   # batches decoded ahead of the one in the model (predict_many)


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most likely first; for a multi-label model also `labels`,
    every class above the model's threshold (maybe none), most likely first."""
    label: str
    confidences: tuple[tuple[str, float], ...]
    labels: tuple[str, ...] | None = None  # None: a single-label model

    def as_dict(self) -> dict:
        """The JSON shape of the HTTP API and the CLI: {"label", "confidences"} for a single-label
        model, {"labels", "confidences"} for a multi-label one."""
        confidences = [{"label": c, "confidence": p} for c, p in self.confidences]
        if self.labels is not None:
            return {"labels": list(self.labels), "confidences": confidences}
        return {"label": self.label, "confidences": confidences}

    def as_label(self) -> dict[str, float]:
        """The value `gr.Label` takes: class name -> confidence (multi-label: the classes above the
        threshold only)."""
        if self.labels is not None:
            shown = set(self.labels)
            return {c: p for c, p in self.confidences if c in shown}
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


class TorchNetwork:
    """A torch network with the folder's normalisation and activation: uint8 (N, 3, S, S) in,
    float32 (N, classes) probabilities on the CPU out. Not locked: the Predictor serialises calls."""

    def __init__(self, model: torch.nn.Module, preprocessing: Preprocessing, activation: str,
                 device: torch.device, optimize: bool = True):
        self.device = device
        self._mean, self._std = preprocessing.stats(device)
        self._normalize = preprocessing.normalize
        self._activation = torch.sigmoid if activation == "sigmoid" else (lambda x: torch.softmax(x, dim=-1))
        model, self._channels_last = model.eval(), False
        if optimize:  # a fused copy: the loaded model itself stays as it is, on the CPU
            model, self._channels_last = _optimize_for_inference(model, device)
        self.model = model.to(device).eval()

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = self._normalize(x.as_subclass(torch.Tensor).to(self.device, non_blocking=True), self._mean, self._std)
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self._activation(self.model(x)).float().cpu()


class Predictor:
    """A loaded model folder, ready to classify images on one device. Thread-safe: forward passes
    are serialised by a lock (each already uses every intra-op thread), decoding is not."""

    def __init__(self, folder: ModelFolder, device: str | torch.device = "auto", optimize: bool = True):
        self.folder = folder
        meta = folder.metadata
        self.classes: list[str] = [str(c) for c in meta.classes]
        self.preprocessing = meta.preprocessing
        self.multi_label: bool = meta.multi_label
        self.threshold: float | None = meta.decision_threshold if meta.multi_label else None
        if isinstance(folder.model, torch.nn.Module):
            self.device = device if isinstance(device, torch.device) else pick_device(device)
            self.network = TorchNetwork(folder.model, self.preprocessing, meta.activation, self.device, optimize)
        else:  # onnxruntime, on the CPU whatever --device says
            if getattr(folder.model, "multi_label", meta.multi_label) != meta.multi_label:
                from models.contract import ModelFolderError
                raise ModelFolderError(f"{folder.path}: model.onnx ends in a {'sigmoid' if folder.model.multi_label else 'softmax'} "
                                       f"but metadata.json says {meta.activation}: re-export the model")
            self.device = torch.device("cpu")
            self.network = folder.model
        self._lock = threading.Lock()
        # `models.imageio.open_image`'s gate for every `prepare`: a server sets its decoding budget
        # here (`serve.limits.DecodeBudget.hold`), shared by every path that decodes for it.
        self.decode_gate = None

    @classmethod
    def load(cls, path, device: str | torch.device = "auto", optimize: bool = True, format: str = "pickle",
             threads: int | None = None) -> "Predictor":
        """Load one format of a model folder (`models.contract.load_model_folder`: raises
        `ModelFolderError`). `threads`: onnxruntime's intra-op threads (torch's are process-wide:
        `configure_threads`)."""
        return cls(load_model_folder(Path(path), format=format, threads=threads), device=device, optimize=optimize)

    @property
    def format(self) -> str:
        return self.folder.format

    # ------------------------------------------------------------------ metadata

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def metadata(self):
        """The folder's `models.contract.ModelMetadata`."""
        return self.folder.metadata

    @property
    def default_top_k(self) -> int:
        """Classes listed per prediction: all of them for a multi-label model (each is its own yes/no)."""
        return len(self.classes) if self.multi_label else min(DEFAULT_TOP_K, len(self.classes))

    def examples(self) -> list[Path]:
        return self.folder.examples()

    # ------------------------------------------------------------------ the pipeline

    def prepare(self, src) -> torch.Tensor:
        """Decode one image and resize it as training did: a uint8 (3, S, S) tensor.

        `src` is a path, bytes, a binary file object, a PIL image or an array. Raises `ImageError`
        for anything that is not a usable image. Safe to call from many threads at once; with a
        `decode_gate`, each call waits for its pixels to fit the budget."""
        return self.preprocessing.prepare(src, gate=self.decode_gate)

    def probabilities(self, items: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """One forward pass over prepared items (a list of them, or already stacked into one
        uint8 (N, 3, H, W) tensor): a float32 (N, n_classes) CPU tensor. Thread-safe: passes run
        one at a time, each with all of torch's intra-op threads."""
        with self._lock:
            return self._forward(items)

    def _forward(self, items) -> torch.Tensor:
        x = items if isinstance(items, torch.Tensor) else _stack(items)
        return self.network.probabilities(x)

    def top_k(self, probs: torch.Tensor, k: int | None = None) -> list[Prediction]:
        """Rows of probabilities -> one `Prediction` each, with the k most likely classes (and, for a
        multi-label model, `labels`: every class above the threshold, whatever k is)."""
        k = max(1, min(k or self.default_top_k, len(self.classes)))
        values, indices = probs.topk(len(self.classes) if self.multi_label else k, dim=-1)
        out = []
        for vs, ix in zip(values.tolist(), indices.tolist()):
            conf = tuple((self.classes[i], float(v)) for v, i in zip(vs, ix))
            # `>` as fastai's accuracy_multi and BCEWithLogitsLossFlat.decodes
            labels = tuple(c for c, v in conf if v > self.threshold) if self.multi_label else None
            out.append(Prediction(conf[0][0], conf[:k], labels))
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
