"""Run an exported landmark model, TorchScript or ONNX, chosen by file extension.

Every runner takes the same input (uint8 NCHW crops from ``landmark.preprocess``) and returns the
same ``Outputs`` (float32 logits, and the pooled embedding where the export has it), so handler,
predictor and benchmarks swap backends without other changes.
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "embedding")  # in this order in model.onnx and model.ts


class Outputs(NamedTuple):
    logits: np.ndarray
    embedding: np.ndarray | None  # None for a model exported before embeddings were


def _outputs(values: list[np.ndarray]) -> Outputs:
    return Outputs(values[0].astype(np.float32, copy=False), values[1] if len(values) > 1 else None)


def _cuda_driver_present() -> bool:
    """Without libcuda the CUDA provider can only fail (noisily): do not even try."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


class OnnxRunner:
    """ONNX Runtime session; CUDA only where the provider is really active after creation."""

    backend = "onnx"

    def __init__(self, model: Path | bytes, device: str = "auto", threads: int = 0) -> None:
        """``model``: an .onnx file, or a serialized model (e.g. the training trunk, built in memory)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0 = ORT's default (one per physical core)
        opts.inter_op_num_threads = 1
        cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
        cuda = cuda and _cuda_driver_present()
        if cuda and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels torch already installed
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                            providers=providers)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        if device == "cuda" and self.device != "cuda":
            why = "" if _cuda_driver_present() else " (no CUDA driver: libcuda.so.1 not found)"
            raise RuntimeError(f"CUDA requested but ONNX Runtime runs on {self.providers}{why}")

    def run_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of the graph, in its order (also for graphs that are not a landmark model)."""
        return self.session.run(self.output_names, {INPUT_NAME: batch})

    def __call__(self, batch: np.ndarray) -> Outputs:
        return _outputs(self.run_all(batch))


class TorchScriptRunner:
    """A frozen TorchScript module on CUDA when available (or asked), else CPU."""

    backend = "torchscript"

    def __init__(self, path: Path, device: str = "auto", threads: int = 0) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA requested but torch.cuda.is_available() is False")
        self.device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        self.providers = [self.device]
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": still what serves TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(path), map_location=self.device).eval()
        self._torch = torch

    def __call__(self, batch: np.ndarray) -> Outputs:
        with self._torch.inference_mode():
            out = self.module(self._torch.from_numpy(batch).to(self.device))
            return _outputs([t.float().cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))])


RUNNERS = {".onnx": OnnxRunner, ".ts": TorchScriptRunner, ".pt": TorchScriptRunner}


def load_runner(path: Path, device: str = "auto", threads: int = 0) -> OnnxRunner | TorchScriptRunner:
    """Pick the runner by the model file's extension (as TorchServe's handlers do)."""
    path = Path(path)
    try:
        runner = RUNNERS[path.suffix]
    except KeyError:
        raise ValueError(f"unknown model file type {path.name!r}: expected one of {sorted(RUNNERS)}") from None
    return runner(path, device=device, threads=threads)
