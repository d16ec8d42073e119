"""Both networks' shapes, a short real training run, resume, export parity and the CLIs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_TRAIN_ARGS, run_module

from landmark.labels import softmax
from landmark.meta import LandmarkClass, ModelRecord
from landmark.predict import Predictor
from landmark.preprocess import PreprocessConfig
from landmark.run_files import read_meta
from landmark.runtime import OnnxRunner
from train.nets import IMAGENET_LITE_MEAN, IMAGENET_LITE_STD, ScratchCNN, TransferNet, build


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
        dropped = TransferNet(13, drop_path=0.2).eval()
        dropped.load_state_dict(net.state_dict())
        torch.testing.assert_close(dropped(x), logits)  # stochastic depth acts in training only
    record = ModelRecord("transfer", {"backbone": "lite0", "drop_path": 0.0},
                         PreprocessConfig(224, 224, IMAGENET_LITE_MEAN, IMAGENET_LITE_STD),
                         tuple(LandmarkClass(str(i), str(i)) for i in range(13)))
    rebuilt = build(record)
    rebuilt.load_state_dict(net.state_dict())  # export rebuilds from the record without the weight wheel


def test_onnx_export_folds_same_padding_into_convs() -> None:
    """The strided convs' TF 'SAME' pads become Conv pads: no Pad node is left, outputs stay exact."""
    import onnx

    from train.export import WithEmbedding, export_onnx

    net = TransferNet(5, pretrained=True, input_size=96).eval()
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    model = export_onnx(WithEmbedding(net).eval(), x[:2])
    assert "Pad" not in {node.op_type for node in onnx.load_from_string(model).graph.node}
    out = OnnxRunner(model, device="cpu")(x.numpy())
    with torch.no_grad():
        logits, embedding = net.forward_embed(x)
    np.testing.assert_allclose(out.logits, logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.embedding, embedding.numpy(), atol=1e-4, rtol=1e-4)


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
    meta = read_meta(tiny_model)
    session = OnnxRunner(tiny_model / "model.onnx", device="cpu").session
    assert session.get_inputs()[0].type == "tensor(uint8)" and meta.onnx_opset >= 17
    assert [c.label for c in meta.classes] == ["09.Golden_Gate_Bridge", "16.Eiffel_Tower", "taj mahal"]
    assert meta.classes[1].location.country == "France"
    for backend in ("torchscript", "onnx"):
        assert meta.parity[backend]["top1_agrees"] and meta.parity[backend]["max_abs_prob_diff"] <= 1e-4
    assert not (tiny_model / "model.onnx.data").exists()  # one self-contained file
    photos = sorted(p for p in (tiny_data / "test").rglob("*") if p.is_file())
    ts, ort = Predictor.from_dir(tiny_model, "torchscript"), Predictor.from_dir(tiny_model, "onnx")
    batch = np.stack([ts.preprocess(p) for p in photos])
    assert len(batch) > 1  # dynamic batch in both exports
    np.testing.assert_allclose(softmax(ts.outputs(batch).logits), softmax(ort.outputs(batch).logits), atol=1e-4)
    top = ort.predict([photos[0]], k=2)[0]["top_k"]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]


