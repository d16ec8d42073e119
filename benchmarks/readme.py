"""README sections generated from results files, never typed by hand: each lies between
``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` and is rewritten whole by the benchmark that
measured it (``make bench-proxy``, ``make sweep``), or again from a saved result:

  python -m benchmarks.readme proxy benchmarks/results/proxy-<host>-<time>.json
  python -m benchmarks.readme sweep benchmarks/results/sweep-<host>-<time>.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from landmark import atomic

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTIONS = {"proxy": "benchmarks.proxy", "sweep": "benchmarks.sweep"}  # name -> module with readme_section()


def markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"


def write_section(readme: Path, name: str, text: str) -> bool:
    """Replace what lies between ``name``'s markers with ``text``; False (and the README untouched) where
    the markers are missing."""
    begin, end = markers(name)
    old = readme.read_text(encoding="utf-8")
    head, found, rest = old.partition(begin)
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        print(f"{readme}: no {begin} ... {end} markers: section not written", file=sys.stderr)
        return False
    atomic.write_text(readme, f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=sorted(SECTIONS))
    p.add_argument("result", type=Path, help="the benchmark's result JSON")
    p.add_argument("--readme", type=Path, default=README)
    return p


def main(args: argparse.Namespace) -> int:
    result = json.loads(args.result.read_text(encoding="utf-8"))
    text = importlib.import_module(SECTIONS[args.section]).readme_section(result, args.result.name)
    return 0 if write_section(args.readme, args.section, text) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
