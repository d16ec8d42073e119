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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from landmark.cli import positive_float, positive_int, precision
from landmark.labels import softmax
from landmark.meta import ModelMeta, ModelRecord, OpenSetRecord, write_meta_file
from landmark.open_set import DEFAULT_MIN_PRECISION
from landmark.preprocess import load_input
from landmark.run_files import META, METRICS, MODEL_FILES, OPEN_SET, read_checkpoint
from landmark.runtime import INPUT_NAME, OUTPUT_NAMES, Outputs, load_runner
from train.data import find_classes, list_samples
from train.nets import build
from train.onnx_graph import optimize
from train.open_set import fit_for_run

ONNX_OPSET = 17
EXPORTED = {backend: MODEL_FILES[backend] for backend in ("torchscript", "onnx")}  # INT8: train.quantize


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


class WithEmbedding(torch.nn.Module):
    """What is exported: the network's logits and its pooled embedding (``OUTPUT_NAMES``)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_embed(x)


def export_onnx(net: torch.nn.Module, example: torch.Tensor, output_names: tuple[str, ...] = OUTPUT_NAMES) -> bytes:
    """One self-contained model (no .onnx.data side file), dynamic batch, graph cleaned up by
    ``onnx_graph.optimize``. The TorchScript-based exporter is deprecated upstream, but it writes
    the single file ONNX Runtime and TorchServe load."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # optimize() folds those
        torch.onnx.export(net, (example,), buf, input_names=[INPUT_NAME], output_names=list(output_names),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *output_names)},
                          opset_version=ONNX_OPSET, dynamo=False)
    return optimize(buf.getvalue())


def parity_images(data_dir: Path, n: int) -> list[Path]:
    """Up to n test photos spread over the classes, in a fixed order."""
    test = list_samples(data_dir / "test", find_classes(data_dir / "train"))
    step = max(1, len(test) // n)
    return [p for p, _ in test[::step][:n]]


def compare(ref: Outputs, out: Outputs) -> dict:
    """Every output of an exported file against eager: probabilities, top-1, and the embedding
    (largest difference relative to the embedding's largest value)."""
    ref_p, p = softmax(ref.logits), softmax(out.logits)
    scale = float(np.abs(ref.embedding).max()) or 1.0
    return {"max_abs_prob_diff": float(np.abs(p - ref_p).max()),
            "top1_agrees": bool((p.argmax(1) == ref_p.argmax(1)).all()),
            "max_rel_embedding_diff": float(np.abs(out.embedding - ref.embedding).max()) / scale}


def check_parity(net: torch.nn.Module, files: dict[str, Path], batch: np.ndarray, atol: float,
                 embedding_rtol: float) -> dict:
    """Eager vs each exported file on the same uint8 batch, every output; raises if any disagree."""
    with torch.no_grad():
        ref = Outputs(*(t.float().numpy() for t in net.forward_embed(torch.from_numpy(batch))))
    report = {"n_images": len(batch), "atol": atol, "embedding_rtol": embedding_rtol}
    for backend, path in files.items():
        report[backend] = r = compare(ref, load_runner(path, device="cpu")(batch))
        if not r["top1_agrees"] or r["max_abs_prob_diff"] > atol or r["max_rel_embedding_diff"] > embedding_rtol:
            raise SystemExit(f"export parity FAILED for {backend}: max |dp| = {r['max_abs_prob_diff']:.2e}, "
                             f"top-1 agrees: {r['top1_agrees']}, embedding |de|/max|e| = "
                             f"{r['max_rel_embedding_diff']:.2e}")
    return report


def publish_open_set(onnx_file: Path, record: ModelRecord, negatives: list[Path], min_precision: float,
                     out: Path) -> OpenSetRecord | None:
    """Fit the open-set decision on the exported network's own outputs and write it to ``out``."""
    fitted = fit_for_run(load_runner(onnx_file, device="cpu"), record, negatives, min_precision)
    if fitted is None:
        print("no validation split (--val-fraction 0): the served decision is the raw top-1 probability >= 0.5",
              file=sys.stderr)
        return None
    decision, summary = fitted
    decision.save(out / OPEN_SET)
    point = "none (no validation tag reached it)" if summary.threshold is None else f"{summary.threshold:.4f}"
    print(f"open-set decision: T={summary.temperature:.3f}, operating point {point} for precision "
          f"{min_precision:.1%}: validation coverage {summary.val_coverage:.1%}, negatives tagged "
          f"{summary.val_negatives_tagged:.1%}, look-alikes tagged {summary.val_lookalikes_tagged:.1%} "
          f"({summary.val_known} known, {summary.val_negative} negative, {summary.val_lookalike} look-alike queries "
          f"over {summary.view_sizes} px views too)")
    return replace(summary, file=OPEN_SET, bytes=(out / OPEN_SET).stat().st_size)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="output folder of python -m train.train")
    p.add_argument("--data-dir", type=Path, help="photos for the parity check (default: the training data)")
    p.add_argument("--parity-images", type=positive_int, default=32)
    p.add_argument("--atol", type=positive_float, default=1e-4, help="largest allowed probability difference")
    p.add_argument("--embedding-rtol", type=positive_float, default=1e-3,
                   help="largest allowed embedding difference, relative to the embedding's largest value")
    p.add_argument("--model-version", default="1.0")
    p.add_argument("--negatives", type=Path, nargs="*",
                   help="folders of photos that show no landmark this model knows, for the open-set decision "
                        "(default: the run's --negatives)")
    p.add_argument("--min-precision", type=precision,
                   help="the stored operating point: tag where validation tags reached this precision "
                        f"(default: the run's --min-precision, else {DEFAULT_MIN_PRECISION})")
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
        staged = {backend: Path(tmp) / name for backend, name in EXPORTED.items()}
        exported = WithEmbedding(net).eval()
        export_torchscript(exported, example, staged["torchscript"])
        staged["onnx"].write_bytes(export_onnx(exported, example))
        parity = check_parity(net, staged, batch, args.atol, args.embedding_rtol)
        negatives = args.negatives if args.negatives is not None else [
            Path(p) for p in record.train_args.get("negatives", [])]
        min_precision = args.min_precision or float(record.train_args.get("min_precision", DEFAULT_MIN_PRECISION))
        open_set = publish_open_set(staged["onnx"], record, negatives, min_precision, Path(tmp))
        metrics_path = args.run_dir / METRICS
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        meta = ModelMeta(
            model=record, model_version=args.model_version, outputs=OUTPUT_NAMES,
            metrics={k: metrics.get(k) for k in ("test_accuracy", "test_top5", "n_test")}, parity=parity,
            files={p.name: sha256(p) for p in Path(tmp).iterdir()}, onnx_opset=ONNX_OPSET,
            torch=torch.__version__, exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            open_set=open_set)
        write_meta_file(Path(tmp) / META, meta)
        for stale in (OPEN_SET, MODEL_FILES["onnx-int8"]):  # fitted on / quantized from an earlier export
            (args.run_dir / stale).unlink(missing_ok=True)
        for path in Path(tmp).iterdir():
            os.replace(path, args.run_dir / path.name)
    print(f"exported {', '.join(EXPORTED.values())}, {META} to {args.run_dir}; parity on "
          f"{parity['n_images']} photos: " + ", ".join(f"{b} max|dp|={parity[b]['max_abs_prob_diff']:.1e}"
                                                         for b in EXPORTED))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
