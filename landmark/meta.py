"""The typed records a model carries: ``ModelRecord`` (what rebuilds the network; stored in every
checkpoint) and ``ModelMeta`` (``model_meta.json`` beside the exported files), each fact once.

Like timm's pretrained config, one record is read by every consumer: training, export, the
handler, the predictor, the tagger and the benchmarks. Files carry ``schema_version``; files that
earlier code wrote without one (version 1) are converted on reading, and any other version is
refused with a message that names it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from landmark import atomic
from landmark.preprocess import PreprocessConfig

SCHEMA_VERSION = 2
# constructor arguments every network takes from the record's classes and preprocessing, never from
# model_args (version 1 files stored them in both places)
SHARED_ARGS = ("num_classes", "mean", "std", "input_size")


class SchemaError(ValueError):
    """A record of a schema version this code cannot read."""


@dataclass(frozen=True)
class Location:
    lat: float
    lon: float
    country: str | None = None
    place: str | None = None


@dataclass(frozen=True)
class LandmarkClass:
    """One network output: the data set's folder name, its display name, and where it is (if known)."""

    label: str
    name: str
    location: Location | None = None

    @classmethod
    def from_dict(cls, d: dict) -> LandmarkClass:
        loc = d.get("location")
        return cls(d["label"], d["name"], Location(**loc) if loc else None)


@dataclass(frozen=True)
class ModelRecord:
    """Everything that rebuilds a trained network and names its outputs; a checkpoint stores it
    beside the weights and the metadata copies it. ``model_args`` holds only the arch's own
    constructor arguments (widths, backbone, ensemble members, ...); class count, input size and
    normalisation are derived from ``classes`` and ``preprocess``."""

    arch: str
    model_args: dict[str, Any]
    preprocess: PreprocessConfig
    classes: tuple[LandmarkClass, ...]
    data_fingerprint: str | None = None
    data_dir: str | None = None
    recipe: str | None = None
    train_args: dict[str, Any] = field(default_factory=dict)  # the run's settings, as JSON values

    def shared_args(self) -> dict[str, Any]:
        cfg = self.preprocess
        return {"num_classes": len(self.classes), "mean": cfg.mean, "std": cfg.std, "input_size": cfg.input_size}

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelRecord:
        d = _upgrade(d, "model record")
        return cls(d["arch"], d["model_args"], PreprocessConfig.from_dict(d["preprocess"]),
                   tuple(LandmarkClass.from_dict(c) for c in d["classes"]), d.get("data_fingerprint"),
                   d.get("data_dir"), d.get("recipe"), dict(d.get("train_args") or {}))


@dataclass(frozen=True)
class Int8Record:
    """What ``train.quantize`` published beside model.onnx: the static INT8 file, the choices that made
    it (so a rerun can repeat them) and its accuracy gate on the test split (so a reader knows how far
    the served INT8 answers may differ from FP32)."""

    file: str  # model.int8.onnx
    sha256: str
    source_sha256: str  # the model.onnx it was quantized from: a re-export makes it stale
    recipe: dict[str, Any]  # format, per-channel, types, calibration method and photos, excluded nodes
    parity: dict[str, Any]  # FP32 vs INT8 on the test split: top-1 of each, agreement, open-set decisions
    onnxruntime: str
    quantized_at: str


@dataclass(frozen=True)
class OpenSetRecord:
    """How ``open_set.npz`` was fitted (``train.open_set``): its method, operating point and what it
    measured on the validation photos (never a test split)."""

    method: str
    format_version: int  # of open_set.npz
    temperature: float
    min_precision: float  # the stored operating point's precision target
    threshold: float | None  # that operating point as a confidence (None: no validation tag reached it)
    gate_signals: list[str]  # the reference gate's inputs, in order ...
    gate_weight: list[float]  # ... and its weight per standardised input
    gate_exponent: float  # confidence = pT x P(known) x gate^exponent ...
    gate_selection: dict[str, float]  # ... the exponent with the best validation coverage among all queries
    view_sizes: list[int]  # shorter sides of the low-resolution views known photos and negatives entered at
    references: int  # reference embeddings carried (training photos and their views)
    folds: int  # the validation scores are cross-fitted over this many folds
    val_known: int  # validation queries (all views) of known landmarks ...
    val_negative: int  # ... of negatives ...
    val_lookalike: int  # ... and leave-class-out look-alikes (fitted on; not operating-point queries)
    val_coverage: float
    val_negatives_tagged: float
    val_lookalikes_tagged: float
    val_ece_before: float
    val_ece_after: float
    negatives: list[str] = field(default_factory=list)
    file: str | None = None  # open_set.npz
    bytes: int | None = None


