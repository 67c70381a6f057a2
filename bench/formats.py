"""Benchmark `model.onnx` on onnxruntime against the torch path the server uses today.

    python bench/formats.py [models/mnist] [--iters 200] [--batch 64] [--repeats 5] [--threads 1]

Two models, each exported to ONNX here (untimed) and run both ways on the same uint8 pixels:
- 28 px: the MNIST model folder given (resnet18 + fastai head, trained);
- 224 px: fastai's `create_vision_model(resnet18, 10, pretrained=False)`, randomly initialised
  (the speed of a network does not depend on its weights), wrapped in a learner with the same
  preprocessing as an exported one.
The torch side is `serve.predictor.Predictor.probabilities` (fastai's batch transforms, BatchNorm
folded into the convolutions, channels-last, `inference_mode`); the ONNX side is
`models.onnx.OnnxClassifier.probabilities`. Both take uint8 (N, 3, S, S) and return float32
probabilities, so decoding and resizing (the same for both) are left out.

1. single image: one (1, 3, S, S) batch, the two calls interleaved so that noise from other
   processes hits both alike (in blocks: see `interleaved`); p50 and p99 of each. Also torch's
   network alone (no fastai transforms around it), to tell the network from the pipeline.
2. batch: `--batch` images per call, images/s, best of `--repeats` calls each, interleaved.
3. agreement on that batch: top-1 and the largest probability difference.
4. onnxruntime's session options at 28 px and 224 px, one image, on 1 thread and on every core:
   spinning threads on/off, the memory arena on/off, the graph optimisation level (with the
   session's creation time); `OnnxClassifier` picks "chosen" from this.
5. loading: in this process (imports done), `OnnxClassifier(path)` against `Predictor.load(folder)`
   (`load_learner` + the fusing), median of 3; and a cold start, a fresh `python` that imports,
   loads and classifies one image, wall time, best of 2.

Both sides get the same intra-op threads, by default what `python -m serve` gives torch (cores - 1,
at least 1). Progress goes to stderr; the last line on stdout is a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.formats")


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def ms(xs) -> dict:
    return {"p50_ms": round(statistics.median(xs) * 1e3, 3), "p99_ms": round(percentile(xs, 99) * 1e3, 3)}


def interleaved(calls: dict, iters: int, block: int = 10) -> dict:
    """Each callable `iters` times, in alternating blocks of `block` calls; the seconds of every
    timed call, per name. Blocks, not call-by-call alternation: both networks' weights (45 MB each)
    do not fit the cache together, so alternating call by call would time each with the other's
    weights in the cache, a penalty a server running one of them never pays. Each block starts with
    one untimed call (re-warming caches); alternating blocks still spreads noise from other
    processes over both sides alike."""
    times = {name: [] for name in calls}
    for _ in range(max(1, -(-iters // block))):
        for name, f in calls.items():
            f()
            for _ in range(block):
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    return times


def synthetic_predictor(size: int, n_out: int = 10):
    """A `Predictor` on a random resnet18 + fastai head at `size` px, built as an exported learner is
    (`models.contract.inference_dataloaders`: the same item and batch transforms)."""
    from PIL import Image
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.vision.learner import create_vision_model
    from torchvision.models import resnet18
    from models.contract import (ARCH, Head, Metrics, ModelFolder, ModelMetadata, Normalization, inference_dataloaders,
                                 library_versions)
    from serve.predictor import Predictor
    classes = [str(i) for i in range(n_out)]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, as a photo model has
    dls = inference_dataloaders(classes, size, mean, std, (Image.new("RGB", (size, size)), classes[0]))
    learn = Learner(dls, create_vision_model(resnet18, n_out, pretrained=False), loss_func=CrossEntropyLossFlat())
    learn.model.eval()
    meta = ModelMetadata(name=f"random-resnet18-{size}", classes=classes, arch=ARCH, n_out=n_out, head=Head(),
                         activation="softmax", image_size=size, resize_method="squish", input_channels=3,
                         normalize=Normalization(mean=mean, std=std), versions=library_versions(),
                         metrics=Metrics(valid_accuracy=0.0, n_valid=0, per_class_accuracy={}, confusion_matrix=[]))
    folder = ModelFolder(Path(f"<random {size} px>"), meta, "pickle", learn.model, learn)
    return Predictor(folder, device="cpu"), meta


def export(predictor, meta, out: Path) -> Path:
    from models.onnx import export_onnx
    return export_onnx(predictor.folder.learner.model, out, image_size=meta.image_size,
                       mean=meta.normalize.mean, std=meta.normalize.std, classes=meta.classes)


def bench_case(name: str, predictor, onnx_path: Path, pixels1, batch, iters: int, repeats: int,
               threads: int) -> dict:
    import torch
    from models.onnx import OnnxClassifier
    clf = OnnxClassifier(onnx_path, threads=threads)
    log.info("%s: one image, %d interleaved calls each", name, iters)
    # and torch's network alone (fused, channels-last, already normalised input): how much of the
    # torch path's time is the network and how much fastai's Python pipeline around it
    x1 = predictor._batch_tfms(predictor._tensor_image(pixels1)).as_subclass(torch.Tensor)
    x1 = x1.contiguous(memory_format=torch.channels_last)

    def torch_model_only():
        with torch.inference_mode():
            return predictor.model(x1)

    single = interleaved({"torch": lambda: predictor.probabilities(pixels1), "torch_model_only": torch_model_only,
                          "onnx": lambda: clf.probabilities(pixels1)}, iters)
    log.info("%s: batch of %d, best of %d each", name, len(batch), repeats)
    many = interleaved({"torch": lambda: predictor.probabilities(batch),
                        "onnx": lambda: clf.probabilities(batch)}, repeats, block=1)
    ips = {k: round(len(batch) / min(v), 1) for k, v in many.items()}
    p_torch, p_onnx = predictor.probabilities(batch), clf.probabilities(batch)
    out = {"torch_single": ms(single["torch"]), "torch_model_only_single": ms(single["torch_model_only"]),
           "onnx_single": ms(single["onnx"]),
           "single_speedup": round(statistics.median(single["torch"]) / statistics.median(single["onnx"]), 2),
           "torch_batch_images_per_s": ips["torch"], "onnx_batch_images_per_s": ips["onnx"],
           "batch_speedup": round(ips["onnx"] / ips["torch"], 2), "batch": len(batch),
           "top1_agreement": float((p_torch.argmax(1) == p_onnx.argmax(1)).float().mean()),
           "max_prob_diff": float((p_torch - p_onnx).abs().max())}
    log.info("%s: %s", name, out)
    return out


def bench_ort_options(onnx_path: Path, pixels, threads: int, iters: int) -> dict:
    """One-image p50 (ms), and session creation (s), under onnxruntime's session options that could
    matter on a small machine: spinning pool threads, the memory arena, the graph optimisation level."""
    import onnxruntime as ort
    from models.onnx import INPUT_NAME, OUTPUT_NAME
    x = pixels.numpy()
    level = ort.GraphOptimizationLevel
    variants = {"chosen": ("0", True, level.ORT_ENABLE_ALL), "spinning_on": ("1", True, level.ORT_ENABLE_ALL),
                "arena_off": ("0", False, level.ORT_ENABLE_ALL), "optimize_extended": ("0", True, level.ORT_ENABLE_EXTENDED),
                "optimize_basic": ("0", True, level.ORT_ENABLE_BASIC)}
    sessions, created = {}, {}
    for name, (spin, arena, opt) in variants.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = opt
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.enable_cpu_mem_arena = arena
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        t = time.perf_counter()
        s = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        created[name] = round(time.perf_counter() - t, 3)
        sessions[name] = lambda s=s: s.run([OUTPUT_NAME], {INPUT_NAME: x})
    times = interleaved(sessions, iters)
    return {name: {"p50_ms": round(statistics.median(t) * 1e3, 3), "create_s": created[name]}
            for name, t in times.items()}


COLD_ONNX = """
import sys, time, numpy as np
sys.path.insert(0, {root!r})
from models.onnx import OnnxClassifier
c = OnnxClassifier({path!r})
c.run(np.zeros((1, 3, c.image_size, c.image_size), np.uint8))
"""
COLD_TORCH = """
import sys, warnings
sys.path.insert(0, {root!r})
warnings.simplefilter("ignore")
from serve.predictor import Predictor
p = Predictor.load({path!r}, device="cpu")
import torch
p.probabilities(torch.zeros(1, 3, p.metadata.image_size, p.metadata.image_size, dtype=torch.uint8))
"""


def bench_loading(model: Path, onnx_path: Path) -> dict:
    from models.onnx import OnnxClassifier
    from serve.predictor import Predictor
    warm = {"onnx": [], "torch": []}
    for _ in range(3):
        t = time.perf_counter()
        OnnxClassifier(onnx_path)
        warm["onnx"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Predictor.load(model, device="cpu")
        warm["torch"].append(time.perf_counter() - t)
    cold = {"onnx": [], "torch": []}
    for _ in range(2):
        for name, code, path in (("onnx", COLD_ONNX, onnx_path), ("torch", COLD_TORCH, model)):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), path=str(path))], check=True,
                           cwd=ROOT, capture_output=True)
            cold[name].append(time.perf_counter() - t)
    return {"onnx_session_s": round(statistics.median(warm["onnx"]), 3),
            "torch_load_learner_and_fuse_s": round(statistics.median(warm["torch"]), 3),
            "onnx_cold_start_s": round(min(cold["onnx"]), 2), "torch_cold_start_s": round(min(cold["torch"]), 2)}


def main(argv=None) -> dict:
    from serve.predictor import available_cpus
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=str(ROOT / "models" / "mnist"), help="a 28 px MNIST model folder")
    p.add_argument("--iters", type=int, default=200, help="one-image calls timed, each way (224 px: a quarter)")
    p.add_argument("--batch", type=int, default=64, help="images per call in the batch test")
    p.add_argument("--repeats", type=int, default=5, help="batch calls each way; the best counts")
    p.add_argument("--threads", type=int, default=max(1, available_cpus() - 1),
                   help="intra-op threads, both sides (default: as `python -m serve`, cores - 1)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from serve.source import quiet_known_warnings
    quiet_known_warnings()

    import numpy as np
    import torch
    from serve.predictor import Predictor, configure_threads
    configure_threads(0, args.threads)
    from train.mnist import load_idx_arrays
    digits = load_idx_arrays(Path(os.environ.get("MNIST_DIR") or ROOT.parent / "shared" / "data" / "mnist")).valid_images
    summary = {"bench": "formats", "model": str(args.model), "threads": args.threads, "cpus": available_cpus(),
               "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench_formats_") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mnist = Predictor.load(args.model, device="cpu")
        mnist_onnx = export(mnist, mnist.metadata, Path(tmp) / "mnist.onnx")
        # real digits at 28 px (RGB, as the item pipeline makes them); random pixels at 224 px
        x28 = torch.from_numpy(np.repeat(digits[:args.batch, None], 3, axis=1))
        big, big_meta = synthetic_predictor(224)
        big_onnx = export(big, big_meta, Path(tmp) / "r18_224.onnx")
        x224 = torch.from_numpy(rng.integers(0, 256, (args.batch, 3, 224, 224), dtype=np.uint8))

        summary["px28"] = bench_case("28 px", mnist, mnist_onnx, x28[:1], x28, args.iters, args.repeats, args.threads)
        summary["px224"] = bench_case("224 px", big, big_onnx, x224[:1], x224, max(20, args.iters // 4),
                                      args.repeats, args.threads)
        log.info("onnxruntime session options, one image")
        summary["ort_options_single"] = {
            f"px{s}_threads{n}": bench_ort_options(path, x[:1], n, it)
            for s, path, x, it in ((28, mnist_onnx, x28, args.iters), (224, big_onnx, x224, max(20, args.iters // 4)))
            for n in sorted({1, available_cpus()})}
        log.info("%s", summary["ort_options_single"])
        log.info("loading")
        summary["loading"] = bench_loading(Path(args.model), mnist_onnx)
        log.info("%s", summary["loading"])
        summary["onnx_bytes"] = {"px28": mnist_onnx.stat().st_size, "px224": big_onnx.stat().st_size}
    c28, c224 = summary["px28"], summary["px224"]
    summary["targets"] = {
        # the trained model only: a random one's near-uniform outputs may tie within fp32 rounding
        "onnx_same_top1_as_torch_28px": c28["top1_agreement"] == 1.0,
        "onnx_probs_within_1e-4_of_torch": max(c28["max_prob_diff"], c224["max_prob_diff"]) < 1e-4,
        "onnx_faster_single_28px": c28["single_speedup"] > 1, "onnx_faster_batch_224px": c224["batch_speedup"] > 1,
        "onnx_loads_faster": summary["loading"]["onnx_session_s"] < summary["loading"]["torch_load_learner_and_fuse_s"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
