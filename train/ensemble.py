"""Average finished runs into one network: the mean of their class probabilities.

  python -m train.ensemble --runs artifacts/wh13-lite0 artifacts/wh13-lite1 artifacts/wh13-lite2 \\
      --out artifacts/wh13-ensemble
  python -m train.export --run-dir artifacts/wh13-ensemble

Members must share classes, preprocessing and data set; backbone, architecture and seed may differ.
Writes best.pt (exported like any run's), metrics.json (test set, with each member's own figure)
and confusion.png. An ensemble costs the sum of its members at inference; it earns its place where
no single network reaches the accuracy needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from landmark.cli import non_negative_int
from landmark.meta import ModelRecord
from landmark.run_files import BEST, METRICS, read_checkpoint, save_checkpoint
from train.data import PhotoDataset, find_classes, list_samples
from train.engine import pick_device
from train.evaluate import evaluate_test, write_metrics
from train.nets import build

SHARED = ("classes", "preprocess", "data_fingerprint")  # what every member must agree on


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="two or more python -m train.train outputs")
    p.add_argument("--out", type=Path, required=True, help="output folder of the ensemble")
    p.add_argument("--data-dir", type=Path, help="photos for the test evaluation (default: the members' data)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch intra-op threads (0 = all cores)")
    return p


def mismatch(runs: list[Path], records: list[ModelRecord]) -> str | None:
    """Why these members cannot be averaged, or None."""
    if len(runs) < 2:
        return f"an ensemble needs at least 2 runs, got {len(runs)}"
    for run, record in zip(runs, records, strict=True):
        if record.arch == "ensemble":
            return f"{run} is an ensemble already: list its members instead"
        for key in SHARED:
            if getattr(record, key) != getattr(records[0], key):
                return f"{run} differs from {runs[0]} in {key}: members must share classes, preprocessing and data"
    return None


def _test_accuracy(run: Path) -> float | None:
    path = run / METRICS
    return json.loads(path.read_text())["test_accuracy"] if path.is_file() else None


def main(args: argparse.Namespace) -> int:
    if (args.out / BEST).exists():
        print(f"error: {args.out} holds a previous run: use another --out", file=sys.stderr)
        return 2
    checkpoints = [read_checkpoint(run) for run in args.runs]
    records = [record for record, _ in checkpoints]
    problem = mismatch(args.runs, records)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    first = records[0]
    data_dir = args.data_dir or Path(first.data_dir)
    classes = [c.label for c in first.classes]
    try:
        if find_classes(data_dir / "train") != classes:
            raise ValueError(f"{data_dir} has other classes than the members were trained on")
        test_ds = PhotoDataset(list_samples(data_dir / "test", classes), first.preprocess, desc="decode test")
    except (OSError, ValueError) as e:  # ImageError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2

    members = [{"arch": r.arch, "model_args": r.model_args} for r in records]
    record = replace(first, arch="ensemble", model_args={"members": members}, recipe=None,
                     train_args={"runs": " ".join(str(run) for run in args.runs)})
    net = build(record)
    for member, (_, state) in zip(net.members, checkpoints, strict=True):
        member.load_state_dict(state["net"])
    device = pick_device(args.device)
    metrics, cm = evaluate_test(net.to(device), record, test_ds, device)
    metrics["members"] = [{"run_dir": str(run), "arch": r.arch, "backbone": r.model_args.get("backbone"),
                           "test_accuracy": _test_accuracy(run)} for run, r in zip(args.runs, records, strict=True)]
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out / BEST, record, net.cpu().state_dict())
    write_metrics(args.out, metrics, cm)
    own = ", ".join(f"{m['test_accuracy']:.4f}" for m in metrics["members"] if m["test_accuracy"] is not None)
    print(f"ensemble of {len(records)}: test accuracy {metrics['test_accuracy']:.4f}  top-5 "
          f"{metrics['test_top5']:.4f}  n={metrics['n_test']}  (members: {own or 'no metrics.json'})  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
