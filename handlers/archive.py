"""Build ``<store>/<name>.mar`` from an exported model folder with torch-model-archiver.

The archive holds the handler, one network (model.onnx, model.int8.onnx or model.ts), model_meta.json, the fitted
open-set decision (open_set.npz), a model-config.yaml (batching, handler threads and pixel limit), a place
index of the user's geotagged photos where ``--index`` names one (``places.npz``: embeddings, GPS and file
names of those photos, no pixels), and the whole ``landmark`` inference package, so the one preprocessing
definition travels with the model and no file list can go stale.
No photos. The result is byte-reproducible (fixed manifest time, sorted entries, fixed zip
dates) and is assembled in a temporary folder, then moved into place: never a half-written .mar.

Usage: python -m handlers.archive --model-dir artifacts/transfer --backend onnx --store model_store --force
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import landmark
from handlers.settings import BATCH_SIZE, MAX_BATCH_DELAY_MS, MODEL_NAME, MODEL_STORE, RESPONSE_TIMEOUT_S, THREADS
from landmark import atomic
from landmark.cli import non_negative_int, positive_int
from landmark.places import INDEX_FILE, ModelId, PlaceIndex, PlaceIndexError
from landmark.preprocess import DEFAULT_MAX_PIXELS
from landmark.run_files import META, MODEL_FILES, OPEN_SET, read_meta

HANDLER = Path(__file__).with_name("landmark_handler.py")
PACKAGE = Path(landmark.__file__).parent  # shipped whole: the handler may import any of it
FIXED_TIME = "01/01/2000 00:00:00"  # MANIFEST createdOn, so two builds of the same inputs are identical
ZIP_TIME = (2000, 1, 1, 0, 0, 0)


def model_config(batch_size: int, max_batch_delay: int, threads: int, max_pixels: int) -> str:
    """model-config.yaml: TorchServe reads the batching keys, the handler reads ``handler:``."""
    return (
        "# Read by TorchServe when the model is loaded (0.12: model-config.yaml inside the archive).\n"
        f"batchSize: {batch_size}          # requests merged into one network call\n"
        f"maxBatchDelay: {max_batch_delay}      # ms to wait for a batch to fill\n"
        f"responseTimeout: {RESPONSE_TIMEOUT_S}    # s before a stuck request fails\n"
        "handler:\n"
        f"  threads: {threads}           # torch / ORT intra-op threads per worker (env LANDMARK_THREADS)\n"
        f"  max_pixels: {max_pixels}  # larger images are refused as decompression bombs (env LANDMARK_MAX_PIXELS)\n"
    )


def stage(model_dir: Path, backend: str, work: Path, config_text: str, index: Path | None = None) -> Path:
    """Lay out the extra files: the ``landmark`` package (sources and data, no caches),
    model_meta.json and the place index at the archive root."""
    extra = work / "extra"
    shutil.copytree(PACKAGE, extra / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(model_dir / META, extra / META)
    if read_meta(model_dir).open_set is not None:  # the fitted open-set decision (derived numbers, no photos)
        shutil.copyfile(model_dir / OPEN_SET, extra / OPEN_SET)
    if index is not None:
        shutil.copyfile(index, extra / INDEX_FILE)
    (work / "model-config.yaml").write_text(config_text, encoding="utf-8")
    return extra


def zip_dir(src: Path, dst: Path) -> None:
    """A deterministic zip of ``src``: sorted names, fixed dates and modes."""
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(src).as_posix(), ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, path.read_bytes())


def build(model_dir: Path, backend: str, name: str, version: str, store: Path, force: bool = False,
          batch_size: int = BATCH_SIZE, max_batch_delay: int = MAX_BATCH_DELAY_MS, threads: int = THREADS,
          max_pixels: int = DEFAULT_MAX_PIXELS, index: Path | None = None) -> Path:
    """Archive ``model_dir``'s exported network (and ``index``, which must be this model's); returns the .mar
    path. Raises FileNotFoundError / FileExistsError / PlaceIndexError."""
    model_dir, store = Path(model_dir), Path(store)
    model_file = model_dir / MODEL_FILES[backend]
    missing = [p.name for p in (model_file, model_dir / META) if not p.is_file()]
    if not missing and read_meta(model_dir).open_set is not None and not (model_dir / OPEN_SET).is_file():
        missing.append(OPEN_SET)
    if missing:
        make = "quantize" if missing == [model_file.name] and backend == "onnx-int8" else "export"
        raise FileNotFoundError(f"{model_dir} lacks {', '.join(missing)}: run `make {make} OUT={model_dir}` first")
    if index is not None:
        PlaceIndex.load(index, ModelId.of(read_meta(model_dir)))  # another model's index is refused here
    target = store / f"{name}.mar"
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists: pass --force (-f) to overwrite")
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store, prefix=f".{name}-") as tmp:
        work = Path(tmp)
        extra = stage(model_dir, backend, work, model_config(batch_size, max_batch_delay, threads, max_pixels), index)
        (work / "tmp").mkdir()
        cmd = [str(Path(sys.executable).with_name("torch-model-archiver")), "--model-name", name,
               "--version", version, "--serialized-file", str(model_file), "--handler", str(HANDLER),
               "--extra-files", str(extra), "--config-file", str(work / "model-config.yaml"),
               "--export-path", str(work), "--archive-format", "no-archive", "--force"]
        # the archiver stages in $TMPDIR/<name>: a private TMPDIR keeps parallel builds apart
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(work / "tmp")})
        if done.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed:\n{done.stdout}{done.stderr}")
        manifest_path = work / name / "MAR-INF" / "MANIFEST.json"
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["createdOn"] = FIXED_TIME
        manifest_path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        with atomic.atomic_path(target) as tmp:
            zip_dir(work / name, tmp)
    return target


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Package an exported landmark model as a TorchServe .mar archive.")
    p.add_argument("--model-dir", type=Path, required=True, help="folder with model.onnx / model.ts + model_meta.json")
    p.add_argument("--backend", choices=sorted(MODEL_FILES), default="onnx")
    p.add_argument("--name", default=MODEL_NAME, help="model name: the URL is /predictions/<name>")
    p.add_argument("--version", default="1.0")
    p.add_argument("--store", type=Path, default=MODEL_STORE)
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing archive")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE)
    p.add_argument("--max-batch-delay", type=non_negative_int, default=MAX_BATCH_DELAY_MS, help="ms")
    p.add_argument("--threads", type=positive_int, default=THREADS, help="intra-op threads per worker")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--index", type=Path, help="place index built with this model (make index), shipped in the archive")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        path = build(args.model_dir, args.backend, args.name, args.version, args.store, args.force,
                     args.batch_size, args.max_batch_delay, args.threads, args.max_pixels, args.index)
    except (FileNotFoundError, FileExistsError, RuntimeError, PlaceIndexError) as e:
        print(f"archive: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.backend}, {path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