def test_resume_after_a_killed_run(tiny_data: Path, tmp_path: Path) -> None:
    """SIGKILL mid-training (as a crash would), then --resume: every epoch exactly once."""
    args = [*TINY_TRAIN_ARGS, "--data-dir", str(tiny_data), "--out", str(tmp_path), "--patience", "1000"]
    args[args.index("--epochs") + 1] = "60"
    log = tmp_path / "log.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "train.train", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            proc.kill()
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    assert not list(tmp_path.glob("*.tmp"))
    again = run_module("train.train", *args)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently overwrites a run
    resumed = run_module("train.train", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == list(range(1, 61))


def test_cli_errors_are_clear(tmp_path: Path, tiny_model: Path) -> None:
    missing = run_module("train.train", "--arch", "scratch", "--data-dir", str(tmp_path / "nope"),
                         "--out", str(tmp_path / "o"))
    assert missing.returncode != 0 and "train/<class>" in missing.stderr and not (tmp_path / "o").exists()
    for arch, flag, value in (("transfer", "--cut", "9"), ("transfer", "--views", "0"),
                              ("scratch", "--batch-size", "0"), ("scratch", "--epochs", "0"),
                              ("scratch", "--val-fraction", "0.5")):
        wrong = run_module("train.train", "--arch", arch, "--data-dir", str(tmp_path), "--out",
                           str(tmp_path / "o"), flag, value)
        assert wrong.returncode == 2 and flag in wrong.stderr and not (tmp_path / "o").exists()
    (tmp_path / "note.txt").write_text("not a photo")
    bad = run_module("landmark.predict", "--model-dir", str(tiny_model), str(tmp_path / "note.txt"))
    assert bad.returncode == 1 and "not an image" in bad.stderr
    no_export = run_module("train.export", "--run-dir", str(tmp_path))
    assert no_export.returncode != 0 and "best.pt not found" in no_export.stderr
    before = sorted(tiny_model.iterdir())
    zero = run_module("train.export", "--run-dir", str(tiny_model), "--parity-images", "0")
    assert zero.returncode == 2 and "--parity-images" in zero.stderr and sorted(tiny_model.iterdir()) == before


def test_unreadable_photo_stops_training_before_it_starts(tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    first_class = sorted((data / "test").iterdir())[0]
    (first_class / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    run = run_module("train.train", "--arch", "scratch", "--data-dir", str(data), "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "broken.jpg" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o" / "last.pt").exists()


def test_transfer_recipe_runs_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    """Cached-trunk transfer training (ONNX Runtime trunk, head stage, block fine-tuning) + export."""
    trained = run_module("train.train", "--arch", "transfer", "--data-dir", str(tiny_data), "--out", str(tmp_path),
                         "--input-size", "64", "--views", "2", "--head-epochs", "3", "--epochs", "2",
                         "--threads", "1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "\r" not in trained.stderr  # progress bars only on a terminal: a log gets the lines per epoch
    assert "[head] epoch   1/3" in trained.stdout and "[finetune] epoch   2/2" in trained.stdout
    stages = [json.loads(line)["stage"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert stages.count("head") >= 1 and stages[-1] == "finetune"
    assert json.loads((tmp_path / "metrics.json").read_text())["test_accuracy"] > 0.5
    exported = run_module("train.export", "--run-dir", str(tmp_path))
    assert exported.returncode == 0, exported.stderr[-3000:]
    meta = read_meta(tmp_path)
    assert meta.preprocess.input_size == 64 and meta.parity["onnx"]["top1_agrees"]


def test_streamed_fine_tuning_trains_all_but_the_frozen_stem(tiny_data: Path, tmp_path: Path) -> None:
    """--stream --cut 0 (the GPU recipe): fresh augmentations per batch through the whole net; the stem,
    below the cut, keeps its ImageNet weights and BatchNorm statistics, every block above it learns."""
    trained = run_module("train.train", "--arch", "transfer", "--data-dir", str(tiny_data), "--out", str(tmp_path),
                         "--input-size", "64", "--views", "1", "--head-epochs", "2", "--epochs", "2", "--stream",
                         "--cut", "0", "--threads", "1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert [json.loads(line)["stage"] for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1] == "finetune"
    tuned = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=False)["net"]
    start = TransferNet(3, input_size=64, pretrained=True).state_dict()
    for name in ("body.conv_stem.weight", "body.bn1.weight", "body.bn1.running_mean", "body.bn1.running_var"):
        assert torch.equal(tuned[name], start[name]), name
    for name in ("body.blocks.0.0.conv_dw.weight", "body.blocks.6.0.conv_pwl.weight", "body.conv_head.weight"):
        assert not torch.equal(tuned[name], start[name]), name
    assert json.loads((tmp_path / "metrics.json").read_text())["test_accuracy"] > 0.5


def test_without_validation_each_stage_keeps_its_last_epoch(tiny_data: Path, tmp_path: Path) -> None:
    """--val-fraction 0: every training photo is used, nothing is early-stopped, and the model is the
    schedule's end (best.pt holds the same weights as the final checkpoint); the report says so."""
    trained = run_module("train.train", "--arch", "transfer", "--data-dir", str(tiny_data), "--out", str(tmp_path),
                         "--input-size", "64", "--views", "1", "--head-epochs", "3", "--epochs", "2",
                         "--patience", "1", "--val-fraction", "0", "--threads", "1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert " 0 val " in trained.stdout
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("head", 1), ("head", 2), ("head", 3),
                                                        ("finetune", 1), ("finetune", 2)]
    assert all(r["val_loss"] is None and r["val_acc"] is None for r in rows)
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=False)["net"]
    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)["net"]
    assert all(torch.equal(best[k], last[k]) for k in last)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_val_loss"] is None and metrics["test_accuracy"] > 0.5
    assert (tmp_path / "curves.png").stat().st_size > 0
