"""Benchmark: reduced decoding of 12 MP phone photos, against today's full decode, in one run.

    python bench/decode_photos.py [--photos 1000] [--size 224] [--test-photos 1000] [--train-size 64]
    python bench/decode_photos.py --photos 40 --test-photos 40 --epochs 2 --seeds 1,2 --no-e2e   # a quick check

Photos: `--photos` large JPEGs (4032x3024, q90, ~3-4 MB, bench/photoset_large.py) and
`--test-photos` more, held out for part (b), written to a temporary folder (timed, reported).

(a) Building the training cache at `--size` (target: new <= 1/3 of old). Both paths decode
through `models.imageio.open_image` and then the model's own item transforms (fastai's
`Resize` squish, PIL bilinear to S x S, and `ToTensor`), in the thread pool `train.data.decode_items`
uses (its worker count and `chunksize`), and stack the result as the cache does:
  old: `open_image(path)`, the full 12 MP decode, then the resize;
  new: `open_image(path, size=S)`, the reduced decode (DCT scaling, never below 2 x S), then the resize.
The photos are taken in chunks (`--chunk`); each chunk is read into the page cache first, then
built both ways, the order alternating from chunk to chunk, so that disk and machine noise fall
on both paths alike. Also reported: how far the two caches differ (mean and max |old - new|,
0..255), which of the two `train.data.decode_items` matches as the checkout stands, and (unless
`--no-e2e`) `python -m train PHOTOS --size S --epochs 1` end to end, its data phase read from the
moment its data table appears on stdout (so it includes start-up and imports).

(b) Accuracy. The trainer has no switch between the two decodings, so the bench decodes every
photo both ways itself, at `--train-size`, exactly as the cache would hold it (item transforms,
uint8), and writes each result losslessly as an S x S PNG: two copies of one train/valid/test
split, one per decoding. `python -m train` trains the same resnet18 from scratch (same seed, same
split, same settings) on each copy; the trainer's own resize of an S x S PNG to S x S is the
identity, so each model trains on exactly the cache its decoding gives. Both models are scored on
the held-out photos decoded either way, through `python -m serve.predict` (four scores).
Both decodings get a model at every seed of `--seeds` (default twenty, 5..24), the order alternating per
seed. Target: on each test decoding, the medians of the two arms within `--tolerance` (0.2)
points. Beside it, what makes the number readable: the test set's resolution (one photo = 100/N
points), each seed's paired gap, and each arm's spread over its seeds (what training noise alone
moves the score: one seed cannot resolve 0.2 points here).

Progress goes to stderr; the last line on stdout is a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.photoset_large import PHONE_SIZE, parse_size, write_photo_sets  # noqa: E402
from models.cli import seeds_list  # noqa: E402
from models.contract import item_transforms  # noqa: E402
from models.imageio import RGBImage, open_image  # noqa: E402

log = logging.getLogger("bench.decode_photos")

RATIO_TARGET = 1 / 3   # new path's time over the old path's, building the cache
TOLERANCE = 0.2        # accuracy points between the two models, per test decoding


def default_workers() -> int:
    return min(8, (os.cpu_count() or 1) * 2)  # what train.data.decode_items uses by default


# --------------------------------------------------------------------------- the two paths

def decode_resize(path: Path, tfms, reduce_to: int | None) -> torch.Tensor:
    """One file as the cache holds it: decoded (fully, or reduced for `reduce_to`), then the
    model's item transforms with their validation behaviour, as train.data._decode applies them."""
    x = RGBImage(open_image(path, size=reduce_to))
    for t in tfms:
        x = t(x, split_idx=1)
    return x


def build_cache(files, size: int, reduced: bool, workers: int) -> torch.Tensor:
    """The cache's uint8 (N, 3, S, S) tensor, in the thread pool `decode_items` uses."""
    tfms = item_transforms(size)
    with ThreadPoolExecutor(workers) as pool:
        xs = list(pool.map(lambda f: decode_resize(f, tfms, size if reduced else None), files, chunksize=32))
    return torch.stack(xs)


def read_into_page_cache(files) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 22):
                pass


