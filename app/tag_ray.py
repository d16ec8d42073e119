"""Batch tagger on Ray Data: the work of ``python -m app.tag --local`` spread over a pool of inference actors.

Pipeline: photo list -> read bytes + header -> decode and preprocess (``landmark.preprocess.load_input``,
the one preprocessing function) -> ONNX Runtime in an actor pool of ``--workers`` actors, each ending in
the open-set decision and the place index's match (``Predictor.answer``) -> decision -> action -> tagged copy or
sidecar (``app.tag.apply_answer``, shared with the sequential tagger) -> the report, written by the driver with
``app.tag``'s writer.

The promises of ``app.tag`` hold because the code is ``app.tag``'s: originals are only read, copies and
reports are written atomically, the report (same settings, same rows) is the resume state and either
tagger resumes the other's, photos already done are dropped before the pipeline (a rerun with nothing
to do does not even start Ray), and a bad photo becomes an ``error`` row, never a failed pipeline.

Ray: a local cluster started here (``--num-cpus``, no dashboard, quiet logs), or the existing cluster in
``RAY_ADDRESS``; there SRC, DST and MODEL_DIR must be at the same path on every node (shared storage).

Usage: python -m app.tag_ray --src photos --dst tagged --model-dir artifacts/wh13 [--workers 2] [--gpus-per-worker 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.tag import (
    PHOTO_ERRORS,
    Abort,
    DestinationError,
    Photo,
    Progress,
    TagPolicy,
    apply_answer,
    check_folders,
    error_text,
    find_photos,
    local_settings,
    new_record,
    read_photo,
    report_run,
)
from landmark.cli import non_negative_int, positive_float, positive_int, precision
from landmark.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig, load_input
from landmark.progress import progress_bar
from landmark.run_files import MODEL_FILES, model_file, read_meta

Batch = dict[str, np.ndarray]  # a Ray Data batch in "numpy" format: column -> values
TASK_CPUS = 1.0  # logical CPUs the read/decode and write tasks need beside the actors on a local cluster


def read_batch(batch: Batch, src: str) -> Batch:
    """Paths -> bytes and header. A bad file leaves ok False and its error in the record."""
    records, data, fmts, gps, ok = [], [], [], [], []
    for rel in batch["path"]:
        record, photo = new_record(str(rel), Path(src)), None
        if not record["error"]:
            try:
                photo = read_photo(Path(src) / str(rel))
            except PHOTO_ERRORS as e:
                record["error"] = error_text(e)
        records.append(json.dumps(record))
        data.append(photo.data if photo else b"")
        fmts.append(photo.fmt or "" if photo else "")
        gps.append(bool(photo and photo.has_gps))
        ok.append(photo is not None)
    return {"path": batch["path"], "record": np.array(records, dtype=object), "data": np.array(data, dtype=object),
            "fmt": np.array(fmts, dtype=object), "has_gps": np.array(gps), "ok": np.array(ok)}


def preprocess_batch(batch: Batch, cfg: PreprocessConfig) -> Batch:
    """Bytes -> the uint8 CHW crops the network takes (zeros where the photo is bad or undecodable)."""
    crops = np.zeros((len(batch["path"]), 3, cfg.input_size, cfg.input_size), np.uint8)
    records, ok = list(batch["record"]), batch["ok"].copy()
    for i in np.flatnonzero(ok):
        try:
            crops[i] = load_input(batch["data"][i], cfg, DEFAULT_MAX_PIXELS)
        except PHOTO_ERRORS as e:
            record = json.loads(records[i])
            record["error"], ok[i] = error_text(e), False
            records[i] = json.dumps(record)
    return {**batch, "record": np.array(records, dtype=object), "ok": ok, "crop": crops}


class Infer:
    """One inference actor: the model loaded once, then batches of crops -> the model's answers (network
    outputs + open-set decision, exactly what ``Predictor.predict`` returns for one photo)."""

    def __init__(self, model_dir: str, backend: str, device: str, threads: int, min_precision: float | None,
                 index: str | None = None) -> None:
        from landmark.predict import Predictor

        self.predictor = Predictor.from_dir(Path(model_dir), backend, device=device, threads=threads,
                                            index=None if index is None else Path(index))
        self.min_precision = min_precision

    def __call__(self, batch: Batch) -> Batch:
        from landmark.predict import rows

        answers = np.full(len(batch["path"]), "", dtype=object)
        ok = np.flatnonzero(batch["ok"])
        if len(ok):
            outputs = self.predictor.outputs(np.ascontiguousarray(batch["crop"][ok]))
            for i, row in zip(ok, rows(outputs), strict=True):
                answers[i] = json.dumps(self.predictor.answer(row, min_precision=self.min_precision))
        return {k: v for k, v in batch.items() if k != "crop"} | {"answer": answers}


def write_batch(batch: Batch, src: str, dst: str, overwrite_gps: bool, sidecar: bool) -> Batch:
    """Decision -> action -> tagged copy or sidecar, by the sequential tagger's own function; -> report records
    (``stop`` in a record: DST cannot take its file, the driver stops the run)."""
    policy, out = TagPolicy(overwrite_gps, sidecar), []
    for i, text in enumerate(batch["record"]):
        record = json.loads(text)
        if batch["ok"][i]:
            photo = Photo(batch["data"][i], batch["fmt"][i] or None, bool(batch["has_gps"][i]))
            try:
                apply_answer(record, photo, json.loads(batch["answer"][i]), Path(src), Path(dst), policy)
            except DestinationError as e:
                record["stop"] = e.strerror
            except PHOTO_ERRORS as e:
                record["error"] = error_text(e)
        out.append(json.dumps(record))
    return {"record": np.array(out, dtype=object)}


def start_ray(args: argparse.Namespace) -> None:
    """The cluster in RAY_ADDRESS, else a local one of ``--num-cpus`` logical CPUs; quiet either way."""
    import ray

    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    address = os.environ.get("RAY_ADDRESS")
    if address:  # the workers there get this package's code; data and model must be on shared storage
        if args.num_cpus or args.num_gpus is not None:
            raise Abort(f"--num-cpus/--num-gpus size a local cluster; RAY_ADDRESS={address} names an existing one")
        root = Path(__file__).resolve().parents[1]
        ray.init(address=address, runtime_env={"py_modules": [str(root / "app"), str(root / "landmark")]}, **quiet)
        return
    num_cpus = args.num_cpus or max(os.cpu_count() or 1, math.ceil(args.workers * args.worker_cpus + TASK_CPUS))
    if num_cpus < args.workers * args.worker_cpus + TASK_CPUS:
        raise Abort(f"--num-cpus {num_cpus} cannot hold {args.workers} workers x {args.worker_cpus} CPUs "
                    f"plus {TASK_CPUS} for reading and writing: lower --worker-cpus or raise --num-cpus")
    ray.init(address="local", num_cpus=num_cpus, num_gpus=args.num_gpus, include_dashboard=False,
             object_store_memory=args.object_store_mb * 2**20, **quiet)
    gpus = ray.cluster_resources().get("GPU", 0)
    if args.workers * args.gpus_per_worker > gpus:  # Ray Data would wait for them forever
        raise Abort(f"{args.workers} workers x {args.gpus_per_worker} GPUs asked for, the local cluster has {gpus:g}")


def pipeline(todo: list[str], args: argparse.Namespace, cfg: PreprocessConfig) -> Any:
    """The Ray Data dataset of report records (lazy: it runs while the driver iterates it)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver's own tqdm counts photos
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # failures still raise
    batch = args.batch_size
    gpu = args.gpus_per_worker > 0
    ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=max(1, math.ceil(len(todo) / batch)))
    ds = ds.map_batches(read_batch, fn_kwargs={"src": str(args.src)}, batch_size=batch, batch_format="numpy")
    ds = ds.map_batches(preprocess_batch, fn_kwargs={"cfg": cfg}, batch_size=batch, batch_format="numpy")
    ds = ds.map_batches(
        Infer, fn_constructor_kwargs={"model_dir": str(args.model_dir.resolve()), "backend": args.backend,
                                      "device": "cuda" if gpu else "cpu", "threads": args.threads,
                                      "min_precision": args.min_precision,
                                      "index": None if args.index is None else str(args.index.resolve())},
        compute=ray.data.ActorPoolStrategy(size=args.workers), num_cpus=args.worker_cpus,
        num_gpus=args.gpus_per_worker if gpu else None,
        batch_size=batch, batch_format="numpy")
    return ds.map_batches(write_batch, fn_kwargs={"src": str(args.src.resolve()), "dst": str(args.dst.resolve()),
                                                  "overwrite_gps": args.overwrite_gps, "sidecar": args.sidecar},
                          batch_size=batch, batch_format="numpy")


