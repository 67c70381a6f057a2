"""Benchmark: our pipeline on a messy photo folder vs fastai's plain `from_folder` on the same
folder with the broken files removed by hand. Both train resnet18 from scratch at 64 px.

    python bench/train_photos.py [--per-class 150] [--epochs 5]

The folder (tests/photoset.py) has assorted sizes, modes (L, RGB, RGBA, P, CMYK, 16-bit) and
formats, an EXIF-rotated photo, and three broken files. Both models are scored on the same
held-out test folder, generated separately, so neither pipeline's own split decides. Target:
ours >= fastai's. Prints one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLAIN_FASTAI = r"""
import sys, json, warnings
warnings.filterwarnings("ignore")
from fastai.vision.all import *
set_seed(42, reproducible=True)
path, test, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
dls = ImageDataLoaders.from_folder(path, valid_pct=0.2, seed=42, item_tfms=Resize(64), bs=64,
                                   batch_tfms=aug_transforms())
learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
with learn.no_bar(): learn.fit_one_cycle(epochs, 3e-3)
files = get_image_files(test)
probs, _ = learn.get_preds(dl=learn.dls.test_dl(files))
pred = [learn.dls.vocab[i] for i in probs.argmax(1)]
print("ACCURACY", sum(p == f.parent.name for p, f in zip(pred, files)) / len(files))
"""

OURS_SCORE = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from fastai.learner import load_learner
learn = load_learner(Path(sys.argv[1]) / "model.pkl")
files = sorted(f for f in Path(sys.argv[2]).rglob("*") if f.is_file())
probs, _ = learn.get_preds(dl=learn.dls.test_dl(files))
pred = [learn.dls.vocab[i] for i in probs.argmax(1)]
print("ACCURACY", sum(p == f.parent.name for p, f in zip(pred, files)) / len(files))
"""


def run(cmd) -> tuple[float, str]:
    cmd = [str(c) for c in cmd]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def accuracy(out: str) -> float:
    return float(out.split("ACCURACY")[-1].split()[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=150, help="images per class in the training folder")
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    from tests.photoset import make_photo_folder
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made = make_photo_folder(tmp / "photos", args.per_class, seed=0)
        test = make_photo_folder(tmp / "test", 40, seed=1, broken=False)["root"]
        # fastai's plain pipeline needs the broken files removed by hand; the stray notes.txt it ignores.
        cleaned = tmp / "photos_cleaned"
        shutil.copytree(made["root"], cleaned)
        for f in made["broken"]:
            (cleaned / f.relative_to(made["root"])).unlink()

        plain_s, out = run([sys.executable, "-c", PLAIN_FASTAI, cleaned, test, str(args.epochs)])
        plain = accuracy(out)
        print(f"fastai from_folder (cleaned by hand): {plain:.4f} in {plain_s:.0f} s", flush=True)

        ours_s, _ = run([sys.executable, "-m", "train", made["root"], "--size", "64", "--epochs", str(args.epochs),
                         "--out", tmp / "ours", "-q"])
        n_test = sum(1 for f in test.rglob("*") if f.is_file())
        _, out = run([sys.executable, "-c", OURS_SCORE, tmp / "ours", test])
        ours = accuracy(out)
        print(f"ours (broken files left in): {ours:.4f} in {ours_s:.0f} s", flush=True)
    print(json.dumps({"per_class": args.per_class, "epochs": args.epochs, "test_images": n_test,
                      "fastai_from_folder_accuracy": round(plain, 4), "fastai_from_folder_seconds": round(plain_s, 1),
                      "ours_accuracy": round(ours, 4), "ours_seconds": round(ours_s, 1), "ok": ours >= plain}))


if __name__ == "__main__":
    main()
