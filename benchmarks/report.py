"""The terminal table and the atomic writers for the JSON and PNG results."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

LABELS = {"eager": "PyTorch eager", "torchscript": "TorchScript", "onnx-cpu": "ONNX Runtime CPU",
          "onnx-cuda": "ONNX Runtime CUDA", "torchscript-cuda": "TorchScript CUDA"}
HEADER = (f"{'backend':<18}{'batch':>5}{'n':>6}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'img/s':>9}"
          f"{'GFLOP/s':>9}{'%peak':>7}{'RSS+MB':>8}{'max|dp|':>9}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write beside the target, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8"))


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def backend_lines(row: dict) -> list[str]:
    label = LABELS.get(row["backend"], row["backend"])
    if row["status"] != "ok":
        return [f"{label:<18}{row['status']}"]
    diff = row.get("max_abs_prob_diff")
    lines = []
    for c in row["cells"]:
        lines.append(f"{label:<18}{c['batch']:>5}{c['n']:>6}{c['mean_ms']:>9.2f}{c['p50_ms']:>9.2f}"
                     f"{c['p90_ms']:>9.2f}{c['p99_ms']:>9.2f}{c['images_per_s']:>9.1f}"
                     f"{_num(c.get('gflops'), '9.1f'):>9}{_num(c.get('pct_of_peak'), '7.1f'):>7}"
                     f"{c['peak_rss_delta_mb']:>8.0f}{_num(diff, '9.1e'):>9}")
    return lines


def model_table(model: dict) -> str:
    head = f"== {model['name']} ({model['path']})"
    if model["status"] != "ok":
        return f"{head}: {model['status']}"
    flops = model.get("flops_per_image")
    head += (f": input {model['input_size']} px, {flops / 1e9:.3f} GFLOP/image" if flops else "") + \
        f", inputs from {model['inputs']['source']}; latency in ms"
    lines = [head, HEADER] + [ln for row in model["backends"] for ln in backend_lines(row)]
    lines += [f"   {c}" for c in comparisons(model)]
    return "\n".join(lines)


def p50(model: dict, backend: str, batch: int) -> float | None:
    for row in model.get("backends", []):
        if row["backend"] == backend and row["status"] == "ok":
            for c in row["cells"]:
                if c["batch"] == batch:
                    return c["p50_ms"]
    return None


def comparisons(model: dict) -> list[str]:
    """Batch-1 TorchScript vs ONNX Runtime CPU side by side, the figure the issue's target is about."""
    ts, ort = p50(model, "torchscript", 1), p50(model, "onnx-cpu", 1)
    if ts is None or ort is None:
        return []
    return [f"batch 1 p50: TorchScript {ts:.2f} ms | ONNX Runtime CPU {ort:.2f} ms -> ORT/TS = {ort / ts:.2f}x"]


def served_table(served: dict) -> str:
    if "status" in served:
        return f"== served endpoint: {served['status']}"
    lines = [f"== served endpoint ({served['server']}, photo {served['photo']['source']})"]
    if served.get("cold_start_s") is not None:
        lines.append(f"cold start (start -> READY) {served['cold_start_s']:.1f} s; worker RSS MB "
                     f"{served.get('worker_rss_mb')}; frontend RSS MB {served.get('frontend_rss_mb')}; "
                     f"archive {served.get('archive')}")
    lines.append(f"{'concurrency':>11}{'requests':>9}{'errors':>7}{'p50':>9}{'p90':>9}{'p99':>9}{'req/s':>8}")
    for lv in served["levels"]:
        lines.append(f"{lv['concurrency']:>11}{lv['requests']:>9}{lv['errors']:>7}{_num(lv.get('p50_ms'), '9.2f'):>9}"
                     f"{_num(lv.get('p90_ms'), '9.2f'):>9}{_num(lv.get('p99_ms'), '9.2f'):>9}"
                     f"{lv['throughput_rps']:>8.1f}")
    ref = served.get("inprocess")
    if ref:
        parts = ", ".join(f"{k} {v['p50_ms']:.2f}" for k, v in ref.items())
        lines.append(f"in-process p50 ms (same bytes, same threads): {parts}")
    if "overhead_ms" in served:
        lines.append(f"serving overhead at concurrency 1: {served['overhead_ms']:.2f} ms "
                     f"(served p50 = {served['served_over_inprocess']:.2f}x in-process)")
    return "\n".join(lines)


def render(result: dict) -> str:
    m = result["machine"]
    head = (f"{m['cpu']} | {m['cores_physical']} cores | GPU: {m['gpu'] if m['gpu'] != 'none' else 'none'} | "
            f"threads {m['threads']['intra_op_threads']} | matmul peak {result['peak']['gflops']:.1f} GFLOP/s | "
            f"load avg {m['load_average_start'][0]:.2f} -> {result['load_average_end'][0]:.2f}")
    parts = [head, *(f"WARNING: {w}" for w in result.get("warnings", [])),
             *(model_table(model) for model in result["models"])]
    if result.get("served"):
        parts.append(served_table(result["served"]))
    return "\n\n".join(parts)
