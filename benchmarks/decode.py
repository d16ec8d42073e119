"""What JPEG draft decoding buys and what it changes: ``landmark.preprocess.load_input`` (the one eval
preprocessing, which lets libjpeg scale by 1/2..1/8 while the shorter side stays >= ``resize_size``)
against a full-scale decode followed by the same resize and crop, per model and photo set.

For each set: how many photos the draft shrinks, the decode + preprocess time per photo both ways (the
best of ``--repeats`` per photo, then the median and p90 over photos), and the model's answers both ways:
top-1 accuracy where the set is the model's own test split, the tag rate (the open-set decision) on
every set, and how often the two ways agree. Training decodes the same way (``train.data``), so the
draft is what the model learned from; the full decode is the deviation measured here.

  python -m benchmarks.decode --model-dir artifacts/im49 artifacts/wh13     # make bench-decode
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

from benchmarks.inputs import SHARED, photo_files
from benchmarks.load import publish, run_header
from landmark.cli import positive_int
from landmark.predict import Predictor
from landmark.preprocess import PreprocessConfig, decode, load_input, resize_crop
from landmark.run_files import METRICS

DEFAULT_SETS = (SHARED / "udacity_samples", SHARED / "world_heritage13" / "test", SHARED / "everyday" / "test")
PHONE_SIZE = (4032, 3024)  # 12 MP: what a phone writes, beyond the shared sets' 800 px


def full_decode(data: bytes, cfg: PreprocessConfig):
    """The same crop without the draft: every pixel decoded, then resized."""
    return resize_crop(decode(data, draft_size=None), cfg)


def best_ms(ways: dict, data: bytes, cfg: PreprocessConfig, repeats: int) -> dict[str, float]:
    """Each way's best time on one photo, the ways interleaved so drift and caches favour none."""
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, fn in ways.items():
            t = time.perf_counter()
            fn(data, cfg)
            times[way].append((time.perf_counter() - t) * 1e3)
    return {way: min(v) for way, v in times.items()}


def drafted(data: bytes, cfg: PreprocessConfig) -> bool:
    """Whether libjpeg decodes this photo at a reduced scale for this preprocessing."""
    with Image.open(io.BytesIO(data)) as img:
        full = img.size
        if img.format != "JPEG":
            return False
        img.draft("RGB", (cfg.resize_size, cfg.resize_size))
        return img.size != full


def upscaled(folder: Path, size: tuple[int, int] = PHONE_SIZE) -> list[bytes]:
    """The folder's photos re-encoded at a phone camera's 12 MP: real decode cost at that size (their
    answers are not a measure of accuracy, only of agreement)."""
    out = []
    for f in photo_files(folder):
        buf = io.BytesIO()
        with Image.open(f) as img:
            img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def measure_set(predictor: Predictor, name: str, photos: list[bytes], truth: list[str] | None,
                repeats: int) -> dict:
    """``truth``: the class labels where the set is the model's own test split."""
    cfg, ways = predictor.cfg, {"draft": load_input, "full": full_decode}
    best = [best_ms(ways, b, cfg, repeats) for b in photos]
    ms = {way: [b[way] for b in best] for way in ways}
    answers = {way: [predictor.answer(predictor.outputs(fn(b, cfg)[None])) for b in photos]
               for way, fn in ways.items()}
    top1 = {w: [a["top_k"][0]["label"] for a in answers[w]] for w in ways}
    tagged = {w: [a["landmark"] is not None for a in answers[w]] for w in ways}
    n = len(photos)
    result = {
        "set": name, "photos": n, "drafted": sum(drafted(b, cfg) for b in photos),
        "ms": {w: {"median": statistics.median(v), "p90": sorted(v)[int(0.9 * (n - 1))]} for w, v in ms.items()},
        "tag_rate": {w: sum(t) / n for w, t in tagged.items()},
        "top1_agree": sum(a == b for a, b in zip(top1["draft"], top1["full"], strict=True)) / n,
        "decision_agree": sum(a == b for a, b in zip(tagged["draft"], tagged["full"], strict=True)) / n,
    }
    if truth is not None:
        result["top1_accuracy"] = {w: sum(a == t for a, t in zip(top1[w], truth, strict=True)) / n for w in ways}
    result["speedup"] = result["ms"]["full"]["median"] / result["ms"]["draft"]["median"]
    return result