def time_cache_paths(files, size: int, chunk: int, workers: int) -> dict:
    old_s = new_s = 0.0
    ratios, diffs, maxdiff = [], [], 0
    chunks = [files[i:i + chunk] for i in range(0, len(files), chunk)]
    for k, part in enumerate(chunks):
        read_into_page_cache(part)
        seconds, caches = {}, {}
        for reduced in ((False, True) if k % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            caches[reduced] = build_cache(part, size, reduced, workers)
            seconds[reduced] = time.perf_counter() - t0
        old_s += seconds[False]
        new_s += seconds[True]
        ratios.append(seconds[True] / seconds[False])
        d = (caches[False].int() - caches[True].int()).abs()
        diffs.append(float(d.float().mean()))
        maxdiff = max(maxdiff, int(d.max()))
        log.info("cache chunk %d/%d (%d photos): old %.1f s, new %.1f s (%.2f)", k + 1, len(chunks), len(part),
                 seconds[False], seconds[True], ratios[-1])
    return {"old_s": round(old_s, 2), "new_s": round(new_s, 2), "ratio": round(new_s / old_s, 4),
            "chunk_ratio_min": round(min(ratios), 4), "chunk_ratio_median": round(statistics.median(ratios), 4),
            "chunk_ratio_max": round(max(ratios), 4),
            "old_photos_per_s": round(len(files) / old_s, 2), "new_photos_per_s": round(len(files) / new_s, 2),
            "mean_abs_diff": round(statistics.fmean(diffs), 3), "max_abs_diff": maxdiff}


def project_builder_mode(items, size: int) -> str:
    """Which path `train.data.decode_items` takes as the checkout stands: 'full', 'reduced' or 'other'."""
    from train.data import DataError, decode_items
    files = [f for f, _, _ in items]
    try:
        root = Path(files[0]).parents[1]  # photos/<class>/<file>: skipped files are named relative to it
        cache = decode_items(items, size, "bench", root, "bench", progress=False)
    except DataError as e:
        log.warning("could not run decode_items on a sample: %s", e)
        return "unknown"
    workers = default_workers()
    for name, reduced in (("full", False), ("reduced", True)):
        if torch.equal(cache.images, build_cache(files, size, reduced, workers)):
            return name
    return "other"


# --------------------------------------------------------------------------- subprocesses

def run_cmd(cmd, timeout: float = 3600) -> tuple[float, str]:
    cmd = [str(c) for c in cmd]
    log.info("running: %s", " ".join(cmd))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def train_end_to_end(photos: Path, size: int, out: Path) -> dict:
    """`python -m train PHOTOS --size S --epochs 1`, with the time each stdout line appeared:
    the data table (its last line is 'skipped files: N') is printed right after the cache is built."""
    cmd = [sys.executable, "-m", "train", str(photos), "--size", str(size), "--epochs", "1", "--out", str(out)]
    log.info("running: %s", " ".join(cmd))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errf:  # a file, not a pipe: nothing blocks while stdout is read
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                stderr=errf, text=True)
        data_s, lines = None, []
        for line in proc.stdout:
            lines.append(line)
            if data_s is None and line.startswith("skipped files:"):
                data_s = time.perf_counter() - t0
                log.info("train: data table after %.1f s", data_s)
        proc.wait()
        errf.seek(0)
        err = errf.read()
    if proc.returncode != 0:
        sys.exit(f"python -m train failed ({proc.returncode}):\n{''.join(lines)[-2000:]}\n{err[-3000:]}")
    total_s = time.perf_counter() - t0
    from models.contract import read_metadata
    meta = read_metadata(out)
    return {"seconds": round(total_s, 1), "data_phase_s": round(data_s, 1) if data_s else None,
            "valid_accuracy": meta.metrics.valid_accuracy}


# --------------------------------------------------------------------------- accuracy

def split_items(items) -> list[tuple[Path, str, str]]:
    """(file, class, split): the training photos get every 5th of each class as 'valid'."""
    out, seen = [], {}
    for f, cls in items:
        k = seen[cls] = seen.get(cls, -1) + 1
        out.append((f, cls, "valid" if k % 5 == 4 else "train"))
    return out


