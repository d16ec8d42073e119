"""Evaluate an exported model's open-set decision on test photos it knows (also shrunk to smaller
views, as thumbnails and shared copies arrive) and on photos of places it does not know, each
unknown set on its own, beside the max-probability baseline (raw top-1 probability >= 0.5, the
tagger's rule before the open-set decision):

  python -m train.eval_open_set --model-dir artifacts/wh13 --unknown ../shared/data/indian_monuments49/test \\
      ../shared/data/everyday/test ../shared/data/porto5

An unknown set whose data set is not among the model's negatives is marked *leave-source-out*: the
decision never saw photos of that source, the honest figure for the world's other landmarks.
Writes open_set_eval.json, open_set_eval.md (the tables) and open_set_eval.png (risk-coverage)
into --model-dir. Every photo goes through ``landmark.predict.Predictor``, the served code path.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from landmark import atomic
from landmark.cli import positive_int, precision
from landmark.labels import softmax
from landmark.predict import Predictor
from landmark.preprocess import ImageError
from landmark.run_files import MODEL_FILES
from train.data import image_files
from train.open_set import VIEW_SIZES, shrunk

BASELINE_THRESHOLD = 0.5
JSON, MARKDOWN, CHART = "open_set_eval.json", "open_set_eval.md", "open_set_eval.png"


@dataclass
class Scored:
    """One photo set through the model: the decision's and the baseline's view of each photo."""

    name: str
    confidence: np.ndarray  # the open-set decision's calibrated confidence
    tagged: np.ndarray
    baseline: np.ndarray  # raw max softmax probability
    correct: np.ndarray  # known photo with the right top-1 (always False for an unknown set)


def set_name(folder: Path) -> str:
    return folder.parent.name + "/" + folder.name if folder.name in ("test", "train") else folder.name


def source(folder: Path) -> Path:
    """The data set a folder belongs to: a train/ or test/ split's parent, else the folder itself."""
    folder = folder.resolve()
    return folder.parent if folder.name in ("test", "train") else folder


def score(predictor: Predictor, folder: Path, known: bool, min_precision: float | None, batch: int,
          view: int | None = None) -> Scored:
    labels = {c.label: i for i, c in enumerate(predictor.classes)}
    files = image_files(folder)
    if not files:
        raise SystemExit(f"no photos under {folder}")
    if known and not {f.parent.name for f in files} <= set(labels):
        raise SystemExit(f"{folder}: class folders unknown to the model; pass it with --unknown instead")
    parts = []
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        try:
            out = predictor.outputs(np.stack([predictor.preprocess(shrunk(p, view) if view else p) for p in chunk]))
        except ImageError as e:
            raise SystemExit(f"{folder}: {e}") from e
        decisions = predictor.open_set.decide(out, min_precision)
        raw = softmax(out.logits)
        truth = np.array([labels.get(p.parent.name, -1) if known else -1 for p in chunk])
        parts.append((np.array([d.confidence for d in decisions]), np.array([d.tagged for d in decisions]),
                      raw.max(1), (truth >= 0) & (raw.argmax(1) == truth)))
    name = set_name(folder) + (f" at {view} px" if view else "")
    return Scored(name, *(np.concatenate(col) for col in zip(*parts, strict=True)))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a known photo scores above an unknown one), ties counted half."""
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + ties / 2)


def gap(scores: np.ndarray, correct: np.ndarray, n_known: int) -> float:
    """Global Average Precision (Google Landmark Recognition): predictions sorted by confidence,
    precision at every correct one, summed and divided by the number of known photos."""
    order = np.argsort(-scores, kind="stable")
    hit = correct[order].astype(np.float64)
    return float((np.cumsum(hit) / np.arange(1, len(hit) + 1) * hit).sum() / n_known)


def summarise(known: Scored, unknown: list[Scored], which: str) -> dict:
    """One method's figures; ``which`` is "decision" or "baseline"."""
    def conf(s: Scored) -> np.ndarray:
        return s.confidence if which == "decision" else s.baseline

    def tags(s: Scored) -> np.ndarray:
        return s.tagged if which == "decision" else s.baseline >= BASELINE_THRESHOLD

    tagged = tags(known)
    mixture = [known, *unknown]
    return {
        "coverage": float(tagged.mean()),
        "precision": float(known.correct[tagged].mean()) if tagged.any() else None,
        "false_tags": {u.name: float(tags(u).mean()) for u in unknown},
        "auroc": {u.name: auroc(conf(known), conf(u)) for u in unknown},
        "gap": gap(np.concatenate([conf(s) for s in mixture]), np.concatenate([s.correct for s in mixture]),
                   len(known.correct)),
        "gap_without_distractors": gap(conf(known), known.correct, len(known.correct)),
    }


