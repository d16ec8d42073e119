"""The typed model records: what earlier code wrote (schema version 1: flat, arguments repeated)
still loads, today's round-trips, and an unknown version is refused with a message naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from landmark.meta import SCHEMA_VERSION, Int8Record, ModelMeta, ModelRecord, SchemaError
from landmark.run_files import BEST, META, load_checkpoint_file, read_meta, save_checkpoint

CLASSES = [{"label": "16.Eiffel_Tower", "name": "Eiffel Tower",
            "location": {"lat": 48.8584, "lon": 2.2945, "country": "France", "place": "Paris"}},
           {"label": "my cabin", "name": "My Cabin", "location": None}]
PREPROCESS = {"input_size": 224, "resize_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
V1_ARGS = {"num_classes": 2, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "backbone": "lite0",
           "input_size": 224, "drop_path": 0.0}
V1_META = {  # model_meta.json as train.export wrote it before schema version 2
    "model_version": "1.0", "arch": "transfer", "model_args": V1_ARGS, "preprocess": PREPROCESS,
    "input": {"name": "image", "dtype": "uint8", "layout": "NCHW", "shape": ["batch", 3, 224, 224]},
    "output": {"name": "logits", "kind": "logits"}, "classes": CLASSES,
    "metrics": {"test_accuracy": 0.84, "test_top5": 0.94, "n_test": 207, "dataset_fingerprint": "abc"},
    "parity": {"n_images": 32}, "files": {"model.onnx": "00"}, "onnx_opset": 17, "torch": "2.14.1",
    "exported_at": "2026-11-29T11:00:00Z"}


def test_version_1_metadata_loads_with_each_fact_once(tmp_path: Path) -> None:
    (tmp_path / META).write_text(json.dumps(V1_META))
    meta = read_meta(tmp_path)
    assert meta.model.model_args == {"backbone": "lite0", "drop_path": 0.0}  # shared arguments stored once
    assert meta.model.shared_args() == {"num_classes": 2, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                        "input_size": 224}
    assert meta.classes[0].location.country == "France" and meta.classes[1].location is None
    assert meta.outputs == ("logits",) and meta.open_set is None and meta.model.data_fingerprint == "abc"
    assert meta.int8 is None  # written before train.quantize
    again = ModelMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta and meta.to_dict()["schema_version"] == SCHEMA_VERSION


def test_int8_record_round_trips_and_is_optional() -> None:
    meta = ModelMeta.from_dict(json.loads(json.dumps({**V1_META})))
    v2 = meta.to_dict()
    assert "int8" in v2 and v2["int8"] is None
    del v2["int8"]  # version 2 metadata written before train.quantize existed
    assert ModelMeta.from_dict(v2) == meta
    record = Int8Record("model.int8.onnx", "11", "00", {"format": "qoperator", "exclude": ["head"]},
                        {"fp32_top1": 0.9, "int8_top1": 0.9}, "1.31.1", "2026-12-02T00:00:00Z")
    quantized = meta.with_int8(record)
    again = ModelMeta.from_dict(json.loads(json.dumps(quantized.to_dict())))
    assert again == quantized and again.int8 == record and again.model == meta.model


def test_unknown_schema_version_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / META).write_text(json.dumps({**V1_META, "schema_version": 99}))
    with pytest.raises(SchemaError, match=r"model_meta.json: model metadata has schema_version 99; this code reads"):
        read_meta(tmp_path)


def test_checkpoints_old_and_new(tmp_path: Path) -> None:
    weights = {"w": torch.ones(2)}
    torch.save({"arch": "transfer", "model_args": V1_ARGS, "preprocess": PREPROCESS, "classes": CLASSES,
                "data_fingerprint": "abc", "data_dir": "/data", "args": {"seed": "0"}, "net": weights},
               tmp_path / "old.pt")
    record, state = load_checkpoint_file(tmp_path / "old.pt")
    assert record.model_args == {"backbone": "lite0", "drop_path": 0.0} and record.train_args == {"seed": "0"}
    assert torch.equal(state["net"]["w"], weights["w"])
    save_checkpoint(tmp_path / BEST, record, weights, epoch=3)
    reread, state = load_checkpoint_file(tmp_path / BEST)
    assert reread == record and state["epoch"] == 3 and isinstance(reread, ModelRecord)
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left beside it
