"""Build or update a place index (``landmark.places``) from a folder of the user's own geotagged photos.

Every photo under SRC that carries GPS EXIF (or, with a ``locations.json``, every photo of a folder that
table names) is embedded with the exported model and stored with its location; nearby photos are grouped
into places, named from the table or by offline reverse geocoding; the operating point is fitted on the
references held out one by one and place by place. A rerun embeds only new or changed photos (size and
mtime) and drops removed ones; an interrupted run resumes from ``<OUT>.partial`` (saved every
SAVE_EVERY photos); every file is written atomically. An OUT built with another model is refused.

Usage: python -m app.index --src photos --out places.npz --model-dir artifacts/wh13 [--locations locations.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from app.exif import read_gps
from app.tag import find_photos
from landmark.cli import non_negative_int, positive_float, positive_int, precision
from landmark.labels import LOCATIONS_FILE, read_locations
from landmark.meta import Location
from landmark.places import (
    CORRECT_KM,
    DEFAULT_MIN_PRECISION,
    EXACT_LIMIT,
    PLACE_RADIUS_KM,
    ModelId,
    PlaceIndex,
    PlaceIndexError,
    Reference,
    build,
    partial,
)
from landmark.preprocess import ImageError
from landmark.run_files import MODEL_FILES

SAVE_EVERY = 64  # photos embedded between saves of the resume state
BATCH = 8


class Abort(Exception):
    """The build cannot go on: one line and exit 2."""


@dataclass(frozen=True)
class Candidate:
    """A photo with a location, embedded or to embed."""

    ref: Reference
    group: str | None  # the labelled folder that makes it a place, or None (grouped by GPS)
    vector: np.ndarray | None = None


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def folder_of(rel: str) -> str | None:
    """The labelled folder of a photo: the first folder under SRC (ImageFolder's class)."""
    parts = Path(rel).parts
    return parts[0] if len(parts) > 1 else None


def gps_of(path: Path) -> tuple[float, float] | None:
    """A photo's GPS EXIF (header only), None where it has none or is no photo."""
    try:
        with Image.open(path) as img:
            return read_gps(img.getexif())
    except (OSError, ValueError, SyntaxError, ZeroDivisionError):
        return None


def previous_vectors(out: Path, model: ModelId) -> dict[str, tuple[Reference, np.ndarray]]:
    """The references already embedded: the finished index at OUT and an interrupted run's state, by path.
    An OUT of another model is refused rather than overwritten."""
    cache: dict[str, tuple[Reference, np.ndarray]] = {}
    for path, is_partial in ((out, False), (partial_path(out), True)):
        if not path.is_file():
            continue
        try:
            index = PlaceIndex.load(path, model, partial=True)
        except PlaceIndexError as e:
            if is_partial and "built with model" not in str(e):
                continue  # an unreadable resume state is only lost work
            raise Abort(f"{e} (or choose another --out)") from None
        cache.update({r.path: (r, index.vectors[i]) for i, r in enumerate(index.meta.references)})
    return cache


def locate(src: Path, rel: str, table: dict[str, Location]) -> tuple[float, float, str, str | None] | None:
    """(lat, lon, located_by, group) of a photo: its folder's table entry first (where the landmark is),
    else its own GPS EXIF (where the camera was); None where neither says."""
    group = folder_of(rel)
    if group is not None and group in table:
        where = table[group]
        return where.lat, where.lon, "locations.json", group
    gps = gps_of(src / rel)
    return None if gps is None else (*gps, "gps", None)


def candidates(src: Path, photos: list[str], table: dict[str, Location],
               cache: dict[str, tuple[Reference, np.ndarray]]) -> tuple[list[Candidate], int]:
    """Every photo with a location, with its vector where the cache has it unchanged; and how many have none."""
    found, no_location = [], 0
    for rel in photos:
        try:
            st = (src / rel).stat()
        except OSError:
            continue
        where = locate(src, rel, table)
        if where is None:
            no_location += 1
            continue
        lat, lon, by, group = where
        ref = Reference(rel, st.st_size, st.st_mtime_ns, lat, lon, -1, by)
        old = cache.get(rel)
        same = old is not None and (old[0].size, old[0].mtime_ns) == (ref.size, ref.mtime_ns)
        found.append(Candidate(ref, group, old[1] if same else None))
    return found, no_location


def embed(predictor, src: Path, todo: list[Candidate], save, batch_size: int) -> tuple[list[Candidate], list[str]]:
    """Embed ``todo`` in batches, calling ``save(done)`` every SAVE_EVERY photos; (embedded, unreadable paths)."""
    done, bad, since_save = [], [], 0
    with tqdm(total=len(todo), desc="embedding", unit="photo", disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            chunk, crops = [], []
            for c in todo[start:start + batch_size]:
                try:
                    crops.append(predictor.preprocess(src / c.ref.path))
                    chunk.append(c)
                except (ImageError, OSError) as e:
                    bad.append(c.ref.path)
                    tqdm.write(f"skipped {c.ref.path}: {e}", file=sys.stderr)
            if crops:
                embedding = predictor.outputs(np.stack(crops)).embedding
                done += [replace(c, vector=v) for c, v in zip(chunk, embedding, strict=True)]
            bar.update(len(todo[start:start + batch_size]))
            since_save += len(chunk)
            if since_save >= SAVE_EVERY:
                save(done)
                since_save = 0
    return done, bad


def run(args: argparse.Namespace) -> PlaceIndex:
    from landmark.predict import Predictor

    src, out = args.src, args.out
    if not src.is_dir():
        raise Abort(f"source folder not found: {src}")
    try:
        predictor = Predictor.from_dir(args.model_dir, args.backend, device=args.device, threads=args.threads)
    except (OSError, ValueError) as e:
        raise Abort(f"not an exported model folder: {args.model_dir} ({e})") from None
    if "embedding" not in predictor.meta.outputs:
        raise Abort(f"{args.model_dir} was exported without the embedding output: re-export it with `make export`")
    model = ModelId.of(predictor.meta)
    locations = args.locations or (src / LOCATIONS_FILE if (src / LOCATIONS_FILE).is_file() else None)
    try:
        table = read_locations(locations) if locations else {}
    except (OSError, ValueError) as e:
        raise Abort(f"cannot read {locations}: {e}") from None
    cache = previous_vectors(out, model)
    photos = find_photos(src, None)
    found, no_location = candidates(src, photos, table, cache)
    kept = [c for c in found if c.vector is not None]
    todo = [c for c in found if c.vector is None]
    removed = len(set(cache) - set(photos))
    built_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"{len(photos)} photos in {src}: {len(found)} with a location ({no_location} without), "
          f"{len(kept)} embedded before, {len(todo)} to embed, {removed} removed", file=sys.stderr)

    def save_partial(done: list[Candidate]) -> None:
        state = kept + done
        partial(model, str(src), built_at, [c.ref for c in state],
                np.array([c.vector for c in state], np.float32)).save(partial_path(out))

    done, bad = embed(predictor, src, todo, save_partial, args.batch_size)
    ready = kept + done
    ready.sort(key=lambda c: c.ref.path)
    names = {}
    for i, c in enumerate(ready):
        if c.group is not None and c.group in table:
            names.setdefault(c.group, (i, table[c.group]))
    try:
        index = build(model, str(src), built_at, [c.ref for c in ready], np.array([c.vector for c in ready]),
                      names={i: (loc.place or group, loc.country) for group, (i, loc) in names.items()},
                      min_precision=args.min_precision, place_radius_km=args.place_radius_km,
                      correct_km=args.correct_km, exact_limit=args.exact_limit, threads=args.threads,
                      groups=[c.group for c in ready])
    except PlaceIndexError as e:
        raise Abort(str(e)) from None
    index.save(out)
    partial_path(out).unlink(missing_ok=True)
    if bad:
        print(f"{len(bad)} photos could not be read and were left out", file=sys.stderr)
    return index


def summary(index: PlaceIndex, out: Path) -> str:
    m = index.meta
    op = m.operating_point
    at = (f"similarity >= {op.threshold:.4f}: {op.located} of {op.queries} held-out references located, "
          f"precision {op.precision:.4f}" if op.threshold is not None
          else "no held-out match reached the target: the index locates nothing")
    search = m.search.kind if m.search.kind == "exact" else f"ivf (nprobe {m.search.nprobe}, recall {m.search.recall})"
    return (f"wrote {out}: {len(m.references)} photos in {len(m.places)} places, model {m.model}, {search} search; "
            f"operating point at precision {op.min_precision}: {at}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.index",
                                description="Build or update a place index from your own geotagged photos.")
    p.add_argument("--src", type=Path, required=True, help="folder of photos (searched recursively, never modified)")
    p.add_argument("--out", type=Path, required=True, help="the index file to write or update (e.g. places.npz)")
    p.add_argument("--model-dir", type=Path, required=True, help="exported model folder whose embedding is indexed")
    p.add_argument("--locations", type=Path,
                   help=f"table of folder -> location (default: SRC/{LOCATIONS_FILE} where present): every photo of "
                        "a folder it names is indexed at that location, as its own place")
    p.add_argument("--min-precision", type=precision, default=DEFAULT_MIN_PRECISION,
                   help="operating point: the precision held-out references must reach")
    p.add_argument("--place-radius-km", type=positive_float, default=PLACE_RADIUS_KM)
    p.add_argument("--correct-km", type=positive_float, default=CORRECT_KM,
                   help="a held-out match is right within this distance")
    p.add_argument("--exact-limit", type=positive_int, default=EXACT_LIMIT,
                   help="references searched exactly; beyond, an approximate (IVF) index")
    p.add_argument("--backend", choices=sorted(MODEL_FILES), default="onnx")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=non_negative_int, default=0, help="intra-op threads (0 = runtime default)")
    p.add_argument("--batch-size", type=positive_int, default=BATCH)
    return p


def main(args: argparse.Namespace) -> int:
    try:
        index = run(args)
    except Abort as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}; rerun to resume", file=sys.stderr)
        return 1
    print(summary(index, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
