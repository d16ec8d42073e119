"""FP32 vs INT8 ONNX files of one model at ONE intra-op thread: interleaved rounds (every file once per
round, so a burst of load elsewhere hits them all alike) and the median of the rounds' p50 latencies,
at each batch size. Quicker than ``make bench`` for choosing a quantization recipe; pin it to one
core and run it on a quiet machine for figures worth quoting:

  taskset -c 1 .venv/bin/python -m benchmarks.quant_variants artifacts/wh13/model.onnx artifacts/wh13/model.int8.onnx
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchmarks.inputs import DEFAULT_PHOTOS, model_inputs
from benchmarks.stats import summarize_ms, time_loop
from landmark.cli import positive_float, positive_int
from landmark.run_files import read_meta
from landmark.runtime import load_runner


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help=".onnx files of one model folder; the first is the baseline")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 8])
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--budget", type=positive_float, default=2.0, help="seconds of timed calls per file, batch, round")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    return p


def main(args: argparse.Namespace) -> int:
    cfg = read_meta(args.models[0].parent).preprocess
    inputs, _ = model_inputs(cfg, args.photos, max(args.batch_sizes))
    runners = {path: load_runner(path, device="cpu", threads=1) for path in args.models}
    for batch_size in args.batch_sizes:
        batch = inputs[:batch_size]
        p50s: dict[Path, list[float]] = {path: [] for path in args.models}
        for _ in range(args.rounds):
            for path, run in runners.items():
                samples, _ = time_loop(lambda r=run, b=batch: r(b), args.budget, min_iters=5, warmup=3)
                p50s[path].append(summarize_ms(samples)["p50_ms"])
        base = statistics.median(p50s[args.models[0]])
        for path, rounds in p50s.items():
            med = statistics.median(rounds)
            print(f"batch {batch_size:>2}  {path}: median p50 {med:8.2f} ms over {args.rounds} rounds "
                  f"({', '.join(f'{r:.1f}' for r in rounds)}), {base / med:.2f}x the first", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
