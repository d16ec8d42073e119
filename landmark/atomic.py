"""Atomic file writing: a temporary file in the target's folder, then ``os.replace``, so a reader
(or a resumed run) never sees half a file, whatever kills the writer."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path, like: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; it replaces ``path`` on success and is
    removed on any error. For writers that want a file name (torch.save, savefig, zip). ``like``: a file
    whose permission bits and times the result takes (a temporary file is 0600: a copy of a 0644 photo
    would be unreadable to a photo library running as another user)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if like is not None:
            shutil.copystat(like, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes, like: Path | None = None) -> None:
    with atomic_path(path, like) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
