"""Shared fixtures: real MNIST digits (from MNIST_DIR) and a small real model trained on them.

MNIST_DIR defaults to ../shared/data/mnist beside the checkout, where these machines keep the
original IDX files; with neither, the tests fail and say so (never skip).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-MNIST runs, minutes each (run by .ci/run; deselect with -m 'not slow')")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from tests
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in tests may reach the real Hub
    # Every `python -m train` of the tests (in process or not) puts its data cache here, never in the
    # user's ~/.cache; removed when the session ends.
    global _XDG_CACHE
    _XDG_CACHE = tempfile.mkdtemp(prefix="pytest-xdg-cache-")
    os.environ["XDG_CACHE_HOME"] = _XDG_CACHE


_XDG_CACHE = None


def pytest_unconfigure(config):
    if _XDG_CACHE:
        shutil.rmtree(_XDG_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    given = os.environ.get("MNIST_DIR") or str(ROOT.parent / "shared" / "data" / "mnist")
    path = Path(given)
    if not path.is_dir():
        pytest.fail(f"MNIST not found at {path}: set MNIST_DIR to a folder with the IDX files")
    os.environ["MNIST_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def mnist_arrays(mnist_dir):
    from train.mnist import load_idx_arrays
    return load_idx_arrays(mnist_dir)


def write_mnist_folder(arrays, out: Path, n_train: int, n_valid: int) -> Path:
    """fastai's MNIST layout (training/<digit>/*.png, testing/<digit>/*.png), the first n per class."""
    from PIL import Image
    for split, xs, ys, n in (("training", arrays.train_images, arrays.train_labels, n_train),
                             ("testing", arrays.valid_images, arrays.valid_labels, n_valid)):
        counts: dict[int, int] = {}
        for i, (x, y) in enumerate(zip(xs, ys)):
            y = int(y)
            if counts.get(y, 0) >= n:
                continue
            counts[y] = counts.get(y, 0) + 1
            d = out / split / str(y)
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(d / f"{i}.png")
            if len(counts) == 10 and all(c >= n for c in counts.values()):
                break
    return out


@pytest.fixture(scope="session")
def mnist_folder(mnist_arrays, tmp_path_factory) -> Path:
    """A few hundred real digits in fastai's folder layout: 30 train + 10 test per digit."""
    return write_mnist_folder(mnist_arrays, tmp_path_factory.mktemp("mnist_small"), 30, 10)


@pytest.fixture(scope="session")
def mnist_model(mnist_arrays, tmp_path_factory) -> Path:
    """A real exported model folder: resnet18 from scratch on 3,000 MNIST digits, 3 epochs
    (~96% on the held-out 500; a few seconds a epoch on 2 cores). Shared by the serve tests."""
    from train.cli import run
    from train.config import TrainConfig
    data = write_mnist_folder(mnist_arrays, tmp_path_factory.mktemp("mnist_3k"), 300, 50)
    out = tmp_path_factory.mktemp("models") / "mnist"
    cfg = TrainConfig(source=str(data), out=str(out), epochs=3, size=28, bs=64, lr="0.01",
                      augment=False, flip=False, quiet=True).resolve()
    run(cfg)
    return out
