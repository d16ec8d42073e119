"""Fit the open-set decision (``landmark.open_set``) of an exported network, at export time.

Nothing is fitted on a test split. The temperature and the operating point come from the run's own
validation split (the photos training held out) plus held-out negatives; the P(known) head from the
training photos plus the other half of the negatives. Negatives are folders of photos that show no
landmark this model knows (everyday scenes, another landmark set's train/ split); their files are
split alternately by sorted path into a fitting half and a validation half.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from landmark.meta import ModelRecord
from landmark.open_set import OpenSet, features, log_softmax, logsumexp, scores, unit
from landmark.preprocess import PreprocessConfig, load_input
from landmark.runtime import Outputs
from train.data import DataSplits, image_files

BATCH = 32


@dataclass
class Features:
    logits: np.ndarray
    embedding: np.ndarray
    labels: np.ndarray  # class index; -1 for a negative photo

    @classmethod
    def concat(cls, parts: list[Features]) -> Features:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("logits", "embedding", "labels")))


def extract(run, paths: list[Path], labels: list[int], cfg: PreprocessConfig) -> Features:
    """The exported network's two outputs for these photos, in batches."""
    out: list[Outputs] = [run(np.stack([load_input(p, cfg) for p in paths[i:i + BATCH]]))
                          for i in range(0, len(paths), BATCH)]
    return Features(np.concatenate([o.logits for o in out]), np.concatenate([o.embedding for o in out]),
                    np.asarray(labels, dtype=np.int64))


def negative_photos(folders: list[Path]) -> tuple[list[Path], list[Path]]:
    """(fitting half, validation half) of every photo under the negative folders."""
    fit, val = [], []
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"negatives folder not found: {folder}")
        photos = image_files(folder)
        if len(photos) < 2:
            raise SystemExit(f"negatives folder {folder} holds {len(photos)} photos; need at least 2")
        fit += photos[0::2]
        val += photos[1::2]
    return fit, val


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """argmin_T of the validation NLL of softmax(logits / T), over a log grid refined once."""
    def nll(t: float) -> float:
        return float(-log_softmax(logits / t)[np.arange(len(labels)), labels].mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 400))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = best * np.exp(np.linspace(-0.02, 0.02, 81))
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-3, steps: int = 500,
                 lr: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression, full batch, Adam: (weight [D, C], bias [C])."""
    w, b = np.zeros((x.shape[1], n_classes)), np.zeros(n_classes)
    onehot = np.eye(n_classes)[y] / len(y)
    moments = [np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        z = x @ w + b
        g = np.exp(z - logsumexp(z)[:, None]) / len(y) - onehot
        for param, grad, m, v in ((w, x.T @ g + l2 * w, *moments[:2]), (b, g.sum(0), *moments[2:])):
            m *= beta1
            m += (1 - beta1) * grad
            v *= beta2
            v += (1 - beta2) * grad**2
            param -= lr * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps)
    return w, b


def ece(log_probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 probability (equal-width bins)."""
    conf, correct = np.exp(log_probs.max(1)), log_probs.argmax(1) == labels
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    return float(sum(abs(correct[idx == i].mean() - conf[idx == i].mean()) * (idx == i).mean()
                     for i in range(bins) if (idx == i).any()))


def fit(train: Features, val: Features, neg_fit: Features | None, neg_val: Features | None,
        min_precision: float) -> tuple[OpenSet, dict]:
    """The decision and a summary of how it was fitted (for model_meta.json)."""
    n_classes = train.logits.shape[1]
    temperature = fit_temperature(val.logits, val.labels)
    head = None
    if neg_fit is not None:
        mean = unit(train.embedding.astype(np.float64)).mean(0)
        x = features(np.concatenate([train.embedding, neg_fit.embedding]), mean)
        y = np.concatenate([train.labels, np.full(len(neg_fit.labels), n_classes)])
        weight, bias = fit_logistic(x, y, n_classes + 1)
        # stored as float32: the validation scores below must be those of the stored head
        head = {k: v.astype(np.float32).astype(np.float64) for k, v in
                {"mean": mean, "weight": weight, "bias": bias}.items()}
    queries = Features.concat([val, neg_val]) if neg_val is not None else val
    log_p, _, log_conf = scores(temperature, head, Outputs(queries.logits, queries.embedding))
    correct = (queries.labels >= 0) & (log_p.argmax(1) == queries.labels)
    decision = OpenSet(temperature, head, log_conf, correct, min_precision)
    tagged = log_conf >= decision.log_threshold()
    known = queries.labels >= 0
    summary = {
        "method": "temperature-scaled softmax x P(known) of a (K+1)-way logistic head" if head is not None
        else "temperature-scaled softmax (no negatives given)",
        "temperature": temperature, "min_precision": min_precision, "threshold": decision.threshold(),
        "val_known": int(known.sum()), "val_negative": int((~known).sum()),
        "val_coverage": float(tagged[known].mean()), "val_negatives_tagged": float(tagged[~known].mean()),
        "val_ece_before": ece(log_softmax(val.logits), val.labels),
        "val_ece_after": ece(log_softmax(val.logits / temperature), val.labels),
    }
    return decision, summary


def fit_for_run(run, record: ModelRecord, negatives: list[Path], min_precision: float) -> tuple[OpenSet, dict] | None:
    """Rebuild the run's own split, extract its photos' outputs with ``run`` (the exported network)
    and fit; None where the run kept no validation photos (``--val-fraction 0``)."""
    args = record.train_args
    splits = DataSplits.load(Path(record.data_dir), float(args.get("val_fraction", 0.1)), int(args.get("seed", 0)))
    if not splits.val:
        return None
    if splits.fingerprint() != record.data_fingerprint:
        raise SystemExit(f"{record.data_dir} is not the data set this run was trained on (fingerprint differs)")
    cfg = record.preprocess
    train = extract(run, [p for p, _ in splits.train], [y for _, y in splits.train], cfg)
    val = extract(run, [p for p, _ in splits.val], [y for _, y in splits.val], cfg)
    neg_fit = neg_val = None
    if negatives:
        fit_paths, val_paths = negative_photos(negatives)
        neg_fit = extract(run, fit_paths, [-1] * len(fit_paths), cfg)
        neg_val = extract(run, val_paths, [-1] * len(val_paths), cfg)
    decision, summary = fit(train, val, neg_fit, neg_val, min_precision)
    summary["negatives"] = [str(p) for p in negatives]
    return decision, summary
