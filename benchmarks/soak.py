"""Soak benchmark (``make soak``): many requests at a fixed concurrency against the served model, real
photos with bad inputs mixed in, sent by Locust through the app in front of TorchServe (the path users
hit; ``--via torchserve`` for TorchServe alone).

It archives a run folder as ``make archive`` does, starts an isolated TorchServe, warms it up, then
sends ``--requests`` bodies (the model's own test photos and everyday photos with no landmark, every
``--bad-every``-th one a bad input that must get a JSON 400) and reports errors by kind,
p50 / p99 of the photo requests per window of ``--window`` requests, and each worker's RSS and PSS
over the run (and the app's RSS). Judged against the bars of a deployment that runs for weeks: no unexpected error, PSS
growth after warm-up under 5%, last window's p99 within 1.5x of the first. Writes
benchmarks/results/soak-<host>-<time>.{json,md,png}.

  python -m benchmarks.soak --model-dir artifacts/wh13                 # 10,000 requests at concurrency 8
  python -m benchmarks.soak --model-dir artifacts/wh13 --requests 2000 --window 250
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.inputs import SHARED
from benchmarks.load import (
    MemoryTrace,
    Plan,
    app_memory,
    latency_ms,
    missing_model,
    outcomes,
    own_app,
    own_server,
    photos_in,
    publish,
    run_header,
    run_locust,
    unexpected,
    worker_memory,
)
from landmark.cli import positive_int
from landmark.run_files import MODEL_FILES

ROOT = Path(__file__).resolve().parents[1]
BARS = {"unexpected_errors": 0, "pss_growth_pct": 5.0, "p99_last_over_first": 1.5}
VIA = ("app", "torchserve")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="an exported run folder (make train / export)")
    p.add_argument("--backend", choices=list(MODEL_FILES), default="onnx")
    p.add_argument("--via", choices=VIA, default="app", help="send through the app (the exposed path) or to "
                   "TorchServe directly")
    p.add_argument("--requests", type=positive_int, default=10_000)
    p.add_argument("--concurrency", type=positive_int, default=8)
    p.add_argument("--bad-every", type=positive_int, default=20, help="every n-th request is a bad input (20: 5%%)")
    p.add_argument("--window", type=positive_int, default=1000, help="requests per latency window")
    p.add_argument("--photos", type=Path, nargs="+",
                   help="photo folders (default: the model's own test split and everyday/test)")
    p.add_argument("--photos-per-folder", type=positive_int, default=100)
    p.add_argument("--workers", type=positive_int, help="workers per model (default: serve_config's)")
    p.add_argument("--serve-venv", type=Path, help="run TorchServe from this venv (make serve-venv: CPU-only torch)")
    p.add_argument("--memory-every", type=float, default=5.0, help="seconds between worker memory samples")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return p


def default_photo_dirs(model_dir: Path) -> list[Path]:
    from landmark.run_files import read_meta

    return [Path(read_meta(model_dir).model.data_dir) / "test", SHARED / "everyday" / "test"]


def windows(records: list[dict], size: int) -> list[dict]:
    """Photo latency and throughput of each consecutive ``size`` requests (in plan order)."""
    out = []
    for i in range(0, len(records), size):
        chunk = records[i:i + size]
        photos = [r for r in chunk if r["kind"] == "photo" and r["status"] == 200]
        span = max(r["start"] + r["ms"] / 1e3 for r in chunk) - min(r["start"] for r in chunk)
        out.append({"from": i, "to": i + len(chunk), "requests_per_s": len(chunk) / span if span > 0 else None,
                    **latency_ms(photos)})
    return out


def memory_growth(trace: list[dict], after: float, start: dict, end: dict) -> dict:
    """Each worker's PSS when warm (the first sample after ``after``, else ``start``) and at the end,
    and the growth in %."""
    warm = next((s["workers"] for s in trace if s["t"] >= after and s["workers"]), start)
    growth = {pid: 100 * (end[pid]["pss_mb"] / warm[pid]["pss_mb"] - 1) for pid in end if pid in warm}
    return {"warm": warm, "growth_pct": growth, "max_growth_pct": max(growth.values()) if growth else None}


def verdict(result: dict) -> dict:
    first, last = result["windows"][0].get("p99_ms"), result["windows"][-1].get("p99_ms")
    got = {"unexpected_errors": result["unexpected"]["count"],
           "pss_growth_pct": result["memory"]["max_growth_pct"],
           "p99_last_over_first": last / first if first and last else None}
    ok = {key: got[key] is not None and got[key] <= limit for key, limit in BARS.items()}
    return {"bars": BARS, "measured": got, "passed": ok, "pass": all(ok.values())}


def soak(args: argparse.Namespace, work: Path) -> dict:
    dirs = args.photos or default_photo_dirs(args.model_dir)
    photos = photos_in(dirs, args.photos_per_folder)
    if not photos:
        raise FileNotFoundError(f"no photos in {[str(d) for d in dirs]}")
    plan = Plan.mixed(work / "soak", photos, args.requests, args.bad_every)
    warmup = Plan.mixed(work / "warmup", photos, 10 * args.concurrency)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(own_server(args.model_dir, args.backend, workers=args.workers,
                                                venv=args.serve_venv))
        app = stack.enter_context(own_app(server, work / "app")) if args.via == "app" else None
        target = app or server
        run_locust(target, warmup, args.concurrency, timeout_s=300)
        pids, start_memory = server.worker_pids(), worker_memory(server)
        app_start = app_memory(app) if app else None
        timeout = 300 + args.requests  # a generous bound (1 request/s), so a hang ends the run
        with MemoryTrace(server, args.memory_every) as trace:
            t0 = time.time()
            records = run_locust(target, plan, args.concurrency, timeout)
            wall = time.time() - t0
        end_memory, end_pids = worker_memory(server), server.worker_pids()
        app_end = app_memory(app) if app else None
        describe = server.describe()
    wins = windows(records, args.window)
    first_window_end = max(r["start"] + r["ms"] / 1e3 for r in records[:args.window])
    bad = unexpected(records)
    result = {
        "photos": {"folders": [str(d) for d in dirs], "count": len(photos)},
        "via": args.via, "app": {"start": app_start, "end": app_end} if app_start else None,
        "server": {"workers": len(pids), "batch_size": describe.get("batchSize"),
                   "max_batch_delay": describe.get("maxBatchDelay"), "cold_start_s": server.cold_start_s},
        "requests": len(records), "wall_s": wall, "requests_per_s": len(records) / wall,
        "outcomes": outcomes(records), "unexpected": {"count": len(bad), "examples": bad[:10]},
        "workers_replaced": sorted(set(pids) ^ set(end_pids)),
        "windows": wins,
        "memory": {"start": start_memory, "end": end_memory, "trace": trace.samples,
                   **memory_growth(trace.samples, first_window_end, start_memory, end_memory)},
    }
    result["verdict"] = verdict(result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if why := missing_model(args.model_dir):
        print(why, file=sys.stderr)
        return 2
    from benchmarks.soak_report import save_soak_chart, soak_markdown

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = {**run_header(args, t0), **soak(args, Path(tmp)), "load_average_end": os.getloadavg()}
    publish(args.out_dir, "soak", t0, result, soak_markdown(result), save_soak_chart)
    return 0 if result["verdict"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
