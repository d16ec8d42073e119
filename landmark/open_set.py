"""The open-set decision: does a photo show a landmark this model knows, and how sure is it?

Most photos a user owns show no known landmark, and a wrong location written into a photo is
worse than none. So every answer carries a calibrated confidence that the top-1 landmark is right
*and* known, and is tagged only at or above the operating point: the lowest confidence at which
the validation photos (the run's held-out known photos plus held-out negatives) were tagged with
at least the target precision. The method (docs/open-set.md has the comparison):

- class probabilities: softmax(logits / T), T fitted on the validation split (temperature scaling);
- P(known): a (K+1)-way logistic regression on the unit-length embedding (centred on the training
  photos' mean), fitted on the training photos (classes 0..K-1) and negative photos (class K,
  "no landmark I know");
- confidence = P(known) x calibrated top-1 probability, compared in log space so that confident
  answers do not tie at 1.0.

Pure numpy: the handler, the predictor and the tagger share this one function of the network's
two outputs. Fitting lives in ``train.open_set``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from landmark import atomic
from landmark.runtime import Outputs

DEFAULT_MIN_PRECISION = 0.99
KNOWN, UNKNOWN, BELOW = "known landmark", "unknown place", "below operating point"


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


def scores(temperature: float, head: dict[str, np.ndarray] | None,
           outputs: Outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibrated log probabilities, log P(known), log confidence) of a batch."""
    log_p = log_softmax(outputs.logits / temperature)
    if head is None:
        log_known = np.zeros(len(log_p))
    elif outputs.embedding is None:
        raise ValueError("this open-set decision needs the embedding output: re-export the model")
    else:
        z = features(outputs.embedding, head["mean"]) @ head["weight"] + head["bias"]
        log_known = logsumexp(z[:, :-1]) - logsumexp(z)
    return log_p, log_known, log_known + log_p.max(axis=1)


def _confidence(log_threshold: float) -> float | None:
    return None if np.isinf(log_threshold) else float(np.exp(log_threshold))


@dataclass(frozen=True)
class Decision:
    index: int  # the most probable known class
    probabilities: np.ndarray  # calibrated class probabilities
    p_known: float  # probability that the photo shows one of the known landmarks at all
    confidence: float  # p_known x calibrated top-1 probability: what the operating point cuts
    tagged: bool
    reason: str  # KNOWN, UNKNOWN or BELOW
    threshold: float | None  # the operating point it was cut at (None: no validation tag reached the target)


@dataclass(frozen=True)
class OpenSet:
    temperature: float
    head: dict[str, np.ndarray] | None  # P(known) head: mean [D], weight [D, K+1], bias [K+1]; None: no negatives
    val_log_confidence: np.ndarray  # the validation queries' log confidences ...
    val_correct: np.ndarray  # ... and whether each was a known photo with the right top-1
    min_precision: float  # the stored operating point's target

    def log_threshold(self, min_precision: float | None = None) -> float:
        target = self.min_precision if min_precision is None else min_precision
        return threshold_for_precision(self.val_log_confidence, self.val_correct, target)

    def threshold(self, min_precision: float | None = None) -> float | None:
        """The operating point as a confidence; None where no validation tag reached that precision."""
        return _confidence(self.log_threshold(min_precision))

    def decide(self, outputs: Outputs, min_precision: float | None = None) -> list[Decision]:
        log_threshold = self.log_threshold(min_precision)
        threshold = _confidence(log_threshold)
        log_p, log_known, log_conf = scores(self.temperature, self.head, outputs)
        decisions = []
        for lp, lk, lc in zip(log_p, log_known, log_conf, strict=True):
            tagged = bool(lc >= log_threshold)
            reason = KNOWN if tagged else UNKNOWN if lk < np.log(0.5) else BELOW
            decisions.append(Decision(int(lp.argmax()), np.exp(lp), float(np.exp(lk)), float(np.exp(lc)), tagged,
                                      reason, threshold))
        return decisions

    def save(self, path: Path) -> None:
        arrays = {"temperature": np.float64(self.temperature), "val_log_confidence": self.val_log_confidence,
                  "val_correct": self.val_correct, "min_precision": np.float64(self.min_precision)}
        arrays.update({f"head_{k}": v.astype(np.float32) for k, v in (self.head or {}).items()})  # fitted as float32
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> OpenSet:
        with np.load(path) as z:
            head = {k.removeprefix("head_"): z[k].astype(np.float64) for k in z.files if k.startswith("head_")}
            return cls(float(z["temperature"]), head or None, z["val_log_confidence"], z["val_correct"],
                       float(z["min_precision"]))

    @classmethod
    def uncalibrated(cls, threshold: float = 0.5) -> OpenSet:
        """For a model exported without a validation split: the raw top-1 probability against a fixed
        threshold (the tagger's rule before the open-set decision), whatever precision is asked for."""
        return cls(1.0, None, np.array([np.log(threshold)]), np.array([True]), 1.0)
