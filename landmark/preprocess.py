"""Image decoding and eval preprocessing: the one definition shared by training, export,
the TorchServe handler, the tagger and the benchmarks.

Networks take uint8 NCHW crops and normalise inside their own graph (see ``train.nets``), so
everything a consumer must reproduce is here: decode -> RGB -> resize shorter side -> centre crop.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, never a grey half-image


def _register_heif() -> bool:
    """HEIC/HEIF (what phones write) through libheif, where pillow-heif is installed (it is pinned; a serving
    image built before it answers HEIC with "not an image" instead of failing to start)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


HEIF = _register_heif()

DEFAULT_MAX_PIXELS = 40_000_000  # ~ a 7,300 x 5,500 photo; beyond this a file is a bomb, not a photo


class ImageError(ValueError):
    """The bytes are not an acceptable photo; callers turn this into a 4xx or a CLI error."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that turns a photo into a network input; stored in checkpoints and metadata."""

    input_size: int  # side of the square crop the network sees
    resize_size: int  # shorter side after resizing, before the centre crop
    mean: tuple[float, float, float]  # applied inside the network, on [0, 1] pixels
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not 16 <= self.input_size <= self.resize_size:
            raise ValueError(f"need 16 <= input_size <= resize_size, got {self.input_size}, {self.resize_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        return cls(int(d["input_size"]), int(d["resize_size"]), tuple(d["mean"]), tuple(d["std"]))


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode: alpha composited on white, 16-bit scaled, CMYK/P/L converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(
    data: bytes | Path | str, draft_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode bytes or a file into an upright RGB image, or raise ImageError.

    ``draft_size`` lets the JPEG decoder scale by 1/2..1/8 while keeping the shorter side
    at least that large: an 800 px photo decodes several times faster, identically for
    every consumer because they all call this function.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageError("empty image: the request body has no bytes")
        source = io.BytesIO(bytes(data))
    else:
        source = Path(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (ImageError, FileNotFoundError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError("not an image: cannot identify the file format") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from e


def photo_format(data: bytes) -> str | None:
    """The format a file's header names (JPEG, PNG, WEBP, HEIF, ...), without decoding; None for no photo."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error):
        return None


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (antialiased bilinear)."""
    width, height = img.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return img if new_size == img.size else img.resize(new_size, Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    """The central ``size`` square as a uint8 CHW array (torchvision's rounding)."""
    width, height = img.size
    left, top = round((width - size) / 2.0), round((height - size) / 2.0)
    crop = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))


def resize_crop(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Resize the shorter side to ``resize_size``, centre crop ``input_size``: uint8 CHW."""
    return center_crop(resize_shorter(img, cfg.resize_size), cfg.input_size)


def load_input(
    data: bytes | Path | str, cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Bytes or file -> the uint8 CHW crop the exported network takes."""
    return resize_crop(decode(data, draft_size=cfg.resize_size, max_pixels=max_pixels), cfg)
