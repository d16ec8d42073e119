"""Batch tagger: GPS EXIF of the recognised landmark, written into copies of photos.

For every JPEG/PNG/WebP under SRC (recursively) it asks the served model (or a local exported
model with --local) for its answer. A photo without GPS that the model's open-set decision tags (a
known landmark at the operating point: the model's stored target precision, or --min-precision) is
copied to DST (same relative path) with GPSLatitude/Longitude and the landmark name in
ImageDescription; originals are never written. DST/tag_report.{json,csv} list every photo with the
reason for each one left untagged, and double as the resume state: a rerun skips photos whose size
and mtime are unchanged.

Usage: python -m app.tag --src photos --dst tagged [--local artifacts/transfer] [--min-precision 0.99]
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

from app.client import ServeError, ServeTarget, add_target_args, parse_answer, target_from_args, unreachable
from app.exif import SUPPORTED_FORMATS, has_gps, with_gps
from landmark import atomic
from landmark.cli import non_negative_int, positive_float, precision
from landmark.preprocess import ImageError
from landmark.progress import progress_bar, write

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp"}
REPORT_JSON, REPORT_CSV = "tag_report.json", "tag_report.csv"
CSV_FIELDS = ["path", "action", "reason", "landmark", "name", "probability", "confidence", "lat", "lon", "place",
              "country", "output", "error"]
SAVE_EVERY = 25  # photos between state saves: an interrupted run loses at most this much work

Predict = Callable[[bytes], dict]  # photo bytes -> the model's answer (landmark.predict.answer)


class Abort(Exception):
    """The run cannot go on (server gone, bad arguments): a message and a non-zero exit."""


def find_photos(src: Path, dst: Path) -> list[str]:
    """Relative POSIX paths of the photos under ``src``, sorted; ``dst`` is skipped if it lies inside."""
    dst = dst.resolve()
    found = []
    for path in src.rglob("*"):
        if path.suffix.lower() in PHOTO_SUFFIXES and path.is_file() and not path.resolve().is_relative_to(dst):
            found.append(path.relative_to(src).as_posix())
    return sorted(found)


def signature(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def local_predictor(model_dir: Path, backend: str, device: str, threads: int,
                    min_precision: float | None) -> tuple[Predict, set[str]]:
    from landmark.predict import Predictor

    predictor = Predictor.from_dir(model_dir, backend, device=device, threads=threads)
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
    """Which photos get the model's location. The model decides "known landmark" at its operating
    point (landmark.open_set); the policy adds what only the file can tell."""

    overwrite_gps: bool = False

    def action(self, answer: dict, has_gps: bool, fmt: str | None) -> tuple[str, str]:
        """(action, reason): ``tagged`` with an empty reason, or why not."""
        landmark = answer["landmark"]
        if has_gps and not self.overwrite_gps:
            return "untagged", "already has GPS"
        if landmark is None:
            return "untagged", answer["reason"]
        if not landmark.get("location"):
            return "untagged", "no location known for this landmark"
        if fmt not in SUPPORTED_FORMATS:
            return "untagged", f"cannot write EXIF into {fmt}"
        return "tagged", ""


def describe(answer: dict) -> dict:
    """The report columns of a model answer: its top-1 known class (tagged or not) and confidence."""
    top = answer["top_k"][0]
    location = top.get("location") or {}
    return {"landmark": top["label"], "name": top["name"], "probability": top["probability"],
            "confidence": answer["confidence"], "lat": location.get("lat"), "lon": location.get("lon"),
            "place": location.get("place"), "country": location.get("country"),
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


def apply_answer(record: dict, photo: Photo, answer: dict, dst: Path, policy: TagPolicy) -> dict:
    """Decision -> action -> write: fills ``record`` from the model's answer and writes the tagged
    copy (atomically, pixels untouched). Shared by the sequential and the Ray tagger, so both write
    the same files and rows. Raises one of PHOTO_ERRORS where the copy cannot be made."""
    record.update(describe(answer))
    record["action"], record["reason"] = policy.action(answer, photo.has_gps, photo.fmt)
    if record["action"] == "tagged":
        location = answer["landmark"]["location"]
        atomic.write_bytes(dst / record["path"],
                           with_gps(photo.data, location["lat"], location["lon"], answer["landmark"]["name"]))
        record["output"] = record["path"]
    return record


def tag_one(rel: str, src: Path, dst: Path, predict: Predict, policy: TagPolicy) -> dict:
    """One photo -> its report record; the tagged copy is written here. Raises Abort only."""
    record = new_record(rel, src)
    if record["error"]:
        return record
    try:
        photo = read_photo(src / rel)
        apply_answer(record, photo, predict(photo.data), dst, policy)
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
    p.add_argument("--local", type=Path, metavar="MODEL_DIR", help="use this exported model folder, not TorchServe")
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


def local_settings(model_dir: Path, backend: str, min_precision: float | None, overwrite_gps: bool) -> dict:
    """The settings a report is resumed under. The Ray tagger uses the same ones, so either tagger
    resumes the other's report."""
    return {"model": f"local:{model_dir.resolve()}:{backend}", "min_precision": min_precision,
            "overwrite_gps": overwrite_gps}


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
        return save_report(self.dst, self.settings, self.records, self.all_labels(), self.src.resolve().name)


def run(args: argparse.Namespace) -> dict:
    src, dst = args.src, args.dst
    check_folders(src, dst)
    photos = find_photos(src, dst)
    if args.local:
        predict, labels = local_predictor(args.local, args.backend, args.device, args.threads, args.min_precision)
        settings = local_settings(args.local, args.backend, args.min_precision, args.overwrite_gps)
    else:
        target = target_from_args(args)
        predict, labels = served_predictor(target, args.timeout, args.min_precision), set()
        settings = {"model": target.predict_url, "min_precision": args.min_precision,
                    "overwrite_gps": args.overwrite_gps}
    policy = TagPolicy(args.overwrite_gps)
    progress = Progress(src, dst, photos, settings, labels)
    try:
        for rel in progress_bar(progress.todo, desc="tagging", unit="photo", disable=not progress.todo):
            progress.add(tag_one(rel, src, dst, predict, policy))
    finally:
        summary = progress.save()
    return summary


def print_summary(summary: dict, dst: Path) -> None:
    accuracy = summary["accuracy"]
    acc = f"; top-1 accuracy {accuracy:.4f} on {summary['graded']} photos in class folders" if accuracy is not None \
        else ""
    print(f"{summary['photos']} photos: {summary['actions']}, untagged because {summary['untagged']}{acc}. "
          f"Report: {dst / REPORT_CSV}")


def report_run(tagger: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> int:
    """Run a tagger (this one's ``run`` or app.tag_ray's): its summary, or its refusal and exit 2."""
    try:
        summary = tagger(args)
    except Abort as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary, args.dst)
    return 0


def main(args: argparse.Namespace) -> int:
    return report_run(run, args)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
