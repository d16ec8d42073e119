"""The soak's Markdown table and chart, from its one result record (benchmarks.soak).

  python -m benchmarks.soak_report benchmarks/results/soak-<host>-<time>.json   # rewrite its .md and .png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

from landmark import atomic


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _memory_rows(result: dict) -> list[str]:
    mem = result["memory"]
    rows = []
    for pid, end in mem["end"].items():
        start, warm = mem["start"].get(pid, {}), mem["warm"].get(pid, {})
        rows.append(f"| {pid} | {_f(start.get('rss_mb'))} | {_f(start.get('pss_mb'))} | {_f(warm.get('pss_mb'))} | "
                    f"{_f(end['rss_mb'])} | {_f(end['pss_mb'])} | {_f(mem['growth_pct'].get(pid), '+.2f')}% |")
    return rows


def _via(result: dict) -> str:
    """Which path the load took, and what the app used of memory and CPU on it (older results: TorchServe)."""
    if result.get("via", "torchserve") == "torchserve":
        return "sent to TorchServe directly"
    start, end = result["app"]["start"], result["app"]["end"]
    return (f"sent through the app (RSS {start['rss_mb']:.0f} -> {end['rss_mb']:.0f} MB, "
            f"{1e3 * (end['cpu_s'] - start['cpu_s']) / result['requests']:.2f} ms CPU per request)")


def soak_markdown(result: dict) -> str:
    m, s, v = result["machine"], result["settings"], result["verdict"]
    lines = [
        f"# Soak: {result['requests']} requests at concurrency {s['concurrency']}",
        "",
        f"{m['cpu']}, {m['cores_logical']} logical cores; started {result['started_at']}; "
        f"model `{s['model_dir']}` ({s['backend']}), {result['server']['workers']} workers, batch "
        f"{result['server']['batch_size']}, delay {result['server']['max_batch_delay']} ms; "
        f"{result['photos']['count']} real photos, every {s['bad_every']}th request a bad input; Locust, "
        f"{_via(result)}.",
        "",
        f"{result['wall_s']:.0f} s, {result['requests_per_s']:.1f} requests/s; workers replaced: "
        f"{result['workers_replaced'] or 'none'}.",
        "",
        "| bar | measured | limit | pass |",
        "|---|---|---|---|",
    ]
    for key, limit in v["bars"].items():
        lines.append(f"| {key} | {_f(v['measured'][key], '.3g')} | {limit} | {'yes' if v['passed'][key] else 'NO'} |")
    lines += ["", "Outcomes by kind of body (HTTP status: count):", "", "| kind | outcomes |", "|---|---|"]
    lines += [f"| {kind} | {', '.join(f'{k}: {n}' for k, n in sorted(st.items()))} |"
              for kind, st in sorted(result["outcomes"].items())]
    lines += ["", "Photo requests per window:", "", "| requests | p50 ms | p99 ms | max ms | requests/s |",
              "|---|---|---|---|---|"]
    lines += [f"| {w['from']}-{w['to']} | {_f(w.get('p50_ms'))} | {_f(w.get('p99_ms'))} | {_f(w.get('max_ms'))} | "
              f"{_f(w['requests_per_s'])} |" for w in result["windows"]]
    lines += ["", "Worker memory (MB; warm = first sample after the first window; growth = warm to end):", "",
              "| worker | RSS start | PSS start | PSS warm | RSS end | PSS end | PSS growth |",
              "|---|---|---|---|---|---|---|",
              *_memory_rows(result)]
    if result["unexpected"]["examples"]:
        lines += ["", "Unexpected answers (first 10):", "", *[f"- {e}" for e in result["unexpected"]["examples"]]]
    return "\n".join(lines) + "\n"


def save_soak_chart(result: dict, path: Path) -> None:
    fig = Figure(figsize=(12, 4), layout="constrained")
    lat, mem = fig.subplots(1, 2)
    wins = [w for w in result["windows"] if w.get("p50_ms") is not None]
    x = [w["to"] for w in wins]
    lat.plot(x, [w["p50_ms"] for w in wins], "o-", label="p50")
    lat.plot(x, [w["p99_ms"] for w in wins], "s-", label="p99")
    lat.set(xlabel="requests sent", ylabel="photo latency, ms", title="latency per window", ylim=(0, None))
    lat.legend(fontsize=8)
    trace = result["memory"]["trace"]
    t0 = trace[0]["t"] if trace else 0
    for pid in sorted({p for s in trace for p in s["workers"]}):
        points = [(s["t"] - t0, s["workers"][pid]["pss_mb"]) for s in trace if pid in s["workers"]]
        mem.plot(*zip(*points, strict=True), ".-", label=f"worker {pid}")
    mem.set(xlabel="seconds", ylabel="PSS, MB", title="worker memory", ylim=(0, None))
    mem.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"soak · {m['host']} · {m['cpu']} · {result['requests']} requests at concurrency "
                 f"{result['settings']['concurrency']} · {result['started_at']}", fontsize=10)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    path = Path((argv or sys.argv[1:])[0])
    result = json.loads(path.read_text(encoding="utf-8"))
    atomic.write_text(path.with_suffix(".md"), soak_markdown(result))
    save_soak_chart(result, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
