"""glibc's malloc told to keep the memory a training step frees, for the next step to reuse.

A step on the CPU allocates and frees the same tensors each time: activations, gradients and bf16
weight copies of 1-32 MB. glibc serves blocks that size with mmap and hands them back with munmap
when freed (its dynamic threshold rises only as far as the largest block freed so far, and trims
the heap top above twice that), so every step faulted the same pages in again: a batch-256 MNIST
step took ~4,500 minor page faults (1.0 M in 240 steps), and the kernel zeroed each page. With the
mmap threshold at its maximum (32 MB) and freed memory kept up to 256 MB, 0.26 M faults in those
steps, and the median step went from 188-190 to 155-178 ms on 2 cores (bench/train_mnist.py for
whole runs); peak RSS +130 MB (README, CPU and GPU). What jemalloc or tcmalloc under LD_PRELOAD
give PyTorch on CPUs, without a library to install. Linux with glibc only: elsewhere nothing is changed.
Training only: the server does the opposite (`serve.limits.return_freed_memory`), since there
strangers' uploads, not a step that repeats, shape what is allocated.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20   # bytes; glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit): blocks below come from the heap
TRIM_THRESHOLD = 256 << 20  # bytes of free heap top kept before any is given back
TOP_PAD = 64 << 20          # bytes asked of the kernel beyond each heap growth


def keep_freed_memory() -> bool:
    """Set the thresholds for this process; whether they were taken (False off glibc; True, for
    nothing, where tcmalloc or jemalloc is preloaded, whose mallopt is a stub that says yes). Blocks
    over 32 MB (224 px photos at large batches) are still mapped afresh each time: glibc's limit."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all([mallopt(param, value) == 1 for param, value in settings])  # 1: taken (musl's stub says 0)
