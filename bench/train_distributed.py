"""Benchmark: one process against `torchrun --nproc_per_node N` for the same small run, on this machine.

    MNIST_DIR=../shared/data/mnist python bench/train_distributed.py [--procs 2] [--per-class 30] [--repeats 1]

Writes `--per-class` training and 10 validation MNIST digits per class as PNGs (fastai's folder layout),
then alternates, `--repeats` times: `python -m train DIGITS --epochs 2 --size 28 --bs B*N` in one process
(torch's threads over every core), the same with OMP_NUM_THREADS=1, and `torchrun --standalone --nproc_per_node N -m train ... --bs B` (the
same effective batch; torchrun gives each process one thread). Wall time of the whole command
(imports, data, export included), the fit's own seconds, the validation accuracy and the load
average before each run. On a CPU box this measures the overhead, not a speed-up: N processes share
the same cores and add gloo's gradient all-reduce every step. Prints one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_digits(arrays, out: Path, n_train: int, n_valid: int) -> Path:
    """The first n digits of each class as PNGs, in fastai's MNIST layout (training/, testing/)."""
    from PIL import Image
    for split, xs, ys, n in (("training", arrays.train_images, arrays.train_labels, n_train),
                             ("testing", arrays.valid_images, arrays.valid_labels, n_valid)):
        counts: dict[int, int] = {}
        for i, (x, y) in enumerate(zip(xs, ys)):
            y = int(y)
            if counts.get(y, 0) < n:
                counts[y] = counts.get(y, 0) + 1
                (out / split / str(y)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(x).save(out / split / str(y) / f"{i}.png")
    return out


def run(cmd: list[str], **env) -> dict:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    m = re.search(r"valid accuracy ([0-9.]+)\s+fit (\d+) s", r.stdout)
    return {"wall_s": round(wall, 1), "fit_s": int(m.group(2)), "accuracy": float(m.group(1)), "load": round(load, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--per-class", type=int, default=30, help="training digits per class (default 30)")
    p.add_argument("--bs", type=int, default=16, help="batch per process (default 16)")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    from train.mnist import load_idx_arrays
    arrays = load_idx_arrays(Path(os.environ["MNIST_DIR"]))
    with tempfile.TemporaryDirectory() as tmp:
        digits = write_digits(arrays, Path(tmp) / "digits", args.per_class, 10)
        common = [str(digits), "--epochs", "2", "--size", "28", "--no-augment", "--lr", "3e-3"]
        one, one_thread, many = [], [], []
        for _ in range(args.repeats):
            single = [sys.executable, "-m", "train", *common, "--bs", str(args.bs * args.procs), "--out", f"{tmp}/one"]
            one.append(run(single))
            # torchrun gives each process one thread (OMP_NUM_THREADS=1): the same for one process
            one_thread.append(run(single, OMP_NUM_THREADS="1"))
            many.append(run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(args.procs), "-m", "train", *common, "--bs", str(args.bs), "--out", f"{tmp}/many"]))
            print(json.dumps({"one_process": one[-1], "one_process_one_thread": one_thread[-1],
                              f"{args.procs}_processes": many[-1]}), flush=True)
    best = lambda runs, k: min(r[k] for r in runs)  # noqa: E731
    print(json.dumps({"bench": "train_distributed", "cpus": os.cpu_count(), "procs": args.procs,
                      "train_images": args.per_class * 10, "effective_batch": args.bs * args.procs,
                      "one_process_wall_s": best(one, "wall_s"), "one_process_fit_s": best(one, "fit_s"),
                      "one_thread_wall_s": best(one_thread, "wall_s"), "one_thread_fit_s": best(one_thread, "fit_s"),
                      "distributed_wall_s": best(many, "wall_s"), "distributed_fit_s": best(many, "fit_s"),
                      "one_process_accuracy": one[-1]["accuracy"], "distributed_accuracy": many[-1]["accuracy"],
                      "repeats": args.repeats}))


if __name__ == "__main__":
    main()
