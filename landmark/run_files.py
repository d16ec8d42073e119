"""A run folder's file names and its checkpoint I/O: the one place that knows what
``python -m train.train`` and ``train.export`` leave in ``--out``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from landmark import atomic
from landmark.meta import ModelMeta, ModelRecord, read_meta_file

BEST, LAST, LOG = "best.pt", "last.pt", "log.jsonl"
METRICS, CURVES, CONFUSION = "metrics.json", "curves.png", "confusion.png"
META = "model_meta.json"
OPEN_SET = "open_set.npz"  # the fitted open-set decision (landmark.open_set), beside the model files
# backend -> exported file; onnx-int8 is written by train.quantize, the others by train.export
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}


def model_file(model_dir: Path, backend: str) -> Path:
    if backend not in MODEL_FILES:
        raise ValueError(f"unknown backend {backend!r}: expected one of {sorted(MODEL_FILES)}")
    return Path(model_dir) / MODEL_FILES[backend]


def save_checkpoint(path: Path, record: ModelRecord, state_dict: dict, **training_state: Any) -> None:
    """The record, the weights and (for ``last.pt``) the state that resumes training, written atomically."""
    import torch

    with atomic.atomic_path(path) as tmp:
        torch.save({"record": record.to_dict(), "net": state_dict, **training_state}, tmp)


def load_checkpoint_file(path: Path) -> tuple[ModelRecord, dict]:
    """(record, the rest: ``net`` weights plus any training state) of one checkpoint file."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    if "record" in state:
        return ModelRecord.from_dict(state.pop("record")), state
    # written before schema version 2: the record's keys stood beside the weights
    return ModelRecord.from_dict(state), state


def read_checkpoint(run_dir: Path) -> tuple[ModelRecord, dict]:
    """A run's best checkpoint; a missing one is a CLI error that says what to run."""
    path = Path(run_dir) / BEST
    if not path.is_file():
        raise SystemExit(f"{path} not found: train first (python -m train.train ... --out {run_dir})")
    return load_checkpoint_file(path)


def read_meta(model_dir: Path) -> ModelMeta:
    """The ``model_meta.json`` of an exported run folder (or an unpacked archive)."""
    return read_meta_file(Path(model_dir) / META)
