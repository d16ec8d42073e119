"""A PNG of the results: p50 latency (whiskers to p90/p99) and throughput per backend and batch,
one row per model, plus the served endpoint by concurrency. matplotlib's object API only (no pyplot
state, safe in tests and threads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from benchmarks.report import LABELS
from landmark import atomic


def _bars(ax, model: dict, key: str, ylabel: str) -> None:
    rows = [r for r in model["backends"] if r["status"] == "ok"]
    batches = sorted({c["batch"] for r in rows for c in r["cells"]})
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(batches))
    for i, row in enumerate(rows):
        cells = {c["batch"]: c for c in row["cells"]}
        vals = [cells[b][key] if b in cells else np.nan for b in batches]
        kwargs = {}
        if key == "p50_ms":  # whiskers from p50 up to p99
            kwargs["yerr"] = [[0] * len(batches), [cells[b]["p99_ms"] - cells[b]["p50_ms"] if b in cells else 0
                                                   for b in batches]]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=LABELS.get(row["backend"], row["backend"]),
               capsize=2, **kwargs)
    ax.set_xticks(x, [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    missing = [f"{LABELS.get(r['backend'], r['backend'])}: {r['status'].split(':')[0]} (reason in the JSON)"
               for r in model["backends"] if r["status"] != "ok"]
    if missing and key == "p50_ms":
        ax.text(0.01, 0.99, "\n".join(missing), transform=ax.transAxes, va="top", fontsize=6, color="0.35")


def _served(ax, served: dict) -> None:
    levels = [lv for lv in served["levels"] if "p50_ms" in lv]
    conc = [lv["concurrency"] for lv in levels]
    for q in ("p50_ms", "p90_ms", "p99_ms"):
        ax.plot(conc, [lv[q] for lv in levels], marker="o", label=f"served {q[:-3]}")
    for lv in levels:
        ax.annotate(f"{lv['throughput_rps']:.1f} req/s, {lv['errors']} err", (lv["concurrency"], lv["p50_ms"]),
                    textcoords="offset points", xytext=(4, -12), fontsize=7)
    ref = served.get("inprocess", {}).get("end_to_end")
    if ref:
        ax.axhline(ref["p50_ms"], color="0.4", linestyle="--", label="in-process p50, same bytes")
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency (ms)")
    ax.set_title("TorchServe endpoint", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _breakdown(ax, served: dict) -> None:
    """Where a concurrency-1 request's time goes: in-process parts against the served p50."""
    ref = served.get("inprocess")
    one = next((lv for lv in served["levels"] if lv["concurrency"] == 1 and "p50_ms" in lv), None)
    if not ref or not one:
        ax.axis("off")
        return
    names = ["decode +\npreprocess", "model", "in-process\nend to end", "served\n(concurrency 1)"]
    vals = [ref["decode_preprocess"]["p50_ms"], ref["model"]["p50_ms"], ref["end_to_end"]["p50_ms"], one["p50_ms"]]
    ax.bar(names, vals, color=["C0", "C1", "C2", "C3"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"serving overhead {served['overhead_ms']:.1f} ms ({served['served_over_inprocess']:.2f}x)",
                 fontsize=9)


def save_chart(result: dict, path: Path) -> None:
    models = [m for m in result["models"] if m["status"] == "ok"]
    served = result.get("served") if result.get("served", {}).get("levels") else None
    rows = len(models) + (1 if served else 0)
    fig = Figure(figsize=(12, 3.6 * max(1, rows)), layout="constrained")
    axes = fig.subplots(max(1, rows), 2, squeeze=False)
    for i, model in enumerate(models):
        _bars(axes[i][0], model, "p50_ms", "p50 latency, ms (whisker: p99)")
        _bars(axes[i][1], model, "images_per_s", "images / s")
        axes[i][0].set_title(f"{model['name']}: latency", fontsize=9)
        axes[i][1].set_title(f"{model['name']}: throughput", fontsize=9)
        axes[i][0].legend(fontsize=7, loc="lower right")
    if served:
        _served(axes[rows - 1][0], served)
        _breakdown(axes[rows - 1][1], served)
    if not models and not served:
        axes[0][0].text(0.5, 0.5, "no results", ha="center")
    m = result["machine"]
    fig.suptitle(f"{m['host']} · {m['cpu']} · {m['threads']['intra_op_threads']} threads · GPU: "
                 f"{m['gpu'] if m['gpu'] != 'none' else 'none'} · {result['started_at']}", fontsize=10)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
