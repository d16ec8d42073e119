"""The open-set decision: does a photo show a landmark this model knows, and how sure is it?

Most photos a user owns show no known landmark, and a wrong location written into a photo is
worse than none. Photos of *other* landmarks are the hard case: the network maps a rice terrace to
the nearest landmark it knows, and a P(known) head fitted only on low-resolution "other landmark"
negatives had learned resolution, not place (docs/open-set.md). So the decision reads four signals
of the network's two outputs and a bank of reference embeddings:

- ``log_pt``: log of the calibrated top-1 probability, softmax(logits / T) (temperature scaling);
- ``log_pknown``: log P(known) of a (K+1)-way logistic head on the centred unit embedding, fitted on
  the training photos *and their low-resolution views* against negatives at every resolution, so
  that resolution alone is no cue;
- ``ref_sim``: cosine of the embedding to the nearest reference photo (a training photo, or one of its
  low-resolution views) of the predicted class;
- ``ref_margin``: ``ref_sim`` minus the same for the best other class: does the photo look like *this*
  landmark's photos rather than like landmark photos in general?

confidence = calibrated top-1 probability x P(known) x P(looks like its class's photos)^a, the last a
logistic *reference gate* on (``ref_sim``, ``ref_margin``) fitted on the validation photos against
leave-class-out look-alikes (each validation photo scored as if its own class were unknown: a photo
of "another landmark" at full resolution, made from the known set itself), and its exponent a (0, 1/2
or 1) chosen on the validation photos. A photo is tagged at or
above the operating point: the lowest confidence at which the validation photos (known + negatives,
the gate cross-fitted) reached the target precision; compared in log space so that confident answers
do not tie at 1.0. Pure numpy: the handler, the predictor and the taggers share this one function of the
network's two outputs. Fitting lives in ``train.open_set``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from landmark import atomic
from landmark.runtime import Outputs

FORMAT_VERSION = 2  # open_set.npz: 1 = P(known) x pT, no references; 2 = with references and their gate
DEFAULT_MIN_PRECISION = 0.99
KNOWN, UNKNOWN, BELOW = "known landmark", "unknown place", "below operating point"
SIGNALS = ("log_pt", "log_pknown", "ref_sim", "ref_margin")
LOG_FLOOR = -30.0  # log P(known) below this carries no more information: keeps every signal finite


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[..., 0]


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    return z - logsumexp(z)[..., None]


def features(embedding: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """What the P(known) head reads: the unit embedding, centred, scaled to unit variance per dimension."""
    return (unit(embedding.astype(np.float64)) - mean) * np.sqrt(embedding.shape[-1])


def threshold_for_precision(scores: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest threshold t (tag when score >= t) whose tags on these queries reach ``target``
    precision: the largest coverage that keeps the bar. A cut falls only between distinct scores;
    +inf where not even the most confident query is right."""
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order].astype(np.float64)
    precision = np.cumsum(c) / np.arange(1, len(s) + 1)
    cut_allowed = np.append(s[1:] != s[:-1], True)
    ok = np.flatnonzero((precision >= target) & cut_allowed)
    return float(s[ok[-1]]) if len(ok) else float("inf")


@dataclass(frozen=True)
class Head:
    """The P(known) head: a (K+1)-way logistic regression on ``features``; class K = "no landmark I know"."""

    mean: np.ndarray  # [D]
    weight: np.ndarray  # [D, K+1]
    bias: np.ndarray  # [K+1]

    def log_pknown(self, embedding: np.ndarray) -> np.ndarray:
        z = features(embedding, self.mean) @ self.weight + self.bias
        return logsumexp(z[:, :-1]) - logsumexp(z)


@dataclass(frozen=True)
class References:
    """Unit embeddings of the training photos (and their low-resolution views), with their classes."""

    embedding: np.ndarray  # [N, D] unit length: float16 values (as stored), held as float32 for the product
    labels: np.ndarray  # [N] class index

    def class_similarity(self, embedding: np.ndarray, n_classes: int, drop: np.ndarray | None = None) -> np.ndarray:
        """[n, K]: cosine to the nearest reference of each class (-2 where a class has none, or is dropped)."""
        sims = unit(embedding.astype(np.float32)) @ self.embedding.T
        out = np.full((len(sims), n_classes), -2.0)
        for c in range(n_classes):
            members = self.labels == c
            if members.any():
                out[:, c] = sims[:, members].max(axis=1)
        if drop is not None:
            out[np.arange(len(out)), drop] = -2.0
        return out


def signals(log_p: np.ndarray, log_pknown: np.ndarray, class_sim: np.ndarray) -> np.ndarray:
    """[n, 4] ``SIGNALS`` of a batch, the predicted class being the argmax of ``log_p``."""
    pred = log_p.argmax(axis=1)
    rows = np.arange(len(pred))
    sim = class_sim[rows, pred]
    others = class_sim.copy()
    others[rows, pred] = -2.0
    return np.stack([log_p[rows, pred], np.maximum(log_pknown, LOG_FLOOR), sim, sim - others.max(axis=1)], axis=1)


GATE_SIGNALS = (2, 3)  # the gate reads ref_sim and ref_margin


@dataclass(frozen=True)
class Gate:
    """log P(the photo looks like its predicted class's reference photos): a logistic regression on the
    standardised ``GATE_SIGNALS``, fitted against leave-class-out look-alikes."""

    center: np.ndarray  # [2]
    scale: np.ndarray  # [2]
    weight: np.ndarray  # [2]
    bias: float

    def log_odds(self, x: np.ndarray) -> np.ndarray:
        return ((x[:, GATE_SIGNALS] - self.center) / self.scale) @ self.weight + self.bias

    def log_p(self, x: np.ndarray) -> np.ndarray:
        return -np.logaddexp(0.0, -self.log_odds(x))


