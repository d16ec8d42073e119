"""Latency benchmarks of the exported landmark models and of the served endpoint (``make bench``).

For each model folder and backend (PyTorch eager, TorchScript, ONNX Runtime CPU FP32/INT8 and CUDA,
TorchScript CUDA) at each batch size: warm-up, then timed calls until the per-cell budget is spent; mean /
p50 / p90 / p99 latency, images/s, peak memory, GFLOP/s against this machine's measured matmul
peak, and the largest probability difference from eager on identical inputs. Then the TorchServe
endpoint at several concurrencies against the in-process cost of the same JPEG. Prints a table
and writes benchmarks/results/<host>-<date>.json and .png.

  python -m benchmarks.run                                   # artifacts/scratch + artifacts/transfer
  python -m benchmarks.run --model-dirs artifacts/transfer --budget 2 --no-serve
  python -m benchmarks.run --url http://127.0.0.1:8080/predictions/landmark --token-file logs/torchserve/key_file.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.machine import default_threads, pin_threads
from landmark.cli import non_negative_int, positive_float, positive_int
from landmark.run_files import META, MODEL_FILES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = (ROOT / "artifacts" / "scratch", ROOT / "artifacts" / "transfer")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def get_args_parser() -> argparse.ArgumentParser:
    from benchmarks.backends import BACKENDS
    from benchmarks.inputs import DEFAULT_PHOTOS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dirs", nargs="+", type=Path, default=list(DEFAULT_MODELS),
                   help="exported model folders (a missing one is reported and skipped)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 8, 32])
    p.add_argument("--threads", type=positive_int, default=default_threads(),
                   help="intra-op threads for torch and ONNX Runtime alike (default: physical cores)")
    p.add_argument("--budget", type=positive_float, default=2.0, help="seconds of timed calls per cell (hard cap 2x)")
    p.add_argument("--min-iters", type=positive_int, default=30)
    p.add_argument("--max-iters", type=positive_int, default=1000)
    p.add_argument("--warmup", type=non_negative_int, default=5)
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="photo folder for the inputs")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--peak-size", type=positive_int, default=1024, help="matmul side for the peak GFLOP/s")
    g = p.add_argument_group("served endpoint")
    g.add_argument("--no-serve", action="store_true", help="skip the TorchServe benchmark")
    g.add_argument("--serve-model-dir", type=Path, help="model to archive and serve (default: the last model dir)")
    g.add_argument("--serve-backend", choices=sorted(MODEL_FILES), default="onnx")
    g.add_argument("--url", help="benchmark a running server at this predictions URL instead of starting one")
    g.add_argument("--token-file", type=Path, help="key_file.json (renewed through the management API named by "
                   "the server.json beside it) or a file with the inference key (with --url)")
    g.add_argument("--photo", type=Path, help="JPEG to send (default: an 800 px shared sample photo)")
    g.add_argument("--max-batch-delay", type=non_negative_int, help="ms; default: what make archive uses")
    g.add_argument("--concurrency", nargs="+", type=positive_int, default=[1, 4, 16])
    g.add_argument("--serve-requests", type=positive_int, default=300, help="most requests per concurrency level")
    g.add_argument("--serve-budget", type=positive_float, default=10.0, help="most seconds per concurrency level")
    return p


def model_setup(model_dir: Path, args: argparse.Namespace, work: Path) -> dict:
    """Inputs, FLOPs per image and eager reference probabilities for one model folder."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.inputs import model_inputs
    from landmark.labels import softmax
    from landmark.run_files import BEST, read_meta
    from train.export import load_checkpoint

    cfg = read_meta(model_dir).preprocess
    inputs, info = model_inputs(cfg, args.photos, max(args.batch_sizes))
    np.save(work / "inputs.npy", inputs)
    setup = {"input_size": cfg.input_size, "inputs": info, "flops_per_image": None, "reference": None}
    if (model_dir / BEST).is_file():
        net, _ = load_checkpoint(model_dir)
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                net(torch.from_numpy(inputs[:1]))
            ref = softmax(net(torch.from_numpy(inputs)).numpy())
        setup.update(flops_per_image=counter.get_total_flops(), reference="eager")
        np.save(work / "reference.npy", ref)
    return setup


def run_backend(model_dir: Path, backend: str, args: argparse.Namespace, work: Path) -> dict:
    """One backend in a fresh process (see benchmarks.cell); a crash or hang becomes the row's status."""
    import numpy as np

    spec = {"model_dir": str(model_dir), "backend": backend, "threads": args.threads,
            "batch_sizes": args.batch_sizes, "inputs": str(work / "inputs.npy"), "budget_s": args.budget,
            "min_iters": args.min_iters, "max_iters": args.max_iters, "warmup": args.warmup,
            "result": str(work / f"{backend}.json"), "probs": str(work / f"{backend}.npy")}
    spec_path = work / f"{backend}.spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    limit = 120 + len(args.batch_sizes) * (2 * args.budget + 60)
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.cell", str(spec_path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "status": f"error: no result within {limit:.0f} s"}
    result_path = Path(spec["result"])
    if not result_path.is_file():
        return {"backend": backend, "status": f"error: worker exited {done.returncode}: {done.stderr[-800:]}"}
    row = {"backend": backend, **json.loads(result_path.read_text(encoding="utf-8"))}
    ref_path, probs_path = work / "reference.npy", Path(spec["probs"])
    if row["status"] == "ok" and ref_path.is_file() and probs_path.is_file():
        ref, probs = np.load(ref_path), np.load(probs_path)
        ref = ref[: len(probs)]
        row["max_abs_prob_diff"] = float(np.abs(probs - ref).max())
        row["top1_agrees"] = float((probs.argmax(1) == ref.argmax(1)).mean())
    return row


