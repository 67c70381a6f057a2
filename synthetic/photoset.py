"""Generate a folder of "photos" the way people's folders really are: one sub-folder per class,
assorted sizes, modes (L, RGB, RGBA, P, CMYK, 16-bit) and formats (jpg/JPEG/png/gif/webp/bmp/tif),
an EXIF-rotated JPEG, plus a few broken files and a stray non-image. Used by the tests and by
bench/train_photos.py (it lives outside tests/ so that both may import it). The classes are shapes
(circle, square, triangle) on noisy backgrounds, so a small CNN can learn them but not trivially.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
FORMATS = [  # (extension, PIL format, mode)
    (".jpg", "JPEG", "RGB"), (".JPG", "JPEG", "L"), (".jpeg", "JPEG", "CMYK"), (".png", "PNG", "RGBA"),
    (".PNG", "PNG", "P"), (".png", "PNG", "I;16"), (".gif", "GIF", "P"), (".webp", "WEBP", "RGB"),
    (".bmp", "BMP", "RGB"), (".tif", "TIFF", "RGB"), (".TIFF", "TIFF", "L"),
]


def draw_shape(shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 60, (h, w, 3), dtype=np.uint8)
    bg = np.array([rng.randrange(60, 200) for _ in range(3)], dtype=np.uint8)
    im = Image.fromarray(np.clip(noise.astype(int) + bg - 30, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    s = rng.uniform(0.35, 0.7) * min(w, h)
    cx, cy = rng.uniform(s / 2, w - s / 2), rng.uniform(s / 2, h - s / 2)
    colour = tuple(rng.choice([rng.randrange(0, 50), rng.randrange(205, 256)]) for _ in range(3))
    if shape == "circle":
        d.ellipse([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], fill=colour)
    elif shape == "square":
        d.rectangle([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], fill=colour)
    else:
        d.polygon([(cx, cy - s / 2), (cx - s / 2, cy + s / 2), (cx + s / 2, cy + s / 2)], fill=colour)
    return im


def save_as(im: Image.Image, path: Path, fmt: str, mode: str) -> None:
    if mode == "I;16":
        a = np.asarray(im.convert("L"), dtype=np.uint16) * 257  # the full 16-bit range
        Image.frombytes("I;16", a.shape[::-1], a.astype("<u2").tobytes()).save(path, fmt)
    elif mode == "P":
        im.convert("P", palette=Image.Palette.ADAPTIVE).save(path, fmt)
    elif mode == "RGBA":
        rgba = im.convert("RGBA")
        rgba.putalpha(255)
        rgba.save(path, fmt)
    else:
        im.convert(mode).save(path, fmt)


def exif_rotated_jpeg(im: Image.Image, path: Path) -> None:
    """Store the picture turned 90 degrees with an EXIF tag saying 'rotate back' (as phones do)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer must rotate 90 degrees clockwise
    im.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", exif=exif.tobytes())


def save_varied(im: Image.Image, folder: Path, stem: str, i: int, ci: int) -> None:
    """Save the i-th picture of class ci the way a real folder mixes them: the second one as an
    EXIF-rotated JPEG, the others cycling through FORMATS (offset per class)."""
    if i == 1:
        exif_rotated_jpeg(im, folder / f"{stem}_{i}_exif.jpg")
        return
    ext, fmt, mode = FORMATS[(i + ci) % len(FORMATS)]
    save_as(im, folder / f"{stem}_{i}{ext}", fmt, mode)


def write_broken_files(folder: Path, im: Image.Image) -> tuple[list[Path], list[Path]]:
    """A truncated JPEG (of `im`), an empty PNG, text named .jpg, and a stray notes.txt.
    Returns (broken images, ignored non-images)."""
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "not_really.jpg").write_text("this is text, not a JPEG")
    (folder / "notes.txt").write_text("files that are not images are ignored")
    return [folder / "truncated.jpg", folder / "empty.png", folder / "not_really.jpg"], [folder / "notes.txt"]


def make_photo_folder(root: Path, n_per_class: int = 12, seed: int = 0, broken: bool = True,
                      split: bool = False) -> dict:
    """Write the folder; returns {'root': Path, 'broken': [paths], 'ignored': [paths]}."""
    rng = random.Random(seed)
    root = Path(root)
    broken_files, ignored = [], []
    for ci, c in enumerate(CLASSES):
        for i in range(n_per_class):
            sub = root / (("valid" if i % 5 == 0 else "train") if split else "") / c
            sub.mkdir(parents=True, exist_ok=True)
            size = (rng.randrange(24, 320), rng.randrange(24, 320))
            save_varied(draw_shape(c, size, rng), sub, c, i, ci)
    if broken:
        d = root / ("train" if split else "") / CLASSES[0]
        broken_files, ignored = write_broken_files(d, draw_shape(CLASSES[0], (200, 200), rng))
    return {"root": root, "broken": broken_files, "ignored": ignored}


def ramp_png(w: int, h: int) -> bytes:
    """A w x h RGB PNG that is small on disk (a horizontal ramp: 0.2 MB at 8000 x 8000) but costs
    w x h x 3 bytes and more to decode: the pixel limit's decode for a tiny upload."""
    row = np.linspace(0, 255, w, dtype=np.float32).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(row[None, :, None], (h, w, 3)))).save(buf, format="PNG")
    return buf.getvalue()
