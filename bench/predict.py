"""Benchmark the prediction path against fastai's own: single-image latency and file throughput.

    python bench/predict.py [models/mnist] [--n 2000] [--iters 300] [--repeats 3]

1. latency: one PIL digit in, a label dict out. `Predictor.predict(img).as_label()` against
   `learn.predict(img)`, interleaved call by call so that noise from other processes hits both
   alike; p50 of each. Target: ratio <= 0.5.
2. throughput: `serve.predict`'s loop over N MNIST PNG files (decoding, batching, JSON lines)
   against `learn.get_preds(dl=learn.dls.test_dl(files))`, best of `--repeats` runs each,
   alternating. Target: ratio >= 1.3.

The PNGs are written from the MNIST test set (MNIST_DIR, IDX files) into a temporary folder.
Progress goes to stderr; the last line on stdout is a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.predict")


def write_pngs(n: int, out: Path) -> tuple[list[str], list[str]]:
    """The first n MNIST test digits as PNG files; returns (paths, true labels)."""
    from PIL import Image
    from train.mnist import load_idx_arrays
    arrays = load_idx_arrays(Path(os.environ.get("MNIST_DIR") or ROOT.parent / "shared" / "data" / "mnist"))
    files, labels = [], []
    for i in range(n):
        path = out / f"{i:05d}_{int(arrays.valid_labels[i])}.png"
        Image.fromarray(arrays.valid_images[i]).save(path)
        files.append(str(path))
        labels.append(str(int(arrays.valid_labels[i])))
    return files, labels


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def bench_latency(predictor, learn, img, iters: int) -> dict:
    import torch
    for _ in range(10):  # warm up both (allocator, oneDNN primitive caches)
        learn.predict(img)
        predictor.predict(img).as_label()
    ours, theirs, raw = [], [], []
    t_raw = torch.randn(1, 3, *predictor.prepare(img).shape[-2:])
    with torch.inference_mode():
        for _ in range(iters):
            t = time.perf_counter()
            learn.predict(img)
            theirs.append(time.perf_counter() - t)
            t = time.perf_counter()
            predictor.predict(img).as_label()
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            learn.model(t_raw)
            raw.append(time.perf_counter() - t)
    p50_ours, p50_theirs = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    return {"learn_predict_p50_ms": round(p50_theirs, 3), "predictor_p50_ms": round(p50_ours, 3),
            "predictor_p99_ms": round(percentile(ours, 99) * 1e3, 3),
            "raw_model_b1_p50_ms": round(statistics.median(raw) * 1e3, 3),
            "ratio": round(p50_ours / p50_theirs, 3)}


def bench_throughput(predictor, learn, files, labels, repeats: int, batch_size: int, workers: int,
                     threads: int | None) -> dict:
    """Each side as it runs by default: fastai with torch's default threads, `serve.predict` with
    the threads its `main` configures (cores shared between decoding and the model)."""
    import torch
    from serve.predict import classify_files, default_threads
    from serve.predictor import configure_threads
    n = len(files)
    fastai_threads = torch.get_num_threads()
    best_theirs = best_ours = float("inf")
    for r in range(repeats):
        torch.set_num_threads(fastai_threads)
        t = time.perf_counter()
        with learn.no_bar():
            probs, _ = learn.get_preds(dl=learn.dls.test_dl(files))
        best_theirs = min(best_theirs, time.perf_counter() - t)
        out, err = io.StringIO(), io.StringIO()
        ours_threads = configure_threads(0, threads or default_threads(workers))
        t = time.perf_counter()
        n_ok, n_bad = classify_files(predictor, files, as_json=True, batch_size=batch_size, workers=workers,
                                     out=out, err=err)
        best_ours = min(best_ours, time.perf_counter() - t)
        log.info("run %d: get_preds %.0f img/s, serve.predict %.0f img/s", r + 1, n / best_theirs, n / best_ours)
    torch.set_num_threads(fastai_threads)
    if n_ok != n or n_bad:
        raise SystemExit(f"serve.predict classified {n_ok} of {n} files: {err.getvalue()[:500]}")
    ours = [json.loads(line)["label"] for line in out.getvalue().splitlines()]
    theirs = [learn.dls.vocab[i] for i in probs.argmax(1).tolist()]
    return {"n_files": n, "get_preds_images_per_s": round(n / best_theirs, 1),
            "serve_predict_images_per_s": round(n / best_ours, 1), "ratio": round(best_theirs / best_ours, 3),
            "agreement_with_get_preds": sum(a == b for a, b in zip(ours, theirs)) / n,
            "accuracy": sum(a == b for a, b in zip(ours, labels)) / n,
            "batch_size": batch_size, "workers": workers, "torch_threads_ours": ours_threads,
            "torch_threads_get_preds": fastai_threads}


def bench_cli(model: Path, folder: Path) -> dict:
    """The real command, end to end (start-up and model load included), once."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "serve.predict", str(model), str(folder), "--json", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    wall = time.perf_counter() - t
    lines = proc.stdout.count("\n")
    return {"cli_exit": proc.returncode, "cli_lines": lines, "cli_wall_s": round(wall, 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=str(ROOT / "models" / "mnist"))
    p.add_argument("--n", type=int, default=2000, help="PNG files for the throughput test")
    p.add_argument("--iters", type=int, default=300, help="single-image calls timed, each way")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs each way; the best counts")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads for serve.predict (default: as its CLI)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-cli", action="store_true", help="skip the end-to-end run of `python -m serve.predict`")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from serve.source import quiet_known_warnings
    quiet_known_warnings()  # as `python -m serve.predict` does

    import torch
    from PIL import Image
    from serve.predict import BATCH_SIZE, default_workers
    from serve.predictor import Predictor
    predictor = Predictor.load(args.model, device=args.device)
    learn = predictor.folder.learner
    summary = {"bench": "predict", "model": str(args.model), "device": str(predictor.device),
               "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        files, labels = write_pngs(args.n, Path(tmp))
        img = Image.open(files[0])
        img.load()
        log.info("latency: %d interleaved calls each", args.iters)
        summary["latency"] = bench_latency(predictor, learn, img, args.iters)
        log.info("%s", summary["latency"])
        log.info("throughput: %d files, best of %d", len(files), args.repeats)
        summary["throughput"] = bench_throughput(predictor, learn, files, labels, args.repeats,
                                                 args.batch_size or BATCH_SIZE, args.workers if args.workers is not None else default_workers(),
                                                 args.threads)
        log.info("%s", summary["throughput"])
        if not args.no_cli:
            summary["cli"] = bench_cli(Path(args.model), Path(tmp))
    summary["targets"] = {"latency_ratio_le_0.5": summary["latency"]["ratio"] <= 0.5,
                          "throughput_ratio_ge_1.3": summary["throughput"]["ratio"] >= 1.3}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
