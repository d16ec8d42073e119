"""One backend of one model at every batch size, in a fresh process (``python -m benchmarks.cell spec.json``).

A fresh process per backend keeps the measurements apart: the peak RSS is this backend's alone,
thread pools of a previous runtime cannot steal cores, and the thread variables are set before
any runtime is imported. The parent passes the uint8 inputs as a .npy and reads back a JSON
result plus the probabilities of the largest batch (for the cross-check against eager).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import psutil

from benchmarks.backends import Backend, Unavailable, make_backend
from benchmarks.stats import summarize_ms, time_loop
from landmark.labels import softmax


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def _peak_rss() -> float:
    """This process's RSS high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux carries the
    parent's peak over fork + exec, so a child of a big parent would report the parent's memory."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024.0  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each batch size gets its own peak."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


class GpuMemory:
    """Peak device memory of a cell: torch's allocator for torch backends, device-wide use for ORT."""

    def __init__(self, backend: Backend) -> None:
        self.active = backend.device == "cuda"
        if self.active:
            import torch

            self.torch = torch
            self.base_used = self._used()

    def _used(self) -> int:
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def reset(self) -> None:
        if self.active:
            self.torch.cuda.reset_peak_memory_stats()

    def report(self) -> dict:
        if not self.active:
            return {}
        return {"gpu_max_allocated_mb": _mb(self.torch.cuda.max_memory_allocated()),
                "gpu_used_delta_mb": _mb(self._used() - self.base_used)}


def runtime_settings(backend: Backend) -> dict:
    """The thread counts the runtimes really use in this process (not just what was asked for)."""
    out = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if "torch" in sys.modules:
        out["torch_num_threads"] = sys.modules["torch"].get_num_threads()
    session = getattr(backend.run, "session", None)
    if session is not None:
        opts = session.get_session_options()
        out.update(ort_intra_op_num_threads=opts.intra_op_num_threads,
                   ort_inter_op_num_threads=opts.inter_op_num_threads,
                   ort_graph_optimization_level=str(opts.graph_optimization_level))
    return out


def measure(spec: dict) -> tuple[dict, np.ndarray | None]:
    inputs = np.load(spec["inputs"])
    before_import = psutil.Process().memory_info().rss
    importlib.import_module("onnxruntime" if spec["backend"].startswith("onnx") else "torch")
    baseline = psutil.Process().memory_info().rss  # deltas below: the model and its run, not the library
    t0 = time.perf_counter()
    try:
        backend = make_backend(spec["backend"], Path(spec["model_dir"]), spec["threads"])
    except Unavailable as e:
        return {"status": f"unavailable: {e}"}, None
    result = {"status": "ok", "device": backend.device, "providers": backend.providers,
              "load_s": round(time.perf_counter() - t0, 3), "rss_baseline_mb": _mb(baseline),
              "runtime_import_rss_mb": _mb(baseline - before_import), "cells": []}
    result["runtime_settings"] = runtime_settings(backend)
    gpu = GpuMemory(backend)
    probs = None
    for batch_size in spec["batch_sizes"]:
        batch = np.ascontiguousarray(inputs[:batch_size])
        gpu.reset()
        _reset_peak_rss()
        samples, first = time_loop(lambda b=batch: backend.run(b), spec["budget_s"], spec["min_iters"],
                                   spec["max_iters"], spec["warmup"], backend.sync)
        stats = summarize_ms(samples)
        result["cells"].append({
            "batch": batch_size, **stats, "first_call_ms": first * 1e3,
            "images_per_s": batch_size / (stats["mean_ms"] / 1e3),
            "peak_rss_mb": _mb(_peak_rss()), "peak_rss_delta_mb": _mb(_peak_rss() - baseline), **gpu.report(),
        })
        probs = softmax(backend.run(batch).logits)
    return result, probs


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        result, probs = measure(spec)
    except Exception as e:  # any failure becomes the row's status; the parent carries on with the next backend
        result, probs = {"status": f"error: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}, None
    if probs is not None:
        np.save(spec["probs"], probs)
    result["pid"] = os.getpid()
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
