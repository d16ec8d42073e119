"""The path users hit (``make bench-proxy``): the same closed-loop load against TorchServe directly and
through the app in front of it, in the same run, at each concurrency; and in-process ONNX Runtime
throughput of the same model, the ceiling the served figures are held against.

One JPEG (an 800 px shared photo by default), sent by Locust users that each post the next request when
the previous one returns (as ``hey -c N`` does); by default a user that got a 503 waits its Retry-After
first, as a well-behaved client does (``--no-wait-on-503``: at once, as ``hey`` does). Per path and
concurrency: photos answered per second, answers by status, p50 / p99 of the answered ones, the longest
wait of any request, the 503s' Retry-After and JSON, and the app's CPU per request. In process, with the
server idle: the model alone at ``--batch`` on all cores (``benchmarks.cell``, as ``make bench``), and
decode + preprocess + model of the same JPEG in one single-threaded process per worker (what the workers
do, without the server). The bars of issue #27 are judged on the run's own figures. Writes
benchmarks/results/proxy-<host>-<time>.{json,md} and the README section between its markers.

  python -m benchmarks.proxy --model-dir artifacts/wh13                       # c = 8, 16, 64
  python -m benchmarks.proxy --model-dir artifacts/wh13 --backend onnx-int8 --requests 2000
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
import tempfile
import time
from argparse import Namespace
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.load import (
    Plan,
    app_memory,
    archive_settings,
    latency_ms,
    missing_model,
    own_app,
    own_server,
    publish,
    run_header,
    run_locust,
    worker_memory,
)
from benchmarks.readme import README, write_section
from handlers.settings import APP_MAX_IN_FLIGHT, CONFIG, read_properties
from landmark.cli import positive_float, positive_int
from landmark.run_files import MODEL_FILES, model_file

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("torchserve", "app")
CELL_BACKEND = {"onnx": "onnx-cpu", "onnx-int8": "onnx-int8", "torchscript": "torchscript"}  # benchmarks.cell's
# issue #27's bars, judged on one run's figures
BARS = {"app_over_direct_c8": 0.9, "app_added_p50_ms_c8": 10.0, "app_max_wait_s_c64": 2.0,
        "direct_c16_over_inprocess": 0.9}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="an exported run folder (make train / export)")
    p.add_argument("--backend", choices=list(MODEL_FILES), default="onnx")
    p.add_argument("--concurrency", type=positive_int, nargs="+", default=[8, 16, 64])
    p.add_argument("--requests", type=positive_int, default=1000, help="requests per path and concurrency")
    p.add_argument("--photo", type=Path, help="the JPEG to send (default: an 800 px shared sample photo)")
    p.add_argument("--workers", type=positive_int, help="TorchServe workers (default: serve_config's)")
    p.add_argument("--max-in-flight", type=positive_int, default=APP_MAX_IN_FLIGHT,
                   help="the app's limit (default: handlers.settings.APP_MAX_IN_FLIGHT)")
    p.add_argument("--no-wait-on-503", dest="wait_on_503", action="store_false",
                   help="a client that got a 503 sends again at once (hey's way) instead of after Retry-After")
    p.add_argument("--batch", type=positive_int, default=32, help="batch of the in-process model-only figure")
    p.add_argument("--inprocess-budget", type=positive_float, default=10.0, help="seconds per in-process figure")
    p.add_argument("--readme", type=Path, default=README, help="README whose generated section to rewrite")
    p.add_argument("--no-readme", dest="readme", action="store_const", const=None)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return p


def summarize(records: list[dict]) -> dict:
    """Photos answered per second, answers by status, latency of the answered ones, the longest wait."""
    ok = [r for r in records if r["status"] == 200]
    span = max(r["start"] + r["ms"] / 1e3 for r in records) - min(r["start"] for r in records)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    shed = [r for r in records if r["status"] == 503]
    return {"requests": len(records), "ok": len(ok), "ok_per_s": len(ok) / span if span > 0 else None,
            "errors": len(records) - len(ok), "statuses": statuses, **latency_ms(ok),
            "max_wait_ms": max(r["ms"] for r in records),
            "shed": {"count": len(shed), "retry_after": sum(bool(r.get("retry_after")) for r in shed),
                     "json": sum(bool(r.get("json_error")) for r in shed)},
            "error_examples": sorted({r["error"] for r in records if r.get("error")})[:3]}


def _photos_per_s(model: str, body: bytes, budget_s: float) -> float:
    """In a fresh single-threaded process, as one worker: decode + preprocess + model of ``body``, per second."""
    from landmark.predict import Predictor

    predictor = Predictor(Path(model), device="cpu", threads=1)
    for _ in range(3):
        predictor.predict([body])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        predictor.predict([body])
        n += 1
    return n / (time.perf_counter() - t0)


def inprocess(args: Namespace, body: bytes, workers: int, work: Path) -> dict:
    """The model alone at ``--batch`` on every core, and end to end in ``workers`` single-threaded processes."""
    from benchmarks.machine import default_threads
    from benchmarks.run import run_backend
    from landmark.preprocess import load_input
    from landmark.run_files import read_meta

    crop = load_input(body, read_meta(args.model_dir).preprocess)
    np.save(work / "inputs.npy", np.stack([crop] * args.batch))
    threads = default_threads()
    cell = run_backend(args.model_dir, CELL_BACKEND[args.backend],
                       Namespace(threads=threads, batch_sizes=[args.batch], budget=args.inprocess_budget,
                                 min_iters=5, max_iters=10_000, warmup=3), work)
    model_only = ({"images_per_s": cell["cells"][0]["images_per_s"], "p50_ms": cell["cells"][0]["p50_ms"]}
                  if cell["status"] == "ok" else {"status": cell["status"]})
    path = str(model_file(args.model_dir, args.backend))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        rates = list(pool.map(_photos_per_s, [path] * workers, [body] * workers, [args.inprocess_budget] * workers))
    return {"model_only": {"batch": args.batch, "threads": threads, **model_only},
            "end_to_end": {"processes": workers, "threads": 1, "photos_per_s": sum(rates),
                           "per_process": rates}}


def measure(args: Namespace, photo: Path, work: Path) -> dict:
    """Both paths at each concurrency, interleaved (the same server, app and machine state), then in process."""
    levels = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(own_server(args.model_dir, args.backend, archive_settings(),
                                                workers=args.workers))
        app = stack.enter_context(own_app(server, work / "app", "--max-in-flight", str(args.max_in_flight)))
        targets = {"torchserve": server, "app": app}
        for via, target in targets.items():  # first requests: ORT warm-up, connections, the app's pool
            run_locust(target, Plan.mixed(work / f"warm-{via}", [photo], 10 * min(args.concurrency)),
                       min(args.concurrency), timeout_s=300)
        for c in args.concurrency:
            for via in PATHS:
                before = app_memory(app)
                records = run_locust(targets[via], Plan.mixed(work / f"{via}-c{c}", [photo], args.requests), c,
                                     timeout_s=300 + args.requests, wait_on_503=args.wait_on_503)
                level = {"via": via, "concurrency": c, **summarize(records)}
                if via == "app":
                    after = app_memory(app)
                    level["app_cpu_ms_per_request"] = 1e3 * (after["cpu_s"] - before["cpu_s"]) / len(records)
                    level["app_rss_mb"] = after["rss_mb"]
                levels.append(level)
                print(f"{via:>10} c={c:<3} {level['ok_per_s']:.1f} photos/s, statuses {level['statuses']}, "
                      f"p50 {level.get('p50_ms', 0):.0f} ms, max wait {level['max_wait_ms']:.0f} ms", flush=True)
        workers = len(server.worker_pids())
        server_info = {"workers": workers, "worker_pss_mb": [m["pss_mb"] for m in worker_memory(server).values()],
                       "job_queue_size": int(read_properties(CONFIG)["job_queue_size"]), **archive_settings(),
                       "app_max_in_flight": args.max_in_flight}
    return {"server": server_info, "levels": levels,
            "inprocess": inprocess(args, photo.read_bytes(), workers, work)}


def level(result: dict, via: str, c: int) -> dict | None:
    return next((lv for lv in result["levels"] if lv["via"] == via and lv["concurrency"] == c), None)


def verdict(result: dict) -> dict:
    """Issue #27's bars on this run's figures; None where the run lacks the level they need."""
    got: dict[str, float | None] = dict.fromkeys(BARS)
    d8, a8, a64, d16 = (level(result, "torchserve", 8), level(result, "app", 8), level(result, "app", 64),
                        level(result, "torchserve", 16))
    if d8 and a8 and d8["ok_per_s"] and a8.get("p50_ms") is not None and d8.get("p50_ms") is not None:
        got["app_over_direct_c8"] = a8["ok_per_s"] / d8["ok_per_s"]
        got["app_added_p50_ms_c8"] = a8["p50_ms"] - d8["p50_ms"]
    if a64:
        got["app_max_wait_s_c64"] = a64["max_wait_ms"] / 1e3
    ceiling = result["inprocess"]["model_only"].get("images_per_s")
    if d16 and ceiling:
        got["direct_c16_over_inprocess"] = d16["ok_per_s"] / ceiling
    at_least = {"app_over_direct_c8", "direct_c16_over_inprocess"}
    passed = {k: None if v is None else (v >= BARS[k] if k in at_least else v <= BARS[k]) for k, v in got.items()}
    if a8 is not None:
        passed["app_errors_c8"] = a8["errors"] == 0
    if a64 is not None:  # every 503 the app gave says when to retry, in JSON
        passed["app_503_json_retry_after_c64"] = a64["shed"]["retry_after"] == a64["shed"]["json"] == \
            a64["statuses"].get("503", 0)
    return {"bars": BARS, "measured": got, "passed": passed}


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(result: dict) -> list[str]:
    lines = ["| path, concurrency | photos/s | answers by status | p50 ms | p99 ms | longest wait s | "
             "app CPU ms/request |", "|---|---|---|---|---|---|---|"]
    for lv in result["levels"]:
        name = "TorchServe directly" if lv["via"] == "torchserve" else "through the app"
        statuses = ", ".join(f"{n} × {s}" for s, n in sorted(lv["statuses"].items()))
        lines.append(f"| {name}, c={lv['concurrency']} | {_f(lv['ok_per_s'], '.1f')} | {statuses} | "
                     f"{_f(lv.get('p50_ms'), '.0f')} | {_f(lv.get('p99_ms'), '.0f')} | "
                     f"{lv['max_wait_ms'] / 1e3:.2f} | {_f(lv.get('app_cpu_ms_per_request'), '.2f')} |")
    return lines


