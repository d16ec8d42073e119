"""``make gpu-pack``: what a lent GPU machine needs beside the working tree to run ``make gpu-check``.

The device tool carries at most 64 MiB per call (working tree included) and the machine reaches no
package registry, so this builds ``.gpu-carry/`` here (git-ignored; the call names it in ``carry``):

  default   models/<name>/ (model.onnx, model.ts, model_meta.json, open_set.npz) of each --model-dirs folder
            that still fits, in order, and crops/<name>.npy: --crops of its test photos through the one
            preprocessing (uint8 arrays, no photo files)
  --served  wheels/ (torchserve, torch-model-archiver, enum-compat at the versions installed here) and
            jre.tar.xz, a Java runtime cut by jlink to what TorchServe's frontend loads: the device image has
            neither. No model (about 63 MB already): gpu_check's train part makes a tiny one there

Assembled in a temporary folder that then replaces .gpu-carry/ whole: never half a pack.

  python -m benchmarks.gpu_pack --model-dirs artifacts/wh13 artifacts/im49
  python -m benchmarks.gpu_pack --served
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.gpu_check import CARRY, DEFAULT_MODELS, ROOT, own_crops
from landmark.cli import non_negative_int, positive_float
from landmark.run_files import META, OPEN_SET, model_file

MiB = 2**20
SERVED_WHEELS = ("torchserve", "torch-model-archiver", "enum-compat")
DEVICE_PYTHON = "3.12"  # the lent machines' python3 (/work/.library/device/KINDS.md)
# what TorchServe 0.12's frontend (model-server.jar) loads, found by serving with this runtime here: it needs
# java.beans (java.desktop) but none of that module's graphics libraries. Modules stored uncompressed: xz
# packs them to about 17 MB, against 28 MB from jlink's own compression.
JRE_MODULES = ("java.base", "java.desktop", "java.logging", "java.management", "java.naming", "java.scripting",
               "java.sql", "java.xml", "jdk.unsupported")
JRE_DROPPED = r"regex:.*/lib(awt|awt_xawt|awt_headless|fontmanager|lcms|javajpeg|mlib_image|splashscreen|jsound)\.so"
DEVICE_COMMAND = ('set -o pipefail; PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh --out-dir "$OUT" 2>&1 '
                  '| tee "$OUT/gpu-check.log"')


class PackError(Exception):
    """The pack cannot be made as asked; the message says why."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dirs", nargs="+", type=Path, default=list(DEFAULT_MODELS),
                   help="exported model folders, most wanted first (a missing one is reported and skipped)")
    p.add_argument("--crops", type=non_negative_int, default=8, help="test crops per model for the parity part")
    p.add_argument("--served", action="store_true", help="TorchServe's wheels and a Java runtime instead of models")
    p.add_argument("--out", type=Path, default=CARRY)
    p.add_argument("--limit-mb", type=positive_float, default=64.0,
                   help="MiB one device call carries, working tree included")
    return p


def tree_bytes(root: Path = ROOT) -> int:
    """What travels anyway: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum(p.stat().st_size for name in listed if name and (p := root / name).is_file() and not p.is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_parts(model_dir: Path) -> list[Path]:
    files = [model_file(model_dir, "onnx"), model_file(model_dir, "torchscript"), model_dir / META]
    return files + ([model_dir / OPEN_SET] if (model_dir / OPEN_SET).is_file() else [])


def pack_models(dst: Path, model_dirs: list[Path], n_crops: int, budget: int) -> list[str]:
    """Copy each model folder's exported files and its crops while they fit; one note per folder."""
    notes, used = [], 0
    for d in model_dirs:
        parts = model_parts(d)
        if missing := [p.name for p in parts if not p.is_file()]:
            notes.append(f"{d}: skipped, no {', '.join(missing)}")
            continue
        crops = own_crops(d, n_crops)[0] if n_crops else None
        size = sum(p.stat().st_size for p in parts) + (crops.nbytes if crops is not None else 0)
        if used + size > budget:
            notes.append(f"{d}: left out, {size / MiB:.1f} MiB would pass the {budget / MiB:.1f} MiB left for the pack")
            continue
        (dst / "models" / d.name).mkdir(parents=True)
        for p in parts:
            shutil.copyfile(p, dst / "models" / d.name / p.name)
        if crops is not None:
            (dst / "crops").mkdir(exist_ok=True)
            np.save(dst / "crops" / f"{d.name}.npy", crops)
        used += size
        notes.append(f"{d}: {size / MiB:.1f} MiB")
    if used == 0:
        raise PackError("no exported model fits: " + "; ".join(notes))
    return notes


def pack_served(dst: Path) -> list[str]:
    """The wheels TorchServe needs on the device (pure Python) and a jlink'd Java runtime."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in SERVED_WHEELS]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--python-version", DEVICE_PYTHON, "-d", str(dst / "wheels"), *pins],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PackError(f"pip download {' '.join(pins)} failed: {done.stderr.strip().splitlines()[-1:]}")
    jlink = shutil.which("jlink")
    if jlink is None:
        raise PackError("no jlink here (a JDK 17+): cannot cut a Java runtime for TorchServe")
    with tempfile.TemporaryDirectory() as tmp:
        jre = Path(tmp) / "jre"
        subprocess.run([jlink, "--add-modules", ",".join(JRE_MODULES), "--strip-debug", "--no-header-files",
                        "--no-man-pages", "--compress=0", f"--exclude-files={JRE_DROPPED}", "--output", str(jre)],
                       check=True, capture_output=True)
        with tarfile.open(dst / "jre.tar.xz", "w:xz") as tar:
            tar.add(jre, arcname="jre")
    return [f"wheels: {', '.join(pins)}", f"jre.tar.xz: {', '.join(JRE_MODULES)}"]


def build(args: argparse.Namespace) -> list[str]:
    tree = tree_bytes()
    budget = int(args.limit_mb * MiB) - tree - MiB  # 1 MiB to spare
    if budget <= 0:
        raise PackError(f"the working tree alone is {tree / MiB:.1f} MiB of the {args.limit_mb:g} MiB a call carries")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=f".{args.out.name}-") as tmp:
        dst = Path(tmp) / "pack"
        dst.mkdir()
        notes = pack_served(dst) if args.served else pack_models(dst, args.model_dirs, args.crops, budget)
        size = folder_bytes(dst)
        if size > budget:
            raise PackError(f"{size / MiB:.1f} MiB packed, over the {budget / MiB:.1f} MiB the working tree leaves "
                            f"of {args.limit_mb:g} MiB")
        if args.out.exists():
            shutil.rmtree(args.out)
        dst.rename(args.out)
    return [*notes, f"{args.out}: {size / MiB:.1f} MiB of {budget / MiB:.1f} MiB left beside the working tree"]


def main(args: argparse.Namespace) -> int:
    try:
        notes = build(args)
    except (PackError, subprocess.CalledProcessError) as e:
        print(f"gpu-pack: {e}", file=sys.stderr)
        return 1
    print("\n".join(notes))
    out = args.out.resolve()
    if out.is_relative_to(ROOT):
        print(f"device call: run(command='{DEVICE_COMMAND}', carry=['{out.relative_to(ROOT)}'], timeout_s=540)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
