"""Batch tagger: the estimated location of a photo, written into a copy of it or into an XMP sidecar.

For every JPEG/PNG/WebP/HEIC under SRC (recursively) it asks the served model (or a local exported
model with --local, and a place index of the user's own geotagged photos with --index) for its answer.
A photo without GPS that the answer locates (a known landmark at the model's operating point, else the
place of the most similar of the user's photos at the index's; ``landmark.predict.located``) is copied to
DST (same relative path) with GPSLatitude/Longitude, the place in ImageDescription and GPSProcessingMethod
saying it is this tool's estimate and how confident; with --sidecar, ``DST/<photo>.<ext>.xmp`` is written
instead (``app.xmp``; the only way for HEIC). Originals are never written; copies keep the original's
permission bits and times. DST/tag_report.{json,csv} list every photo with the reason for each one left
untagged, and double as the resume state: a rerun skips photos whose size and mtime are unchanged. A full
or read-only DST stops the run with one line and the report of what was done; a rerun resumes.

Usage: python -m app.tag --src photos --dst tagged [--local artifacts/wh13 [--index places.npz]] [--sidecar]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, UnidentifiedImageError

from app import xmp
from app.client import ServeError, ServeTarget, add_target_args, parse_answer, target_from_args, unreachable
from app.exif import SUPPORTED_FORMATS, has_gps, with_gps
from landmark import atomic
from landmark.cli import non_negative_int, positive_float, precision
from landmark.preprocess import ImageError
from landmark.progress import progress_bar, write

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".heic", ".heif"}
REPORT_JSON, REPORT_CSV = "tag_report.json", "tag_report.csv"
CSV_FIELDS = ["path", "action", "reason", "landmark", "name", "probability", "confidence", "lat", "lon", "place",
              "country", "output", "error", "location_source", "similarity"]
SAVE_EVERY = 25  # photos between state saves: an interrupted run loses at most this much work

Predict = Callable[[bytes], dict]  # photo bytes -> the model's answer (landmark.predict.answer)


class Abort(Exception):
    """The run cannot go on (server gone, bad arguments, full destination): a message and a non-zero exit;
    ``summary``: what was done before it stopped, where anything was."""

    def __init__(self, message: str, summary: dict | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class DestinationError(OSError):
    """DST cannot take a file (full, read-only, gone): the run stops, the photo is not recorded as done."""


def find_photos(src: Path, skip: Path | None) -> list[str]:
    """Relative POSIX paths of the photos under ``src``, sorted; ``skip`` (the output folder) is left out if
    it lies inside."""
    skip = skip.resolve() if skip is not None else None
    found = []
    for path in src.rglob("*"):
        if (path.suffix.lower() in PHOTO_SUFFIXES and path.is_file()
                and (skip is None or not path.resolve().is_relative_to(skip))):
            found.append(path.relative_to(src).as_posix())
    return sorted(found)


def signature(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def local_predictor(model_dir: Path, backend: str, device: str, threads: int, min_precision: float | None,
                    index: Path | None = None) -> tuple[Predict, set[str]]:
    from landmark.places import PlaceIndexError
    from landmark.predict import Predictor

    try:
        predictor = Predictor.from_dir(model_dir, backend, device=device, threads=threads, index=index)
    except (PlaceIndexError, FileNotFoundError) as e:
        raise Abort(str(e)) from None
    labels = {c.label for c in predictor.classes}
    return (lambda data: predictor.predict([data], min_precision=min_precision)[0]), labels


def served_predictor(target: ServeTarget, timeout: float, min_precision: float | None) -> Predict:
    client = httpx.Client(timeout=timeout)
    try:
        client.get(f"{target.url.rstrip('/')}/ping")
    except httpx.HTTPError as e:
        raise Abort(unreachable(target, e).message) from e

    headers = {"X-Min-Precision": str(min_precision)} if min_precision is not None else {}

    def predict(data: bytes) -> dict:
        try:
            response = target.post(client, data, headers)
        except httpx.HTTPError as e:
            raise Abort(unreachable(target, e).message) from e
        return parse_answer(response)

    return predict


@dataclass(frozen=True)
class TagPolicy:
    """Which photos get the answer's location, and how it is written. The answer decides where a photo is
    (``landmark.predict.located``: the model's operating point, then the place index's); the policy adds
    what only the file can tell."""

    overwrite_gps: bool = False
    sidecar: bool = False  # an XMP sidecar instead of a copy

    def action(self, answer: dict, has_gps: bool, fmt: str | None) -> tuple[str, str]:
        """(action, reason): ``tagged`` with an empty reason, or why not."""
        if has_gps and not self.overwrite_gps:
            return "untagged", "already has GPS"
        if answer.get("location") is None:
            if answer["landmark"] is not None:
                return "untagged", "no location known for this landmark"
            return "untagged", answer["reason"] + (" and unlike your photos" if answer.get("place") else "")
        if not self.sidecar and fmt not in SUPPORTED_FORMATS:
            return "untagged", f"cannot write EXIF into {fmt}: use --sidecar"
        return "tagged", ""

    def output(self, rel: str) -> str:
        return xmp.sidecar_name(rel) if self.sidecar else rel


def describe(answer: dict) -> dict:
    """The report columns of an answer: its top-1 known class (tagged or not), the model's confidence, and
    the location it gives (else the top-1 class's), with its source and the index's similarity."""
    top = answer["top_k"][0]
    location = answer.get("location") or top.get("location") or {}
    place = answer.get("place") or {}
    return {"landmark": top["label"], "name": top["name"], "probability": top["probability"],
            "confidence": answer["confidence"], "lat": location.get("lat"), "lon": location.get("lon"),
            "place": location.get("place"), "country": location.get("country"), "location_source": answer.get("source"),
            "similarity": place.get("similarity"),
            "top_k": [[p["label"], p["probability"]] for p in answer["top_k"]]}


PHOTO_ERRORS = (OSError, ValueError, SyntaxError)  # unreadable, corrupt, not an image, bad EXIF


def error_text(e: BaseException) -> str:
    return f"{e.__class__.__name__}: {e}"


def new_record(rel: str, src: Path) -> dict:
    """A photo's blank report record, "error" until decided; its size + mtime are the resume key. A
    photo gone since the listing gets its error here (no source: a rerun retries it), not a crash."""
    record = {**dict.fromkeys(CSV_FIELDS), "path": rel, "source": None, "action": "error", "reason": "",
              "output": "", "error": "", "top_k": []}
    try:
        record["source"] = signature(src / rel)
    except OSError as e:
        record["error"] = error_text(e)
    return record


@dataclass(frozen=True)
class Photo:
    """A photo's bytes and what only the file (not the model) can tell the policy."""

    data: bytes
    fmt: str | None
    has_gps: bool


def read_photo(source: Path) -> Photo:
    """The file's bytes and header (format, GPS EXIF); raises one of PHOTO_ERRORS for a bad file."""
    data = source.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, exif = img.format, img.getexif()
    except UnidentifiedImageError:  # its own message names a BytesIO address: no two runs' reports would match
        raise ImageError("not an image: cannot identify the file format") from None
    return Photo(data, fmt, has_gps(exif))


def place_name(answer: dict) -> str:
    """What a tagged file names as its place: the landmark's name, or the matched place of your photos."""
    return answer["landmark"]["name"] if answer["landmark"] is not None else answer["location"]["place"]


def apply_answer(record: dict, photo: Photo, answer: dict, src: Path, dst: Path, policy: TagPolicy) -> dict:
    """Decision -> action -> write: fills ``record`` from the answer and writes the tagged copy (atomically,
    pixels untouched, the original's permission bits and times) or the sidecar. Shared by the sequential and
    the Ray tagger, so both write the same files and rows. Raises one of PHOTO_ERRORS where the copy cannot
    be made, DestinationError where DST cannot take it."""
    record.update(describe(answer))
    record["action"], record["reason"] = policy.action(answer, photo.has_gps, photo.fmt)
    if record["action"] == "tagged":
        where, name = answer["location"], place_name(answer)
        how = xmp.method(answer["source"], where["confidence"])
        if policy.sidecar:
            data = xmp.sidecar(where["lat"], where["lon"], name, answer["source"], where["confidence"]).encode()
        else:
            data = with_gps(photo.data, where["lat"], where["lon"], name, how)
        out = policy.output(record["path"])
        try:
            atomic.write_bytes(dst / out, data, like=None if policy.sidecar else src / record["path"])
        except OSError as e:
            raise DestinationError(e.errno, f"cannot write {dst / out}: {e.strerror or e}") from e
        record["output"] = out
    return record


def tag_one(rel: str, src: Path, dst: Path, predict: Predict, policy: TagPolicy) -> dict:
    """One photo -> its report record; the tagged copy is written here. Raises Abort only."""
    record = new_record(rel, src)
    if record["error"]:
        return record
    try:
        photo = read_photo(src / rel)
        apply_answer(record, photo, predict(photo.data), src, dst, policy)
    except DestinationError as e:
        raise Abort(f"{e.strerror}: DST is full or read-only; rerun to resume") from e
    except ServeError as e:
        if e.status == 503:
            raise Abort(e.message) from e
        record["error"] = e.message
    except PHOTO_ERRORS as e:
        record["error"] = error_text(e)
    return record


def is_done(record: dict, src: Path, dst: Path) -> bool:
    source = src / record["path"]
    return (source.is_file() and record.get("source") == signature(source)
            and (record["action"] != "tagged" or (dst / record["output"]).is_file()))


def load_state(dst: Path, settings: dict) -> dict[str, dict]:
    """Records of the previous run with the same settings; anything else means start afresh."""
    try:
        previous = json.loads((dst / REPORT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(previous, dict) or previous.get("settings") != settings:
        return {}
    return {r["path"]: r for r in previous.get("photos", []) if isinstance(r, dict) and "path" in r}


def summarise(records: list[dict], labels: set[str], src_name: str) -> dict:
    """Counts per action and top-1 accuracy where the photo's folder name (SRC's own for its top-level
    photos) is a class label: a data set's test/ split grades itself."""
    def folder(r: dict) -> str:
        return Path(src_name, r["path"]).parent.name

    graded = [r for r in records if r.get("landmark") and folder(r) in labels]
    correct = sum(r["landmark"] == folder(r) for r in graded)
    return {"photos": len(records), "actions": dict(Counter(r["action"] for r in records)),
            "untagged": dict(Counter(r["reason"] for r in records if r["action"] == "untagged")),
            "graded": len(graded), "correct": correct,
            "accuracy": round(correct / len(graded), 6) if graded else None}


def save_report(dst: Path, settings: dict, records: dict[str, dict], labels: set[str], src_name: str) -> dict:
    rows = [records[k] for k in sorted(records)]
    summary = summarise(rows, labels, src_name)
    report = {"settings": settings, "summary": summary, "photos": rows}
    atomic.write_text(dst / REPORT_JSON, json.dumps(report, indent=1))
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(dst / REPORT_CSV, text.getvalue())
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.tag",
                                description="Write GPS EXIF of the recognised landmark into copies of photos.")
    p.add_argument("--src", type=Path, required=True, help="folder of photos (searched recursively, never modified)")
    p.add_argument("--dst", type=Path, required=True, help="folder for tagged copies and tag_report.{json,csv}")
    p.add_argument("--min-precision", type=precision,
                   help="operating point: tag where the model's validation tags reached this precision "
                        "(default: the model's stored one, e.g. 0.99)")
    p.add_argument("--overwrite-gps", action="store_true", help="also tag photos that already have GPS EXIF")
    p.add_argument("--sidecar", action="store_true",
                   help="write DST/<photo>.<ext>.xmp sidecars (Immich, digiKam, darktable) instead of tagged copies")
    p.add_argument("--local", type=Path, metavar="MODEL_DIR", help="use this exported model folder, not TorchServe")
    p.add_argument("--index", type=Path, help="with --local: place index of your geotagged photos (make index), "
                                             "built with the same model; served: the server's own")
    p.add_argument("--backend", choices=["onnx", "torchscript"], default="onnx", help="with --local")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="with --local")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="with --local: intra-op threads (0 = runtime default)")
    add_target_args(p)
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds per request")
    return p