def photo_sets(model_dir: Path, folders: list[Path], phone: Path | None) -> list[tuple[str, list[bytes], list | None]]:
    """(name, photos, labels or None): the run's own test split (from its metrics.json), the other
    folders, and the phone-size copies."""
    metrics = model_dir / METRICS  # absent for an unpacked archive
    own = (Path(json.loads(metrics.read_text())["data_dir"]) / "test").resolve() if metrics.is_file() else None
    sets = []
    for folder in ([own] if own and own.is_dir() else []) + [d for d in folders if not own or d.resolve() != own]:
        files = photo_files(folder)
        sets.append((str(folder), [p.read_bytes() for p in files],
                     [p.parent.name for p in files] if folder == own else None))
    if phone:
        sets.append((f"{phone} at {PHONE_SIZE[0]}x{PHONE_SIZE[1]}", upscaled(phone), None))
    return sets


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# JPEG draft decoding: decode + preprocess per photo, and the answers", "",
             f"{m['cpu']}; started {result['started_at']}; best of {result['settings']['repeats']} per photo, "
             "then median / p90 over the photos; one thread, nothing else running.", "",
             "| model (resize) | photos | drafted | draft ms p50 / p90 | full ms p50 / p90 | speed-up | "
             "top-1 acc. draft / full | tagged draft / full | same top-1 | same decision |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        for s in run["sets"]:
            acc = s.get("top1_accuracy")
            acc_text = f"{acc['draft']:.1%} / {acc['full']:.1%}" if acc else "-"
            lines.append(
                f"| `{run['model_dir']}` ({run['resize_size']}) | `{s['set']}` {s['photos']} | {s['drafted']} | "
                f"{s['ms']['draft']['median']:.2f} / {s['ms']['draft']['p90']:.2f} | "
                f"{s['ms']['full']['median']:.2f} / {s['ms']['full']['p90']:.2f} | {s['speedup']:.2f}x | {acc_text} | "
                f"{s['tag_rate']['draft']:.1%} / {s['tag_rate']['full']:.1%} | {s['top1_agree']:.1%} | "
                f"{s['decision_agree']:.1%} |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="JPEG draft decoding against a full decode: time and answers.")
    p.add_argument("--model-dir", type=Path, nargs="+", default=[Path("artifacts/im49"), Path("artifacts/wh13")])
    p.add_argument("--photos", type=Path, nargs="+", default=list(DEFAULT_SETS),
                   help="photo folders besides each model's own test split")
    p.add_argument("--phone-size", type=Path, default=SHARED / "udacity_samples",
                   help=f"photos also timed re-encoded at {PHONE_SIZE[0]}x{PHONE_SIZE[1]}")
    p.add_argument("--no-phone-size", dest="phone_size", action="store_const", const=None)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    started = time.time()
    missing = [str(d) for d in [*args.model_dir, *args.photos, *[args.phone_size] * bool(args.phone_size)]
               if not d.is_dir()]
    if missing:
        print(f"bench-decode: missing {', '.join(missing)} (a model folder: make train; photos: ../shared/data)",
              file=sys.stderr)
        return 1
    runs = []
    for model_dir in args.model_dir:
        predictor = Predictor.from_dir(model_dir, device="cpu", threads=1)
        runs.append({"model_dir": str(model_dir), "resize_size": predictor.cfg.resize_size,
                     "sets": [measure_set(predictor, *ps, args.repeats)
                              for ps in photo_sets(model_dir, args.photos, args.phone_size)]})
    result = {**run_header(args, started), "runs": runs}
    publish(args.out_dir, "decode", started, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
