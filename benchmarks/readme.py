"""``make report``: rewrite README.md's generated blocks from the committed results files.

A generated block sits between two marker comments; the first names what renders it and its sources:

  <!-- make report: soak benchmarks/results/soak-a.json benchmarks/results/soak-b.json -->
  ...generated text, never edited by hand...
  <!-- end make report -->

Each renderer writes its figures from those JSON files only, and names the file of each figure in
the text, so ``make report`` on a clean clone rewrites the README byte for byte, and a hand-edited
figure is put back (tests/test_readme.py). ``--check`` changes nothing and exits 1 where a block is
not what its sources give.

  python -m benchmarks.readme [--readme README.md] [--check]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from benchmarks.report import p50
from landmark import atomic

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- make report:\s+(?P<kind>[\w-]+)(?P<sources>(?:\s+[^\s>]+)*?)\s*-->)(?P<body>.*?)"
                   r"(<!-- end make report -->)", re.DOTALL)
BACKEND_NAMES = {"onnx": "ONNX FP32", "onnx-int8": "ONNX INT8", "torchscript": "TorchScript"}


def _name(path: Path) -> str:
    return f"`{path.name}`"


def _soak_run(path: Path, result: dict) -> str:
    """One soak result file as a table row: what ran, what it measured, and the file."""
    s = result["settings"]
    what = f"soak: {s['requests']:,} requests at concurrency {s['concurrency']}, {100 / s['bad_every']:.0f}% bad " \
           f"inputs, {result['server']['workers']} workers, {BACKEND_NAMES.get(s['backend'], s['backend'])}"
    if s.get("serve_venv"):
        what += " from `make serve-venv`"
    bad: Counter[str] = Counter()
    for kind, got in result["outcomes"].items():
        if kind != "photo":
            bad.update(got)
    answered = ", ".join(f"{n} got {status}" for status, n in sorted(bad.items()))
    growth = result["memory"]["max_growth_pct"]
    pss = max(w["pss_mb"] for w in result["memory"]["end"].values())
    verdict = result["verdict"]["measured"]
    return (f"| {what} | {result['unexpected']['count']} unexpected errors (bad inputs: {answered}); "
            f"{result['requests_per_s']:.1f} requests/s; p99 last / first window {verdict['p99_last_over_first']:.2f}; "
            f"worker PSS {pss:.0f} MB, {growth:+.2f}% after warm-up | {_name(path)} |")


def _fault_runs(path: Path, result: dict) -> list[str]:
    """The faults file's three kinds of fault as table rows."""
    one, every = result["workers"]["one worker SIGKILLed"], result["workers"]["every worker SIGKILLed"]
    statuses = " or ".join(str(s) for s in sorted({e["status"] for r in (one, every) for e in r["failed_examples"]}))
    rows = [f"| 1 / both of {one['workers']} workers SIGKILLed under load ({one['requests']:,} requests at "
            f"concurrency {result['concurrency']}) | {one['failed']} / {every['failed']} failed (bounds "
            f"{one['failure_bound']} / {every['failure_bound']}: the dead workers' batches; {statuses} \"Worker "
            f"died\"); READY again in {one['recovery_s']:.1f} / {every['recovery_s']:.1f} s, readiness "
            f"{str(not one['ready_went_false']).lower()} / {str(not every['ready_went_false']).lower()} meanwhile; "
            f"{one['failed_after_recovery']} of {one['requests_after_recovery']:,} / {every['failed_after_recovery']} "
            f"of {every['requests_after_recovery']:,} later requests failed | {_name(path)} |"]
    server = result["server"]
    rows.append(f"| whole server SIGKILLed ({server['killed_processes']} processes), then `make serve` | starts "
                f"over its stale state ({len(server['stale_files'])} files: state, pid file, sockets) in "
                f"{server['restart_s']:.1f} s; `make stop` leaves {len(server['processes_left'])} processes | "
                f"{_name(path)} |")
    storage = result.get("storage") or {}
    if storage:
        rcs = " / ".join(sorted({str(c["rc"]) for c in storage.values()}))
        slowest = max(c["seconds"] for c in storage.values())
        rows.append(f"| server folder {', '.join(k.replace('_', ' ') for k in storage)} | `make serve` exits {rcs} "
                    f"in at most {slowest:.1f} s, naming the folder and the cause | {_name(path)} |")
    return rows


def serving(sources: list[Path], results: list[dict]) -> str:
    """The README's production-serving table: a row per soak file, the fault rows of a faults file."""
    rows = ["| run | result | file |", "|---|---|---|"]
    for path, result in zip(sources, results, strict=True):
        rows += [_soak_run(path, result)] if path.name.startswith("soak-") else _fault_runs(path, result)
    return "\n" + "\n".join(rows) + "\n"


def ci_time(sources: list[Path], results: list[dict]) -> str:
    """How long ``.ci/run`` took, inline."""
    [path], [result] = sources, results
    return f"{result['seconds'] / 60:.0f} min on {result['cpus']} CPUs, {_name(path)}"