@dataclass(frozen=True)
class Decision:
    index: int  # the most probable known class
    probabilities: np.ndarray  # calibrated class probabilities
    p_known: float  # probability that the photo shows one of the known landmarks at all
    confidence: float  # top-1 probability x p_known x the reference gate: what the operating point cuts
    tagged: bool
    reason: str  # KNOWN, UNKNOWN or BELOW
    threshold: float | None  # the operating point it was cut at (None: no validation tag reached the target)


@dataclass(frozen=True)
class OpenSet:
    temperature: float
    head: Head | None  # None: fitted without negatives
    references: References | None  # None (with gate None): the uncalibrated top-1 rule
    gate: Gate | None
    gate_exponent: float  # how much the gate counts: 0 (not at all), 0.5 or 1, chosen on validation photos
    val_score: np.ndarray  # the validation queries' log confidences (the gate cross-fitted) ...
    val_correct: np.ndarray  # ... and whether each was a known photo with the right top-1
    min_precision: float  # the stored operating point's target

    def target(self, min_precision: float | None = None) -> float:
        """The precision target asked for, else the stored one: the one place that default is resolved."""
        return self.min_precision if min_precision is None else min_precision

    def score_threshold(self, min_precision: float | None = None) -> float:
        return threshold_for_precision(self.val_score, self.val_correct, self.target(min_precision))

    def threshold(self, min_precision: float | None = None) -> float | None:
        """The operating point as a confidence; None where no validation tag reached that precision."""
        t = self.score_threshold(min_precision)
        return None if np.isinf(t) else float(np.exp(t))

    def signals(self, outputs: Outputs) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated log probabilities [n, K], ``SIGNALS`` [n, 4]) of a batch."""
        log_p = log_softmax(outputs.logits / self.temperature)
        if (self.head is not None or self.references is not None) and outputs.embedding is None:
            raise ValueError("this open-set decision needs the embedding output: re-export the model")
        log_pknown = np.zeros(len(log_p)) if self.head is None else self.head.log_pknown(outputs.embedding)
        sims = (np.zeros_like(log_p) if self.references is None
                else self.references.class_similarity(outputs.embedding, log_p.shape[1]))
        return log_p, signals(log_p, log_pknown, sims)

    def _score(self, x: np.ndarray) -> np.ndarray:
        """log confidence: log top-1 probability + log P(known) + log gate (each 0 where not fitted)."""
        gated = self.gate is not None and self.gate_exponent > 0
        return x[:, 0] + x[:, 1] + (self.gate_exponent * self.gate.log_p(x) if gated else 0.0)

    def decide(self, outputs: Outputs, min_precision: float | None = None) -> list[Decision]:
        cut = self.score_threshold(min_precision)
        threshold = None if np.isinf(cut) else float(np.exp(cut))
        log_p, x = self.signals(outputs)
        score = self._score(x)
        decisions = []
        for lp, row, s in zip(log_p, x, score, strict=True):
            tagged, confidence, p_known = bool(s >= cut), float(np.exp(s)), float(np.exp(row[1]))
            reason = KNOWN if tagged else UNKNOWN if p_known < 0.5 or confidence < 0.5 else BELOW
            decisions.append(Decision(int(lp.argmax()), np.exp(lp), p_known, confidence, tagged, reason, threshold))
        return decisions

    def save(self, path: Path) -> None:
        arrays = {"format_version": np.int64(FORMAT_VERSION), "temperature": np.float64(self.temperature),
                  "gate_exponent": np.float64(self.gate_exponent),
                  "val_score": self.val_score, "val_correct": self.val_correct,
                  "min_precision": np.float64(self.min_precision)}
        if self.head is not None:  # fitted as float32: the validation scores are those of the stored head
            arrays.update({f"head_{k}": getattr(self.head, k).astype(np.float32) for k in ("mean", "weight", "bias")})
        if self.references is not None:
            arrays.update(ref_embedding=self.references.embedding.astype(np.float16),
                          ref_labels=self.references.labels.astype(np.int32))
        if self.gate is not None:
            arrays.update({f"gate_{k}": np.asarray(getattr(self.gate, k), np.float64)
                           for k in ("center", "scale", "weight", "bias")})
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> OpenSet:
        with np.load(path) as z:
            version = int(z["format_version"]) if "format_version" in z.files else 1
            if version != FORMAT_VERSION:
                raise ValueError(f"{path}: open-set format {version}; this code reads {FORMAT_VERSION}: "
                                 "re-export the model (make export)")
            head = Head(*(z[f"head_{k}"].astype(np.float64) for k in ("mean", "weight", "bias"))) \
                if "head_mean" in z.files else None
            refs = References(z["ref_embedding"].astype(np.float32), z["ref_labels"]) \
                if "ref_embedding" in z.files else None
            gate = Gate(z["gate_center"], z["gate_scale"], z["gate_weight"],
                        float(z["gate_bias"])) if "gate_weight" in z.files else None
            return cls(float(z["temperature"]), head, refs, gate, float(z["gate_exponent"]), z["val_score"],
                       z["val_correct"],
                       float(z["min_precision"]))

    @classmethod
    def uncalibrated(cls, threshold: float = 0.5) -> OpenSet:
        """For a model exported without a validation split: the raw top-1 probability against a fixed
        threshold (the tagger's rule before the open-set decision), whatever precision is asked for."""
        return cls(1.0, None, None, None, 0.0, np.array([np.log(threshold)]), np.array([True]), 1.0)