def write_decoded(entries, size: int, roots: dict[bool, Path], workers: int) -> dict:
    """Decode each (file, class, split) both ways at `size` and write root/split/class/name.png;
    returns timing and difference figures for the two decodings (interleaved per chunk of 100)."""
    tfms = item_transforms(size)
    seconds = {False: 0.0, True: 0.0}
    diffs, maxdiff = [], 0
    for k in range(0, len(entries), 100):
        part = entries[k:k + 100]
        read_into_page_cache([f for f, _, _ in part])
        xs = {}
        for reduced in ((False, True) if (k // 100) % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                xs[reduced] = list(pool.map(lambda e: decode_resize(e[0], tfms, size if reduced else None), part,
                                            chunksize=32))
            seconds[reduced] += time.perf_counter() - t0
        for i, (f, cls, split) in enumerate(part):
            for reduced, root in roots.items():
                d = root / split / cls
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(xs[reduced][i].permute(1, 2, 0).numpy()).save(d / (f.stem + ".png"))
            d = (xs[False][i].int() - xs[True][i].int()).abs()
            diffs.append(float(d.float().mean()))
            maxdiff = max(maxdiff, int(d.max()))
        log.info("decoded %d/%d photos both ways at %d px", min(k + 100, len(entries)), len(entries), size)
    return {"old_s": round(seconds[False], 2), "new_s": round(seconds[True], 2),
            "ratio": round(seconds[True] / seconds[False], 4),
            "mean_abs_diff": round(statistics.fmean(diffs), 3), "max_abs_diff": maxdiff}


def score(model: Path, test: Path) -> tuple[float, dict[str, str]]:
    """Accuracy of `model` on the class folders under `test`, through `python -m serve.predict`."""
    _, out = run_cmd([sys.executable, "-m", "serve.predict", model, test, "--json", "--quiet"])
    preds = {}
    for line in out.splitlines():
        if line.strip():
            r = json.loads(line)
            preds[str(Path(r["file"]).relative_to(test))] = r["label"]
    n = sum(1 for f in test.rglob("*.png"))
    if len(preds) != n:
        sys.exit(f"serve.predict classified {len(preds)} of the {n} test images in {test}")
    right = sum(label == Path(name).parts[0] for name, label in preds.items())
    return 100.0 * right / n, preds


def accuracy_check(train_items, test_items, args, tmp: Path) -> dict:
    """Both decodings' models at every seed of `--seeds`, each scored on both test decodings.
    One seed cannot resolve 0.2 points here (another seed of the same data moves the score by a
    point or more), so the target is on the medians over the seeds, with the seeds' spread beside
    it: the gap between the two arms' medians, on each test decoding, within `--tolerance`."""
    workers = default_workers()
    roots = {False: tmp / "decoded_full", True: tmp / "decoded_reduced"}
    entries = split_items(train_items) + [(f, c, "test") for f, c in test_items]
    decode = write_decoded(entries, args.train_size, roots, workers)
    train_args = ["--size", args.train_size, "--epochs", args.epochs, "-q"]
    arms = {"full": roots[False], "reduced": roots[True]}
    acc: dict = {}    # (arm, test decoding) -> [accuracy per seed]
    agree: dict = {}  # arm -> [% of test photos whose top-1 is the same on both test decodings, per seed]
    seconds: dict = {}
    for seed in args.seeds:
        for arm in (("full", "reduced") if args.seeds.index(seed) % 2 == 0 else ("reduced", "full")):
            # With train/ and valid/ present the trainer takes those two as its split and nothing
            # else: test/ beside them stays unseen.
            model = tmp / f"model_{arm}_{seed}"
            t, _ = run_cmd([sys.executable, "-m", "train", arms[arm], *train_args, "--seed", seed, "--out", model])
            seconds.setdefault(arm, []).append(round(t, 1))
            preds = {}
            for test_name, reduced in (("full", False), ("reduced", True)):
                a, preds[test_name] = score(model, roots[reduced] / "test")
                acc.setdefault((arm, test_name), []).append(round(a, 2))
                log.info("seed %d: model %s on test photos decoded %s: %.2f%%", seed, arm, test_name, a)
            agree.setdefault(arm, []).append(round(100.0 * sum(preds["full"][k] == preds["reduced"][k]
                                                               for k in preds["full"]) / len(test_items), 2))
            shutil.rmtree(model, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in acc.items()}
    gaps = {t: round(abs(med[("reduced", t)] - med[("full", t)]), 2) for t in ("full", "reduced")}
    paired = {t: [round(r - f, 2) for r, f in zip(acc[("reduced", t)], acc[("full", t)])] for t in ("full", "reduced")}
    spread = {arm: round(max(acc[(arm, "full")]) - min(acc[(arm, "full")]), 2) for arm in arms}
    n_test = len(test_items)
    return {"train_size": args.train_size, "epochs": args.epochs, "train_photos": len(train_items),
            "test_photos": n_test, "points_per_test_photo": round(100.0 / n_test, 3), "seeds": args.seeds,
            "decode_at_train_size": decode, "train_seconds": seconds,
            "accuracy_per_seed": {f"{m}_model_on_{t}_test": v for (m, t), v in acc.items()},
            "accuracy_median": {f"{m}_model_on_{t}_test": round(v, 2) for (m, t), v in med.items()},
            "top1_same_on_both_test_decodings_pct": agree,
            "gap_of_medians_points_on_full_test": gaps["full"],
            "gap_of_medians_points_on_reduced_test": gaps["reduced"],
            "gap_deployed_points": round(abs(med[("reduced", "reduced")] - med[("full", "full")]), 2),
            # reduced minus full at the same seed: how far apart one pair of runs can land
            "paired_gaps_points": paired,
            # what training noise alone moves the score: one arm's best seed against its worst
            "seed_spread_points": spread,
            "target_within_points": args.tolerance,
            "ok": max(gaps.values()) <= args.tolerance}


