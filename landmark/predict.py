"""Photo -> top-k landmarks with locations, from an exported model folder.

The TorchServe handler wraps this same class, so served and offline answers cannot drift.
Usage: python -m landmark.predict --model-dir artifacts/transfer photo.jpg [photo2.png ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from landmark.cli import positive_int, precision
from landmark.labels import top_k
from landmark.meta import LandmarkClass
from landmark.open_set import Decision, OpenSet
from landmark.preprocess import DEFAULT_MAX_PIXELS, ImageError, PreprocessConfig, load_input
from landmark.run_files import MODEL_FILES, OPEN_SET, model_file, read_meta
from landmark.runtime import Outputs, load_runner


class Predictor:
    """Loads ``model.onnx`` or ``model.ts``, ``model_meta.json`` and the open-set decision from one
    folder (a run folder or an unpacked archive) and answers photos."""

    def __init__(
        self, model_path: Path, device: str = "auto", threads: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        model_path = Path(model_path)
        self.meta = read_meta(model_path.parent)
        self.cfg: PreprocessConfig = self.meta.preprocess
        self.classes = self.meta.classes
        self.max_pixels = max_pixels
        self.open_set = (OpenSet.load(model_path.parent / OPEN_SET) if self.meta.open_set is not None
                         else OpenSet.uncalibrated())
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
        return answer(self.open_set.decide(outputs, target)[0], self.classes, k, target)

    def predict(self, images: list[bytes | Path | str], k: int = 5, min_precision: float | None = None) -> list[dict]:
        batch = np.stack([self.preprocess(img) for img in images])
        outputs = self.outputs(batch)
        return [self.answer(row, k, min_precision) for row in rows(outputs)]


def rows(outputs: Outputs) -> list[Outputs]:
    """A batch's outputs as batches of one, photo by photo."""
    n = len(outputs.logits)
    return [Outputs(outputs.logits[i:i + 1], None if outputs.embedding is None else outputs.embedding[i:i + 1])
            for i in range(n)]


def answer(d: Decision, classes: Sequence[LandmarkClass], k: int, min_precision: float) -> dict:
    """``landmark``: the top-1 class where the photo is tagged, else null; ``reason`` says why not;
    ``top_k``: the k most probable known classes (calibrated probabilities) either way."""
    ranked = top_k(d.probabilities, classes, k)
    return {"landmark": ranked[0] if d.tagged else None, "reason": d.reason,
            "confidence": round(d.confidence, 6), "p_known": round(d.p_known, 6),
            "operating_point": {"min_precision": min_precision,
                                "threshold": None if d.threshold is None else round(d.threshold, 6)},
            "top_k": ranked}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Top-k landmarks for photos, from an exported model folder.")
    p.add_argument("images", nargs="+", type=Path, help="photo files")
    p.add_argument("--model-dir", type=Path, required=True, help="output folder of train + export")
    p.add_argument("--backend", choices=sorted(MODEL_FILES), default="onnx")
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--min-precision", type=precision, help="operating point (default: the model's stored one)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def main(args: argparse.Namespace) -> int:
    predictor = Predictor.from_dir(args.model_dir, args.backend, device=args.device)
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
