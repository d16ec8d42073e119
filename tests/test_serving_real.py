"""Opt-in: a real trained model served over HTTP answers every test photo of a real data set
(LANDMARK_DATA_SET, default world_heritage13) with the same top-1 as the offline predictor, for
the TorchScript and the ONNX archive.

Run: LANDMARK_MODEL_DIR=artifacts/transfer .venv/bin/python -m pytest tests/test_serving_real.py -s
(skipped without LANDMARK_MODEL_DIR or without ../shared/data)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from handlers.archive import build
from handlers.process import TorchServe
from landmark.predict import Predictor

MODEL_DIR = os.environ.get("LANDMARK_MODEL_DIR")
DATA_SET = os.environ.get("LANDMARK_DATA_SET", "world_heritage13")
BACKENDS = {"landmark_onnx": "onnx", "landmark_ts": "torchscript"}

pytestmark = pytest.mark.skipif(not MODEL_DIR, reason="set LANDMARK_MODEL_DIR to an exported model folder")


def test_served_top1_equals_offline_on_real_test_photos(shared_data: Path, tmp_path: Path) -> None:
    photos = sorted(p for p in (shared_data / DATA_SET / "test").rglob("*") if p.is_file())
    assert photos, f"no {DATA_SET} test photos"
    model_dir = Path(MODEL_DIR)
    for name, backend in BACKENDS.items():
        build(model_dir, backend, name, "1.0", tmp_path / "store")
    with TorchServe(tmp_path / "store", list(BACKENDS), tmp_path / "ts", workers=1).start(timeout=180) as server:
        print(f"\ncold start: {server.cold_start_s:.1f} s")
        for name, backend in BACKENDS.items():
            predictor = Predictor.from_dir(model_dir, backend, device="cpu", threads=1)
            labels = {c.label for c in predictor.classes}
            same = correct = 0
            t0 = time.perf_counter()
            for path in photos:
                r = requests.post(server.url(name), data=path.read_bytes(), timeout=60,
                                  headers={**server.headers(), "Content-Type": "image/jpeg", "X-Topk": "1"})
                assert r.status_code == 200, (path, r.text)
                served, offline = r.json(), predictor.predict([path], 1)[0]
                same += served["top_k"][0]["label"] == offline["top_k"][0]["label"] and (
                    served["landmark"] == offline["landmark"])
                correct += served["top_k"][0]["label"] == path.parent.name
            per_photo = (time.perf_counter() - t0) / len(photos)
            accuracy = f"{correct / len(photos):.3f}" if path.parent.name in labels else "n/a (other classes)"
            print(f"{backend}: served top-1 == offline on {same}/{len(photos)} photos; served accuracy {accuracy}; "
                  f"{per_photo * 1000:.0f} ms per photo (HTTP + offline check, sequential)")
            assert same == len(photos)
