"""The open-set decision's maths on synthetic numbers, against brute force or a known answer: the
operating point (``threshold_for_precision``), the temperature fit and the P(known) head's fit."""

from __future__ import annotations

import numpy as np
import pytest

from landmark.open_set import log_softmax, threshold_for_precision
from train.open_set import fit_logistic, fit_temperature


def precision_at(scores: np.ndarray, correct: np.ndarray, t: float) -> float | None:
    tagged = scores >= t
    return float(correct[tagged].mean()) if tagged.any() else None


def brute_force_threshold(scores: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest score value whose tags (score >= it) reach ``target``, trying every distinct value."""
    ok = [float(t) for t in np.unique(scores) if precision_at(scores, correct, t) >= target]
    return min(ok) if ok else float("inf")


def test_threshold_is_the_lowest_score_that_keeps_the_precision() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, False, True])
    assert threshold_for_precision(scores, correct, 1.0) == 0.8
    assert threshold_for_precision(scores, correct, 0.75) == 0.6  # 3 of 4 right: exactly the target
    assert threshold_for_precision(scores, correct, np.nextafter(0.75, 1)) == 0.8  # a hair above: 2 of 2
    assert threshold_for_precision(scores[::-1].copy(), correct[::-1].copy(), 1.0) == 0.8  # order of the input


def test_threshold_never_cuts_between_tied_scores() -> None:
    """Tagging is ``score >= t``: two photos with one score are tagged together, so a cut after the
    right one of a tied pair would promise a precision the tags do not have."""
    scores = np.array([0.9, 0.8, 0.8, 0.7])
    assert threshold_for_precision(scores, np.array([True, True, False, True]), 1.0) == 0.9
    assert threshold_for_precision(scores, np.array([True, False, True, True]), 1.0) == 0.9
    assert threshold_for_precision(scores, np.array([True, True, True, False]), 1.0) == 0.8
    assert threshold_for_precision(np.full(5, 0.5), np.array([True] * 4 + [False]), 0.8) == 0.5
    assert threshold_for_precision(np.full(5, 0.5), np.array([True] * 4 + [False]), 0.81) == float("inf")


def test_threshold_is_inf_where_no_tag_reaches_the_target() -> None:
    scores = np.array([0.9, 0.5, 0.1])
    assert threshold_for_precision(scores, np.zeros(3, bool), 0.01) == float("inf")
    assert threshold_for_precision(scores, np.array([False, True, True]), 0.9) == float("inf")
    assert threshold_for_precision(np.array([]), np.array([], bool), 0.9) == float("inf")
    assert threshold_for_precision(np.array([-np.inf, 0.0]), np.array([True, False]), 0.5) == -np.inf


@pytest.mark.parametrize("seed", range(20))
def test_threshold_matches_brute_force(seed: int) -> None:
    """Random log-confidences, rounded so that many tie, at several targets: the answer is the largest
    coverage whose tags reach the target, and tagging at it does reach it."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    scores = np.round(rng.normal(size=n), int(rng.integers(0, 3)))
    correct = rng.random(n) < rng.uniform(0.2, 1.0)
    for target in (0.5, 0.8, 0.9, 0.99, 1.0):
        t = threshold_for_precision(scores, correct, target)
        assert t == brute_force_threshold(scores, correct, target), (target, scores, correct)
        if np.isfinite(t):
            assert precision_at(scores, correct, t) >= target


def sample_labels(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Labels drawn from softmax(logits / T): the logits are then calibrated exactly at T."""
    p = np.exp(log_softmax(logits / temperature))
    return (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at(true_t: float) -> None:
    rng = np.random.default_rng(int(true_t * 10))
    logits = rng.normal(0, 3, size=(3_000, 10))
    labels = sample_labels(logits, true_t, rng)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_fit_temperature_is_the_nll_minimum() -> None:
    """The returned T beats its neighbours on the validation NLL it minimises."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, size=(2_000, 5))
    labels = sample_labels(logits, 1.7, rng)

    def nll(t: float) -> float:
        return float(-log_softmax(logits / t)[np.arange(len(labels)), labels].mean())

    t = fit_temperature(logits, labels)
    assert nll(t) <= min(nll(t * 0.97), nll(t * 1.03))


def test_fit_logistic_separates_separable_classes() -> None:
    """Three well separated clusters plus a "no landmark" cluster (the head's K+1 classes): every
    training point is classified right, with a confident probability, and a new point from a cluster
    goes to that cluster."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, size=(4, 16))
    centres *= 4 / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(4), 50)
    x = centres[y] + rng.normal(0, 0.3, size=(len(y), 16))
    w, b = fit_logistic(x, y, 4)
    assert w.shape == (16, 4) and b.shape == (4,)
    log_p = log_softmax(x @ w + b)
    assert (log_p.argmax(1) == y).all()
    assert np.exp(log_p[np.arange(len(y)), y]).min() > 0.8
    fresh = centres + rng.normal(0, 0.3, size=centres.shape)
    assert ((fresh @ w + b).argmax(1) == np.arange(4)).all()


def test_fit_logistic_l2_shrinks_the_weights() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(2), 40)
    x = np.where(y[:, None] == 1, 1.0, -1.0) + rng.normal(0, 0.2, size=(80, 4))
    loose, _ = fit_logistic(x, y, 2, l2=0.0)
    tight, _ = fit_logistic(x, y, 2, l2=1.0)
    assert np.linalg.norm(tight) < 0.5 * np.linalg.norm(loose)
