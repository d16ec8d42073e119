"""Progress bars for the command lines, drawn only where someone watches: on a terminal.

Redirected to a file (``make demo > log``, CI), a tqdm bar writes a carriage-return line per step
(megabytes per training run); there the commands' own one line per epoch / stage is the log. tqdm is
imported on the first bar only, so the archived ``landmark`` package never needs it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any


def on_terminal(stream: IO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where the bars go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)``, disabled unless its stream is a terminal (or when ``disable``)."""
    from tqdm import tqdm

    return tqdm(iterable, disable=disable or not on_terminal(kwargs.get("file")), **kwargs)


def write(message: str, file: IO | None = None) -> None:
    """A line that does not tear a bar being drawn (stderr by default)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr if file is None else file)
