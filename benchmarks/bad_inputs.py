"""Bodies that are not photos, each of which TorchServe must answer with a JSON 400 without losing a
worker: shared by the serving tests and the soak, so both send the same corpus."""

from __future__ import annotations

import functools
import struct
import zlib


@functools.cache
def png_bomb(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 Mpx) that is a few kB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" * (1 + side // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_inputs(jpeg: bytes) -> dict[str, bytes]:
    """Kind -> body; ``jpeg`` is a valid photo, cut in half for the truncated case."""
    return {
        "empty": b"",
        "garbage": bytes(range(256)) * 4,
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "text": b"hello, this is not a photo",
        "bad_base64": b"aGVsbG8=",  # valid base64 of 'hello': not an image either
        "decompression_bomb": png_bomb(),
        "html": b"<html><body>no</body></html>",
    }
