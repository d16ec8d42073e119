"""What the numbers were measured on: CPU, GPU, library versions, thread settings, load, and the
machine's own float32 matmul peak (the yardstick for each backend's % of peak)."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import socket
import sys
import time

import psutil

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
LIBRARIES = ("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "pillow", "timm", "torchserve",
             "torch-model-archiver", "matplotlib", "psutil", "httpx", "fastapi", "uvicorn", "uvloop", "httptools",
             "locust")


def default_threads() -> int:
    """One intra-op thread per physical core this process may run on."""
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, min(physical, len(os.sched_getaffinity(0))))


def pin_threads(threads: int) -> None:
    """Set the OpenMP/MKL pools' size before torch is imported (children inherit it too)."""
    for name in THREAD_ENV:
        os.environ[name] = str(threads)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_unavailable_reason() -> str | None:
    """None when torch sees a GPU, else the real reason (driver library missing, no device...)."""
    import torch

    if torch.cuda.is_available():
        return None
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"no NVIDIA driver: {e}"
    try:
        torch.cuda.init()
    except Exception as e:  # torch words the cause (no device, driver too old, CPU-only build)
        return f"torch.cuda.is_available() is False: {e}"
    return f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {torch.version.cuda})"


def gpu_info() -> dict:
    import torch

    reason = cuda_unavailable_reason()
    if reason:
        return {"gpu": "none", "gpu_reason": reason, "torch_cuda_build": torch.version.cuda}
    return {"gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "torch_cuda_build": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    import onnxruntime as ort

    out["onnxruntime_providers"] = ort.get_available_providers()
    return out


def thread_settings(threads: int) -> dict:
    import torch

    return {"intra_op_threads": threads, "torch_num_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "ort_intra_op_num_threads": threads,
            "ort_inter_op_num_threads": 1, **{k: os.environ.get(k) for k in THREAD_ENV}}


def machine_info(threads: int) -> dict:
    mem = psutil.virtual_memory()
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem.total / 2**30, 1),
        **gpu_info(),
        "versions": versions(),
        "threads": thread_settings(threads),
        "load_average_start": os.getloadavg(),
    }


def matmul_peak_gflops(n: int = 1024, budget_s: float = 2.0) -> dict:
    """Best float32 GEMM rate with torch at the current thread count: the CPU's practical peak."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
        reps += 1
    return {"gflops": 2 * n**3 / best / 1e9, "n": n, "reps": reps, "threads": torch.get_num_threads()}
