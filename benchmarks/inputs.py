"""The bytes every backend sees: one uint8 batch per model from real photos through the one eval
preprocessing (``landmark.preprocess.load_input``), or deterministic synthetic JPEGs where the
photos are absent; and one 800 px JPEG for the served endpoint."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from landmark.preprocess import PreprocessConfig, load_input

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_PHOTOS = SHARED / "world_heritage13"
SERVED_PHOTOS = (SHARED / "udacity_samples", SHARED / "world_heritage13")
SUFFIXES = {".jpg", ".jpeg", ".png"}


def photo_files(folder: Path) -> list[Path]:
    """Every JPEG / PNG under ``folder``, recursively, sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


def list_photos(folder: Path, n: int) -> list[Path]:
    """Up to n photos spread evenly over the folder's sorted files (test split first where there is one)."""
    files = photo_files(folder / "test" if (folder / "test").is_dir() else folder)
    step = max(1, len(files) // n) if files else 1
    return files[::step][:n]


def synthetic_jpeg(seed: int, size: tuple[int, int] = (800, 600)) -> bytes:
    """A deterministic photo-sized JPEG: smooth gradients plus noise, so it compresses like a photo."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * rng.uniform(80, 255, 3)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def model_inputs(cfg: PreprocessConfig, photos: Path | None, n: int) -> tuple[np.ndarray, dict]:
    """n crops (photos repeated cyclically when fewer exist), and a note on where they came from."""
    files = list_photos(photos, n) if photos and photos.is_dir() else []
    if files:
        sources: list[bytes | Path] = [files[i % len(files)] for i in range(n)]
        info = {"source": str(photos), "unique_photos": len(files)}
    else:
        sources = [synthetic_jpeg(i) for i in range(n)]
        info = {"source": "synthetic", "note": f"no photos at {photos}: deterministic synthetic 800x600 JPEGs"}
    return np.stack([load_input(s, cfg) for s in sources]), info


def served_photo(path: Path | None = None) -> tuple[bytes, dict]:
    """An 800 px JPEG's bytes for the HTTP benchmark: the given file, a shared sample, or synthetic."""
    candidates = [path] if path else [f for d in SERVED_PHOTOS if d.is_dir() for f in list_photos(d, 1)]
    for f in candidates:
        if f and f.is_file():
            with Image.open(f) as img:
                size = img.size
            return f.read_bytes(), {"source": str(f), "size": list(size)}
    return synthetic_jpeg(0), {"source": "synthetic", "size": [800, 600],
                               "note": f"no photo found in {[str(d) for d in SERVED_PHOTOS]}: synthetic JPEG"}
