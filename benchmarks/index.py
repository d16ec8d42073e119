"""What a place index (``landmark.places``) costs as a photo library grows: build time per photo, query
latency, memory, and the recall of the approximate search against the exact one.

- Per photo (with ``--model-dir``): decode + preprocess + the network's embedding of real photos
  (``--photos``), one at a time and in batches of ``--batch``: the part of ``make index`` that grows with
  the library (grouping and the operating point are timed at each size below).
- Per size (``--sizes``, default 1k / 100k / 1M references): the model's real embeddings of those photos,
  then synthetic references beyond them: unit vectors drawn around random "place" centres (``--per-place``
  photos each, so the data has the cluster structure of a photo library; uniform random vectors would not),
  queried with fresh photos of the same places. For the exact index (IndexFlatIP) and the approximate one
  ``landmark.places.build_search`` makes beyond its exact limit (IVF, nprobe tuned by ``tune_nprobe`` to
  recall >= 0.95): build seconds, query latency one photo at a time (p50 / p95, as the handler asks), the
  index's memory, and the top-1 recall of the approximate search against the exact one.

  python -m benchmarks.index --model-dir artifacts/wh13               # make bench-index
  python -m benchmarks.index --sizes 1000 5000 --queries 50           # tiny: proves it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.inputs import SHARED, photo_files
from benchmarks.load import publish, run_header
from landmark.cli import non_negative_int, positive_int
from landmark.open_set import unit
from landmark.places import MIN_RECALL, build_search, tune_nprobe

DEFAULT_SIZES = (1_000, 100_000, 1_000_000)
DEFAULT_PHOTOS = SHARED / "porto5" / "train"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def embed_photos(model_dir: Path, photos: list[Path], batch: int, threads: int) -> tuple[np.ndarray, dict]:
    """The real embeddings of ``photos``, and the seconds per photo it took one by one and in batches."""
    from landmark.predict import Predictor

    predictor = Predictor.from_dir(model_dir, device="cpu", threads=threads)
    one = []
    for p in photos[:min(len(photos), 32)]:
        t0 = time.perf_counter()
        predictor.outputs(predictor.preprocess(p)[None])
        one.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    out = []
    for start in range(0, len(photos), batch):
        crops = np.stack([predictor.preprocess(p) for p in photos[start:start + batch]])
        out.append(predictor.outputs(crops).embedding)
    batched = (time.perf_counter() - t0) / len(photos)
    return np.concatenate(out).astype(np.float32), {"photos": len(photos), "one_s_median": statistics.median(one),
                                                      "batched_s_per_photo": batched, "batch": batch}


def synthetic(n: int, dim: int, per_place: int, spread: float, rng: np.random.Generator,
              centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around random place centres (new ones, or drawn from ``centres``), in chunks."""
    if centres is None:
        centres = unit(rng.standard_normal((max(1, n // per_place), dim)).astype(np.float32))
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 65_536):
        m = min(65_536, n - start)
        pick = centres[rng.integers(0, len(centres), m)]
        noise = rng.standard_normal((m, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        out[start:start + m] = unit(pick + noise)
    return out, centres


def latencies(index, queries: np.ndarray) -> list[float]:
    out = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], 3)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def measure_size(n: int, real: np.ndarray | None, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    dim = real.shape[1] if real is not None else args.dim
    take = 0 if real is None else min(n, len(real))
    refs, centres = synthetic(n - take, dim, args.per_place, args.spread, rng)
    if take:
        refs = np.concatenate([unit(real[:take]), refs])
    queries, _ = synthetic(args.queries, dim, args.per_place, args.spread, rng, centres)
    row: dict = {"references": n, "real": take, "dim": dim}
    for kind, limit in (("exact", n), ("approximate", 0)):
        if kind == "approximate" and n < args.min_approximate:
            continue
        t0 = time.perf_counter()
        index, info = build_search(refs, exact_limit=limit, threads=args.threads)
        if info.kind == "ivf":
            tuning, _ = synthetic(args.queries, dim, args.per_place, args.spread, rng, centres)
            info = tune_nprobe(index, refs, tuning, min_recall=MIN_RECALL)  # other queries than the measured ones
        build_s = time.perf_counter() - t0
        ms = latencies(index, queries)
        row[kind] = {"search": info.kind, "nlist": info.nlist, "nprobe": info.nprobe, "build_s": build_s,
                     "build_us_per_reference": build_s / n * 1e6, "query_ms_p50": percentile(ms, 50),
                     "query_ms_p95": percentile(ms, 95), "memory_mb": _index_bytes(index) / 2**20}
        if kind == "approximate":
            exact = row["exact_top1"]
            found = index.search(queries, 1)[1][:, 0]
            row[kind]["recall_at_1"] = float((found == exact).mean())
            row[kind]["recall_at_1_tuning"] = info.recall
        else:
            row["exact_top1"] = index.search(queries, 1)[1][:, 0]
        del index
    row.pop("exact_top1")
    return row


def _index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Place index: build, query, memory, recall", "",
             f"{m['cpu']}; started {result['started_at']}; {result['settings']['threads']} faiss threads "
             "(0: every core); queries one photo at a time.", ""]
    e = result.get("embedding")
    if e:
        lines += [f"Embedding (the part of a build that grows with the library): {e['one_s_median'] * 1000:.1f} ms "
                  f"per photo one at a time, {e['batched_s_per_photo'] * 1000:.1f} ms in batches of {e['batch']} "
                  f"({e['photos']} photos of `{result['settings']['photos']}`).", ""]
    lines += ["| references (real) | search | build s | build µs/ref | query ms p50 / p95 | memory MB | recall@1 |",
              "|---|---|---|---|---|---|---|"]
    for r in result["sizes"]:
        for kind in ("exact", "approximate"):
            if kind not in r:
                continue
            k = r[kind]
            search = k["search"] if k["search"] == "exact" else f"IVF{k['nlist']} nprobe {k['nprobe']}"
            recall = f"{k['recall_at_1']:.3f}" if "recall_at_1" in k else "1 (exact)"
            lines.append(f"| {r['references']:,} ({r['real']}) | {search} | {k['build_s']:.2f} | "
                         f"{k['build_us_per_reference']:.1f} | {k['query_ms_p50']:.2f} / {k['query_ms_p95']:.2f} | "
                         f"{k['memory_mb']:.0f} | {recall} |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Place index cost: build, query latency, memory, recall.")
    p.add_argument("--model-dir", type=Path, help="embed real photos with this model (else synthetic only)")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="real photos (with --model-dir)")
    p.add_argument("--sizes", type=positive_int, nargs="+", default=list(DEFAULT_SIZES))
    p.add_argument("--dim", type=positive_int, default=1280, help="embedding size without --model-dir")
    p.add_argument("--queries", type=positive_int, default=200)
    p.add_argument("--per-place", type=positive_int, default=50, help="synthetic photos per place")
    p.add_argument("--spread", type=float, default=1.0, help="noise norm around a place's centre (unit centres)")
    p.add_argument("--min-approximate", type=positive_int, default=1_000,
                   help="sizes from which the approximate index is measured too")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--threads", type=non_negative_int, default=0, help="faiss / ONNX Runtime threads (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    started = time.time()
    real, embedding = None, None
    if args.model_dir is not None:
        photos = photo_files(args.photos) if args.photos.is_dir() else []
        if not photos:
            print(f"bench-index: no photos in {args.photos} (../shared/data)", file=sys.stderr)
            return 1
        real, embedding = embed_photos(args.model_dir, photos, args.batch, args.threads)
    rng = np.random.default_rng(args.seed)
    sizes = [measure_size(n, real, args, rng) for n in args.sizes]
    result = {**run_header(args, started), "embedding": embedding, "sizes": sizes}
    publish(args.out_dir, "index", started, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
