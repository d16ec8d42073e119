"""The two photos ``make demo`` asks the served model about, chosen once the model exists.

A known landmark: the first photo of the model's own test split (sorted by path) that it tags, with a
location where its classes have one. A refused photo: the first of the given candidates (the Makefile's
IMG, then every photo under --unknown) that it does not tag; failing those, an own test photo it
refuses. Prints the two paths, one a line; exits 1 with one line when no photo qualifies, since then
the demo could not show the product working.

  python -m train.demo_photos --model-dir artifacts/wh13 --unknown ../shared/data/everyday/test photo.jpg
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from landmark.predict import Predictor
from landmark.preprocess import ImageError
from train.data import image_files


def first(photos: Iterable[Path], predictor: Predictor, wanted: Callable[[dict], bool]) -> Path | None:
    """The first readable photo whose answer is ``wanted``, answering one photo at a time."""
    for path in photos:
        try:
            answer = predictor.predict([path], 1)[0]
        except ImageError:
            continue
        if wanted(answer):
            return path
    return None


def pick(predictor: Predictor, test: list[Path], candidates: list[Path]) -> tuple[Path | None, Path | None]:
    """(a tagged own test photo, a refused photo)."""
    located = any(c.location is not None for c in predictor.classes)
    known = first(test, predictor,
                  lambda a: a["landmark"] is not None and (not located or a["landmark"]["location"] is not None))
    refused = first([*candidates, *test], predictor, lambda a: a["landmark"] is None)
    return known, refused


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", nargs="*", type=Path, help="candidates for the refused photo, tried first")
    p.add_argument("--model-dir", type=Path, required=True, help="an exported run folder")
    p.add_argument("--unknown", type=Path, nargs="*", default=[],
                   help="folders of photos of no landmark the model knows (absent ones are passed over)")
    return p


def main(args: argparse.Namespace) -> int:
    predictor = Predictor.from_dir(args.model_dir, "onnx", device="cpu")
    test_dir = Path(predictor.meta.model.data_dir) / "test"
    test = image_files(test_dir)
    candidates = [p for p in args.photos if p.is_file()] + [
        p for folder in args.unknown if folder.is_dir() for p in image_files(folder)]
    known, refused = pick(predictor, test, candidates)
    if known is None or refused is None:
        what = "tags none" if known is None else "refuses none"
        print(f"demo: the model in {args.model_dir} {what} of the {len(test)} photos of {test_dir}"
              + ("" if known is None else f" and {len(candidates)} others"), file=sys.stderr)
        return 1
    print(f"{known}\n{refused}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
