"""Benchmark: the decode-once data cache (train/cache.py) on a 30,000-image folder at 128 px.

    python bench/data_cache.py                                  # 30,000 images, 128 px (the targets' setting)
    python bench/data_cache.py --images 3000 --epoch-images 256 # a quick check

Data: `--images` JPEGs (q90) of the synthetic shapes of synthetic/photoset.py (circle, square,
triangle on noise; sides drawn from 140-200 px so that every one is resized), written in parallel
to a temporary folder (timed, reported). Small sources keep generation fast; what is measured is
the memory and the time of the cache, which depend on the number of images and --size, not on
the sources' resolution (bench/decode_photos.py measures large photos).

(a) Memory: `load_data(FOLDER, --size, cache_dir=...)` in a fresh process that decodes every file
into a new cache, while a thread samples /proc/self/status (RssAnon, RssFile, VmHWM) every 20 ms.
Target: peak RssAnon < 1 GB. For comparison, the in-memory path (`--no-cache`) in another fresh
process (skip with --no-memory-path).
(b) Time: the same call again in a fresh process, now a cache hit. Target: its data phase (the
`load_data` call: listing, the key, mapping) < 15% of (a)'s.
(c) Epochs, in this process: the hit's memory-mapped cache against the same images copied into
memory, through the same `build_dataloaders`. Alternating, `--rounds` each: one pass over every
training batch of the whole set (batch transforms, no model), and one `fit` epoch of resnet18 from
scratch on a strided subset of `--epoch-images` images (CPU cannot train on 30,000 128 px images
in bench time). Target: within noise (the spread between rounds of one path).

Progress goes to stderr; the last line on stdout is a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.data_cache")

RSS_ANON_TARGET_MB = 1000   # peak anonymous memory while decoding into the cache
HIT_RATIO_TARGET = 0.15     # the hit's data phase over the build's


# --------------------------------------------------------------------------- data

def _write_some(args) -> int:
    folder, start, stop, seed = args
    from PIL import Image  # noqa: F401  (each worker imports its own)
    from synthetic.photoset import CLASSES, draw_shape
    rng = random.Random(seed + start)
    for i in range(start, stop):
        c = CLASSES[i % len(CLASSES)]
        im = draw_shape(c, (rng.randrange(140, 201), rng.randrange(140, 201)), rng)
        im.save(Path(folder) / c / f"{i:06d}.jpg", "JPEG", quality=90)
    return stop - start


def generate(folder: Path, n: int, seed: int = 0) -> None:
    from synthetic.photoset import CLASSES
    for c in CLASSES:
        (folder / c).mkdir(parents=True, exist_ok=True)
    step = 500
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        done = 0
        for k in pool.map(_write_some, [(str(folder), s, min(s + step, n), seed) for s in range(0, n, step)]):
            done += k
            if done % 5000 < step:
                log.info("generated %d/%d images", done, n)


# --------------------------------------------------------------------------- one data phase, in a child

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) // 1024  # kB -> MB
    return out


def child(folder: str, size: int, cache_dir: str | None) -> None:
    """Time `load_data` in this fresh process and sample its memory; print one JSON line."""
    logging.basicConfig(level=logging.INFO, format="child: %(message)s", stream=sys.stderr)
    from train.data import load_data
    base = _status()
    peak = dict(base)
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            for k, v in _status().items():
                peak[k] = max(peak[k], v)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    cache = load_data(folder, size, progress=False, cache_dir=cache_dir)
    data_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    cache.stats()
    stats_s = time.perf_counter() - t1
    stop.set()
    t.join()
    for k, v in _status().items():
        peak[k] = max(peak[k], v)
    print(json.dumps({"data_s": round(data_s, 2), "stats_s": round(stats_s, 2), "n_images": len(cache.labels),
                      "rss_anon_before_mb": base["RssAnon"], "rss_anon_peak_mb": peak["RssAnon"],
                      "rss_file_peak_mb": peak["RssFile"], "vm_hwm_mb": peak["VmHWM"]}))


def run_child(folder: Path, size: int, cache_dir: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--size", str(size)]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=7200)
    if r.returncode != 0:
        sys.exit(f"child failed ({r.returncode}): {r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_s"] = round(time.perf_counter() - t0, 1)
    res["log"] = [line for line in r.stderr.splitlines() if line.startswith("child: data:")]
    return res


# --------------------------------------------------------------------------- epochs

def epoch_times(folder: Path, size: int, cache_dir: Path, epoch_images: int, rounds: int, bs: int) -> dict:
    import torch
    from fastai.torch_core import set_seed
    from train.config import TrainConfig
    from train.data import ImageCache, build_dataloaders, load_data
    from train.learner import build_learner
    mapped = load_data(str(folder), size, progress=False, cache_dir=cache_dir)
    memory = ImageCache(mapped.images.clone(), mapped.labels, mapped.is_valid, mapped.vocab, mapped.summary)
    mean, std = mapped.stats()
    k = max(1, len(mapped.labels) // epoch_images)

    def subset(c):  # every k-th image: all classes, and for the map a strided view of it, not a copy
        return ImageCache(c.images[::k], c.labels[::k], c.is_valid[::k], c.vocab, c.summary)

    caches = {"mapped": mapped, "memory": memory}
    sm = subset(memory)
    subsets = {"mapped": subset(mapped),
               "memory": ImageCache(sm.images.clone(), sm.labels, sm.is_valid, sm.vocab, sm.summary)}
    passes = {n: [] for n in caches}
    fits = {n: [] for n in caches}
    cfg = TrainConfig(source=str(folder), out=str(folder.parent / "bench_model"), epochs=1, size=size, bs=bs,
                      lr="3e-3", augment=False, quiet=True).resolve()
    device = torch.device("cpu")
    for r in range(rounds):
        for name in (("memory", "mapped") if r % 2 == 0 else ("mapped", "memory")):
            dls = build_dataloaders(caches[name], bs, mean, std, device=device)
            t0 = time.perf_counter()
            n = sum(len(xb) for xb, _ in dls.train)
            passes[name].append(time.perf_counter() - t0)
            log.info("round %d %s: a pass over %d training images in %.1f s", r + 1, name, n, passes[name][-1])
            set_seed(42, reproducible=True)
            dls = build_dataloaders(subsets[name], bs, mean, std, device=device)
            learn = build_learner(dls, cfg, device, workdir=folder.parent)
            with learn.no_bar(), learn.no_logging():
                t0 = time.perf_counter()
                learn.fit_one_cycle(1, 3e-3)
                fits[name].append(time.perf_counter() - t0)
            log.info("round %d %s: a fit epoch on %d images in %.1f s", r + 1, name, len(subsets[name].labels),
                     fits[name][-1])

    def spread(xs):
        return round(max(xs) - min(xs), 2)

    res = {"rounds": rounds, "bs": bs, "fit_images": len(subsets["mapped"].labels)}
    for what, d in (("pass_all_batches_s", passes), ("fit_epoch_s", fits)):
        res[what] = {n: [round(x, 2) for x in xs] for n, xs in d.items()}
        med = {n: statistics.median(xs) for n, xs in d.items()}
        res[what + "_ratio_mapped_over_memory"] = round(med["mapped"] / med["memory"], 3)
        res[what + "_spread_within_path"] = {n: spread(xs) for n, xs in d.items()}
        res[what + "_within_noise"] = abs(med["mapped"] - med["memory"]) <= max(spread(xs) for xs in d.values())
    return res


# --------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=30_000, help="images to generate (default 30000)")
    p.add_argument("--size", type=int, default=128, help="the cache's image size, px (default 128)")
    p.add_argument("--epoch-images", type=int, default=512, help="images of the fit epochs in (c) (default 512)")
    p.add_argument("--bs", type=int, default=64, help="batch size in (c) (default 64)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (c) per path (default 2)")
    p.add_argument("--no-memory-path", dest="memory_path", action="store_false",
                   help="skip the in-memory path's memory figure in (a)")
    p.add_argument("--no-epochs", dest="epochs", action="store_false", help="skip (c)")
    p.add_argument("--workdir", type=Path, default=None, help="where the images and the cache go (default: a temporary folder)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.size, args.cache_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        folder, cache_dir = tmp / "shapes", tmp / "cache"
        summary = {"images": args.images, "size": args.size, "cpus": os.cpu_count(),
                   "load_avg_start": round(os.getloadavg()[0], 2)}
        t0 = time.perf_counter()
        generate(folder, args.images)
        summary["generate_s"] = round(time.perf_counter() - t0, 1)
        summary["source_mb"] = round(sum(f.stat().st_size for f in folder.rglob("*.jpg")) / 1e6, 1)
        log.info("%d JPEGs (%.0f MB) in %.0f s", args.images, summary["source_mb"], summary["generate_s"])

        build = run_child(folder, args.size, cache_dir)
        log.info("build: %s", build)
        hit = run_child(folder, args.size, cache_dir)
        log.info("hit: %s", hit)
        if not any("cache hit" in line for line in hit["log"]):
            sys.exit(f"the second run did not hit the cache: {hit['log']}")
        summary["cache_mb"] = round(sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) / 1e6, 1)
        summary["build"], summary["hit"] = build, hit
        if args.memory_path:
            summary["in_memory"] = run_child(folder, args.size, None)
            log.info("in memory: %s", summary["in_memory"])
        summary["rss_anon_peak_mb"] = build["rss_anon_peak_mb"]
        summary["rss_anon_ok"] = build["rss_anon_peak_mb"] < RSS_ANON_TARGET_MB
        summary["hit_over_build"] = round(hit["data_s"] / build["data_s"], 4)
        summary["hit_ok"] = summary["hit_over_build"] < HIT_RATIO_TARGET
        if args.epochs:
            summary["epochs"] = epoch_times(folder, args.size, cache_dir, args.epoch_images, args.rounds, args.bs)
        summary["load_avg_end"] = round(os.getloadavg()[0], 2)
        summary["ok"] = summary["rss_anon_ok"] and summary["hit_ok"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
