"""argparse `type=` parsers for the perf scripts' numeric options, with messages naming what was expected."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def number(convert: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """A parser: convert(text), then ok(value), else "expected <expected>, got ..."."""
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {v}")
        return v
    return parse


def int_at_least(lo: int) -> Callable[[str], int]:
    return number(int, lambda v: v >= lo, f"an integer >= {lo}")


positive_int = number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
fraction = number(float, lambda v: 0 < v < 1, "a number in (0, 1)")
