"""Benchmark: `python -m train mnist` against the article's own fastai pipeline, side by side.

    MNIST_DIR=../shared/data/mnist python bench/train_mnist.py [--skip-default] [--repeats N]

Runs, one after the other on the same machine, each as its own process (imports included):
  1. the article: `ImageDataLoaders.from_folder(path, train='training', valid='testing')` +
     `vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)` + `fit_one_cycle(1, 0.1)`
     on fastai's PNG folder layout (written once from the IDX files, before timing);
  2. ours, `python -m train mnist --epochs 1`: target >= 99.0% in <= 2/3 of (1)'s wall time;
  3. ours with the documented MNIST defaults, `python -m train mnist`: target >= 99.3% within (1)'s wall time.
Peak RSS of each process comes from `os.wait4`. Prints one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARTICLE = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from fastai.vision.all import *
path = Path(sys.argv[1])
dls = ImageDataLoaders.from_folder(path, train='training', valid='testing')
learn = vision_learner(dls, resnet18, pretrained=False, loss_func=F.cross_entropy, metrics=accuracy)
with learn.no_bar(): learn.fit_one_cycle(1, 0.1)
print("ACCURACY", float(learn.recorder.values[-1][-1]))
"""


def timed(cmd, env=None) -> dict:
    """Run `cmd`; wall seconds, peak RSS (MB) of that process, exit code and output."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "rc": p.returncode, "output": out}


def write_png_layout(mnist_dir: Path, out: Path) -> None:
    from PIL import Image
    from train.mnist import load_idx_arrays
    a = load_idx_arrays(mnist_dir)
    for split, xs, ys in (("training", a.train_images, a.train_labels), ("testing", a.valid_images, a.valid_labels)):
        for d in range(10):
            (out / split / str(d)).mkdir(parents=True, exist_ok=True)
        for i, (x, y) in enumerate(zip(xs, ys)):
            Image.fromarray(x).save(out / split / str(int(y)) / f"{i}.png")


def ours(args, tmp: Path, name: str) -> dict:
    out = tmp / name
    r = timed([sys.executable, "-m", "train", "mnist", *args, "--out", str(out)], env={"PYTHONPATH": str(ROOT)})
    if r["rc"] != 0:
        sys.exit(f"{name} failed:\n{r['output'][-3000:]}")
    from models.contract import read_metadata
    meta = read_metadata(out)
    r["accuracy"] = meta.metrics.valid_accuracy
    r["epochs"] = meta.config["epochs"]
    r["fit_seconds"] = meta.training_seconds
    print(f"{name}: {r['accuracy']:.4f} in {r['seconds']} s (fit {r['fit_seconds']} s), peak RSS {r['peak_rss_mb']} MB",
          flush=True)
    return r


def article_run(tmp: Path) -> dict:
    r = timed([sys.executable, "-c", ARTICLE, str(tmp / "mnist_png")])
    if r["rc"] != 0:
        sys.exit(f"article pipeline failed:\n{r['output'][-3000:]}")
    r["accuracy"] = float(r["output"].split("ACCURACY")[-1].split()[0])
    print(f"article: {r['accuracy']:.4f} in {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB", flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-default", action="store_true", help="skip run 3 (the documented defaults)")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternate the article and our 1-epoch run this many times; ratios are per pair, "
                        "and the median pair counts (the machine's speed drifts over minutes)")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    mnist_dir = Path(os.environ.get("MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))
    os.environ["MNIST_DIR"] = str(mnist_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        from train.mnist import MnistError
        try:
            write_png_layout(mnist_dir, tmp / "mnist_png")
        except MnistError as e:
            sys.exit(f"error: {e}")
        print(f"wrote the PNG layout in {time.perf_counter() - t:.0f} s (not timed)", flush=True)
        pairs = []
        for i in range(args.repeats):
            article = article_run(tmp)
            one = ours(["--epochs", "1"], tmp, f"ours_1_epoch_{i}")
            pairs.append((article, one))
            print(f"pair {i}: time ratio {one['seconds'] / article['seconds']:.3f}", flush=True)
        default = None if args.skip_default else ours([], tmp, "ours_default")
        if default:  # the default run is compared with an article run next to it, too
            after = article_run(tmp)

    ratios = [one["seconds"] / article["seconds"] for article, one in pairs]
    article, one = sorted(pairs, key=lambda p: p[1]["seconds"] / p[0]["seconds"])[len(pairs) // 2]
    summary = {
        "article_seconds": article["seconds"], "article_accuracy": article["accuracy"],
        "ours_1epoch_seconds": one["seconds"], "ours_1epoch_accuracy": one["accuracy"],
        "ours_1epoch_fit_seconds": one["fit_seconds"],
        "ours_1epoch_time_ratio": round(one["seconds"] / article["seconds"], 3),
        "time_ratios": [round(r, 3) for r in ratios],
        "ours_1epoch_ok": one["accuracy"] >= 0.990 and one["seconds"] <= article["seconds"] * 2 / 3,
        "ours_peak_rss_mb": max([o["peak_rss_mb"] for _, o in pairs] + ([default["peak_rss_mb"]] if default else [])),
        "article_peak_rss_mb": max(a["peak_rss_mb"] for a, _ in pairs),
    }
    if default:
        budget = min(after["seconds"], pairs[-1][0]["seconds"])  # the article runs either side of it
        summary.update({
            "ours_default_epochs": default["epochs"], "ours_default_seconds": default["seconds"],
            "ours_default_accuracy": default["accuracy"], "article_seconds_beside_default": budget,
            "ours_default_ok": default["accuracy"] >= 0.993 and default["seconds"] <= budget,
        })
    summary["rss_ok"] = summary["ours_peak_rss_mb"] < 4096
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
