"""Decode any image a person may hand us into one RGB picture, or say clearly why not.

This is the single home of image decoding for training (the data cache) and for serving every
model format (`models.contract.Preprocessing`), so both decode alike. The exported learner carries
fastai's own `PILImage` instead, so that `model.pkl` loads with fastai alone: a third party's
`learn.predict(path)` decodes the fastai way, without what follows.

What it takes care of, beyond `PIL.Image.open(...).convert("RGB")`:
- EXIF orientation: phone photos are stored sideways with a rotation tag; we apply it.
- animated GIF/WebP/TIFF: the first frame.
- 16-bit greys ("I;16", "I"): scaled to 8 bits instead of clipped to white.
- CMYK, palette and alpha: converted; transparency is composited over white, as a browser shows it.
- decompression bombs: Pillow's pixel limit is set on purpose (`MAX_PIXELS`) and enforced as an error.
- empty, truncated and non-image files: an `ImageError` with a one-line reason.
- reduced decoding: given the size the image is about to be resized to, a large JPEG is decoded
  straight at 1/2, 1/4 or 1/8 scale in the DCT (`Image.draft`), and any other large image is
  box-reduced by an integer factor (`Image.reduce`), never below twice that size, so the final
  resize still downsamples (crisp) and a 12-megapixel photo costs a fraction of a full decode.
- a decoding budget (`gate`): the caller may hold each decode to a share of a budget, charged the
  pixels the decode will produce (known from the header, after the DCT scale is chosen), so a
  server bounds the memory of all its decodes together (`serve.limits.DecodeBudget`).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from fastai.vision.core import PILImage

__all__ = ["ImageError", "MAX_PIXELS", "IMAGE_EXTENSIONS", "open_image", "RGBImage", "is_image_file", "ORIGINAL_SIZE",
           "DECODER_VERSION"]

# Bump whenever a change here alters the pixels some file decodes to (reduced decoding, colour
# handling, orientation...): the training data cache (`train.cache`) has it in its key, so every
# cache decoded the old way is rebuilt instead of trusted. Pillow's own version is in the key too.
DECODER_VERSION = 1

# 64 megapixels: a 10,000 x 6,000 camera photo passes, a crafted 50,000 x 50,000 PNG (a few KB on
# disk, 7.5 GB decoded) does not. Pillow's own default (89 MP) only warns below 2x its limit.
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# Lower-case; matching is case-insensitive (`.JPG` from cameras is common).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})


class ImageError(ValueError):
    """An input that is not a usable image. `str(err)` is a short reason fit for a person."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit or float greys: stretch the real range to 0..255 rather than clip (PIL's convert
        # maps every value above 255 to white, which turns a 16-bit scan into a blank page).
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


ORIENTATION = 0x0112       # the EXIF tag
ORIGINAL_SIZE = "original_size"  # `info` key of every decoded image: its full upright size, reduced or not

# Reduced decoding keeps at least this many times the target size in each dimension, so the final
# (bilinear, antialiased) resize always downsamples by 2x or more: what it would have done anyway.
REDUCE_MARGIN = 2


def _reduce_factor(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The largest integer factor that keeps `size` at least REDUCE_MARGIN x `target` (>= 1)."""
    return max(1, min(size[0] // (REDUCE_MARGIN * target[0]), size[1] // (REDUCE_MARGIN * target[1])))


def _as_pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    w, h = (size, size) if isinstance(size, int) else size
    return int(w), int(h)


def open_image(src, max_pixels: int = MAX_PIXELS, size: int | tuple[int, int] | None = None,
               gate=None) -> Image.Image:
    """Decode `src` (a path, bytes, a binary file object or a PIL image) into a loaded RGB image.

    `size` (S or (w, h), in pixels): what the caller resizes the image to next. Then a large image
    comes back reduced, at no less than `REDUCE_MARGIN` times that size in each dimension (see
    the module's docstring); without it, at full size. The pixel limit applies to the stored size.
    `gate(pixels)`: a context manager held while the pixels are decoded and converted, given the
    number the decode produces (the stored size, or the DCT-scaled one); it may wait for its turn.

    Raises `ImageError` with a reason a person can act on; never anything else for bad data.
    """
    target = _as_pair(size)
    if isinstance(src, Image.Image):
        im = src
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise ImageError("empty file (0 bytes)")
            src = io.BytesIO(src)
        elif isinstance(src, (str, Path)):
            path = Path(src)
            if not path.is_file():
                raise ImageError(f"no such file: {path}")
            if path.stat().st_size == 0:
                raise ImageError("empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                # Between MAX_PIXELS and 2x Pillow only warns; make that an error too.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(src)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"image too large (more than {max_pixels:,} pixels); refusing a "
                             "possible decompression bomb") from None
        except UnidentifiedImageError:
            raise ImageError("not an image, or a format Pillow cannot read") from None
        except OSError as e:
            raise ImageError(_unreadable(e)) from None
    w, h = im.size  # as stored: the pixel limit counts these, before any (reduced) decoding
    if w * h > max_pixels:
        raise ImageError(f"image too large ({w}x{h} = {w*h:,} pixels, limit {max_pixels:,})")
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animated GIF/WebP or multi-page TIFF: the first frame
        if target is not None and im.format == "JPEG" and not isinstance(src, Image.Image):
            # The DCT scale is picked on the stored (not yet EXIF-rotated) size: asking for the
            # larger target side both ways keeps the margin whichever way the photo is turned.
            side = REDUCE_MARGIN * max(target)
            im.draft(None, (side, side))  # mode None: decode to the stored mode, as a full decode does
        dw, dh = im.size  # after draft(): what the decoder will produce
        with gate(dw * dh) if gate is not None else contextlib.nullcontext():
            # Inside the gate: for a PNG, whose EXIF may follow the pixels, getexif() decodes them all.
            turned = im.getexif().get(ORIENTATION) in (5, 6, 7, 8)  # EXIF says: stored sideways
            im.load()  # decode now, so truncation surfaces here and not inside a DataLoader
            im = _to_rgb(ImageOps.exif_transpose(im))
            if target is not None and (k := _reduce_factor(im.size, target)) > 1:
                im = im.reduce(k)
        im.info[ORIGINAL_SIZE] = (h, w) if turned else (w, h)  # upright (width, height) of the full image
        return im
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(_unreadable(e)) from None


def _unreadable(e: Exception) -> str:
    reason = str(e) or type(e).__name__
    if "truncated" in reason.lower():
        reason = "truncated file"
    return f"unreadable image ({reason})"


class RGBImage(PILImage):
    """fastai's `PILImage`, created through `open_image` so that training and the server decode
    alike (EXIF rotation, 16-bit, CMYK, first frame). Never pickled: the exported learner uses
    fastai's `PILImage` (see `models.contract.inference_dataloaders`)."""

    @classmethod
    def create(cls, fn: Path | str | bytes | Image.Image | np.ndarray | torch.Tensor, size: int | None = None,
               gate=None, **kwargs) -> "RGBImage":
        # The type hint is read by fastai (`input_types`): `test_dl` and `predict` accept any of these.
        if isinstance(fn, cls):
            return fn
        if isinstance(fn, torch.Tensor):
            if fn.ndim == 3 and fn.shape[0] in (1, 3):  # fastai's TensorImage is channels-first
                fn = fn.permute(1, 2, 0).squeeze(-1)
            fn = fn.to(torch.uint8).numpy()
        if isinstance(fn, np.ndarray):
            fn = Image.fromarray(fn)
        return cls(open_image(fn, size=size, gate=gate))  # `size`: what it is resized to next (reduced decoding)
