"""INT8 export of the tiny model: a real static ONNX Runtime quantization calibrated on its training
photos, the accuracy gate that refuses to publish a worse model, and the INT8 archive the handler serves."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_module
from test_handler import jpeg_bytes, load_handler, run_batch

from benchmarks.report import comparisons
from handlers.archive import build
from landmark.labels import softmax
from landmark.meta import ModelMeta
from landmark.predict import Predictor
from landmark.preprocess import load_input
from landmark.run_files import META, MODEL_FILES, OPEN_SET, read_meta
from landmark.runtime import load_runner
from train.data import image_files
from train.export import sha256
from train.quantize import get_args_parser, main

INT8 = MODEL_FILES["onnx-int8"]


def exported_copy(tiny_model: Path, dst: Path) -> Path:
    """The export's files only, so quantizing never touches the shared session model."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILES["onnx"], META, OPEN_SET):
        shutil.copyfile(tiny_model / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def int8_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = exported_copy(tiny_model, tmp_path_factory.mktemp("int8") / "run")
    done = run_module("train.quantize", "--run-dir", str(run_dir), "--calibration-photos", "24", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout and "open-set decision agreement" in done.stdout
    return run_dir


def test_int8_model_is_quantized_and_agrees_with_fp32(int8_model: Path, tiny_data: Path) -> None:
    graph = onnx.load(str(int8_model / INT8)).graph
    made_by = {out: n for n in graph.node for out in n.output}
    weights = {i.name: i.data_type for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]  # QDQ: ORT fuses DQ -> Conv -> Q into QLinearConv
    assert convs and all(made_by[c.input[0]].op_type == "DequantizeLinear" for c in convs)
    assert all(weights[made_by[c.input[1]].input[0]] == onnx.TensorProto.INT8 for c in convs)  # S8 weights
    test = image_files(tiny_data / "test")
    batch = np.stack([load_input(p, read_meta(int8_model).preprocess) for p in test])
    fp32, int8 = (load_runner(int8_model / name, device="cpu")(batch) for name in (MODEL_FILES["onnx"], INT8))
    assert int8.embedding is not None and int8.logits.shape == fp32.logits.shape
    assert (int8.logits.argmax(1) == fp32.logits.argmax(1)).mean() >= 0.9

    meta = read_meta(int8_model)
    record = meta.int8
    assert record.file == INT8 and record.sha256 == sha256(int8_model / INT8)
    assert record.source_sha256 == sha256(int8_model / MODEL_FILES["onnx"])
    assert record.recipe["format"] == "qdq" and record.recipe["calibration_split"] == "train"
    assert record.recipe["calibration_photos"] == 24
    parity = record.parity
    assert parity["n_test"] == len(test) and parity["top1_agreement"] >= 0.9
    assert parity["top1_drop_points"] <= parity["max_drop_points"] == 0.5
    # the recorded figures are those of the two served models, recomputed here through the offline Predictor
    fp32_p, int8_p = (Predictor.from_dir(int8_model, b, device="cpu", threads=1) for b in ("onnx", "onnx-int8"))
    decided = [[(a["landmark"] or {}).get("label") for a in p.predict(test, 1)] for p in (fp32_p, int8_p)]
    assert parity["decision_agreement"] == pytest.approx(np.mean([a == b for a, b in zip(*decided, strict=True)]))
    assert [parity["fp32_tagged"], parity["int8_tagged"]] == pytest.approx(
        [np.mean([d is not None for d in ds]) for ds in decided])
    assert parity["max_abs_prob_diff"] == pytest.approx(np.abs(softmax(int8.logits) - softmax(fp32.logits)).max(),
                                                        abs=1e-5)
    assert ModelMeta.from_dict(json.loads((int8_model / META).read_text())) == meta
    assert not list(int8_model.glob(".*tmp*"))


def test_gate_refuses_a_drop_beyond_the_allowed(tiny_model: Path, tmp_path: Path) -> None:
    """In process (the CLI's imports cost more than the tiny quantization): SystemExit with a message
    is what the command exits with, status 1."""
    run_dir = exported_copy(tiny_model, tmp_path / "run")
    meta_before = (run_dir / META).read_bytes()
    args = ["--run-dir", str(run_dir), "--calibration-photos", "24", "--max-drop", "-100"]  # nothing is 100 better
    with pytest.raises(SystemExit, match=rf"quantize gate FAILED, {INT8} not written: test top-1 FP32") as failed:
        main(get_args_parser().parse_args(args))
    assert isinstance(failed.value.code, str)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([MODEL_FILES["onnx"], META, OPEN_SET])
    assert (run_dir / META).read_bytes() == meta_before


def test_int8_archive_serves_through_the_handler(int8_model: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(build(int8_model, "onnx-int8", "landmark", "1.0", tmp_path / "store")) as z:
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"] == INT8
        assert MODEL_FILES["onnx"] not in z.namelist()
        z.extractall(tmp_path / "model")
    handler, context = load_handler(tmp_path / "model")
    answers = [json.loads(a) for a in run_batch(handler, context, [{"body": jpeg_bytes(i)} for i in range(3)],
                                                [{}] * 3)]
    assert all(len(a["top_k"]) == 3 for a in answers)


def test_int8_archive_without_quantizing_says_what_to_run(tiny_model: Path, tmp_path: Path) -> None:
    run_dir = exported_copy(tiny_model, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=rf"lacks {INT8}: run `make quantize OUT="):
        build(run_dir, "onnx-int8", "landmark", "1.0", tmp_path / "store")


def test_bench_report_puts_int8_beside_fp32_at_every_batch_size() -> None:
    def row(backend: str, p50s: dict[int, float]) -> dict:
        return {"backend": backend, "status": "ok", "cells": [{"batch": b, "p50_ms": v} for b, v in p50s.items()]}

    model = {"backends": [row("onnx-cpu", {1: 10.0, 8: 80.0}), row("onnx-int8", {1: 5.0, 8: 32.0})]}
    assert comparisons(model) == ["INT8 speed-up over FP32 ONNX (p50): batch 1 2.00x, batch 8 2.50x"]