def run(args: argparse.Namespace) -> dict:
    src, dst = args.src, args.dst
    check_folders(src, dst)
    try:
        meta = read_meta(args.model_dir)
        if not model_file(args.model_dir, args.backend).is_file():
            raise FileNotFoundError(f"no {model_file(args.model_dir, args.backend).name}")
    except (OSError, ValueError, KeyError) as e:
        raise Abort(f"not an exported model folder: {args.model_dir} ({error_text(e)})") from e
    photos = find_photos(src, dst)
    settings = local_settings(args.model_dir, args.backend, args.min_precision, args.overwrite_gps, args.index,
                              args.sidecar)
    if args.index is not None:  # refused here, before Ray starts, if it is another model's
        from landmark.places import ModelId, PlaceIndex, PlaceIndexError

        try:
            PlaceIndex.load(args.index, ModelId.of(meta))
        except PlaceIndexError as e:
            raise Abort(str(e)) from None
    try:
        progress = Progress(src, dst, photos, settings, {c.label for c in meta.classes})
    except OSError as e:
        raise Abort(f"cannot write to {dst}: {e.strerror or e}") from None
    if not progress.todo:  # nothing to do: no cluster either
        return progress.save()
    import ray

    started = time.monotonic()
    try:
        start_ray(args)
        ready = time.monotonic()
        with progress_bar(total=len(progress.todo), desc="tagging", unit="photo") as bar:
            for row in pipeline(progress.todo, args, meta.preprocess).iter_rows():
                record = json.loads(row["record"])
                if record.get("stop"):
                    raise Abort(f"{record['stop']}: DST is full or read-only; rerun to resume")
                progress.add(record)
                bar.update()
        done = time.monotonic()
        print(f"{len(progress.todo)} photos in {done - ready:.1f} s on {args.workers} workers: "
              f"{len(progress.todo) / (done - ready):.2f} photos/s (Ray start {ready - started:.1f} s)",
              file=sys.stderr)
    except ray.exceptions.RayError as e:
        raise progress.stopped(Abort(f"the Ray pipeline failed: {str(e).strip().splitlines()[-1]}")) from e
    except Abort as e:
        raise progress.stopped(e) from None
    except BaseException:
        progress.save()
        raise
    finally:
        ray.shutdown()
    return progress.save()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.tag_ray",
                                description="app.tag --local on a Ray cluster: GPS EXIF into copies of photos.")
    p.add_argument("--src", type=Path, required=True, help="folder of photos (searched recursively, never modified)")
    p.add_argument("--dst", type=Path, required=True, help="folder for tagged copies and tag_report.{json,csv}")
    p.add_argument("--model-dir", type=Path, required=True, help="exported model folder (as app.tag --local)")
    p.add_argument("--backend", choices=sorted(MODEL_FILES), default="onnx")
    p.add_argument("--min-precision", type=precision, help="operating point (default: the model's stored one)")
    p.add_argument("--overwrite-gps", action="store_true", help="also tag photos that already have GPS EXIF")
    p.add_argument("--sidecar", action="store_true", help="XMP sidecars instead of tagged copies (as app.tag)")
    p.add_argument("--index", type=Path, help="place index of your geotagged photos, built with this model")
    p.add_argument("--workers", type=positive_int, default=2, help="inference actors (the actor pool's size)")
    p.add_argument("--worker-cpus", type=positive_float, default=1.0, help="logical CPUs each actor reserves")
    p.add_argument("--threads", type=non_negative_int, default=1,
                   help="ONNX Runtime intra-op threads per actor (0 = runtime default: every core, per actor)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs each actor reserves (e.g. 1 or 0.5); > 0 runs the model on CUDA, 0 (default) on CPU")
    p.add_argument("--batch-size", type=positive_int, default=8, help="photos per Ray Data batch")
    p.add_argument("--num-cpus", type=positive_int,
                   help="local cluster only: logical CPUs (default: the machine's, at least workers x "
                        "worker-cpus + 1)")
    p.add_argument("--num-gpus", type=non_negative_int, help="local cluster only: GPUs (default: Ray's detection)")
    p.add_argument("--object-store-mb", type=positive_int, default=1024, help="local cluster only: object store")
    return p


def main(args: argparse.Namespace) -> int:
    if args.gpus_per_worker < 0:
        print("error: --gpus-per-worker must be >= 0", file=sys.stderr)
        return 2
    return report_run(run, args)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
