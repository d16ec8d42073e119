"""The backends under test, each built from an exported model folder, or ``Unavailable`` with the
real reason: a CUDA row is never filled with CPU numbers (ONNX Runtime falls back silently)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from landmark.run_files import BEST, model_file
from landmark.runtime import Outputs, load_runner

BACKENDS = ("eager", "torchscript", "onnx-cpu", "onnx-int8", "onnx-cuda", "torchscript-cuda")
ORT_CUDA = "CUDAExecutionProvider"


class Unavailable(Exception):
    """This backend cannot run here; the message says why."""


def _noop() -> None:
    return None


@dataclass
class Backend:
    name: str
    run: Callable[[np.ndarray], Outputs]  # uint8 NCHW -> logits (+ embedding), numpy on the host
    device: str
    providers: list[str]
    sync: Callable[[], None] = _noop  # waits for queued device work (CUDA)


def _need(path: Path) -> Path:
    if not path.is_file():
        raise Unavailable(f"{path.name} not found in {path.parent}")
    return path


def _eager(model_dir: Path, threads: int) -> Backend:
    import torch

    from train.export import load_checkpoint

    torch.set_num_threads(threads)
    _need(model_dir / BEST)
    net, _ = load_checkpoint(model_dir)

    def run(batch: np.ndarray) -> Outputs:
        with torch.inference_mode():
            return Outputs(*(t.float().numpy() for t in net.forward_embed(torch.from_numpy(batch))))

    return Backend("eager", run, "cpu", ["pytorch-eager"])


def _cuda_reason() -> str | None:
    from benchmarks.machine import cuda_unavailable_reason

    return cuda_unavailable_reason()


def _runner(model_dir: Path, name: str, threads: int) -> Backend:
    """TorchScript / ONNX Runtime through ``landmark.runtime`` (what the handler serves)."""
    kind, device = {"torchscript": ("torchscript", "cpu"), "onnx-cpu": ("onnx", "cpu"),
                    "onnx-int8": ("onnx-int8", "cpu"), "onnx-cuda": ("onnx", "cuda"),
                    "torchscript-cuda": ("torchscript", "cuda")}[name]
    path = _need(model_file(model_dir, kind))
    if kind == "torchscript":
        import torch

        torch.set_num_threads(threads)
        if device == "cuda" and (reason := _cuda_reason()):
            raise Unavailable(reason)
    elif device == "cuda":
        import onnxruntime as ort

        if ORT_CUDA not in ort.get_available_providers():
            raise Unavailable(f"{ORT_CUDA} missing from this onnxruntime build {ort.get_available_providers()}")
    try:
        runner = load_runner(path, device=device, threads=threads)
        if kind != "torchscript":
            assert_provider(runner.providers, ORT_CUDA if device == "cuda" else "CPUExecutionProvider")
    except (RuntimeError, Unavailable) as e:  # the runner refuses a CUDA request that fell back to CPU
        if device != "cuda":
            raise
        cause = _cuda_reason()
        known = cause is None or "driver" in str(e)  # the runner may already name the missing driver
        raise Unavailable(f"{e}" + ("" if known else f"; {cause}")) from e
    sync = _noop
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize
    return Backend(name, runner, runner.device, list(runner.providers), sync)


def make_backend(name: str, model_dir: Path, threads: int) -> Backend:
    """Build one backend or raise ``Unavailable``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS}")
    return _eager(model_dir, threads) if name == "eager" else _runner(model_dir, name, threads)


def assert_provider(providers: list[str], wanted: str) -> None:
    """ONNX Runtime drops a provider it cannot load and runs on CPU: check what the session really uses."""
    if wanted not in providers:
        raise Unavailable(f"ONNX Runtime silently fell back: session providers are {providers}, not {wanted}")
