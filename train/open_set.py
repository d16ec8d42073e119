"""Fit the open-set decision (``landmark.open_set``) of an exported network, at export time.

Nothing is fitted on a test split. The temperature, the reference gate and the operating point come from
the run's own validation split (the photos training held out) plus held-out negatives; the P(known)
head and the reference bank from the training photos plus the other half of the negatives. Every
known photo and negative also enters at lower resolutions (``VIEW_SIZES``: shrunk, JPEG-recompressed
views), so resolution is no cue. Negatives are folders of photos that show no landmark this model
knows (everyday scenes, another landmark set's train/ split); their files are split alternately by
sorted path into a fitting half and a validation half. Look-alikes of other landmarks, which the
reference gate is fitted against, come from the validation photos themselves: each one scored as if
its own class were unknown (leave-class-out).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from landmark.meta import ModelRecord, OpenSetRecord
from landmark.open_set import (
    FORMAT_VERSION,
    GATE_SIGNALS,
    SIGNALS,
    Gate,
    Head,
    OpenSet,
    References,
    features,
    log_softmax,
    logsumexp,
    signals,
    threshold_for_precision,
    unit,
)
from landmark.preprocess import PreprocessConfig, decode, load_input
from landmark.runtime import Outputs
from train.data import DataSplits, image_files

BATCH = 32
VIEW_SIZES = (224, 128)  # shorter sides of the low-resolution views (a photo already smaller gets none)
VIEW_QUALITY = 85  # JPEG quality of a view: what a resized share or thumbnail carries
GATE_EXPONENTS = (0.0, 0.5, 1.0)  # candidates for how much the reference gate counts, chosen on validation photos
FOLDS = 5  # the gate's validation scores are cross-fitted over this many folds of the validation photos
METHOD = ("calibrated top-1 probability x resolution-mixed P(known) x reference gate (nearest-reference similarity "
          "and margin, fitted against leave-class-out look-alikes)")


@dataclass
class Features:
    logits: np.ndarray
    embedding: np.ndarray
    labels: np.ndarray  # class index; -1 for a negative photo
    photo: np.ndarray  # index of the source photo within its set (a photo's views share it)

    def outputs(self) -> Outputs:
        return Outputs(self.logits, self.embedding)

    @classmethod
    def concat(cls, parts: list[Features]) -> Features:
        names = ("logits", "embedding", "labels", "photo")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in names))


def shrunk(path: Path, short_side: int, quality: int = VIEW_QUALITY) -> bytes:
    """The photo with its shorter side scaled down to ``short_side`` (Lanczos), as a JPEG of ``quality``."""
    img = decode(path)
    scale = short_side / min(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def short_side(path: Path) -> int:
    with Image.open(path) as img:
        return min(img.size)


def extract(run, paths: list[Path], labels: list[int], cfg: PreprocessConfig, view: int | None = None
            ) -> Features | None:
    """The exported network's two outputs for these photos (or their ``view``-px views), in batches;
    None where no photo is larger than the view."""
    keep = list(range(len(paths))) if view is None else [i for i, p in enumerate(paths) if short_side(p) > view]
    if not keep:
        return None
    sources = [shrunk(paths[i], view) if view else paths[i] for i in keep]
    out: list[Outputs] = [run(np.stack([load_input(s, cfg) for s in sources[i:i + BATCH]]))
                          for i in range(0, len(sources), BATCH)]
    return Features(np.concatenate([o.logits for o in out]), np.concatenate([o.embedding for o in out]),
                    np.asarray(labels, dtype=np.int64)[keep], np.asarray(keep, dtype=np.int64))


def extract_views(run, paths: list[Path], labels: list[int], cfg: PreprocessConfig) -> list[Features]:
    """The photos at full size, then at each of ``VIEW_SIZES`` (where they are larger)."""
    views = [extract(run, paths, labels, cfg, v) for v in (None, *VIEW_SIZES)]
    return [f for f in views if f is not None]


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


def fit_head(known: Features, negatives: Features) -> Head:
    """The (K+1)-way P(known) head, stored as float32: later scores must be those of the stored head."""
    n_classes = known.logits.shape[1]
    mean = unit(known.embedding.astype(np.float64)).mean(0)
    x = features(np.concatenate([known.embedding, negatives.embedding]), mean)
    y = np.concatenate([known.labels, np.full(len(negatives.labels), n_classes)])
    weight, bias = fit_logistic(x, y, n_classes + 1)
    return Head(*(v.astype(np.float32).astype(np.float64) for v in (mean, weight, bias)))


def fit_gate(x: np.ndarray, right: np.ndarray) -> Gate:
    """Logistic regression of "a tag would be right" on the standardised ``GATE_SIGNALS``."""
    g = x[:, GATE_SIGNALS]
    center, scale = g.mean(0), g.std(0) + 1e-6
    w, b = fit_logistic((g - center) / scale, right.astype(np.int64), 2, l2=1e-2, steps=2000, lr=0.05)
    return Gate(center, scale, w[:, 1] - w[:, 0], float(b[1] - b[0]))


@dataclass
class Rows:
    """The validation rows: signals, whether a tag would be right, the fold, and what each row is
    (a known photo, a leave-class-out look-alike: fitted on, never an operating-point query; a negative)."""

    x: np.ndarray
    right: np.ndarray
    fold: np.ndarray
    lookalike: np.ndarray
    negative: np.ndarray


def validation_rows(base: OpenSet, val: list[Features], neg_val: list[Features], folds: int) -> Rows:
    parts = []
    for f in val:
        log_p, x = base.signals(f.outputs())
        parts.append((x, (log_p.argmax(1) == f.labels), f.photo % folds, "known"))
        # leave-class-out: the photo's own class removed from the logits and from the references
        logits = f.logits.astype(np.float64).copy()
        logits[np.arange(len(logits)), f.labels] = -np.inf
        log_p = log_softmax(logits / base.temperature)
        sims = base.references.class_similarity(f.embedding, logits.shape[1], drop=f.labels)
        # P(known) reads only the embedding: the known row's own value, not a second pass of the head
        parts.append((signals(log_p, x[:, 1], sims), np.zeros(len(logits), bool), f.photo % folds, "lookalike"))
    for f in neg_val:
        parts.append((base.signals(f.outputs())[1], np.zeros(len(f.labels), bool), f.photo % folds, "negative"))
    kind = np.concatenate([np.full(len(p[1]), p[3]) for p in parts])
    return Rows(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), kind == "lookalike", kind == "negative")


def fit(train: list[Features], val: list[Features], neg_fit: list[Features] | None, neg_val: list[Features] | None,
        min_precision: float) -> tuple[OpenSet, OpenSetRecord]:
    """The decision and a record of how it was fitted (for model_meta.json). ``train``/``val``/negatives:
    one Features per resolution, full size first."""
    known = Features.concat(train)
    temperature = fit_temperature(val[0].logits, val[0].labels)
    head = fit_head(known, Features.concat(neg_fit)) if neg_fit else None
    refs = References(unit(known.embedding.astype(np.float32)).astype(np.float16).astype(np.float32),
                      known.labels.astype(np.int32))
    base = OpenSet(temperature, head, refs, None, 0.0, np.zeros(0), np.zeros(0, bool), min_precision)
    folds = max(2, min(FOLDS, len(val[0].labels)))
    rows = validation_rows(base, val, neg_val or [], folds)
    gate_rows = ~rows.negative  # known photos against their own leave-class-out look-alikes
    log_gate = np.zeros(len(rows.right))
    for k in range(folds):
        held = rows.fold == k
        gate = fit_gate(rows.x[gate_rows & ~held], rows.right[gate_rows & ~held])
        log_gate[held] = gate.log_p(rows.x[held])
    known_all = ~rows.lookalike & ~rows.negative

    def coverage_among_all(exponent: float) -> float:
        """Validation coverage at the target when look-alikes count as queries too: how well this
        exponent's ranking separates right tags from negatives *and* look-alikes."""
        score = rows.x[:, 0] + rows.x[:, 1] + exponent * log_gate
        return float((score[known_all] >= threshold_for_precision(score, rows.right, min_precision)).mean())

    exponent = max(GATE_EXPONENTS, key=coverage_among_all)  # ties: the smaller exponent (first in order)
    log_conf = rows.x[:, 0] + rows.x[:, 1] + exponent * log_gate
    queries = ~rows.lookalike
    decision = OpenSet(temperature, head, refs, fit_gate(rows.x[gate_rows], rows.right[gate_rows]), exponent,
                       log_conf[queries], rows.right[queries], min_precision)
    cut = threshold_for_precision(decision.val_score, decision.val_correct, min_precision)
    known_rows = known_all[queries]
    tagged = decision.val_score >= cut
    record = OpenSetRecord(
        method=METHOD if head is not None else METHOD.replace("resolution-mixed P(known)", "no P(known)"),
        format_version=FORMAT_VERSION, temperature=temperature, min_precision=min_precision,
        threshold=decision.threshold(),
        gate_signals=[SIGNALS[i] for i in GATE_SIGNALS], gate_exponent=exponent,
        gate_selection={str(a): round(coverage_among_all(a), 4) for a in GATE_EXPONENTS},
        gate_weight=[round(float(w), 6) for w in decision.gate.weight],
        view_sizes=list(VIEW_SIZES),
        references=len(refs.labels), folds=folds, val_known=int(known_rows.sum()),
        val_negative=int((~known_rows).sum()), val_lookalike=int(rows.lookalike.sum()),
        val_coverage=float(tagged[known_rows].mean()),
        val_negatives_tagged=float(tagged[~known_rows].mean()) if (~known_rows).any() else 0.0,
        val_lookalikes_tagged=float((log_conf[rows.lookalike] >= cut).mean()),
        val_ece_before=ece(log_softmax(val[0].logits), val[0].labels),
        val_ece_after=ece(log_softmax(val[0].logits / temperature), val[0].labels))
    return decision, record


