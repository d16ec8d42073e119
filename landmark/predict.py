"""Photo -> top-k landmarks with locations, from an exported model folder, and optionally the place of
the user's own most similar geotagged photo (``landmark.places``).

The TorchServe handler wraps this same class, so served and offline answers cannot drift.
Usage: python -m landmark.predict --model-dir artifacts/transfer [--index places.npz] photo.jpg [photo2.png ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from landmark.cli import positive_int, precision
from landmark.labels import top_k
from landmark.meta import LandmarkClass
from landmark.open_set import Decision, OpenSet
from landmark.places import ModelId, PlaceIndex, PlaceIndexError, PlaceMatch
from landmark.preprocess import DEFAULT_MAX_PIXELS, ImageError, PreprocessConfig, load_input
from landmark.run_files import MODEL_FILES, OPEN_SET, model_file, read_meta
from landmark.runtime import Outputs, load_runner

SOURCE_MODEL, SOURCE_PLACES = "landmark model", "your photos"  # where an answer's location comes from


class Predictor:
    """Loads ``model.onnx`` or ``model.ts``, ``model_meta.json`` and the open-set decision from one
    folder (a run folder or an unpacked archive), and a place index built with the same model where one
    is given, and answers photos."""

    def __init__(
        self, model_path: Path, device: str = "auto", threads: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
        index: Path | None = None,
    ) -> None:
        model_path = Path(model_path)
        self.meta = read_meta(model_path.parent)
        self.cfg: PreprocessConfig = self.meta.preprocess
        self.classes = self.meta.classes
        self.max_pixels = max_pixels
        self.open_set = (OpenSet.load(model_path.parent / OPEN_SET) if self.meta.open_set is not None
                         else OpenSet.uncalibrated())
        self.places = None
        if index is not None:
            if "embedding" not in self.meta.outputs:
                raise PlaceIndexError(f"{model_path.parent} was exported without the embedding output a place "
                                      "index needs: re-export it with `make export`")
            self.places = PlaceIndex.load(index, ModelId.of(self.meta), threads=threads)
        self.runner = load_runner(model_path, device=device, threads=threads)

    @classmethod
    def from_dir(cls, model_dir: Path, backend: str = "onnx", **kwargs) -> Predictor:
        return cls(model_file(model_dir, backend), **kwargs)

    def preprocess(self, data: bytes | Path | str) -> np.ndarray:
        """One photo -> uint8 CHW crop; raises ImageError for anything that is not a photo."""
        return load_input(data, self.cfg, self.max_pixels)

    def outputs(self, batch: np.ndarray) -> Outputs:
        return self.runner(batch)

    def answer(self, outputs: Outputs, k: int = 5, min_precision: float | None = None) -> dict:
        """The served JSON of one photo (``outputs`` of a batch of one; see ``answer``)."""
        target = self.open_set.target(min_precision)
        match = None if self.places is None else self.places.match(outputs.embedding, min_precision)[0]
        return answer(self.open_set.decide(outputs, target)[0], self.classes, k, target, match)

    def predict(self, images: list[bytes | Path | str], k: int = 5, min_precision: float | None = None) -> list[dict]:
        batch = np.stack([self.preprocess(img) for img in images])
        outputs = self.outputs(batch)
        return [self.answer(row, k, min_precision) for row in rows(outputs)]


@dataclass(frozen=True)
class Prepared:
    """One request's photo, ready for the network, with the settings it is answered with (the TorchServe
    handler's batch item; defined here because TorchServe allows one class per handler module)."""

    idx: int  # its place in the batch
    crop: np.ndarray
    k: int
    min_precision: float | None
    v2: dict | None  # the v2 request body, answered inside a v2 response; None for a plain request


def rows(outputs: Outputs) -> list[Outputs]:
    """A batch's outputs as batches of one, photo by photo."""
    n = len(outputs.logits)
    return [Outputs(outputs.logits[i:i + 1], None if outputs.embedding is None else outputs.embedding[i:i + 1])
            for i in range(n)]


def located(landmark: dict | None, confidence: float, match: PlaceMatch | None) -> tuple[str | None, dict | None]:
    """(source, location) of an answer. The model's own decision comes first: a landmark it tags keeps its
    location; else the place index's match where it clears its operating point; else none."""
    if landmark is not None:
        where = landmark.get("location")
        return SOURCE_MODEL, None if where is None else {**where, "confidence": round(confidence, 6)}
    if match is not None and match.located:
        return SOURCE_PLACES, {"lat": match.place.lat, "lon": match.place.lon, "country": match.place.country,
                               "place": match.place.name, "confidence": round(match.confidence, 6)}
    return None, None


def answer(d: Decision, classes: Sequence[LandmarkClass], k: int, min_precision: float,
           match: PlaceMatch | None = None) -> dict:
    """``landmark``: the top-1 class where the model tags the photo, else null; ``reason`` says why not;
    ``top_k``: the k most probable known classes (calibrated probabilities) either way. ``source`` and
    ``location``: where the photo was located from (``located``), null where it was not; ``place``: the
    place index's nearest place, similarity and photos where an index is loaded, else null."""
    ranked = top_k(d.probabilities, classes, k)
    landmark = ranked[0] if d.tagged else None
    source, location = located(landmark, d.confidence, match)
    return {"landmark": landmark, "reason": d.reason, "source": source, "location": location,
            "confidence": round(d.confidence, 6), "p_known": round(d.p_known, 6),
            "operating_point": {"min_precision": min_precision,
                                "threshold": None if d.threshold is None else round(d.threshold, 6)},
            "top_k": ranked, "place": None if match is None else match.to_dict()}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Top-k landmarks for photos, from an exported model folder.")
    p.add_argument("images", nargs="+", type=Path, help="photo files")
    p.add_argument("--model-dir", type=Path, required=True, help="output folder of train + export")
    p.add_argument("--backend", choices=sorted(MODEL_FILES), default="onnx")
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--min-precision", type=precision,
                   help="operating point of the model and the index (default: the stored ones)")
    p.add_argument("--index", type=Path, help="place index of your geotagged photos (make index) of this model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        predictor = Predictor.from_dir(args.model_dir, args.backend, device=args.device, index=args.index)
    except (PlaceIndexError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = 0
    for path in args.images:
        try:
            result = predictor.predict([path], args.topk, args.min_precision)[0]
        except (ImageError, FileNotFoundError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({"image": str(path), **result}))
    return status


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