def add_flops(row: dict, flops: float | None, peak: float) -> None:
    for c in row.get("cells", []):
        if flops:
            c["gflops"] = flops * c["images_per_s"] / 1e9
            c["pct_of_peak"] = 100 * c["gflops"] / peak


def bench_model(model_dir: Path, args: argparse.Namespace, peak: float) -> dict:
    model = {"name": model_dir.name, "path": str(model_dir)}
    if not (model_dir / META).is_file():
        why = "folder not found" if not model_dir.is_dir() else "no model_meta.json (run make export)"
        print(f"[{model_dir}] skipped: {why}", flush=True)
        return {**model, "status": f"skipped: {why}"}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        model.update(status="ok", **model_setup(model_dir, args, work), backends=[])
        for backend in args.backends:
            row = run_backend(model_dir, backend, args, work)
            add_flops(row, model["flops_per_image"], peak)
            model["backends"].append(row)
            summary = ", ".join(f"b{c['batch']} p50 {c['p50_ms']:.2f} ms" for c in row.get("cells", []))
            print(f"[{model['name']}] {backend}: {summary or row['status']}", flush=True)
    return model


def bench_served(args: argparse.Namespace, models: list[dict]) -> dict:
    from benchmarks.inputs import served_photo
    from benchmarks.served import Load, bench_external, bench_own_server, token_keys
    from handlers.settings import server_urls

    body, photo = served_photo(args.photo)
    loads = [Load(c, args.serve_requests, args.serve_budget) for c in args.concurrency]
    if args.url:
        if not args.token_file:
            return {"status": "skipped: --url needs --token-file"}
        keys = token_keys(args.token_file, server_urls(args.token_file.parent)["management"])
        return {**bench_external(args.url, keys, body, loads), "photo": photo}
    ok = [Path(m["path"]) for m in models if m["status"] == "ok"]
    model_dir = args.serve_model_dir or (ok[-1] if ok else None)
    if model_dir is None:
        return {"status": "skipped: no exported model to serve"}
    try:
        served = bench_own_server(model_dir, args.serve_backend, body, loads, args.budget, args.max_batch_delay)
    except Exception as e:  # a server that will not start must not lose the in-process results above
        return {"status": f"error: {type(e).__name__}: {e}"[:2000]}
    return {**served, "model_dir": str(model_dir), "photo": photo}


def busy_warnings(result: dict) -> list[str]:
    """Other processes on the CPU make every number here unreliable (torch's thread pools most of all)."""
    cores = result["machine"]["cores_logical"]
    loads = (result["machine"]["load_average_start"][0], result["load_average_end"][0])
    if loads[0] > 0.5 * cores:
        return [f"load average {loads[0]:.1f} on {cores} cores before the run: other processes compete for the "
                "CPU, so these latencies are unreliable; rerun on a quiet machine"]
    return []


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.photo and not args.photo.is_file():
        print(f"--photo {args.photo}: no such file", file=sys.stderr)
        return 2
    if args.url and urlsplit(args.url).hostname not in LOOPBACK:
        print(f"--url {args.url}: only a server on this machine (127.0.0.1, localhost, ::1) is benchmarked",
              file=sys.stderr)
        return 2
    pin_threads(args.threads)  # before torch is imported here or in any child
    import torch

    from benchmarks.chart import save_chart
    from benchmarks.machine import machine_info, matmul_peak_gflops
    from benchmarks.report import render, write_json, write_markdown

    torch.set_num_threads(args.threads)
    t0 = time.time()
    result = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "machine": machine_info(args.threads),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                           if k not in ("token_file",)}}
    result["peak"] = matmul_peak_gflops(args.peak_size)
    print(f"matmul peak {result['peak']['gflops']:.1f} GFLOP/s at {args.threads} threads", flush=True)
    result["models"] = [bench_model(d.resolve() if d.exists() else d, args, result["peak"]["gflops"])
                        for d in args.model_dirs]
    if not args.no_serve:
        result["served"] = bench_served(args, result["models"])
    result["load_average_end"] = os.getloadavg()
    result["warnings"] = busy_warnings(result)
    result["seconds"] = round(time.time() - t0, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(t0))}"
    json_path, png_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.png"
    result["chart"] = png_path.name
    save_chart(result, png_path)
    write_json(json_path, result)
    write_markdown(json_path, result)
    print("\n" + render(result))
    print(f"\nwrote {json_path}, {png_path.name}, {json_path.with_suffix('.md').name} and LATEST.md in "
          f"{result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
