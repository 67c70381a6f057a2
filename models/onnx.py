"""`model.onnx`: the classifier as one self-contained ONNX file, and a small onnxruntime runner.

The file runs anywhere onnxruntime (or OpenVINO, TensorRT, ...) does, with no torch and no fastai:
everything after "an RGB image squished to S x S" is inside the graph.

    input   pixels         uint8  (N, 3, S, S)  RGB, S = `image_size`, N free (dynamic batch)
    graph   /255, (x - mean) / std, the network, softmax (sigmoid for a multi-label model)
    output  probabilities  float32 (N, n_classes), in the order of `classes`

The ONNX metadata (`metadata_props`, strings) carries what a user needs to feed it: `classes`
(a JSON list), `image_size`, `resize` (how to get to S x S), `multi_label`, `normalize` (for the
record: it is already applied inside), and `contract_version`.

    from models.onnx import export_onnx, OnnxClassifier
    export_onnx(learn.model, "model.onnx", image_size=28, mean=m, std=s, classes=learn.dls.vocab)
    clf = OnnxClassifier("model.onnx")
    clf.probabilities(uint8_nchw)        # torch float32 (N, C); clf.run(...) for numpy

Exporting needs torch (+ onnx and onnxscript for the exporter); `OnnxClassifier` needs only
numpy and onnxruntime (torch only if you ask it for torch tensors), so this module imports
neither at import time.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["ONNX_FILE", "INPUT_NAME", "OUTPUT_NAME", "OPSET", "CONTRACT_VERSION", "RESIZE",
           "OnnxModelError", "export_onnx", "OnnxClassifier"]

ONNX_FILE = "model.onnx"
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
# Opset 18 is what torch's exporter translates to natively (no version conversion step) and what
# runtimes from 2023 on read: onnxruntime >= 1.14, OpenVINO >= 2023.0, TensorRT >= 8.6.
OPSET = 18
CONTRACT_VERSION = 1  # of the input/output/metadata convention above; bumped if it changes
# fastai's Resize(method=Squish) is PIL's `resize((S, S), BILINEAR)` of the whole image, no crop
# (fastai.vision.augment.Resize: resamples=(BILINEAR, NEAREST), the first for images).
RESIZE = "squish: PIL Image.resize((S, S), Image.BILINEAR) of the whole RGB image, no crop"


class OnnxModelError(ValueError):
    """An ONNX file that cannot be used as a classifier; the message is one line, for a person."""


# ---------------------------------------------------------------------------------- export

def _with_preprocessing(model, mean, std, multi_label: bool):
    """`model` wrapped so that uint8 pixels go in and probabilities come out."""
    import torch

    class PixelsToProbabilities(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            # (1, 3, 1, 1) like fastai's Normalize; the same ops in the same order as fastai's
            # IntToFloatTensor (x.float() / 255) and Normalize ((x - mean) / std), so the
            # rounding matches too.
            device = next(model.parameters()).device
            self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1))

        def forward(self, pixels):
            x = (pixels.float() / 255.0 - self.mean) / self.std
            logits = self.model(x)
            return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)

    return PixelsToProbabilities().eval()


def _strip_source_locations(proto) -> None:
    """torch's exporter notes, on every node, the Python stack and the module path that made it
    (file names of this machine, the checkout's and site-packages'): a model file leaves the
    machine, so none of that goes in. The graph itself is unchanged."""
    graphs = [proto.graph]
    while graphs:
        g = graphs.pop()
        g.doc_string = ""
        for node in g.node:
            node.doc_string = ""
            del node.metadata_props[:]
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [sg for a in node.attribute for sg in a.graphs]
        for vi in [*g.input, *g.output, *g.value_info]:
            del vi.metadata_props[:]
    for fn in proto.functions:
        fn.doc_string = ""
        for node in fn.node:
            node.doc_string = ""
            del node.metadata_props[:]



def _export(torch, wrapped, example):
    import warnings
    with warnings.catch_warnings():
        # torch.export's notes on the dynamic batch dimension, aimed at exporter developers
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            wrapped, (example,), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}})


def export_onnx(model, path, *, image_size: int, mean, std, classes: Sequence[str],
                multi_label: bool = False, extra_metadata: dict | None = None) -> Path:
    """Write `model` (a torch module taking normalised float images) as one ONNX file at `path`,
    with the preprocessing and the activation inside (see the module docstring), and return the path.

    The weights are inside the file (no external data). The file is written beside `path` and
    renamed into place only once complete and checked, so a failed export leaves an older
    `path` as it was. `extra_metadata` (str -> str or JSON-able) is added to the ONNX metadata."""
    import torch
    import onnx

    path = Path(path)
    classes = [str(c) for c in classes]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    wrapped = _with_preprocessing(model, mean, std, multi_label)
    device = next(model.parameters()).device  # a learner loaded without cpu=True may sit on a GPU
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8, device=device)  # 2, not 1: a batch of 1 may be specialised
    with torch.no_grad():
        n_out = wrapped(example).shape[-1]
    if n_out != len(classes):
        raise ValueError(f"the model has {n_out} outputs but {len(classes)} classes were given")

    import logging
    # The exporter's graph optimiser (onnxscript, onnx_ir) logs each pass at INFO ("PassManager: No
    # more graph changes..."): notes for exporter developers, which would land in `python -m train`'s
    # output, whose root logger is at INFO. Quiet for the export, restored after.
    quiet = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        program = _export(torch, wrapped, example)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    proto = program.model_proto
    _strip_source_locations(proto)
    proto.doc_string = (f"uint8 RGB {INPUT_NAME} (N, 3, {image_size}, {image_size}) -> float32 "
                        f"{OUTPUT_NAME} (N, {len(classes)}); preprocessing and "
                        f"{'sigmoid' if multi_label else 'softmax'} inside")
    meta = {"contract_version": str(CONTRACT_VERSION), "classes": json.dumps(classes),
            "image_size": str(int(image_size)), "resize": RESIZE,
            "multi_label": json.dumps(bool(multi_label)),
            "normalize": json.dumps({"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                                     "applied": "inside the graph, after /255"})}
    for key, value in (extra_metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)

    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name beside the target (same file system, so the rename is atomic), opened with
    # "x" rather than mkstemp so the file gets the umask's mode (0644), not mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(proto.SerializeToString())  # one protobuf, weights inline (resnet18: ~45 MB < 2 GB)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------- runtime

def _providers(device: str) -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "auto"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "auto":
            return ["CPUExecutionProvider"]
        raise OnnxModelError("this onnxruntime has no CUDA provider (pip install onnxruntime-gpu), "
                             "use device 'cpu'")
    raise OnnxModelError(f"unknown device {device!r} for onnxruntime: use cpu, cuda or auto")


class OnnxClassifier:
    """An onnxruntime session on a `model.onnx` written by `export_onnx`. Thread-safe (onnxruntime
    sessions may be run from several threads at once).

    `threads`: onnxruntime's intra-op threads (None: its default, one per physical core).
    `device`: "cpu", "cuda" (needs onnxruntime-gpu) or "auto" (CUDA if this onnxruntime has it)."""

    def __init__(self, path, threads: int | None = None, device: str = "cpu"):
        import onnxruntime as ort
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"no ONNX model at {self.path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # conv+BN+ReLU fusion, layouts
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of ops: nothing for inter-op threads
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = int(threads)
        # No busy-waiting between ops: on a small loaded machine a spinning pool thread takes the
        # core a decoder or the event loop needs (bench/formats.py, 2 loaded cores, 2 threads, 224 px:
        # 135 ms spinning against 78 ms not; quiet, it halved one 28 px image: see README).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only: no warnings about unused initializers on stderr
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=_providers(device))
        except OnnxModelError:
            raise
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise OnnxModelError(f"cannot load {self.path}: {str(e).splitlines()[0][:300]}") from None
        self.providers = self.session.get_providers()
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes: list[str] = [str(c) for c in json.loads(meta["classes"])]
            self.image_size: int = int(meta["image_size"])
            self.multi_label: bool = bool(json.loads(meta.get("multi_label", "false")))
            self.metadata: dict[str, str] = dict(meta)
        except (KeyError, ValueError, TypeError) as e:
            raise OnnxModelError(f"{self.path} lacks this project's ONNX metadata ({e}): "
                                 "not a model.onnx written by `python -m train`") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        s = self.image_size
        if ([i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]
                or inputs[0].type != "tensor(uint8)" or list(inputs[0].shape)[1:] != [3, s, s]):
            raise OnnxModelError(f"{self.path} does not take uint8 {INPUT_NAME} (N, 3, {self.image_size}, "
                                 f"{self.image_size}) to {OUTPUT_NAME}: not a model.onnx written by `python -m train`")

    def run(self, pixels) -> np.ndarray:
        """uint8 RGB (N, 3, S, S) pixels (numpy array or torch tensor) -> float32 (N, C) numpy."""
        torch = sys.modules.get("torch")  # a torch tensor can only exist if torch is imported
        if torch is not None and isinstance(pixels, torch.Tensor):
            pixels = pixels.detach().as_subclass(torch.Tensor).cpu().numpy()
        pixels = np.ascontiguousarray(pixels)
        s = self.image_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (3, s, s) or not len(pixels):
            raise ValueError(f"expected uint8 pixels of shape (N, 3, {s}, {s}) with N >= 1, got "
                             f"{pixels.dtype} {tuple(pixels.shape)}")
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]

    def probabilities(self, pixels):
        """As `run`, but a torch float32 (N, C) CPU tensor, the shape `Predictor.probabilities` returns."""
        import torch
        return torch.from_numpy(self.run(pixels))
