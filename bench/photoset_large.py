"""Generate large JPEG "phone photos" for the photo benchmarks: 12 megapixels, ~3-4 MB each.

    python bench/photoset_large.py OUT [--photos 1000] [--size 4032x3024] [--quality 90]

Writes OUT/<class>/<class>_<i>.jpg, one folder per class, the classes in turn. Each photo is a
textured scene: a background of multi-octave colour noise (smooth gradients across the frame
down to a per-pixel grain, like sensor noise on a real photo, so that JPEG and the resize both do
real work), a few small clutter blobs, and one large foreground object whose shape is the class
(a disc, a square, a triangle or diagonal stripes), itself textured, pulled towards a colour of
its class's hue band (see `class_colour`), at a random size, place and rotation: visible at
224 px, learnable from scratch at 64 px.

Speed: the noise is the expensive part, so each worker process makes `TEXTURES` base textures
once (a few seconds each) and every photo is a random crop of them, composited by Pillow in C
(the object only within its own box); what remains per photo is mostly the JPEG encoding. Everything is seeded: the same
arguments write the same files. The photos are benchmark inputs: write them to a temporary
folder, never into the repository.
"""
from __future__ import annotations

import argparse
import colorsys
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("bench.photoset_large")

CLASSES = ("disc", "square", "triangle", "stripes")
PHONE_SIZE = (4032, 3024)  # a 12-megapixel phone camera, landscape (w, h)
QUALITY = 90               # phones save at ~90-95; with this texture and grain, ~3-4 MB per 12 MP photo
TEXTURES = 2               # base textures per worker (~5 s each); each photo crops them at random offsets
PAD = 512                  # extra pixels per side of a texture, room for the random crop offsets
# (octave grid width, amplitude in 0..255 units): coarse gradients to fine detail; then grain.
OCTAVES = ((4, 55), (16, 40), (64, 26), (256, 14), (1024, 8))
GRAIN = 8.0                # std of the per-pixel luminance grain, 0..255 units (sensor noise)


def make_texture(seed: int, size: tuple[int, int]) -> Image.Image:
    """An RGB noise texture of `size` + PAD: bicubic-upsampled random grids, summed over octaves."""
    rng = np.random.default_rng(seed)
    w, h = size[0] + PAD, size[1] + PAD
    acc = np.zeros((h, w, 3), np.float32)
    for grid_w, amp in OCTAVES:
        grid_h = max(2, grid_w * h // w)
        for c in range(3):
            small = rng.standard_normal((grid_h, grid_w), dtype=np.float32)
            up = np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.Resampling.BICUBIC))
            acc[..., c] += up * (amp if c == 0 else amp * 0.6)  # mostly luminance, some colour
    acc += GRAIN * rng.standard_normal((h, w, 1), dtype=np.float32)
    acc += 128
    return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))


def _crop(tex: Image.Image, box, rng) -> Image.Image:
    """The (x0, y0, x1, y1) part of a frame, taken from `tex` at a random offset."""
    x, y = int(rng.integers(0, PAD)), int(rng.integers(0, PAD))
    return tex.crop((box[0] + x, box[1] + y, box[2] + x, box[3] + y))


def _tint(im: Image.Image, colour, strength: float) -> Image.Image:
    """Pull every pixel towards `colour` by `strength` (0..1), keeping the rest of the texture:
    one table lookup per byte (`Image.point`), cheaper than blending with a colour image."""
    lut = [round(v * (1 - strength) + c * strength) for c in colour for v in range(256)]
    return im.point(lut)


def _shape_mask(cls: str, size, rng) -> tuple[Image.Image, tuple[int, int]]:
    """A mask (mode L) of the class's object and where it goes: (mask, (x, y) of its corner).
    The object is 45-75% of the shorter side across, anywhere in the frame; the stripes cross it."""
    w, h = size
    r = rng.uniform(0.45, 0.75) * min(w, h) / 2
    turn = rng.uniform(0, 2 * math.pi)
    if cls == "stripes":  # 4-7 parallel bands across the whole frame, at a random angle
        mask = Image.new("L", size, 0)
        draw = ImageDraw.Draw(mask)
        n = int(rng.integers(4, 8))
        period = max(w, h) * 1.5 / n
        dx, dy = math.cos(turn), math.sin(turn)
        span, half = max(w, h) * 2, period / 4
        for k in range(-n, n + 1):
            ox, oy = w / 2 + dy * k * period, h / 2 - dx * k * period  # step across the bands
            draw.polygon([(ox - dx * span - dy * half, oy - dy * span + dx * half),
                          (ox + dx * span - dy * half, oy + dy * span + dx * half),
                          (ox + dx * span + dy * half, oy + dy * span - dx * half),
                          (ox - dx * span + dy * half, oy - dy * span - dx * half)], fill=255)
        return mask, (0, 0)
    # The other objects are drawn in their own square box only, so compositing costs its area.
    side = int(2 * r) + 2
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    c = side / 2
    if cls == "disc":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=255)
    else:
        n = 4 if cls == "square" else 3
        draw.polygon([(c + r * math.cos(turn + 2 * math.pi * k / n), c + r * math.sin(turn + 2 * math.pi * k / n))
                      for k in range(n)], fill=255)
    return mask, (int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)))


