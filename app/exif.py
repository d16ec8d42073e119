"""GPS EXIF for a landmark, written into a copy of a photo without re-encoding its pixels.

JPEG and WebP go through piexif's segment/chunk splicing; PNG gets an ``eXIf`` chunk spliced in
front of its first ``IDAT``. Other fields already in the photo's EXIF are kept (via Pillow's
``Image.Exif``), so a copy differs from its original only in the metadata block.
"""

from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction

import piexif
from PIL import ExifTags, Image, TiffImagePlugin

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
IMAGE_DESCRIPTION = 0x010E
_SECONDS_DENOMINATOR = 10_000  # 1e-4 arc seconds ~ 3 mm: far below the 1e-5 degree we promise
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def has_gps(exif: Image.Exif) -> bool:
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    return ExifTags.GPS.GPSLatitude in gps and ExifTags.GPS.GPSLongitude in gps


def to_dms(value: float) -> tuple[TiffImagePlugin.IFDRational, ...]:
    """Unsigned decimal degrees -> (degrees, minutes, seconds) rationals, as EXIF stores them."""
    seconds_total = round(abs(value) * 3600 * _SECONDS_DENOMINATOR)
    degrees, rest = divmod(seconds_total, 3600 * _SECONDS_DENOMINATOR)
    minutes, seconds = divmod(rest, 60 * _SECONDS_DENOMINATOR)
    return (TiffImagePlugin.IFDRational(degrees, 1), TiffImagePlugin.IFDRational(minutes, 1),
            TiffImagePlugin.IFDRational(Fraction(seconds, _SECONDS_DENOMINATOR)))


def from_dms(dms: tuple, ref: str) -> float:
    """EXIF (d, m, s) + 'N'/'S'/'E'/'W' -> signed decimal degrees."""
    degrees, minutes, seconds = (float(x) for x in dms)
    value = degrees + minutes / 60 + seconds / 3600
    return -value if ref.strip("\x00").upper() in ("S", "W") else value


def read_gps(exif: Image.Exif) -> tuple[float, float] | None:
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    if not has_gps(exif):
        return None
    return (from_dms(gps[ExifTags.GPS.GPSLatitude], gps.get(ExifTags.GPS.GPSLatitudeRef, "N")),
            from_dms(gps[ExifTags.GPS.GPSLongitude], gps.get(ExifTags.GPS.GPSLongitudeRef, "E")))


def gps_exif(exif: Image.Exif, lat: float, lon: float, description: str, method: str | None = None) -> bytes:
    """``exif`` (updated in place) plus GPS position and description, as an ``Exif\\0\\0``-prefixed block;
    ``method``: GPSProcessingMethod, which marks the position as estimated (and by what)."""
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps.clear()
    gps.update({
        ExifTags.GPS.GPSVersionID: b"\x02\x03\x00\x00",
        ExifTags.GPS.GPSLatitudeRef: "N" if lat >= 0 else "S",
        ExifTags.GPS.GPSLatitude: to_dms(lat),
        ExifTags.GPS.GPSLongitudeRef: "E" if lon >= 0 else "W",
        ExifTags.GPS.GPSLongitude: to_dms(lon),
        ExifTags.GPS.GPSMapDatum: "WGS-84",
    })
    if method is not None:  # UNDEFINED with EXIF's 8-byte character-code prefix
        gps[ExifTags.GPS.GPSProcessingMethod] = b"ASCII\x00\x00\x00" + method.encode("ascii", "replace")
    exif[ExifTags.IFD.GPSInfo] = gps
    exif[IMAGE_DESCRIPTION] = description
    return exif.tobytes()


def _png_with_exif(data: bytes, tiff: bytes) -> bytes:
    """Replace any eXIf chunk by a new one placed before the first IDAT (where the spec wants it)."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    out, pos, inserted = [_PNG_SIGNATURE], len(_PNG_SIGNATURE), False
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ValueError("truncated PNG chunk")
        if kind == b"IDAT" and not inserted:
            out.append(chunk)
            inserted = True
        if kind != b"eXIf":
            out.append(data[pos:end])
        pos = end
    if not inserted:
        raise ValueError("PNG without image data")
    return b"".join(out)


def with_gps(data: bytes, lat: float, lon: float, description: str, method: str | None = None) -> bytes:
    """A copy of a JPEG/PNG/WebP file's bytes carrying GPS EXIF; pixels are not re-encoded."""
    with Image.open(io.BytesIO(data)) as img:
        fmt, existing = img.format, img.getexif()
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"cannot write EXIF into {fmt} files (supported: {', '.join(SUPPORTED_FORMATS)})")
    block = gps_exif(existing, lat, lon, description, method)
    if fmt == "PNG":
        return _png_with_exif(data, block[6:])
    out = io.BytesIO()
    if fmt == "JPEG":
        stripped = io.BytesIO()
        piexif.remove(data, stripped)
        data = stripped.getvalue()
    piexif.insert(block, data, out)
    return out.getvalue()