def fit_for_run(run, record: ModelRecord, negatives: list[Path], min_precision: float
                ) -> tuple[OpenSet, OpenSetRecord] | None:
    """Rebuild the run's own split, extract its photos' outputs with ``run`` (the exported network)
    and fit; None where the run kept no validation photos (``--val-fraction 0``)."""
    args = record.train_args
    splits = DataSplits.load(Path(record.data_dir), float(args.get("val_fraction", 0.1)), int(args.get("seed", 0)))
    if not splits.val:
        return None
    if splits.fingerprint() != record.data_fingerprint:
        raise SystemExit(f"{record.data_dir} is not the data set this run was trained on (fingerprint differs)")
    cfg = record.preprocess
    train = extract_views(run, [p for p, _ in splits.train], [y for _, y in splits.train], cfg)
    val = extract_views(run, [p for p, _ in splits.val], [y for _, y in splits.val], cfg)
    neg_fit = neg_val = None
    if negatives:
        fit_paths, val_paths = negative_photos(negatives)
        neg_fit = extract_views(run, fit_paths, [-1] * len(fit_paths), cfg)
        neg_val = extract_views(run, val_paths, [-1] * len(val_paths), cfg)
    decision, summary = fit(train, val, neg_fit, neg_val, min_precision)
    return decision, replace(summary, negatives=[str(p) for p in negatives])
