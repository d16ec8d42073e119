"""Timing loop and latency statistics shared by the in-process and served benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

PERCENTILES = (50, 90, 99)
MIN_WARMUP = 2  # TorchScript's profiling executor optimises the graph on its second call


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), so reports match ``np.percentile``."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize_ms(seconds: list[float]) -> dict:
    """Latency samples in seconds -> n, mean and percentiles in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    out = {"n": len(ms), "mean_ms": sum(ms) / len(ms)}
    out.update({f"p{q}_ms": percentile(ms, q) for q in PERCENTILES})
    out["min_ms"], out["max_ms"] = min(ms), max(ms)
    return out


def time_loop(
    fn: Callable[[], object],
    budget_s: float,
    min_iters: int = 20,
    max_iters: int = 2000,
    warmup: int = 3,
    sync: Callable[[], None] | None = None,
) -> tuple[list[float], float]:
    """Time ``fn`` after ``warmup`` calls; returns (per-call seconds, first-call seconds).

    Stops at the first of: ``max_iters`` calls; ``budget_s`` spent with at least ``min_iters``
    calls; twice ``budget_s`` spent whatever the count (a slow cell stays bounded, with fewer
    samples, never none). ``sync`` (e.g. ``torch.cuda.synchronize``) runs inside each timed call so
    asynchronous devices are timed to completion. Warm-up beyond ``MIN_WARMUP`` calls stops at half
    the budget.
    """
    sync = sync or (lambda: None)
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    for i in range(warmup):
        if i >= MIN_WARMUP and time.perf_counter() - t0 > budget_s / 2:
            break
        fn()
        sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_iters:
        elapsed = time.perf_counter() - start
        if samples and (elapsed >= 2 * budget_s or (elapsed >= budget_s and len(samples) >= min_iters)):
            break
        t = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t)
    return samples, first
