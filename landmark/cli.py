"""Argument types shared by the package's command lines, so a bad value is a usage error (exit 2,
one line) in every one of them instead of a traceback, a silent remap, or an artefact that only
fails later (an archive whose worker cannot start). The served handler checks its settings and
per-request values with them too."""

from __future__ import annotations

import argparse
import math


def _int(value: str, least: int, what: str, most: float = math.inf) -> int:
    if not value.isdigit() or not least <= int(value) <= most:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return int(value)


def positive_int(value: str) -> int:
    return _int(value, 1, "a positive integer")


def non_negative_int(value: str) -> int:
    return _int(value, 0, "an integer >= 0")


def port(value: str) -> int:
    return _int(value, 1, "a TCP port 1..65535", 65535)


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan  # fails every range check below


def positive_float(value: str) -> float:
    number = _float(value)
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def fraction_below_half(value: str) -> float:
    number = _float(value)
    if not 0 <= number < 0.5:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 0.5), got {value!r}")
    return number


def precision(value: str) -> float:
    """A target precision of the open-set operating point: in (0, 1]."""
    number = _float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"expected a precision in (0, 1], got {value!r}")
    return number