@dataclass(frozen=True)
class ModelMeta:
    """``model_meta.json``: the record plus what export measured and wrote."""

    model: ModelRecord
    model_version: str
    outputs: tuple[str, ...]  # output names of model.onnx / model.ts, in order
    metrics: dict[str, Any]  # test accuracy of the run, copied from metrics.json
    parity: dict[str, Any]  # eager vs each exported file
    files: dict[str, str]  # file name -> sha256
    onnx_opset: int
    torch: str
    exported_at: str
    open_set: OpenSetRecord | None = None  # the fitted unknown-place decision, where there is one
    int8: Int8Record | None = None  # the quantized model.int8.onnx, where ``make quantize`` made one

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.model.preprocess

    @property
    def classes(self) -> tuple[LandmarkClass, ...]:
        return self.model.classes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return {"schema_version": SCHEMA_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> ModelMeta:
        d = _upgrade(d, "model metadata")
        return cls(ModelRecord.from_dict(d["model"]), d["model_version"], tuple(d["outputs"]), d["metrics"],
                   d["parity"], d["files"], d["onnx_opset"], d["torch"], d["exported_at"], _open_set(d.get("open_set")),
                   Int8Record(**d["int8"]) if d.get("int8") else None)

    def with_int8(self, int8: Int8Record) -> ModelMeta:
        return replace(self, int8=int8)


def _open_set(d: dict | None) -> OpenSetRecord | None:
    """The record of the fitted decision; one of the first format (before references) is refused."""
    if not d:
        return None
    if d.get("format_version") is None:
        raise SchemaError("its open-set decision is of format 1 (before reference photos): re-export the model "
                          "(python -m train.export --run-dir <run>)")
    return OpenSetRecord(**d)


def _strip_shared(model_args: dict) -> dict:
    args = {k: v for k, v in model_args.items() if k not in SHARED_ARGS}
    if "members" in args:
        args["members"] = [{"arch": m["arch"], "model_args": _strip_shared(m["model_args"])} for m in args["members"]]
    return args


def _upgrade(d: dict, what: str) -> dict:
    """Version 1 (no ``schema_version``: flat metadata, shared arguments repeated) -> version 2."""
    version = d.get("schema_version", 1)
    if version == SCHEMA_VERSION:
        return d
    if version != 1:
        raise SchemaError(f"{what} has schema_version {version!r}; this code reads versions 1 and {SCHEMA_VERSION}")
    model = {"arch": d["arch"], "model_args": _strip_shared(d["model_args"]), "preprocess": d["preprocess"],
             "classes": d["classes"], "data_fingerprint": d.get("data_fingerprint"), "data_dir": d.get("data_dir"),
             "train_args": d.get("args") or {}}
    if what == "model record":
        return model
    return {"model": {**model, "data_fingerprint": (d.get("metrics") or {}).get("dataset_fingerprint")},
            "model_version": d["model_version"], "outputs": [d["output"]["name"]], "metrics": d["metrics"],
            "parity": d["parity"], "files": d["files"], "onnx_opset": d["onnx_opset"], "torch": d["torch"],
            "exported_at": d["exported_at"]}


def read_meta_file(path: Path) -> ModelMeta:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `make export` on a training output first")
    try:
        return ModelMeta.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None


def write_meta_file(path: Path, meta: ModelMeta) -> None:
    atomic.write_text(path, json.dumps(meta.to_dict(), indent=2) + "\n")
