"""An ensemble of two trained transfer runs (Lite0 + Lite1): averaged probabilities, exported and
checked like any run, and refused when its members cannot be averaged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_module

from landmark.labels import softmax
from landmark.predict import Predictor
from landmark.preprocess import load_input
from landmark.run_files import read_meta
from train.data import find_classes, list_samples
from train.export import load_checkpoint


@pytest.fixture(scope="module")
def members(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two head-only transfer runs that differ in backbone and seed."""
    runs = []
    for seed, backbone in enumerate(("lite0", "lite1")):
        out = tmp_path_factory.mktemp(backbone)
        trained = run_module("train.train", "--arch", "transfer", "--data-dir", str(tiny_data), "--out", str(out),
                             "--input-size", "64", "--views", "1", "--head-epochs", "3", "--epochs", "0",
                             "--backbone", backbone, "--seed", str(seed), "--threads", "1")
        assert trained.returncode == 0, trained.stderr[-3000:]
        runs.append(out)
    return runs


def test_ensemble_averages_member_probabilities_and_exports(members: list[Path], tiny_data: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "ensemble"
    made = run_module("train.ensemble", "--runs", *map(str, members), "--out", str(out), "--threads", "1")
    assert made.returncode == 0, made.stderr[-3000:]
    exported = run_module("train.export", "--run-dir", str(out))
    assert exported.returncode == 0, exported.stderr[-3000:]

    nets = [load_checkpoint(run)[0] for run in members]
    cfg = read_meta(out).preprocess
    test = list_samples(tiny_data / "test", find_classes(tiny_data / "train"))
    photos = [p for p, _ in test]
    batch = np.stack([load_input(p, cfg) for p in photos])
    with torch.no_grad():
        expected = np.mean([softmax(net(torch.from_numpy(batch)).numpy()) for net in nets], axis=0)
    served = Predictor.from_dir(out, "onnx", device="cpu")
    np.testing.assert_allclose(softmax(served.outputs(batch).logits), expected, atol=1e-5)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arch"] == "ensemble" and metrics["n_test"] == len(photos)
    assert [m["backbone"] for m in metrics["members"]] == ["lite0", "lite1"]
    labels = np.array([label for _, label in test])
    assert metrics["test_accuracy"] == pytest.approx(float((expected.argmax(1) == labels).mean()))


def test_ensemble_refuses_members_it_cannot_average(members: list[Path], tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    cases = {
        "differs from": [str(members[0]), str(tiny_model)],  # 64 px transfer vs 32 px scratch CNN
        "at least 2 runs": [str(members[0])],
    }
    for message, runs in cases.items():
        refused = run_module("train.ensemble", "--runs", *runs, "--out", str(out))
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
        assert not out.exists()
    missing = run_module("train.ensemble", "--runs", str(members[0]), str(tmp_path / "nope"), "--out", str(out))
    assert missing.returncode != 0 and "not found" in missing.stderr and not out.exists()
