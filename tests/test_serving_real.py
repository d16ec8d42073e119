"""Opt-in: a real trained model, served over HTTP, gives every photo of real test sets the same
answer (top-1, and the open-set decision: landmark or null, with its reason) as the offline
predictor, for the TorchScript and the ONNX archive; the tagger (--local) decides the same.
LANDMARK_DATA_SETS (default: world_heritage13 indian_monuments49 everyday) names the test sets:
the model's own and the ones it does not know.

Run: LANDMARK_MODEL_DIR=artifacts/wh13 .venv/bin/python -m pytest tests/test_serving_real.py -s
(skipped without LANDMARK_MODEL_DIR or without ../shared/data)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from conftest import run_module

from handlers.archive import build
from handlers.process import TorchServe
from landmark.predict import Predictor

MODEL_DIR = os.environ.get("LANDMARK_MODEL_DIR")
DATA_SETS = os.environ.get("LANDMARK_DATA_SETS", "world_heritage13 indian_monuments49 everyday").split()
BACKENDS = {"landmark_onnx": "onnx", "landmark_ts": "torchscript"}

pytestmark = pytest.mark.skipif(not MODEL_DIR, reason="set LANDMARK_MODEL_DIR to an exported model folder")


def test_served_offline_and_tagger_decide_alike_on_real_photos(shared_data: Path, tmp_path: Path) -> None:
    photos = sorted(p for name in DATA_SETS for p in (shared_data / name / "test").rglob("*") if p.is_file())
    assert photos, f"no test photos in {DATA_SETS}"
    model_dir = Path(MODEL_DIR)
    offline = {backend: Predictor.from_dir(model_dir, backend, device="cpu", threads=1)
               for backend in BACKENDS.values()}
    answers = {backend: {path: p.predict([path], 1)[0] for path in photos} for backend, p in offline.items()}

    def decision(answer: dict) -> tuple:
        return answer["top_k"][0]["label"], answer["landmark"] is not None, answer["reason"]

    # the two exports decide alike (their probabilities differ by ~1e-6, so only the rounded digits may differ)
    assert all(decision(answers["onnx"][p]) == decision(answers["torchscript"][p]) for p in photos)
    for name, backend in BACKENDS.items():
        build(model_dir, backend, name, "1.0", tmp_path / "store")
    with TorchServe(tmp_path / "store", list(BACKENDS), tmp_path / "ts", workers=1).start(timeout=180) as server:
        print(f"\ncold start: {server.cold_start_s:.1f} s")
        for name, backend in BACKENDS.items():
            same, t0 = 0, time.perf_counter()
            for path in photos:
                r = httpx.post(server.url(name), content=path.read_bytes(), timeout=60,
                                  headers={**server.headers(), "Content-Type": "image/jpeg", "X-Topk": "1"})
                assert r.status_code == 200, (path, r.text)
                served, want = r.json(), answers[backend][path]
                same += (served["top_k"], served["landmark"], served["reason"]) == (
                    want["top_k"], want["landmark"], want["reason"])
            per_photo = (time.perf_counter() - t0) / len(photos)
            print(f"{backend}: served answer == offline on {same}/{len(photos)} photos; "
                  f"{per_photo * 1000:.0f} ms per photo (HTTP, sequential)")
            assert same == len(photos)
    tagged = {}
    for name in DATA_SETS:
        dst = tmp_path / "tagged" / name
        done = run_module("app.tag", "--src", str(shared_data / name / "test"), "--dst", str(dst), "--local",
                          str(model_dir), "--device", "cpu", "--threads", "1", timeout=3600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = json.loads((dst / "tag_report.json").read_text())["photos"]
        for r in rows:
            want = answers["onnx"][shared_data / name / "test" / r["path"]]
            if r["action"] == "tagged" or r["reason"] in ("unknown place", "below operating point"):
                assert (r["action"] == "tagged") == (want["landmark"] is not None), r["path"]
            elif r["reason"] != "already has GPS":  # checked before the model's decision
                assert want["landmark"] is not None, r  # a file the model tagged but EXIF cannot be written into
        tagged[name] = f"{sum(r['action'] == 'tagged' for r in rows)}/{len(rows)}"
    print(f"tagger (--local) decisions == offline on every photo; tagged: {tagged}")
