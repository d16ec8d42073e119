"""The result record of ``make gpu-check`` (benchmarks.gpu_check): which GPU, each check's verdict and why,
and the CUDA rows of the ``make bench`` run it made, as JSON + Markdown. Written once, at the end, each
file atomically: a check cut short leaves no half-written results."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.report import LABELS, p50
from landmark import atomic
from landmark.meta import SchemaError

SCHEMA_VERSION = 1
PASS, FAIL, NOT_RUN = "pass", "fail", "not run"
CUDA_PAIRS = (("onnx-cpu", "onnx-cuda"), ("torchscript", "torchscript-cuda"))  # (CPU row, its CUDA row)


@dataclass(frozen=True)
class Check:
    """One part of the check: ``status`` is PASS, FAIL or NOT_RUN; ``detail`` says what was seen or why not."""

    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in (PASS, FAIL, NOT_RUN):
            raise ValueError(f"check {self.name}: status {self.status!r} is not one of {PASS}, {FAIL}, {NOT_RUN}")


@dataclass(frozen=True)
class GpuCheckRecord:
    started_at: str
    host: str
    gpus: list[str]
    versions: dict[str, Any]  # torch and its CUDA build, onnxruntime and its providers, the driver
    checks: list[Check]
    seconds: float
    bench_file: str | None = None  # the benchmarks.run result written beside this record
    cuda_rows: list[dict] = field(default_factory=list)  # cuda_rows() of that result

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> GpuCheckRecord:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(f"GPU check record has schema_version {d.get('schema_version')!r}; "
                              f"this code reads {SCHEMA_VERSION}")
        d = {k: v for k, v in d.items() if k != "schema_version"}
        return cls(**{**d, "checks": [Check(**c) for c in d["checks"]]})


def cuda_rows(bench: dict) -> list[dict]:
    """Per model of a ``benchmarks.run`` result: p50 ms of each CPU row and its CUDA row per batch, the
    CUDA speed-up over CPU, batch-1 ORT CUDA vs TorchScript CUDA, and the reason of each row that did not run.
    Batch sizes are string keys, as they read back from the JSON."""
    out = []
    for model in bench.get("models", []):
        if model.get("status") != "ok":
            out.append({"model": model["name"], "status": model["status"]})
            continue
        rows = {r["backend"]: r for r in model["backends"]}
        batches = sorted({c["batch"] for r in rows.values() if r["status"] == "ok" for c in r["cells"]})
        p50s = {str(b): {name: p50(model, name, b) for pair in CUDA_PAIRS for name in pair} for b in batches}
        speedup = {b: {gpu: cpu_ms / gpu_ms for cpu, gpu in CUDA_PAIRS
                       if (cpu_ms := p50s[b][cpu]) is not None and (gpu_ms := p50s[b][gpu]) is not None}
                   for b in p50s}
        ort, ts = (p50s.get("1") or {}).get("onnx-cuda"), (p50s.get("1") or {}).get("torchscript-cuda")
        out.append({"model": model["name"], "status": "ok", "input_size": model.get("input_size"),
                    "p50_ms": p50s, "cuda_speedup": speedup,
                    "batch1_ort_over_ts_cuda": ort / ts if ort is not None and ts is not None else None,
                    "not_run": {name: rows[name]["status"] for pair in CUDA_PAIRS for name in pair
                                if name in rows and rows[name]["status"] != "ok"}})
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "/")


def _model_lines(row: dict) -> list[str]:
    if row["status"] != "ok":
        return [f"### {row['model']}", "", _one_line(row["status"]), ""]
    batches = list(row["p50_ms"])
    lines = [f"### {row['model']}" + (f": input {row['input_size']} px" if row.get("input_size") else ""), "",
             "| backend | " + " | ".join(f"batch {b} p50 ms" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for name in (name for pair in CUDA_PAIRS for name in pair):
        lines.append(f"| {LABELS[name]} | " + " | ".join(_ms(row["p50_ms"][b][name]) for b in batches) + " |")
    lines.append("")
    ratio = row["batch1_ort_over_ts_cuda"]
    if ratio is not None:
        lines.append(f"Batch 1 p50: ONNX Runtime CUDA {_ms(row['p50_ms']['1']['onnx-cuda'])} ms, TorchScript "
                     f"CUDA {_ms(row['p50_ms']['1']['torchscript-cuda'])} ms: ORT / TS = {ratio:.2f}x.")
    for _, gpu in CUDA_PAIRS:
        ups = [(b, s[gpu]) for b, s in row["cuda_speedup"].items() if gpu in s]
        if ups:
            lines.append(f"{LABELS[gpu]} speed-up over its CPU row (p50): "
                         + ", ".join(f"batch {b} {x:.1f}x" for b, x in ups) + ".")
    lines += [f"{LABELS[name]}: {_one_line(why)}." for name, why in row["not_run"].items()]
    return [*lines, ""]


def markdown(record: GpuCheckRecord, source: str) -> str:
    """The checks and the CUDA rows, generated from the record (never edited by hand)."""
    gpus = ", ".join(record.gpus) or "none"
    v = record.versions
    lines = [f"# GPU check ({source})", "",
             f"Generated by `make gpu-check` from `{source}`: GPU {gpus}; torch {v.get('torch')} (CUDA "
             f"{v.get('torch_cuda')}), onnxruntime {v.get('onnxruntime')} {v.get('onnxruntime_providers')}; host "
             f"{record.host}; started {record.started_at}; {record.seconds:.0f} s.", "",
             "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {c.status} | {_one_line(c.detail)} |" for c in record.checks]
    lines.append("")
    if record.cuda_rows:
        lines += [f"## CUDA rows (`{record.bench_file}`, same run, CPU rows for the ratio)", ""]
        for row in record.cuda_rows:
            lines += _model_lines(row)
    not_run = [c for c in record.checks if c.status == NOT_RUN]
    if not_run:
        lines += ["## Not measured", ""] + [f"- {c.name}: {_one_line(c.detail)}" for c in not_run] + [""]
    return "\n".join(lines)


def write(record: GpuCheckRecord, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.md`` in ``out_dir``, each written atomically."""
    json_path, md_path = Path(out_dir) / f"{stem}.json", Path(out_dir) / f"{stem}.md"
    atomic.write_text(json_path, json.dumps(record.to_dict(), indent=2, default=str) + "\n")
    atomic.write_text(md_path, markdown(record, json_path.name))
    return json_path, md_path
