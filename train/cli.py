"""Argument types shared by the package's command lines, so a bad value is a usage error
(exit 2, one line) in every one of them instead of a traceback or a silent remap."""

from __future__ import annotations

import argparse


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)