def _clutter(im: Image.Image, rng) -> None:
    """A few small blobs in random colours, so the object is not alone on the background."""
    draw = ImageDraw.Draw(im)
    w, h = im.size
    for _ in range(int(rng.integers(3, 9))):
        r = rng.uniform(0.02, 0.07) * min(w, h)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        draw.ellipse((x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))


def class_colour(cls: str, rng) -> list[int]:
    """The object's colour: a hue within +-35 degrees of its class's own (classes 90 degrees
    apart), any saturation and brightness from half to full. With the shape it makes the class
    learnable from scratch in a few epochs at 64 px; shape alone needs far more photos than a
    CPU benchmark can afford (resnet18, 640 photos, 6 epochs: 45%, chance 25%)."""
    k = CLASSES.index(cls) if cls in CLASSES else int(rng.integers(4))
    hue = (k * 90 + rng.uniform(-35, 35)) % 360 / 360
    return [round(255 * v) for v in colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1), rng.uniform(0.5, 1))]


def make_photo(cls: str, seed: int, textures: list[Image.Image], size=PHONE_SIZE) -> Image.Image:
    """One photo of class `cls`; the same seed and textures give the same photo."""
    rng = np.random.default_rng(seed)
    pick = lambda: textures[int(rng.integers(len(textures)))]
    photo = _crop(pick(), (0, 0, *size), rng)
    _clutter(photo, rng)
    mask, (x, y) = _shape_mask(cls, size, rng)
    # The object: another texture pulled strongly towards its class's colour family.
    front = _tint(_crop(pick(), (x, y, x + mask.width, y + mask.height), rng), class_colour(cls, rng),
                  float(rng.uniform(0.55, 0.75)))
    photo.paste(front, (x, y), mask)
    return photo


# --------------------------------------------------------------------------- writing a folder

_TEXTURES: list[Image.Image] = []  # per worker process, made once by _init


def _init(size, seed) -> None:
    _TEXTURES[:] = [make_texture(seed * 1000 + k, size) for k in range(TEXTURES)]


def _write(job) -> int:
    path, cls, seed, size, quality = job
    make_photo(cls, seed, _TEXTURES, size).save(path, "JPEG", quality=quality)
    return path.stat().st_size


def write_photo_sets(sets, size=PHONE_SIZE, quality: int = QUALITY, seed: int = 0, classes=CLASSES,
                     workers: int | None = None) -> list[list[tuple[Path, str]]]:
    """Write disjoint photo sets in one pool (the textures are made once per worker): `sets` is
    [(root, n), ...]; set k gets n photos under root/<class>/, the classes in turn. Returns, per
    set, [(path, class)] in order. Photo i of the whole run has seed (seed, i): reproducible."""
    jobs, bounds = [], []
    for root, n in sets:
        root = Path(root)
        first = len(jobs)
        for i in range(first, first + n):
            cls = classes[i % len(classes)]
            (root / cls).mkdir(parents=True, exist_ok=True)
            jobs.append((root / cls / f"{cls}_{i:05d}.jpg", cls, seed * 1_000_003 + i, tuple(size), quality))
        bounds.append((first, len(jobs)))
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    t0 = time.perf_counter()
    total = 0
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(tuple(size), seed)) as pool:
        for k, nbytes in enumerate(pool.map(_write, jobs, chunksize=4), 1):
            total += nbytes
            if k % 50 == 0 or k == len(jobs):
                log.info("photos: %d/%d written (%.1f MB average, %.0f s)", k, len(jobs), total / k / 1e6,
                         time.perf_counter() - t0)
    return [[(j[0], j[1]) for j in jobs[a:b]] for a, b in bounds]


def write_photos(root: Path, n: int, size=PHONE_SIZE, quality: int = QUALITY, seed: int = 0,
                 workers: int | None = None) -> list[tuple[Path, str]]:
    """`n` photos under root/<class>/; [(path, class)] in order."""
    return write_photo_sets([(root, n)], size, quality, seed, workers=workers)[0]


def parse_size(s: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 4032x3024, got {s!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"photos must be at least 16x16, got {s}")
    return w, h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write (one sub-folder per class)")
    p.add_argument("--photos", type=int, default=1000)
    p.add_argument("--size", type=parse_size, default=PHONE_SIZE, help="WIDTHxHEIGHT (default 4032x3024)")
    p.add_argument("--quality", type=int, default=QUALITY, help="JPEG quality (default 90)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    items = write_photos(args.out, args.photos, args.size, args.quality, args.seed, workers=args.workers)
    mb = sum(f.stat().st_size for f, _ in items) / 1e6
    print(f"{len(items)} photos, {mb:.0f} MB, in {time.perf_counter() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
