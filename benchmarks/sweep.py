"""Serving settings by measurement (``make sweep``): the same Locust load against the served model
for each worker count, batch size, batching delay and intra-op threads per worker, then an overload past
``job_queue_size``, and the slowest legitimate request (a photo at the pixel limit) against the archive's
``responseTimeout``. The values in serve_config/config.properties and handlers/settings.py cite this run.

Writes benchmarks/results/sweep-<host>-<time>.{json,md} and the README section between its markers.

  python -m benchmarks.sweep --model-dir artifacts/wh13
  python -m benchmarks.sweep --model-dir artifacts/wh13 --backend onnx-int8 --grid 2,2,1,1 1,2,1,2 2,4,5,1
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.load import (
    Plan,
    archive_settings,
    latency_ms,
    missing_model,
    outcomes,
    own_server,
    photos_in,
    publish,
    run_header,
    run_locust,
    worker_memory,
)
from benchmarks.readme import README, write_section
from handlers.settings import CONFIG, RESPONSE_TIMEOUT_S, read_properties
from landmark.cli import positive_int
from landmark.preprocess import DEFAULT_MAX_PIXELS
from landmark.run_files import MODEL_FILES

ROOT = Path(__file__).resolve().parents[1]
# (workers, batch size, max batch delay ms, threads per worker): each axis varied around the shipped
# 2 / 2 / 1 / 1 (handlers.settings); one worker with two threads is the other way to use both cores
GRID = [(2, 2, 1, 1), (1, 2, 1, 1), (3, 2, 1, 1), (2, 1, 1, 1), (2, 4, 1, 1), (2, 8, 1, 1), (2, 2, 5, 1),
        (2, 2, 20, 1), (1, 2, 1, 2), (1, 8, 5, 2), (2, 2, 1, 2)]


def grid_cell(text: str) -> tuple[int, int, int, int]:
    """``W,B,D,T``: workers, batch size, max batch delay ms, threads per worker."""
    try:
        w, b, d, t = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected workers,batch,delay_ms,threads, got {text!r}") from None
    if min(w, b, t) < 1 or d < 0:
        raise argparse.ArgumentTypeError(f"expected workers, batch, threads >= 1 and delay >= 0, got {text!r}")
    return w, b, d, t


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--backend", choices=list(MODEL_FILES), default="onnx")
    p.add_argument("--requests", type=positive_int, default=1000, help="requests per setting")
    p.add_argument("--concurrency", type=positive_int, default=8)
    p.add_argument("--overload", type=positive_int, default=4, help="overload concurrency = this x job_queue_size")
    p.add_argument("--grid", type=grid_cell, nargs="+", default=GRID,
                   help="settings to measure, each W,B,D,T: workers,batch,delay_ms,threads (default: GRID)")
    p.add_argument("--no-grid", action="store_true", help="only the overload and the slowest request")
    p.add_argument("--readme", type=Path, default=README, help="README whose generated section to rewrite")
    p.add_argument("--no-readme", dest="readme", action="store_const", const=None)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return p


def measure(server, photos: list[Path], n: int, concurrency: int, work: Path) -> dict:
    records = run_locust(server, Plan.mixed(work, photos, n), concurrency, timeout_s=600)
    ok = [r for r in records if r["status"] == 200]
    span = max(r["start"] + r["ms"] / 1e3 for r in records) - min(r["start"] for r in records)
    return {"requests": len(records), "ok_per_s": len(ok) / span, "outcomes": outcomes(records),
            **latency_ms(ok)}


def largest_photo(photo: Path, fmt: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """``photo`` scaled up to just under the pixel limit: the slowest body of ``fmt`` the handler accepts
    (a JPEG decodes at a reduced scale, a PNG never does)."""
    with Image.open(photo) as img:
        scale = (0.98 * max_pixels / (img.width * img.height)) ** 0.5
        big = img.convert("RGB").resize((int(img.width * scale), int(img.height * scale)))
    buf = io.BytesIO()
    big.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


def slowest_request(server, photo: Path, repeats: int = 3) -> dict:
    """Worst seconds of ``repeats`` posts of the largest JPEG and PNG (PNGs over max_request_size are skipped)."""
    limit = int(read_properties(CONFIG)["max_request_size"])
    out = {}
    for fmt in ("JPEG", "PNG"):
        body = largest_photo(photo, fmt)
        if len(body) > limit:
            out[fmt] = {"bytes": len(body), "skipped": "over max_request_size"}
            continue
        seconds = []
        for _ in range(repeats):
            t = time.perf_counter()
            r = server.keys.send(lambda h, body=body, fmt=fmt: httpx.post(
                server.url(), content=body, timeout=300, headers=h), {"Content-Type": f"image/{fmt.lower()}"})
            seconds.append(time.perf_counter() - t)
            r.raise_for_status()
        out[fmt] = {"bytes": len(body), "max_s": max(seconds), "median_s": float(np.median(seconds))}
    return out


def sweep(args: argparse.Namespace, work: Path) -> dict:
    from benchmarks.soak import default_photo_dirs

    photos = photos_in(default_photo_dirs(args.model_dir)[:1], 100)
    rows = []
    for i, (workers, batch, delay, threads) in enumerate([] if args.no_grid else args.grid):
        settings = archive_settings(batch_size=batch, max_batch_delay=delay, threads=threads)
        with own_server(args.model_dir, args.backend, settings, workers=workers) as server:
            run_locust(server, Plan.mixed(work / f"warm{i}", photos, 10 * args.concurrency), args.concurrency, 300)
            row = {"workers": workers, "batch_size": batch, "max_batch_delay": delay, "threads": threads,
                   **measure(server, photos, args.requests, args.concurrency, work / f"run{i}"),
                   "worker_pss_mb": [m["pss_mb"] for m in worker_memory(server).values()]}
        print(f"workers {workers} batch {batch} delay {delay} ms threads {threads}: {row['ok_per_s']:.1f}/s, "
              f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms", flush=True)
        rows.append(row)
    queue = int(read_properties(CONFIG)["job_queue_size"])
    with own_server(args.model_dir, args.backend) as server:
        over = measure(server, photos, args.requests, args.overload * queue, work / "overload")
        slow = slowest_request(server, photos[0])
    return {"grid": rows, "overload": {"job_queue_size": queue, "concurrency": args.overload * queue, **over},
            "slowest_request": slow,
            "response_timeout_s": RESPONSE_TIMEOUT_S}


def _seconds(v: dict) -> str:
    return f"{v['max_s']:.2f} s" if "max_s" in v else v["skipped"]


def grid_table(result: dict) -> list[str]:
    """One row per setting (results before the threads axis: the handler's 1 thread)."""
    lines = ["| workers | batch | delay ms | threads | ok/s | p50 ms | p99 ms | worker PSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {r['workers']} | {r['batch_size']} | {r['max_batch_delay']} | {r.get('threads', 1)} | "
                    f"{r['ok_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                    f"{', '.join(f'{p:.0f}' for p in r['worker_pss_mb'])} |" for r in result["grid"]]


def setup_line(result: dict) -> str:
    m = result["machine"]
    return (f"{m['cpu']}, {m['cores_logical']} logical cores; started {result['started_at']}; "
            f"`{result['model_dir']}` ({result['backend']}); Locust, {result['settings']['requests']} photo requests "
            f"per row at concurrency {result['settings']['concurrency']}, straight to TorchServe.")


def readme_section(result: dict, source: str) -> str:
    """The README's figures of this run (benchmarks.readme writes them between the markers)."""
    return "\n".join([f"Generated by `make sweep` from `benchmarks/results/{source}`: {setup_line(result)}", "",
                      *grid_table(result)])


def markdown(result: dict) -> str:
    lines = [f"# Serving settings: {result['model_dir']} ({result['backend']})", "", setup_line(result), "",
             *grid_table(result)]
    o, s = result["overload"], result["slowest_request"]
    lines += ["", f"Overload: concurrency {o['concurrency']} against job_queue_size {o['job_queue_size']}: "
              f"outcomes {o['outcomes']}; answered p50 {o.get('p50_ms', 0):.0f} ms, p99 {o.get('p99_ms', 0):.0f} ms.",
              "", "Slowest accepted requests (a photo scaled to just under the pixel limit), worst of 3, against "
              f"the archive's responseTimeout {result['response_timeout_s']} s: "
              + "; ".join(f"{fmt} {v['bytes'] / 2**20:.1f} MB: {_seconds(v)}" for fmt, v in s.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if why := missing_model(args.model_dir):
        print(why, file=sys.stderr)
        return 2
    t0 = time.time()
    result = {**run_header(args, t0), "model_dir": str(args.model_dir), "backend": args.backend}
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        result.update(sweep(args, Path(tmp)))
    stem = publish(args.out_dir, "sweep", t0, result, markdown(result))
    if args.readme is not None and result["grid"]:
        write_section(args.readme, "sweep", stem.with_suffix(".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
