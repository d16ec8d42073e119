"""The TorchServe handler in process, with TorchServe's own Context: loaded from an unpacked
archive exactly as a worker loads it, then fed a batch the way ts.service feeds it."""

from __future__ import annotations

import importlib.util
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import ts
import yaml
from conftest import synthetic_photo
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.archive import build
from handlers.landmark_handler import TOPK_HEADER, TOPK_PARAM, parse_topk, requested
from landmark.predict import Predictor


def load_handler(model_dir: Path, threads: int = 1):
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    spec = importlib.util.spec_from_file_location("archived_handler", model_dir / manifest["model"]["handler"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    context = Context(manifest["model"]["modelName"], str(model_dir), manifest, 4, None, "0.12.0",
                      metrics=metrics, model_yaml_config=config)
    handler = module.LandmarkHandler()
    handler.initialize(context)
    return handler, context


@pytest.fixture(scope="module", params=["onnx", "torchscript"])
def unpacked(request, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp(f"mar_{request.param}")
    with zipfile.ZipFile(build(tiny_model, request.param, "landmark", "1.0", tmp / "store")) as z:
        z.extractall(tmp / "model")
    return tmp / "model", request.param


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    synthetic_photo(seed % 3, np.random.default_rng(seed), (80, 64)).save(buf, "JPEG")
    return buf.getvalue()


def run_batch(handler, context: Context, items: list[dict], headers: list[dict]) -> list:
    context.request_processor = [RequestProcessor(h) for h in headers]
    return handler.handle(items, context)


def test_batch_matches_predictor_and_isolates_bad_items(unpacked: tuple[Path, str], tiny_model: Path) -> None:
    model_dir, backend = unpacked
    handler, context = load_handler(model_dir)
    assert handler.predictor.runner.backend == backend and handler.predictor.runner.device == "cpu"
    photos = [jpeg_bytes(i) for i in range(3)]
    items = [{"body": bytearray(photos[0])}, {"body": bytearray(b"\x89PNG broken")}, {"data": bytearray(photos[1])},
             {"body": bytearray(photos[2])}, {"body": bytearray(photos[2])}, {"body": bytearray(photos[2])},
             {"body": bytearray(photos[2]), "min_precision": bytearray(b"0.5")}]
    headers = [{}, {}, {}, {"X-Topk": "1"}, {"x-topk": "0"}, {"X-Min-Precision": "1.5"}, {}]
    out = run_batch(handler, context, items, headers)
    statuses = [context.get_response_status(i)[0] for i in range(len(items))]
    assert statuses == [200, 400, 200, 200, 400, 400, 200]
    assert all(context.get_response_content_type(i) == "application/json" for i in range(len(items)))
    assert "not an image" in json.loads(out[1])["error"] and "topk" in json.loads(out[4])["error"]
    assert "min_precision" in json.loads(out[5])["error"]
    predictor = Predictor.from_dir(tiny_model, backend, device="cpu", threads=1)
    offline = predictor.predict(photos, 3)
    served = [json.loads(out[i]) for i in (0, 2, 3)]
    for got, want in zip(served, [offline[0], offline[1], predictor.predict(photos[2:], 1)[0]], strict=True):
        assert [p["label"] for p in got["top_k"]] == [p["label"] for p in want["top_k"]]
        assert np.allclose([p["probability"] for p in got["top_k"]], [p["probability"] for p in want["top_k"]],
                           atol=2e-6)
        assert got["landmark"] == want["landmark"] and got["reason"] == want["reason"]
    assert json.loads(out[6])["operating_point"]["min_precision"] == 0.5


def test_handler_settings_from_env(unpacked: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANDMARK_MAX_PIXELS", "1000")
    handler, context = load_handler(unpacked[0])
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "PNG")
    out = run_batch(handler, context, [{"body": bytearray(buf.getvalue())}], [{}])
    assert context.get_response_status(0)[0] == 400 and "too large" in json.loads(out[0])["error"]
    for bad in ("0", "-2", "four"):
        monkeypatch.setenv("LANDMARK_THREADS", bad)
        with pytest.raises(ValueError, match=f"LANDMARK_THREADS.*positive integer, got '{bad}'"):
            load_handler(unpacked[0])


def test_topk_parsing() -> None:
    assert parse_topk(None, 3) == 3 and parse_topk(None, 13) == 5 and parse_topk(" 2 ", 13) == 2
    for bad in ("0", "14", "x", "1.5", ""):
        with pytest.raises(ValueError, match="topk"):
            parse_topk(bad, 13)
    # a query/form field beats the header
    assert requested({"topk": bytearray(b"3")}, {"X-Topk": "1"}, TOPK_PARAM, TOPK_HEADER) == "3"
    assert requested({"body": {"data": "...", "topk": 2}}, {}, TOPK_PARAM, TOPK_HEADER) == "2"
    assert requested({"body": b""}, {"X-TOPK": "4", "body": {"content-type": "image/png"}}, TOPK_PARAM,
                     TOPK_HEADER) == "4"
