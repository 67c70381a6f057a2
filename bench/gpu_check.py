"""GPU check, for a machine with CUDA: one full-MNIST epoch there, then the exported model served
by the `Predictor` on that GPU (single-image latency, batch throughput). Prints one JSON line last.

    MNIST_DIR=path/to/mnist python bench/gpu_check.py --out /tmp/gpu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/gpu_check")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--model", default="", help="skip training and serve this model folder (a dry run on CPU)")
    args = p.parse_args()
    out = Path(args.out)
    model = Path(args.model) if args.model else out / "mnist_gpu"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    devices = ("cuda", "cpu") if not args.model else ("cpu",)

    t0 = time.perf_counter()
    r = subprocess.run(["true"]) if args.model else subprocess.run([sys.executable, "-m", "train", "mnist", "--epochs", str(args.epochs), "--device", "cuda",
                        "--out", str(model)], cwd=ROOT, env=env, capture_output=True, text=True)
    train_wall = time.perf_counter() - t0
    print((r.stdout or "")[-1500:], (r.stderr or "")[-1500:], flush=True)
    if r.returncode != 0:
        sys.exit("training failed")
    from models.contract import read_metadata
    meta = read_metadata(model)

    import torch
    from PIL import Image
    from serve.predictor import Predictor
    from train.mnist import load_idx_arrays
    a = load_idx_arrays(Path(os.environ["MNIST_DIR"]))
    images = [Image.fromarray(x) for x in a.valid_images[:2000]]
    truth = [str(int(y)) for y in a.valid_labels[:2000]]
    res = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "train_epochs": args.epochs,
           "train_wall_s": round(train_wall, 1), "train_fit_s": meta.training_seconds,
           "train_valid_accuracy": meta.metrics.valid_accuracy, "train_device": meta.device}
    for device in devices:
        pred = Predictor.load(model, device=device)
        for im in images[:20]:  # warm-up: cuDNN autotuning, allocator
            pred.predict(im)
        lat = []
        for im in images[:300]:
            t = time.perf_counter()
            pred.predict(im).as_dict()
            if device == "cuda":
                torch.cuda.synchronize()
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        preds = pred.predict_batch(images, top_k=1)
        batch_s = time.perf_counter() - t
        acc = sum(p.label == y for p, y in zip(preds, truth)) / len(truth)
        # The model alone on ready tensors, batch 256: the ceiling the decode path works towards.
        x = torch.stack([pred.prepare(im) for im in images[:256]])
        with torch.inference_mode():
            for _ in range(3):
                pred.probabilities(list(x))
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                pred.probabilities(list(x))
            if device == "cuda":
                torch.cuda.synchronize()
            raw = 2560 / (time.perf_counter() - t)
        res[device] = {"single_p50_ms": round(statistics.median(lat) * 1000, 2),
                       "single_p99_ms": round(sorted(lat)[int(0.99 * len(lat))] * 1000, 2),
                       "predict_batch_2000_images_per_s": round(len(images) / batch_s),
                       "batch256_model_images_per_s": round(raw), "accuracy_2000": acc}
        print(device, res[device], flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
