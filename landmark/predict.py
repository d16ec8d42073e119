"""Photo -> top-k landmarks with locations, from an exported model folder.

The TorchServe handler wraps this same class, so served and offline answers cannot drift.
Usage: python -m landmark.predict --model-dir artifacts/transfer photo.jpg [photo2.png ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from landmark.labels import softmax, top_k
from landmark.preprocess import DEFAULT_MAX_PIXELS, ImageError, PreprocessConfig, load_input
from landmark.run_files import MODEL_FILES, model_file, read_meta
from landmark.runtime import load_runner


class Predictor:
    """Loads ``model.onnx`` or ``model.ts`` plus ``model_meta.json`` from one folder."""

    def __init__(
        self, model_path: Path, device: str = "auto", threads: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        model_path = Path(model_path)
        self.meta = read_meta(model_path.parent)
        self.cfg: PreprocessConfig = self.meta.preprocess
        self.classes = self.meta.classes
        self.max_pixels = max_pixels
        self.runner = load_runner(model_path, device=device, threads=threads)

    @classmethod
    def from_dir(cls, model_dir: Path, backend: str = "onnx", **kwargs) -> Predictor:
        return cls(model_file(model_dir, backend), **kwargs)

    def preprocess(self, data: bytes | Path | str) -> np.ndarray:
        """One photo -> uint8 CHW crop; raises ImageError for anything that is not a photo."""
        return load_input(data, self.cfg, self.max_pixels)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.runner(batch))

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[dict]:
        return top_k(probs, self.classes, k)

    def predict(self, images: list[bytes | Path | str], k: int = 5) -> list[list[dict]]:
        batch = np.stack([self.preprocess(img) for img in images])
        return [self.top_k(p, k) for p in self.probabilities(batch)]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Top-k landmarks for photos, from an exported model folder.")
    p.add_argument("images", nargs="+", type=Path, help="photo files")
    p.add_argument("--model-dir", type=Path, required=True, help="output folder of train + export")
    p.add_argument("--backend", choices=sorted(MODEL_FILES), default="onnx")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def main(args: argparse.Namespace) -> int:
    predictor = Predictor.from_dir(args.model_dir, args.backend, device=args.device)
    status = 0
    for path in args.images:
        try:
            result = predictor.predict([path], args.topk)[0]
        except (ImageError, FileNotFoundError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({"image": str(path), "predictions": result}))
    return status


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
