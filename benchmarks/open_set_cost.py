"""What the open-set decision's references and gate cost per request: one photo answered end to end
(decode + preprocess + network + decision + answer JSON, ``Predictor.predict``, as the handler runs it)
with the shipped decision, against the same model and photos with the reference bank and gate left out
(the first decision: calibrated top-1 x P(known)), interleaved photo by photo so drift favours neither.

  python -m benchmarks.open_set_cost --model-dir artifacts/wh13        # make bench-open-set
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from benchmarks.inputs import SHARED, photo_files
from benchmarks.load import publish, run_header
from landmark.cli import positive_int
from landmark.predict import Predictor
from landmark.run_files import model_file

RESULTS = Path(__file__).resolve().parent / "results" / "open-set"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--photos", type=Path, default=SHARED / "world_heritage13" / "test")
    p.add_argument("--n", type=positive_int, default=60, help="photos, each answered --repeats times both ways")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    return p


def main(args: argparse.Namespace) -> int:
    if not (args.model_dir / "model_meta.json").is_file():
        print(f"{args.model_dir}: no exported model (make train RECIPE=wh13)", file=sys.stderr)
        return 2
    photos = photo_files(args.photos)[:args.n]
    if not photos:
        print(f"{args.photos}: no photos", file=sys.stderr)
        return 2
    t0 = time.time()
    shipped = Predictor(model_file(args.model_dir, "onnx"), device="cpu", threads=args.threads)
    first = copy.copy(shipped)  # the same network session: only the decision differs
    first.open_set = dataclasses.replace(shipped.open_set, references=None, gate=None, gate_exponent=0.0)
    ways = {"shipped decision (references + gate)": shipped, "without references and gate": first}
    times: dict[str, list[float]] = {w: [] for w in ways}
    for path in [photos[0], *photos]:  # the first photo once more, untimed below: warm-up
        data = path.read_bytes()
        for way, predictor in ways.items():
            best = min(_timed(predictor, data) for _ in range(args.repeats))
            times[way].append(best)
    rows = {w: {"p50_ms": statistics.median(v[1:]), "p90_ms": statistics.quantiles(v[1:], n=10)[-1]}
            for w, v in times.items()}
    [new, old] = rows.values()
    result = {**run_header(args, t0), "model_dir": str(args.model_dir), "photos": len(photos), "rows": rows,
              "p50_ratio": new["p50_ms"] / old["p50_ms"], "references": len(shipped.open_set.references.labels)}
    m = result["machine"]
    lines = [f"# Open-set decision cost: {args.model_dir}", "",
             f"{m['cpu']}, {args.threads} threads; {len(photos)} photos of `{args.photos}`, best of {args.repeats} "
             f"each, one photo per request (`Predictor.predict`, as the handler runs it), interleaved.", "",
             "| decision | p50 ms | p90 ms |", "|---|---|---|"]
    lines += [f"| {w} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} |" for w, r in rows.items()]
    lines += ["", f"p50 with references and gate / without: {result['p50_ratio']:.3f} "
              f"({result['references']} reference embeddings)."]
    publish(args.out_dir, "cost", t0, result, "\n".join(lines) + "\n")
    return 0


def _timed(predictor: Predictor, data: bytes) -> float:
    t = time.perf_counter()
    predictor.predict([data], 5)
    return (time.perf_counter() - t) * 1e3


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
