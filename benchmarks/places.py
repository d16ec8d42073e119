"""Issue #25's figures for a trained model: porto5 as the user's geotagged library, then who gets a location.

The library is a copy of porto5/train in which every photo carries its landmark's GPS EXIF (written by
``app.exif``, so the index reads the real EXIF path), indexed by ``app.index`` with the model (operating
point: held-out references, default 98 % precision). Then every photo of the query sets is answered by
``Predictor`` with the index (the model's own decision first, then the index):

- porto5/test: located (by either source), and located within 1 km of the true landmark (precision);
- everyday/test, indian_monuments49/test: photos that get any location (should be ~none);
- the model's own test split (world_heritage13/test for wh13): the model's tag rate and top-1 accuracy
  of its tags with and without the index (the index only adds locations where the model does not tag).

  python -m benchmarks.places --model-dir artifacts/wh13        # writes benchmarks/results/places-*.{json,md}
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from app.exif import with_gps
from benchmarks.inputs import SHARED, photo_files
from benchmarks.load import publish, run_header
from landmark.cli import non_negative_int, precision
from landmark.places import DEFAULT_MIN_PRECISION, haversine_km
from landmark.predict import SOURCE_MODEL, SOURCE_PLACES, Predictor
from landmark.run_files import read_meta

PORTO = SHARED / "porto5"
NEGATIVES = (SHARED / "everyday" / "test", SHARED / "indian_monuments49" / "test")


def geotagged_copy(train: Path, table: dict, out: Path) -> Path:
    for p in photo_files(train):
        where = table[p.parent.name]
        target = out / p.relative_to(train)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(with_gps(p.read_bytes(), where["lat"], where["lon"], where["place"]))
    return out


def build_index(model_dir: Path, library: Path, out: Path, min_precision: float, threads: int) -> dict:
    from app.index import get_args_parser, run, summary

    args = get_args_parser().parse_args(["--src", str(library), "--out", str(out), "--model-dir", str(model_dir),
                                         "--min-precision", str(min_precision), "--threads", str(threads)])
    t0 = time.perf_counter()
    index = run(args)
    print(summary(index, out), file=sys.stderr)
    return {"seconds": time.perf_counter() - t0, "photos": len(index.meta.references),
            "places": len(index.meta.places), "operating_point": index.meta.operating_point.__dict__}


def answers(predictor: Predictor, folder: Path, batch: int = 8) -> list[tuple[Path, dict]]:
    photos = photo_files(folder)
    out = []
    for start in range(0, len(photos), batch):
        chunk = photos[start:start + batch]
        out += list(zip(chunk, predictor.predict(chunk), strict=True))
    return out


def porto_figures(found: list[tuple[Path, dict]], table: dict, correct_km: float) -> dict:
    located = [(p, a) for p, a in found if a["location"] is not None]
    right = {SOURCE_MODEL: 0, SOURCE_PLACES: 0}
    for p, a in located:
        truth = table[p.parent.name]
        right[a["source"]] += bool(haversine_km(np.array([a["location"]["lat"], a["location"]["lon"]]),
                                                np.array([truth["lat"], truth["lon"]])) <= correct_km)
    by_places = sum(a["source"] == SOURCE_PLACES for _, a in located)
    total = sum(right.values())
    return {"photos": len(found), "located": len(located), "located_rate": len(located) / len(found),
            "right_within_km": total, "precision": total / len(located) if located else None,
            "located_right_rate": total / len(found), "by_your_photos": by_places,
            "by_your_photos_right": right[SOURCE_PLACES],
            "by_your_photos_precision": right[SOURCE_PLACES] / by_places if by_places else None,
            "by_model": len(located) - by_places, "by_model_right": right[SOURCE_MODEL]}


def negative_figures(found: list[tuple[Path, dict]]) -> dict:
    located = [a for _, a in found if a["location"] is not None]
    return {"photos": len(found), "located": len(located), "located_rate": len(located) / len(found),
            "by_model": sum(a["source"] == SOURCE_MODEL for a in located),
            "by_your_photos": sum(a["source"] == SOURCE_PLACES for a in located)}


def own_test_figures(with_index: list[tuple[Path, dict]], without: list[tuple[Path, dict]]) -> dict:
    def tags(found):
        tagged = [(p, a) for p, a in found if a["landmark"] is not None]
        right = sum(a["landmark"]["label"] == p.parent.name for p, a in tagged)
        return {"tagged": len(tagged), "tag_rate": len(tagged) / len(found),
                "tag_accuracy": right / len(tagged) if tagged else None}

    return {"photos": len(with_index), "without_index": tags(without), "with_index": tags(with_index),
            "located_by_your_photos": sum(a["source"] == SOURCE_PLACES for _, a in with_index)}


def markdown(result: dict) -> str:
    p, op = result["porto5_test"], result["index"]["operating_point"]
    lines = [f"# Places from your photos: `{result['model_dir']}` with porto5/train as the library", "",
             f"Index: {result['index']['photos']} photos in {result['index']['places']} places, built in "
             f"{result['index']['seconds']:.0f} s; operating point at {op['min_precision']:.0%} precision on "
             f"held-out references: similarity >= {op['threshold']}, {op['located']} of {op['queries']} located.", "",
             "| query set | photos | located (any source) | within 1 km (precision) | by the model (right) | "
             "by your photos (right) |", "|---|---|---|---|---|---|",
             f"| porto5/test | {p['photos']} | {p['located']} ({p['located_rate']:.1%}) | {p['right_within_km']} "
             f"({(p['precision'] or 0):.1%}) | {p['by_model']} ({p['by_model_right']}) | {p['by_your_photos']} "
             f"({p['by_your_photos_right']}) |"]
    for name, n in result["negatives"].items():
        lines.append(f"| {name} | {n['photos']} | {n['located']} ({n['located_rate']:.1%}) | - | {n['by_model']} | "
                     f"{n['by_your_photos']} |")
    own = result.get("own_test")
    if own:
        w, wo = own["with_index"], own["without_index"]
        lines += ["", f"Model's own test split `{result['own_test_dir']}`: tagged {wo['tagged']} of {own['photos']} "
                  f"(accuracy {wo['tag_accuracy']}) without the index, {w['tagged']} (accuracy {w['tag_accuracy']}) "
                  f"with it; located by your photos instead: {own['located_by_your_photos']}."]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Issue #25 figures: porto5 as your library, who gets a location.")
    p.add_argument("--model-dir", type=Path, default=Path("artifacts/wh13"))
    p.add_argument("--min-precision", type=precision, default=DEFAULT_MIN_PRECISION)
    p.add_argument("--correct-km", type=float, default=1.0)
    p.add_argument("--threads", type=non_negative_int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    started = time.time()
    if not (args.model_dir / "model_meta.json").is_file() or not (PORTO / "train").is_dir():
        print(f"bench places: needs {args.model_dir}/model_meta.json and {PORTO}", file=sys.stderr)
        return 1
    table = json.loads((PORTO / "locations.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="places-") as tmp:
        library = geotagged_copy(PORTO / "train", table, Path(tmp) / "library")
        index = build_index(args.model_dir, library, Path(tmp) / "places.npz", args.min_precision, args.threads)
        predictor = Predictor.from_dir(args.model_dir, device="cpu", threads=args.threads,
                                       index=Path(tmp) / "places.npz")
        shutil.rmtree(library)
    plain = Predictor.from_dir(args.model_dir, device="cpu", threads=args.threads)
    result = {**run_header(args, started), "model_dir": str(args.model_dir), "index": index,
              "porto5_test": porto_figures(answers(predictor, PORTO / "test"), table, args.correct_km),
              "negatives": {f"{d.parent.name}/test": negative_figures(answers(predictor, d))
                            for d in NEGATIVES if d.is_dir()}}
    own = Path(read_meta(args.model_dir).model.data_dir or "", "test")
    if own.is_dir():
        result["own_test_dir"] = str(own)
        result["own_test"] = own_test_figures(answers(predictor, own), answers(plain, own))
    publish(args.out_dir, "places", started, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
