"""Class names, display names and landmark locations: one table per model, built at training
time (stored in the checkpoint and the metadata) and read by the handler, the predictor, the
tagger and the app."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from landmark.meta import LandmarkClass, Location

BUILTIN_LOCATIONS = Path(__file__).with_name("locations.json")  # the 50 Udacity landmarks
LOCATIONS_FILE = "locations.json"  # optional table beside a data set's train/ and test/

_PREFIX = re.compile(r"^\d+[._\-\s]+")


def display_name(folder: str) -> str:
    """'09.Golden_Gate_Bridge' -> 'Golden Gate Bridge'; 'hawa mahal' -> 'Hawa Mahal'."""
    name = " ".join(_PREFIX.sub("", folder).replace("_", " ").split()) or folder
    return name.title() if name.islower() else name


def _key(folder: str) -> str:
    """Loose match key, so 'machu_picchu' finds the built-in '41.Machu_Picchu'."""
    return re.sub(r"[^a-z0-9]+", " ", display_name(folder).lower()).strip()


def _valid_location(entry: dict, source: Path, folder: str) -> Location:
    try:
        lat, lon = float(entry["lat"]), float(entry["lon"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: entry {folder!r} needs numeric 'lat' and 'lon'") from e
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"{source}: entry {folder!r} has lat/lon out of range: {lat}, {lon}")
    return Location(lat, lon, entry.get("country"), entry.get("place"))


def read_locations(path: Path) -> dict[str, Location]:
    """A locations.json table: class folder -> location; ValueError naming the file and entry when bad."""
    table = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected an object mapping class folder -> location")
    return {folder: _valid_location(entry, path, folder) for folder, entry in table.items()}


def build_classes(folders: list[str], data_dir: Path | None = None) -> tuple[LandmarkClass, ...]:
    """The class table stored in model metadata: index order = network output order.

    A location comes from ``<data_dir>/locations.json`` (exact folder names) first, then
    from the built-in Udacity table by loose name; ``None`` where neither knows the place.
    """
    own = data_dir / LOCATIONS_FILE if data_dir is not None else None
    custom = read_locations(own) if own is not None and own.is_file() else {}
    builtin = {_key(k): v for k, v in read_locations(BUILTIN_LOCATIONS).items()}
    return tuple(LandmarkClass(f, display_name(f), custom.get(f) or builtin.get(_key(f))) for f in folders)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, so probabilities from every backend compare exactly."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, classes: Sequence[LandmarkClass], k: int) -> list[dict]:
    """One image's probabilities -> its k best classes, most probable first."""
    k = max(1, min(int(k), len(classes)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [answer(classes[int(i)], float(probs[i])) for i in order]


def answer(c: LandmarkClass, probability: float) -> dict:
    """One class as the served JSON names it: label, name, probability, and location where known."""
    record = {"label": c.label, "name": c.name, "probability": round(probability, 6)}
    if c.location is not None:
        record["location"] = asdict(c.location)
    return record