def inprocess_line(result: dict) -> str:
    ref = result["inprocess"]
    m, e = ref["model_only"], ref["end_to_end"]
    alone = (f"the model alone at batch {m['batch']} on {m['threads']} threads: {m['images_per_s']:.1f} photos/s"
             if "images_per_s" in m else f"the model alone: {m['status']}")
    return (f"In process, same model and JPEG, server idle: {alone}; decode + preprocess + model in "
            f"{e['processes']} single-threaded processes: {e['photos_per_s']:.1f} photos/s.")


def verdict_lines(result: dict) -> list[str]:
    v = result["verdict"]
    names = {"app_over_direct_c8": "through the app / TorchServe directly, photos/s at c=8",
             "app_added_p50_ms_c8": "p50 added by the app at c=8, ms", "app_errors_c8": "errors through the app at c=8",
             "app_max_wait_s_c64": "longest wait through the app at c=64, s",
             "app_503_json_retry_after_c64": "every 503 of the app at c=64 JSON with Retry-After",
             "direct_c16_over_inprocess": "TorchServe at c=16 / in-process model alone, photos/s"}
    lines = ["| bar | measured | limit | pass |", "|---|---|---|---|"]
    for key, ok in v["passed"].items():
        limit = BARS.get(key)
        bound = "-" if limit is None else (f">= {limit}" if key in ("app_over_direct_c8", "direct_c16_over_inprocess")
                                           else f"<= {limit}")
        lines.append(f"| {names[key]} | {_f(v['measured'].get(key), '.3g')} | {bound} | "
                     f"{'-' if ok is None else 'yes' if ok else 'NO'} |")
    return lines


