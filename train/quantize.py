"""Quantize a run's exported model.onnx to a static INT8 model.int8.onnx beside it, calibrated on the
run's TRAINING photos through the one preprocessing function, and refuse to publish it unless its
test top-1 stays within --max-drop points of the FP32 model's (docs/quantization.md has the variants).

  python -m train.quantize --run-dir artifacts/wh13

The default recipe (why: docs/quantization.md): ONNX Runtime's shape inference and graph optimisation
first; QDQ with U8 activations x per-channel S8 weights (ORT's CPU fuses it into QLinearConv, the
VNNI fast path, and other providers can still read the file); plain MinMax ranges of 256 training
photos; the global pool, the embedding and the classifier kept in FP32 (cheap, and the open-set
decision reads the embedding).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from landmark import atomic
from landmark.cli import positive_int
from landmark.meta import Int8Record, write_meta_file
from landmark.open_set import OpenSet
from landmark.preprocess import PreprocessConfig, load_input
from landmark.run_files import META, MODEL_FILES, OPEN_SET, read_meta
from landmark.runtime import INPUT_NAME, Outputs, load_runner
from train.data import find_classes, image_files, list_samples
from train.export import compare, sha256
from train.open_set import Features, extract

FORMATS = {"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
TYPES = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
BATCH = 8


def calibration_photos(data_dir: Path, n: int) -> list[Path]:
    """Up to n photos of the TRAINING split spread evenly over its sorted files, so every class is in
    the calibration set; the test split is kept for the accuracy gate."""
    photos = image_files(data_dir / "train")
    return photos[::max(1, len(photos) // n)][:n]


class PhotoReader(CalibrationDataReader):
    """Calibration batches of uint8 crops, decoded lazily (a calibration set of 448 px crops need not
    sit in memory all at once)."""

    def __init__(self, photos: list[Path], cfg: PreprocessConfig) -> None:
        self.batches: Iterator[np.ndarray] = (np.stack([load_input(p, cfg) for p in photos[i:i + BATCH]])
                                              for i in range(0, len(photos), BATCH))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def excluded_nodes(model: onnx.ModelProto, which: list[str]) -> list[str]:
    """Node names for --exclude: ``head`` = the global pool and everything after it (the embedding and
    the classifier: quantized, the embedding would be rounded to 256 levels twice before the open-set
    head reads it), ``stem`` = the first Conv."""
    nodes = list(model.graph.node)
    names = []
    pools = [i for i, n in enumerate(nodes) if n.op_type == "GlobalAveragePool"]
    if "head" in which and pools:
        names += [n.name for n in nodes[pools[-1]:]]
    if "stem" in which:
        names += [next(n.name for n in nodes if n.op_type == "Conv")]
    return names


def quantize(src: Path, dst: Path, photos: list[Path], cfg: PreprocessConfig, recipe: dict) -> None:
    """Write the static INT8 model of ``src`` to ``dst`` with the choices in ``recipe`` (see get_args_parser)."""
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_optimization=not recipe["pre_process"])
        # MinMax keeps only each batch's range (ReduceMin/Max in the calibration graph); not
        # CalibMaxIntermediateOutputs, which in ORT 1.31 drops the batches collected so far
        extra = {"CalibMovingAverage": recipe["moving_average"]}
        quantize_static(str(prepared), str(dst), PhotoReader(photos, cfg), quant_format=FORMATS[recipe["format"]],
                        per_channel=recipe["per_channel"], reduce_range=recipe["reduce_range"],
                        activation_type=TYPES[recipe["activations"]], weight_type=TYPES[recipe["weights"]],
                        nodes_to_exclude=excluded_nodes(onnx.load(str(prepared)), recipe["exclude"]),
                        calibrate_method=METHODS[recipe["calibration"]], extra_options=extra)


def gate_features(run, data_dir: Path, cfg: PreprocessConfig) -> Features:
    test = list_samples(data_dir / "test", find_classes(data_dir / "train"))
    return extract(run, [p for p, _ in test], [y for _, y in test], cfg)


def agreement(fp32: Features, int8: Features, open_set: OpenSet) -> dict:
    """INT8 vs FP32 on the same photos: top-1 of each, how often they agree, the largest probability
    change, and how often the served open-set decision (tag or not, and which landmark) is the same."""
    ref, out = Outputs(fp32.logits, fp32.embedding), Outputs(int8.logits, int8.embedding)
    decided = [open_set.decide(o) for o in (ref, out)]
    same = [a.tagged == b.tagged and (not a.tagged or a.index == b.index) for a, b in zip(*decided, strict=True)]
    top1 = [float((f.logits.argmax(1) == f.labels).mean()) for f in (fp32, int8)]
    diffs = compare(ref, out)
    return {"n_test": len(fp32.labels), "fp32_top1": top1[0], "int8_top1": top1[1],
            "top1_drop_points": 100 * (top1[0] - top1[1]),
            "top1_agreement": float((fp32.logits.argmax(1) == int8.logits.argmax(1)).mean()),
            "max_abs_prob_diff": diffs["max_abs_prob_diff"], "max_rel_embedding_diff": diffs["max_rel_embedding_diff"],
            "decision_agreement": float(np.mean(same)),
            "fp32_tagged": float(np.mean([d.tagged for d in decided[0]])),
            "int8_tagged": float(np.mean([d.tagged for d in decided[1]]))}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="an exported run folder (make export)")
    p.add_argument("--data-dir", type=Path, help="photos with train/ and test/ (default: the run's data set)")
    p.add_argument("--max-drop", type=float, default=0.5,
                   help="largest allowed loss of test top-1, in percentage points, against the FP32 model.onnx")
    p.add_argument("--calibration-photos", type=positive_int, default=256, help="training photos to calibrate on")
    p.add_argument("--calibration", choices=sorted(METHODS), default="minmax",
                   help="entropy / percentile keep every calibration output in memory: use few photos")
    p.add_argument("--moving-average", action=argparse.BooleanOptionalAction, default=False,
                   help="minmax: average each batch's range instead of the extremes of all photos")
    p.add_argument("--format", choices=sorted(FORMATS), default="qdq")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=False,
                   help="7-bit weights: only for CPUs without VNNI, where U8S8 products can saturate")
    p.add_argument("--activations", choices=sorted(TYPES), default="u8")
    p.add_argument("--weights", choices=sorted(TYPES), default="s8")
    p.add_argument("--exclude", nargs="*", choices=["head", "stem"], default=["head"], help="nodes kept in FP32")
    p.add_argument("--pre-process", action=argparse.BooleanOptionalAction, default=True,
                   help="ORT graph optimisation before quantizing (shape inference runs either way)")
    return p


def main(args: argparse.Namespace) -> int:
    meta = read_meta(args.run_dir)
    cfg = meta.preprocess
    data_dir = args.data_dir or Path(meta.model.data_dir)
    if not (data_dir / "train").is_dir() or not (data_dir / "test").is_dir():
        raise SystemExit(f"{data_dir}: need train/ (calibration) and test/ (the gate); pass --data-dir")
    src, dst = args.run_dir / MODEL_FILES["onnx"], args.run_dir / MODEL_FILES["onnx-int8"]
    recipe = {k: getattr(args, k) for k in ("format", "per_channel", "reduce_range", "activations", "weights",
                                            "calibration", "moving_average", "exclude", "pre_process")}
    photos = calibration_photos(data_dir, args.calibration_photos)
    recipe.update(calibration_split="train", calibration_photos=len(photos))
    open_set = OpenSet.load(args.run_dir / OPEN_SET) if meta.open_set is not None else OpenSet.uncalibrated()
    fp32 = gate_features(load_runner(src, device="cpu"), data_dir, cfg)
    with atomic.atomic_path(dst) as tmp:  # nothing at dst unless the gate passes
        quantize(src, tmp, photos, cfg, recipe)
        parity = agreement(fp32, gate_features(load_runner(tmp, device="cpu"), data_dir, cfg), open_set)
        parity["max_drop_points"] = args.max_drop
        summary = (f"test top-1 FP32 {parity['fp32_top1']:.2%} -> INT8 {parity['int8_top1']:.2%} "
                   f"({-parity['top1_drop_points']:+.2f} points), top-1 agreement {parity['top1_agreement']:.2%}, "
                   f"open-set decision agreement {parity['decision_agreement']:.2%} on {parity['n_test']} photos")
        if parity["top1_drop_points"] > args.max_drop:
            raise SystemExit(f"quantize gate FAILED, {dst.name} not written: {summary}; allowed drop {args.max_drop}")
        record = Int8Record(dst.name, sha256(tmp), sha256(src), recipe, parity, ort.__version__,
                            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_meta_file(args.run_dir / META, meta.with_int8(record))
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB, FP32 {src.stat().st_size / 1e6:.1f} MB): {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
