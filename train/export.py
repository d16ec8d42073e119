"""Export a run's best checkpoint to TorchScript (model.ts) and ONNX (model.onnx) plus
model_meta.json, and refuse to publish them unless eager, TorchScript and ONNX Runtime agree
(same top-1, probabilities within --atol) on real test photos.

  python -m train.export --run-dir artifacts/transfer
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from landmark.cli import positive_float, positive_int
from landmark.labels import softmax
from landmark.meta import ModelMeta, ModelRecord, write_meta_file
from landmark.preprocess import load_input
from landmark.run_files import META, METRICS, MODEL_FILES, read_checkpoint
from landmark.runtime import INPUT_NAME, OUTPUT_NAME, load_runner
from train.data import find_classes, list_samples
from train.nets import build
from train.onnx_graph import optimize

ONNX_OPSET = 17


def load_checkpoint(run_dir: Path) -> tuple[torch.nn.Module, ModelRecord]:
    """Rebuild the network from the record stored beside its weights."""
    record, state = read_checkpoint(run_dir)
    net = build(record)
    net.load_state_dict(state["net"])
    return net.eval(), record


def export_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    # torch.jit is deprecated upstream but is exactly what TorchServe loads: keep the output to what matters
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, example)
        torch.jit.save(torch.jit.freeze(traced), str(path))


def export_onnx(net: torch.nn.Module, example: torch.Tensor, output_name: str = OUTPUT_NAME) -> bytes:
    """One self-contained model (no .onnx.data side file), dynamic batch, graph cleaned up by
    ``onnx_graph.optimize``. The TorchScript-based exporter is deprecated upstream, but it writes
    the single file ONNX Runtime and TorchServe load."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # optimize() folds those
        torch.onnx.export(net, (example,), buf, input_names=[INPUT_NAME], output_names=[output_name],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)
    return optimize(buf.getvalue())


def parity_images(data_dir: Path, n: int) -> list[Path]:
    """Up to n test photos spread over the classes, in a fixed order."""
    test = list_samples(data_dir / "test", find_classes(data_dir / "train"))
    step = max(1, len(test) // n)
    return [p for p, _ in test[::step][:n]]


def check_parity(net: torch.nn.Module, files: dict[str, Path], batch: np.ndarray, atol: float) -> dict:
    """Eager vs each exported file on the same uint8 batch; raises if any disagree."""
    with torch.no_grad():
        ref = softmax(net(torch.from_numpy(batch)).numpy())
    report = {"n_images": len(batch), "atol": atol}
    for backend, path in files.items():
        probs = softmax(load_runner(path, device="cpu")(batch))
        diff = float(np.abs(probs - ref).max())
        same_top1 = bool((probs.argmax(1) == ref.argmax(1)).all())
        report[backend] = {"max_abs_prob_diff": diff, "top1_agrees": same_top1}
        if not same_top1 or diff > atol:
            raise SystemExit(f"export parity FAILED for {backend}: max |dp| = {diff:.2e}, top-1 agrees: {same_top1}")
    return report


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="output folder of python -m train.train")
    p.add_argument("--data-dir", type=Path, help="photos for the parity check (default: the training data)")
    p.add_argument("--parity-images", type=positive_int, default=32)
    p.add_argument("--atol", type=positive_float, default=1e-4, help="largest allowed probability difference")
    p.add_argument("--model-version", default="1.0")
    return p


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    net, record = load_checkpoint(args.run_dir)
    cfg = record.preprocess
    data_dir = args.data_dir or Path(record.data_dir)
    if not (data_dir / "test").is_dir():
        raise SystemExit(f"{data_dir}/test not found: pass --data-dir with real photos for the parity check")
    batch = np.stack([load_input(p, cfg) for p in parity_images(data_dir, args.parity_images)])
    example = torch.from_numpy(batch[:2])

    with tempfile.TemporaryDirectory(dir=args.run_dir, prefix=".export-") as tmp:
        staged = {backend: Path(tmp) / name for backend, name in MODEL_FILES.items()}
        export_torchscript(net, example, staged["torchscript"])
        staged["onnx"].write_bytes(export_onnx(net, example))
        parity = check_parity(net, staged, batch, args.atol)
        metrics_path = args.run_dir / METRICS
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        meta = ModelMeta(
            model=record, model_version=args.model_version, outputs=(OUTPUT_NAME,),
            metrics={k: metrics.get(k) for k in ("test_accuracy", "test_top5", "n_test")}, parity=parity,
            files={path.name: sha256(path) for path in staged.values()}, onnx_opset=ONNX_OPSET,
            torch=torch.__version__, exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_meta_file(Path(tmp) / META, meta)
        for name in [*MODEL_FILES.values(), META]:
            os.replace(Path(tmp) / name, args.run_dir / name)
    print(f"exported {', '.join(MODEL_FILES.values())}, {META} to {args.run_dir}; parity on "
          f"{parity['n_images']} photos: " + ", ".join(f"{b} max|dp|={parity[b]['max_abs_prob_diff']:.1e}"
                                                         for b in MODEL_FILES))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
