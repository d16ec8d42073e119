"""The terminal table, the Markdown table (``LATEST.md``, which the README links) and the JSON
result, all from the one result record.

  python -m benchmarks.report benchmarks/results/<host>-<date>.json   # rewrite its .md and LATEST.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from landmark import atomic

LATEST = "LATEST.md"
LABELS = {"eager": "PyTorch eager", "torchscript": "TorchScript", "onnx-cpu": "ONNX Runtime CPU",
          "onnx-int8": "ONNX Runtime INT8", "onnx-cuda": "ONNX Runtime CUDA", "torchscript-cuda": "TorchScript CUDA"}
HEADER = (f"{'backend':<18}{'batch':>5}{'n':>6}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'img/s':>9}"
          f"{'GFLOP/s':>9}{'%peak':>7}{'RSS+MB':>8}{'max|dp|':>9}")


def write_json(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2, default=str) + "\n")


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
    """Batch-1 TorchScript vs ONNX Runtime CPU side by side, the figure the issue's target is about, and
    the INT8 speed-up over FP32 ONNX at every batch size."""
    lines = []
    ts, ort = p50(model, "torchscript", 1), p50(model, "onnx-cpu", 1)
    if ts is not None and ort is not None:
        lines.append(f"batch 1 p50: TorchScript {ts:.2f} ms | ONNX Runtime CPU {ort:.2f} ms -> "
                     f"ORT/TS = {ort / ts:.2f}x")
    int8 = next((r for r in model.get("backends", []) if r["backend"] == "onnx-int8" and r["status"] == "ok"), None)
    speedups = [(c["batch"], fp32 / c["p50_ms"]) for c in (int8 or {}).get("cells", [])
                if (fp32 := p50(model, "onnx-cpu", c["batch"])) is not None]
    if speedups:
        lines.append("INT8 speed-up over FP32 ONNX (p50): " + ", ".join(f"batch {b} {x:.2f}x" for b, x in speedups))
    return lines


def _worker_memory(served: dict) -> str:
    """Each worker's PSS / RSS after the load (results before PSS was recorded: RSS only)."""
    if "workers" not in served:
        return f"worker RSS MB {served.get('worker_rss_mb')}"
    workers = served["workers"].values()
    return "worker PSS / RSS MB " + ", ".join(f"{w['pss_mb']:.0f} / {w['rss_mb']:.0f}" for w in workers)


def served_table(served: dict) -> str:
    if "status" in served:
        return f"== served endpoint: {served['status']}"
    lines = [f"== served endpoint ({served['server']}, photo {served['photo']['source']})"]
    if served.get("cold_start_s") is not None:
        lines.append(f"cold start (start -> READY) {served['cold_start_s']:.1f} s; {_worker_memory(served)}; "
                     f"frontend RSS MB {served.get('frontend_rss_mb')}; archive {served.get('archive')}")
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


def _machine_line(result: dict) -> str:
    m = result["machine"]
    gpu = m["gpu"] if m["gpu"] != "none" else f"none ({m.get('gpu_reason') or 'no CUDA device'})"
    return (f"{m['cpu']}, {m['cores_physical']} cores, GPU: {gpu}; {m['threads']['intra_op_threads']} threads; "
            f"measured float32 matmul peak {result['peak']['gflops']:.1f} GFLOP/s; started {result['started_at']}")


def markdown(result: dict, source: str) -> str:
    """p50 latency (ms) per model, backend and batch, unavailable backends with their reason, and the
    served endpoint; generated, never edited by hand."""
    lines = [f"# Benchmark results ({source})", "",
             f"Generated by `make bench` from `{source}`: {_machine_line(result)}.", ""]
    for model in result["models"]:
        lines.append(f"## {model['name']}" + (f": input {model['input_size']} px" if model.get("input_size") else ""))
        if model["status"] != "ok":
            lines += ["", model["status"], ""]
            continue
        ok = [r for r in model["backends"] if r["status"] == "ok"]
        batches = [c["batch"] for c in ok[0]["cells"]] if ok else []
        lines += ["", "| backend | " + " | ".join(f"batch {b} p50 ms" for b in batches) + " | max abs prob diff |",
                  "|---|" + "---|" * (len(batches) + 1)]
        for row in ok:
            cells = " | ".join(_num(p50(model, row["backend"], b), ".2f") for b in batches)
            lines.append(f"| {LABELS.get(row['backend'], row['backend'])} | {cells} | "
                         f"{_num(row.get('max_abs_prob_diff'), '.1e')} |")
        lines += [f"| {LABELS.get(r['backend'], r['backend'])} | {r['status']} |" for r in model["backends"]
                  if r["status"] != "ok"]
        lines.append("")
    served = result.get("served")
    if served and "levels" in served:
        lines += ["## Served endpoint", "",
                  f"{served['server']}; cold start {_num(served.get('cold_start_s'), '.1f')} s", "",
                  "| concurrency | requests | errors | p50 ms | p99 ms | requests/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {_num(lv.get('p50_ms'), '.1f')} | "
                  f"{_num(lv.get('p99_ms'), '.1f')} | {lv['throughput_rps']:.1f} |" for lv in served["levels"]]
        if "served_over_inprocess" in served:
            lines += ["", f"Served p50 at concurrency 1 = {served['served_over_inprocess']:.2f}x the in-process "
                          "decode + preprocess + model p50 of the same bytes."]
    elif served:
        lines += ["## Served endpoint", "", served["status"]]
    return "\n".join(lines) + "\n"


def write_markdown(json_path: Path, result: dict) -> None:
    """``<stem>.md`` beside the JSON, and the same text as the results folder's LATEST.md."""
    text = markdown(result, json_path.name)
    atomic.write_text(json_path.with_suffix(".md"), text)
    atomic.write_text(json_path.with_name(LATEST), text)


if __name__ == "__main__":
    for arg in sys.argv[1:] or sys.exit("usage: python -m benchmarks.report RESULT.json ..."):
        write_markdown(Path(arg), json.loads(Path(arg).read_text(encoding="utf-8")))
