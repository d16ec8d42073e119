"""make gpu-check on a machine without a GPU (this one): one refusal line, exit 2, nothing written; its parts
never label CPU work as CUDA (real ONNX Runtime, real TorchScript); the result record and its Markdown; and
make gpu-pack's folder for a lent device machine."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_module

from benchmarks.gpu_check import Run, get_args_parser, no_gpu_reason, part_parity, part_providers, synthetic_set
from benchmarks.gpu_pack import get_args_parser as pack_parser
from benchmarks.gpu_pack import main as pack_main
from benchmarks.gpu_record import FAIL, NOT_RUN, PASS, Check, GpuCheckRecord, cuda_rows, markdown, write
from landmark.meta import SchemaError
from landmark.run_files import META, read_meta

NO_GPU = no_gpu_reason() is not None
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="this host has a GPU: gpu-check runs instead of refusing")


def cell(batch: int, p50: float) -> dict:
    return {"batch": batch, "p50_ms": p50}


def bench_result(cuda_ok: bool) -> dict:
    """A benchmarks.run result of one model, in its format, with or without the CUDA rows."""
    def row(name: str, p50s: list[float] | None) -> dict:
        if p50s is None:
            return {"backend": name, "status": f"unavailable: no CUDA for {name}"}
        return {"backend": name, "status": "ok", "cells": [cell(b, p) for b, p in zip((1, 8), p50s, strict=True)]}

    return {"models": [{"name": "wh13", "status": "ok", "input_size": 448, "backends": [
        row("torchscript", [40.0, 300.0]), row("onnx-cpu", [20.0, 160.0]),
        row("onnx-cuda", [2.0, 4.0] if cuda_ok else None), row("torchscript-cuda", [4.0, 5.0] if cuda_ok else None)]},
        {"name": "im49", "status": "skipped: folder not found"}]}


# --- the refusal -----------------------------------------------------------------------------------------


@needs_no_gpu
@pytest.mark.parametrize("how", ["script", "module"])
def test_refuses_without_gpu_in_one_line_and_writes_nothing(tmp_path: Path, how: str) -> None:
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    cmd = ["bash", "benchmarks/gpu_check.sh"] if how == "script" else [str(ROOT / ".venv/bin/python"), "-m",
                                                                          "benchmarks.gpu_check"]
    done = subprocess.run([*cmd, "--out-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp)})
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: refused: no usable GPU here ("), done.stderr
    assert "nothing was run or written" in lines[0] and "Traceback" not in done.stderr
    assert not out.exists() and not list(tmp.iterdir())


@needs_no_gpu
def test_cpu_is_never_labelled_cuda(tiny_model: Path, tmp_path: Path) -> None:
    """ONNX Runtime's CUDA provider is not active here: the providers part fails saying so (the session's own
    providers), and the parity part runs nothing rather than compare CPU with CPU."""
    run = Run(get_args_parser().parse_args(["--crops-dir", str(tmp_path)]), tmp_path, [tiny_model])
    providers = part_providers(run)
    assert providers.status == FAIL and "runs on CPU here" in providers.detail
    assert providers.data["session_providers"] == {tiny_model.name: ["CPUExecutionProvider"]}
    parity = part_parity(run)
    assert parity.status == NOT_RUN
    assert [(r["backend"], r["status"]) for r in parity.data["rows"]] == [("onnx", NOT_RUN), ("torchscript", NOT_RUN)]
    assert all("CUDA" in r["why"] for r in parity.data["rows"])


def test_bad_model_folder_is_one_line(tmp_path: Path) -> None:
    done = run_module("benchmarks.gpu_check", "--model-dirs", str(tmp_path), "--out-dir", str(tmp_path / "out"))
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and done.stdout == ""
    assert done.stderr.startswith("gpu-check: refused: no usable GPU" if NO_GPU else "gpu-check: not an exported")
    assert not (tmp_path / "out").exists()


# --- the record ------------------------------------------------------------------------------------------


def test_cuda_rows_ratios_and_reasons() -> None:
    ok, missing = cuda_rows(bench_result(True)), cuda_rows(bench_result(False))
    assert ok[0]["batch1_ort_over_ts_cuda"] == pytest.approx(0.5)
    assert ok[0]["cuda_speedup"]["8"] == pytest.approx({"onnx-cuda": 40.0, "torchscript-cuda": 60.0})
    assert ok[0]["not_run"] == {} and ok[1] == {"model": "im49", "status": "skipped: folder not found"}
    assert missing[0]["batch1_ort_over_ts_cuda"] is None and missing[0]["cuda_speedup"]["1"] == {}
    assert missing[0]["p50_ms"]["1"]["onnx-cuda"] is None and missing[0]["p50_ms"]["1"]["onnx-cpu"] == 20.0
    assert set(missing[0]["not_run"]) == {"onnx-cuda", "torchscript-cuda"}


def record(cuda_ok: bool) -> GpuCheckRecord:
    checks = [Check("providers", PASS if cuda_ok else FAIL, "session providers ['CPUExecutionProvider']"),
              Check("ddp", NOT_RUN, "1 GPU here: one NCCL DDP step needs 2 or more", {"gpus": 1})]
    return GpuCheckRecord("2026-12-05T00:00:00Z", "dev", ["NVIDIA H100 80GB HBM3"], {"torch": "2.11.0"}, checks,
                          12.5, "dev-1.json", cuda_rows(bench_result(cuda_ok)))


def test_markdown_names_the_gpu_the_figures_and_what_was_not_measured() -> None:
    text = markdown(record(True), "gpu-check-dev.json")
    assert "GPU NVIDIA H100 80GB HBM3" in text and "| providers | pass |" in text
    assert "| ONNX Runtime CUDA | 2.00 | 4.00 |" in text and "| TorchScript | 40.00 | 300.00 |" in text
    assert "ORT / TS = 0.50x" in text and "batch 8 40.0x" in text
    assert "## Not measured" in text and "- ddp: 1 GPU here" in text and "im49" in text
    missing = markdown(record(False), "gpu-check-dev.json")
    assert "| ONNX Runtime CUDA | - | - |" in missing and "ORT / TS" not in missing
    assert "ONNX Runtime CUDA: unavailable: no CUDA for onnx-cuda." in missing


def test_record_round_trip_and_atomic_write(tmp_path: Path) -> None:
    rec = record(False)
    json_path, md_path = write(rec, tmp_path / "out", "gpu-check-dev")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu-check-dev.json", "gpu-check-dev.md"]
    data = json.loads(json_path.read_text())
    assert data["schema_version"] == 1 and GpuCheckRecord.from_dict(data) == rec
    assert rec.failed() == [rec.checks[0]] and md_path.read_text() == markdown(rec, json_path.name)
    with pytest.raises(SchemaError, match="schema_version 2"):
        GpuCheckRecord.from_dict({**data, "schema_version": 2})
    with pytest.raises(ValueError, match="status 'ok'"):
        Check("x", "ok", "")


# --- the pack and the tiny model's data ------------------------------------------------------------------


def test_pack_carries_models_and_crops_that_fit(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "carry"
    args = pack_parser().parse_args(["--model-dirs", str(tiny_model), str(tmp_path / "absent"), "--crops", "3",
                                     "--out", str(out)])
    assert pack_main(args) == 0
    files = {p.name for p in (out / "models" / tiny_model.name).iterdir()}
    assert {"model.onnx", "model.ts", META} <= files and "best.pt" not in files
    crops = np.load(out / "crops" / f"{tiny_model.name}.npy")
    size = read_meta(tiny_model).preprocess.input_size
    assert crops.dtype == np.uint8 and crops.shape == (3, 3, size, size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["carry"]  # the temporary folder is gone


def test_pack_that_does_not_fit_leaves_the_old_one(tiny_model: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "carry"
    out.mkdir()
    (out / "old").write_text("kept")
    args = pack_parser().parse_args(["--model-dirs", str(tiny_model), "--out", str(out), "--limit-mb", "3"])
    assert pack_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("gpu-pack: ") and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["old"] and sorted(p.name for p in tmp_path.iterdir()) == ["carry"]


def test_synthetic_set_is_a_data_folder() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_set(Path(tmp), n_train=2, n_test=1)
        for split, n in (("train", 2), ("test", 1)):
            assert [len(list(d.glob("*.jpg"))) for d in sorted((root / split).iterdir())] == [n, n, n]