def risk_coverage(known: Scored, unknown: list[Scored], out: Path, title: str) -> None:
    """Error rate of the tags against the share of all photos tagged, as the threshold falls."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for which, label in (("decision", "open-set decision"), ("baseline", "max probability")):
        scores = np.concatenate([(s.confidence if which == "decision" else s.baseline) for s in [known, *unknown]])
        correct = np.concatenate([s.correct for s in [known, *unknown]])
        order = np.argsort(-scores, kind="stable")
        n = np.arange(1, len(order) + 1)
        ax.plot(n / len(order), 1 - np.cumsum(correct[order]) / n, label=label)
    n_all = sum(len(s.correct) for s in [known, *unknown])
    tagged = sum(int(s.tagged.sum()) for s in [known, *unknown])
    wrong = int((known.tagged & ~known.correct).sum()) + sum(int(s.tagged.sum()) for s in unknown)
    ax.plot([tagged / n_all], [wrong / max(tagged, 1)], "o", color="black", label="stored operating point")
    ax.set(xlabel="coverage (share of all photos tagged)", ylabel="risk (share of tags that are wrong)",
           title=title, ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def markdown(result: dict) -> str:
    unknown = list(result["decision"]["false_tags"])
    head = ["method", "known test tagged", "precision of tags", *[f"{u} tagged" for u in unknown],
            *[f"AUROC vs {u}" for u in unknown], "GAP (all)", "GAP (known only)"]
    rows = []
    for which, name in (("baseline", f"max probability >= {BASELINE_THRESHOLD}"),
                        ("decision", f"open-set decision, precision target {result['min_precision']:.0%}")):
        r = result[which]
        prec = "–" if r["precision"] is None else f"{r['precision']:.1%}"
        rows.append([name, f"{r['coverage']:.1%}", prec, *[f"{r['false_tags'][u]:.1%}" for u in unknown],
                     *[f"{r['auroc'][u]:.3f}" for u in unknown], f"{r['gap']:.3f}",
                     f"{r['gap_without_distractors']:.3f}"])
    lines = [f"Model `{result['model']}` ({result['n_known']} known test photos: {result['known']}; unknown: "
             + ", ".join(f"{u} ({n})" for u, n in result["n_unknown"].items()) + ")", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    d, b = result["decision"], result["baseline"]
    lines += ["", "| photos of places the model does not know | photos | source in the model's negatives | "
              "tagged (decision) | tagged (baseline) | AUROC known vs these |", "|---|---|---|---|---|---|"]
    lines += [f"| {u} | {n} | {'yes' if u in result['seen_sources'] else 'no: leave-source-out'} | "
              f"{d['false_tags'][u]:.1%} | {b['false_tags'][u]:.1%} | {d['auroc'][u]:.3f} |"
              for u, n in result["n_unknown"].items()]
    if result["views"]:
        lines += ["", "| known test photos shrunk to (shorter side, JPEG q85) | top-1 | tagged | precision of tags |",
                  "|---|---|---|---|"]
        lines += [f"| {v['name']} | {v['top1']:.1%} | {v['coverage']:.1%} | "
                  + ("–" if v["precision"] is None else f"{v['precision']:.1%}") + " |" for v in result["views"]]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="an exported run folder")
    p.add_argument("--known", type=Path, help="test photos of the model's classes (<class>/ folders; default: the "
                   "test/ split of the model's data set)")
    p.add_argument("--unknown", type=Path, nargs="+", required=True, help="folders of photos of unknown places")
    p.add_argument("--backend", choices=sorted(MODEL_FILES), default="onnx")
    p.add_argument("--min-precision", type=precision, help="operating point (default: the model's stored one)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--views", type=positive_int, nargs="*", default=list(VIEW_SIZES),
                   help="also score the known photos shrunk to these shorter sides (JPEG q85)")
    return p


def main(args: argparse.Namespace) -> int:
    predictor = Predictor.from_dir(args.model_dir, args.backend, device="cpu")
    args.known = args.known or Path(predictor.meta.model.data_dir) / "test"
    for folder in (args.known, *args.unknown):
        if not folder.is_dir():
            print(f"error: folder not found: {folder}", file=sys.stderr)
            return 2
    known = score(predictor, args.known, True, args.min_precision, args.batch_size)
    unknown = [score(predictor, f, False, args.min_precision, args.batch_size) for f in args.unknown]
    target = predictor.open_set.target(args.min_precision)
    negatives = {source(Path(p)) for p in predictor.meta.model.train_args.get("negatives", [])}
    views = []
    for size in args.views:
        v = score(predictor, args.known, True, args.min_precision, args.batch_size, size)
        views.append({"name": v.name, "size": size, "top1": float(v.correct.mean()), "coverage": float(v.tagged.mean()),
                      "precision": float(v.correct[v.tagged].mean()) if v.tagged.any() else None})
    fitted = predictor.meta.open_set
    result = {"model": str(args.model_dir), "known": known.name, "n_known": len(known.correct),
              "n_unknown": {u.name: len(u.correct) for u in unknown}, "min_precision": target,
              "seen_sources": [u.name for u, f in zip(unknown, args.unknown, strict=True) if source(f) in negatives],
              "views": views, "threshold": predictor.open_set.threshold(target),
              "open_set": None if fitted is None else asdict(fitted),
              "test_top1": float(known.correct.mean()),
              "decision": summarise(known, unknown, "decision"), "baseline": summarise(known, unknown, "baseline")}
    atomic.write_text(args.model_dir / JSON, json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    atomic.write_text(args.model_dir / MARKDOWN, table)
    risk_coverage(known, unknown, args.model_dir / CHART, f"{args.model_dir.name}: {known.name} + unknown places")
    print(table + f"\nwrote {JSON}, {MARKDOWN}, {CHART} to {args.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