def check_folders(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise Abort(f"source folder not found: {src}")
    if dst.resolve() == src.resolve():
        raise Abort("--dst must differ from --src: originals are never modified")


def index_id(index: Path | None) -> str | None:
    """The place index a report was made with: its path and build time (a rebuilt index answers anew)."""
    if index is None:
        return None
    from landmark.places import PlaceIndex, PlaceIndexError

    try:
        return f"{index.resolve()}@{PlaceIndex.load(index).meta.built_at}"
    except (PlaceIndexError, FileNotFoundError) as e:
        raise Abort(str(e)) from None


def local_settings(model_dir: Path, backend: str, min_precision: float | None, overwrite_gps: bool,
                   index: Path | None = None, sidecar: bool = False) -> dict:
    """The settings a report is resumed under. The Ray tagger uses the same ones, so either tagger
    resumes the other's report."""
    return {"model": f"local:{model_dir.resolve()}:{backend}", "min_precision": min_precision,
            "overwrite_gps": overwrite_gps, "index": index_id(index), "sidecar": sidecar}


class Progress:
    """A run's records (the previous run's finished ones + this run's), saved every SAVE_EVERY photos
    and at the end; ``todo`` lists the photos still to tag, in order."""

    def __init__(self, src: Path, dst: Path, photos: list[str], settings: dict, labels: set[str]) -> None:
        self.src, self.dst, self.settings, self.labels = src, dst, settings, labels
        dst.mkdir(parents=True, exist_ok=True)
        previous = load_state(dst, settings)
        self.records = {p: previous[p] for p in photos if p in previous and is_done(previous[p], src, dst)}
        self.todo = [p for p in photos if p not in self.records]
        self.added = 0
        print(f"{len(photos)} photos in {src}: {len(self.records)} done before, {len(self.todo)} to tag",
              file=sys.stderr)

    def all_labels(self) -> set[str]:  # served mode: every label the server has named in a top-k
        return self.labels or {lab for r in self.records.values() for lab, _ in r.get("top_k", [])}

    def add(self, record: dict) -> None:
        self.records[record["path"]] = record
        if record["error"]:
            write(f"skipped {record['path']}: {record['error']}", file=sys.stderr)
        self.added += 1
        if self.added % SAVE_EVERY == 0:
            self.save()

    def save(self) -> dict:
        """Write the report; where DST cannot take it, say so on stderr and return the summary all the same
        (a rerun resumes from the last report written)."""
        try:
            summary = save_report(self.dst, self.settings, self.records, self.all_labels(), self.src.resolve().name)
        except OSError as e:
            print(f"error: the report could not be written to {self.dst} ({e.strerror or e}): "
                  "a rerun redoes the photos since the last one", file=sys.stderr)
            return {**summarise(list(self.records.values()), self.all_labels(), self.src.resolve().name),
                    "report": None}
        return {**summary, "report": str(self.dst / REPORT_CSV)}

    def stopped(self, e: Abort) -> Abort:
        """``e`` with the report of what was done (written where DST still takes it)."""
        e.summary = self.save()
        return e


def run(args: argparse.Namespace) -> dict:
    src, dst = args.src, args.dst
    check_folders(src, dst)
    photos = find_photos(src, dst)
    if args.local:
        predict, labels = local_predictor(args.local, args.backend, args.device, args.threads, args.min_precision,
                                          args.index)
        settings = local_settings(args.local, args.backend, args.min_precision, args.overwrite_gps, args.index,
                                  args.sidecar)
    else:
        if args.index is not None:
            raise Abort("--index goes with --local: a server answers with the index it was given "
                        "(handlers.archive --index, or LANDMARK_INDEX)")
        target = target_from_args(args)
        predict, labels = served_predictor(target, args.timeout, args.min_precision), set()
        settings = {"model": target.predict_url, "min_precision": args.min_precision,
                    "overwrite_gps": args.overwrite_gps, "index": None, "sidecar": args.sidecar}
    policy = TagPolicy(args.overwrite_gps, args.sidecar)
    try:
        progress = Progress(src, dst, photos, settings, labels)
    except OSError as e:
        raise Abort(f"cannot write to {dst}: {e.strerror or e}") from None
    try:
        for rel in progress_bar(progress.todo, desc="tagging", unit="photo", disable=not progress.todo):
            progress.add(tag_one(rel, src, dst, predict, policy))
    except Abort as e:
        raise progress.stopped(e) from e.__cause__
    except BaseException:
        progress.save()  # Ctrl-C: what was done is kept
        raise
    return progress.save()


def print_summary(summary: dict) -> None:
    accuracy = summary["accuracy"]
    acc = f"; top-1 accuracy {accuracy:.4f} on {summary['graded']} photos in class folders" if accuracy is not None \
        else ""
    report = f"Report: {summary['report']}" if summary.get("report") else "No report written"
    print(f"{summary['photos']} photos: {summary['actions']}, untagged because {summary['untagged']}{acc}. {report}")


def report_run(tagger: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> int:
    """Run a tagger (this one's ``run`` or app.tag_ray's): its summary, or its refusal (one line, then what
    was done before it stopped) and exit 2."""
    try:
        summary = tagger(args)
    except Abort as e:
        print(f"error: {e}", file=sys.stderr)
        if e.summary is not None:
            print_summary(e.summary)
        return 2
    print_summary(summary)
    return 0


def main(args: argparse.Namespace) -> int:
    return report_run(run, args)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