def setup_line(result: dict) -> str:
    m, s, srv = result["machine"], result["settings"], result["server"]
    wait = "waits Retry-After after a 503" if s["wait_on_503"] else "sends again at once after a 503 (hey's way)"
    return (f"{m['cpu']}, {m['cores_logical']} logical cores; started {result['started_at']}; model "
            f"`{s['model_dir']}` ({s['backend']}), {srv['workers']} workers, batch {srv['batch_size']}, delay "
            f"{srv['max_batch_delay']} ms, job_queue_size {srv['job_queue_size']}; app max in flight "
            f"{srv['app_max_in_flight']}; {s['requests']} requests per row of `{result['photo']}`, Locust, "
            f"each client {wait}.")


def markdown(result: dict) -> str:
    return "\n".join(["# The path users hit: TorchServe directly and through the app", "", setup_line(result), "",
                      *table(result), "", inprocess_line(result), "", *verdict_lines(result)]) + "\n"


def readme_section(result: dict, source: str) -> str:
    """The README's figures of this run (benchmarks.readme writes them between the markers)."""
    return "\n".join([f"Generated by `make bench-proxy` from `benchmarks/results/{source}`: {setup_line(result)}",
                      "", *table(result), "", inprocess_line(result), "", *verdict_lines(result)])


def main(args: argparse.Namespace) -> int:
    if why := missing_model(args.model_dir):
        print(why, file=sys.stderr)
        return 2
    if args.photo and not args.photo.is_file():
        print(f"--photo {args.photo}: no such file", file=sys.stderr)
        return 2
    from benchmarks.inputs import served_photo

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="proxy-") as tmp:
        work = Path(tmp)
        body, info = served_photo(args.photo)
        photo = work / "photo.jpg"
        photo.write_bytes(body)
        result = {**run_header(args, t0), "photo": info["source"], **measure(args, photo, work)}
    result["verdict"] = verdict(result)
    stem = publish(args.out_dir, "proxy", t0, result, markdown(result))
    if args.readme is not None:
        write_section(args.readme, "proxy", stem.with_suffix(".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
