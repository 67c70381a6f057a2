"""Which torch device to run on: one rule for training and serving.

It lives in `models/` (not `train/`) because a served model, and the Space that bundles it, need
it without the training package.
"""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    """The device asked for is not available here; the message says what to use instead."""


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU. `cpu`, `cuda`, `cuda:N` and `mps` are
    checked up front, so an unavailable device fails here with a clear message rather than with a
    CUDA error on the first batch."""
    kind = name.split(":")[0]
    if kind not in ("auto", "cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda (or cuda:N) or mps")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA GPU is visible to torch (use --device auto or cpu)")
    if kind == "mps" and not _mps_available():
        raise DeviceError("--device mps: Apple's MPS backend is not available here (use --device auto or cpu)")
    return torch.device(name)
