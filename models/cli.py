"""Command-line conventions shared by every entry point (`python -m train`, `serve`, `serve.predict`,
`serve.hub`, `serve.space`): one rule for numeric flags, and one way to end.

- A flag's value is checked by argparse (`positive_int`, `non_negative_int`, ...), so a bad value is
  a usage line and exit status 2, the same for every tool and every flag, never a traceback and
  never a silent "0 means default".
- `run_cli` runs a tool's body: an error a person can fix (the exception types the tool names) is
  one `error: ...` line on stderr and exit status 2; Ctrl-C (and SIGTERM where the tool maps it to
  KeyboardInterrupt) is exit status 130 with one line saying what was kept.

It lives in `models/` because the Space bundles `models/` and `serve/` but not `train/`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

__all__ = ["positive_int", "non_negative_int", "positive_float", "number", "fraction", "seed_int", "int_list", "seeds_list", "port_int", "run_cli", "EXIT_ERROR", "EXIT_INTERRUPTED"]

EXIT_ERROR = 2         # what argparse itself returns for a usage error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None


def positive_int(s: str) -> int:
    v = _int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def non_negative_int(s: str) -> int:
    v = _int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def seed_int(s: str) -> int:
    """A random seed: numpy, torch and Python all take 0 .. 2**32 - 1."""
    v = _int(s)
    if not 0 <= v < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be between 0 and {2 ** 32 - 1}, got {v}")
    return v


def int_list(what: str, minimum: int):
    """An argparse type for integers separated by commas ("42,1,2"), each at least `minimum`;
    `what` names them in the error ("seeds", "thread counts")."""
    def parse(s: str) -> list[int]:
        try:
            values = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} separated by commas, got {s!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum} separated by commas, got {s!r}")
        return values
    parse.__name__ = what.replace(" ", "_")  # argparse names the type in its error
    return parse


# For the benches that run once per seed.
seeds_list = int_list("seeds", 0)


def port_int(s: str) -> int:
    """A TCP port; 0 asks the system for a free one."""
    v = _int(s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0 to 65535, got {v}")
    return v


def number(s: str, expected: str = "a number") -> float:
    """`s` as a float, or argparse's usage error saying what was `expected`."""
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None


def fraction(s: str) -> float:
    """A share strictly between 0 and 1."""
    v = number(s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {v}")
    return v


def positive_float(s: str) -> float:
    v = number(s)
    if not v > 0 or v == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def run_cli(body: Callable[[], int | None], errors: tuple[type[BaseException], ...],
            interrupted: Callable[[], str] | str = "error: interrupted") -> int:
    """Run `body()` and return its exit status (None counts as 0). `errors` are the exceptions
    whose message is fit for a person: printed as one `error:` line, exit 2. KeyboardInterrupt:
    `interrupted` (a line, or a function returning one) on stderr, exit 130."""
    try:
        return body() or 0
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(interrupted() if callable(interrupted) else interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
