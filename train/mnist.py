"""Find MNIST: a local copy named by `MNIST_DIR` (or `--mnist-dir`), else fastai's download.

A local copy is either fastai's folder layout (`training/<digit>/*.png`, `testing/<digit>/*.png`)
or the four original IDX files, gzipped or not. IDX files are read straight into arrays (no PNGs
are written): that is the fastest way in, and the folder they live in may be read-only.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MnistError", "MnistArrays", "find_mnist", "read_idx", "load_idx_arrays"]

IDX_FILES = {  # role -> file stem, as published by LeCun et al.
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "valid_images": "t10k-images-idx3-ubyte",
    "valid_labels": "t10k-labels-idx1-ubyte",
}

HOW_TO_POINT = ("Point MNIST_DIR (or --mnist-dir) at a local copy: a folder holding either "
                "training/<digit>/*.png and testing/<digit>/*.png, or the four IDX files "
                "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]).")


class MnistError(RuntimeError):
    """MNIST could not be found or read; the message says what to do."""


@dataclass
class MnistArrays:
    """MNIST as uint8 arrays: images (N, 28, 28), labels (N,) in 0..9."""
    train_images: np.ndarray
    train_labels: np.ndarray
    valid_images: np.ndarray
    valid_labels: np.ndarray
    source: str


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise MnistError(f"cannot read {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MnistError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise MnistError(f"{path} is truncated: {len(data) - offset} bytes of data, expected {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_arrays(folder: Path) -> MnistArrays:
    paths = {role: _idx_path(folder, stem) for role, stem in IDX_FILES.items()}
    missing = [IDX_FILES[r] for r, p in paths.items() if p is None]
    if missing:
        raise MnistError(f"{folder} lacks {', '.join(missing)}. {HOW_TO_POINT}")
    a = {role: read_idx(p) for role, p in paths.items()}
    for split in ("train", "valid"):
        n_img, n_lab = len(a[f"{split}_images"]), len(a[f"{split}_labels"])
        if n_img != n_lab:
            raise MnistError(f"{folder}: {n_img} {split} images but {n_lab} labels")
    return MnistArrays(**a, source=str(folder))


def has_idx_files(folder: Path) -> bool:
    return _idx_path(folder, IDX_FILES["train_images"]) is not None


def has_folder_layout(folder: Path) -> bool:
    return (folder / "training").is_dir() and (folder / "testing").is_dir()


def find_mnist(mnist_dir: str | Path | None = None) -> Path | MnistArrays:
    """Return the MNIST folder layout (a Path) or the IDX arrays.

    Order: the `mnist_dir` argument, then `MNIST_DIR`, then fastai's `untar_data(URLs.MNIST)`.
    """
    given = mnist_dir or os.environ.get("MNIST_DIR")
    if given:
        folder = Path(given).expanduser()
        if not folder.is_dir():
            raise MnistError(f"MNIST folder {folder} does not exist. {HOW_TO_POINT}")
        if has_folder_layout(folder):
            return folder
        if has_idx_files(folder):
            return load_idx_arrays(folder)
        raise MnistError(f"{folder} holds neither training/ + testing/ nor the IDX files. {HOW_TO_POINT}")
    from fastai.data.external import URLs, untar_data
    try:
        return Path(untar_data(URLs.MNIST))
    except Exception as e:  # no network, DNS failure, proxy: all surface differently
        raise MnistError(f"could not download MNIST ({type(e).__name__}: {e}). {HOW_TO_POINT}") from None