def int8_speedup(sources: list[Path], results: list[dict]) -> str:
    """INT8 over FP32 ONNX Runtime p50, per model and batch size of a ``make bench`` result, inline."""
    [path], [result] = sources, results
    parts = []
    for model in result["models"]:
        speedups = [(c["batch"], fp32 / c["p50_ms"]) for row in model.get("backends", [])
                    if row["backend"] == "onnx-int8" and row["status"] == "ok" for c in row["cells"]
                    if (fp32 := p50(model, "onnx-cpu", c["batch"])) is not None]
        if speedups:
            parts.append(" / ".join(f"{x:.2f}x" for _, x in speedups) + f" on {model['name']}")
    batches = " / ".join(str(b) for b, _ in speedups)
    return f"INT8 p50 over FP32 at batch {batches}: {', '.join(parts)} ({_name(path)})"


def served_overhead(sources: list[Path], results: list[dict]) -> str:
    """The served endpoint of a ``make bench`` result against the same work in process, inline."""
    [path], [result] = sources, results
    served = result["served"]
    pss = " / ".join(f"{w['pss_mb']:.0f}" for w in served["workers"].values())
    return (f"p50 at concurrency 1 is {served['served_over_inprocess']:.2f}x the in-process cost, worker PSS "
            f"{pss} MB ({_name(path)})")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def open_set(sources: list[Path], results: list[dict]) -> str:
    """``make eval-open-set`` of each model: known photos (full size and shrunk) and each unknown set."""
    rows = ["| model (`open_set_eval.json`) | decision | known test tagged @ precision | shrunk known: tagged @ "
            "precision | unknown sets tagged (leave-source-out: *not* among the model's negatives) | GAP |",
            "|---|---|---|---|---|---|"]
    for path, r in zip(sources, results, strict=True):
        views = ", ".join(f"{v['size']} px {_pct(v['coverage'])} @ {_pct(v['precision'])}" for v in r.get("views", []))
        for which, name in (("baseline", "max probability ≥ 0.5"),
                            ("decision", f"open set, {r['min_precision']:.0%} target")):
            d = r[which]
            unknown = ", ".join(f"{u} ({n}) {_pct(d['false_tags'][u])}"
                                + ("" if u in r.get("seen_sources", []) else " (leave-source-out)")
                                for u, n in r["n_unknown"].items())
            rows.append(f"| {r['known'].split('/')[0]} ({r['n_known']}), {_name(path)} | {name} | "
                        f"{_pct(d['coverage'])} @ {_pct(d['precision'])} | {views if which == 'decision' else '–'} | "
                        f"{unknown} | {d['gap']:.3f} |")
    return "\n" + "\n".join(rows) + "\n"


def _section(module: str) -> Callable[[list[Path], list[dict]], str]:
    """A benchmark's own README section (its ``readme_section(result, source name)``), from one result file."""
    def render(sources: list[Path], results: list[dict]) -> str:
        [path], [result] = sources, results
        return "\n" + importlib.import_module(module).readme_section(result, path.name) + "\n"
    return render


RENDERERS: dict[str, Callable[[list[Path], list[dict]], str]] = {
    "serving": serving, "ci-time": ci_time, "int8-speedup": int8_speedup, "served-overhead": served_overhead,
    "open-set": open_set, "proxy": _section("benchmarks.proxy"), "sweep": _section("benchmarks.sweep")}


def write_section(readme: Path, kind: str, source: Path) -> bool:
    """After a benchmark run: point the README's ``kind`` block at ``source`` and render it from that file;
    False (and the README untouched) where the README has no such block."""
    text = readme.read_text(encoding="utf-8")
    blocks = [m for m in BLOCK.finditer(text) if m["kind"] == kind]
    if not blocks:
        print(f"{readme}: no '<!-- make report: {kind} ... -->' block: section not written", file=sys.stderr)
        return False
    source = source.resolve()
    root = readme.resolve().parent
    named = source.relative_to(root) if source.is_relative_to(root) else source
    m = blocks[0]
    head = f"<!-- make report: {kind} {named.as_posix()} -->"
    new = text[:m.start()] + head + RENDERERS[kind]([named], [json.loads(source.read_text(encoding="utf-8"))]) \
        + m.group(5) + text[m.end():]
    atomic.write_text(readme, new)
    return True


def render(text: str, root: Path) -> str:
    """``text`` with every generated block rewritten from its sources (paths relative to ``root``)."""
    def block(m: re.Match) -> str:
        kind = m["kind"]
        if kind not in RENDERERS:
            raise SystemExit(f"README block 'make report: {kind}': no such renderer ({', '.join(RENDERERS)})")
        sources = [Path(s) for s in m["sources"].split()]
        if not sources:  # a section no run has written yet: its placeholder stays
            return m.group(0)
        missing = [str(s) for s in sources if not (root / s).is_file()]
        if missing:
            raise SystemExit(f"README block 'make report: {kind}': source files missing: {missing}")
        results = [json.loads((root / s).read_text(encoding="utf-8")) for s in sources]
        return m.group(1) + RENDERERS[kind](sources, results) + m.group(5)

    return BLOCK.sub(block, text)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--root", type=Path, default=ROOT, help="the folder the blocks' source paths are relative to")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where a block differs")
    return p


def main(args: argparse.Namespace) -> int:
    text = args.readme.read_text(encoding="utf-8")
    new = render(text, args.root)
    blocks = len(BLOCK.findall(text))
    if new == text:
        print(f"{args.readme}: {blocks} generated blocks, all as their sources give")
        return 0
    if args.check:
        print(f"{args.readme}: a generated block differs from its sources: run make report", file=sys.stderr)
        return 1
    atomic.write_text(args.readme, new)
    print(f"{args.readme}: {blocks} generated blocks rewritten from their sources")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