# --------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=1000, help="photos for the cache timing and for training (default 1000)")
    p.add_argument("--test-photos", type=int, default=1000, help="held-out photos for part (b) (default 1000)")
    p.add_argument("--photo-size", type=parse_size, default=PHONE_SIZE, help="WIDTHxHEIGHT (default 4032x3024)")
    p.add_argument("--size", type=int, default=224, help="cache size for part (a), px (default 224)")
    p.add_argument("--chunk", type=int, default=100, help="photos per interleaved chunk in part (a) (default 100)")
    p.add_argument("--train-size", type=int, default=64, help="training size for part (b), px (default 64)")
    p.add_argument("--epochs", type=int, default=6, help="epochs for part (b)'s models (default 6)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="accuracy points allowed between the models (default 0.2)")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip `python -m train PHOTOS --size S --epochs 1`")
    p.add_argument("--no-accuracy", dest="accuracy", action="store_false", help="skip part (b)")
    # Twenty: one seed moves a model by 1-3 points here, and with five the medians still moved by 0.3.
    p.add_argument("--seeds", type=seeds_list, default=list(range(5, 25)),
                   help="part (b): one model per decoding at each seed; the target is on the medians (default 5,6,...,24)")
    p.add_argument("--workdir", type=Path, default=None, help="where the photos go (default: a temporary folder, removed)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("bench.photoset_large").setLevel(logging.INFO)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        summary = {"photos": args.photos, "photo_size": list(args.photo_size), "size": args.size,
                   "cpus": os.cpu_count(), "load_avg_start": round(os.getloadavg()[0], 2)}
        t0 = time.perf_counter()
        items, test = write_photo_sets([(tmp / "photos", args.photos),
                                        (tmp / "test_photos", args.test_photos if args.accuracy else 0)], args.photo_size)
        summary["generate_s"] = round(time.perf_counter() - t0, 1)
        summary["generated"] = len(items) + len(test)
        summary["photo_mb_mean"] = round(sum(f.stat().st_size for f, _ in items) / len(items) / 1e6, 2)
        log.info("%d photos in %.0f s, %.2f MB each on average", len(items) + len(test), summary["generate_s"],
                 summary["photo_mb_mean"])

        files = [f for f, _ in items]
        sample = [(f, c, i % 5 == 4) for i, (f, c) in enumerate(items[:20])]  # 5 per class, 1 to validate
        summary["decode_items_today"] = project_builder_mode(sample, args.size)
        log.info("train.data.decode_items, as the checkout stands: %s decoding", summary["decode_items_today"])
        cache = time_cache_paths(files, args.size, args.chunk, default_workers())
        cache["target_ratio"] = round(RATIO_TARGET, 4)
        cache["ok"] = cache["ratio"] <= RATIO_TARGET
        summary["cache"] = cache
        log.info("cache at %d px: old %.1f s, new %.1f s: %.3f (target <= %.3f)", args.size, cache["old_s"],
                 cache["new_s"], cache["ratio"], RATIO_TARGET)

        if args.e2e:
            summary["train_e2e"] = train_end_to_end(tmp / "photos", args.size, tmp / "model_e2e")
            summary["train_e2e"]["decode_items"] = summary["decode_items_today"]
        if args.accuracy:
            summary["accuracy"] = accuracy_check(items, test, args, tmp)
        summary["load_avg_end"] = round(os.getloadavg()[0], 2)
        summary["ok"] = cache["ok"] and summary.get("accuracy", {}).get("ok", True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
