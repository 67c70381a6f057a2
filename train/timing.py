"""Timing alternatives against each other on this machine, for the choices training makes by
measurement (the precision, train/precision.py; a convolution's weight gradient, train/smallmaps.py)."""
from __future__ import annotations

import time
from typing import Callable


def fastest_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds of the fastest of `repeats` calls of each run, taken in turns (so a drift of the
    machine's speed touches them alike) after one untimed call each (oneDNN picks and caches its
    kernels on the first)."""
    best = {name: float("inf") for name in runs}
    for i in range(repeats + 1):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            if i:
                best[name] = min(best[name], time.perf_counter() - t)
    return best
