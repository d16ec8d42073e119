"""README figures are generated (``make report``, benchmarks/readme.py) from the committed results files
each block names: regenerating leaves README.md byte for byte as committed, and a hand-edited figure is
found and put back."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from conftest import ROOT, run_make

from benchmarks.readme import BLOCK


def copy_readme(tmp_path: Path) -> Path:
    return Path(shutil.copyfile(ROOT / "README.md", tmp_path / "README.md"))


def test_make_report_leaves_the_readme_as_committed(tmp_path: Path) -> None:
    readme = copy_readme(tmp_path)
    done = run_make("report", f"REPORT_ARGS=--readme {readme}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert readme.read_bytes() == (ROOT / "README.md").read_bytes(), "a generated README table was edited by hand"
    blocks = BLOCK.findall(readme.read_text(encoding="utf-8"))
    assert blocks and "all as their sources give" in done.stdout
    for _, kind, sources, body, _ in blocks:  # each block names its files, and each figure's file is named
        files = sources.split()
        if not files:  # a section no run has written yet says so, with no figure in it
            assert "Not yet measured" in body and not re.search(r"\d+\.\d", body), kind
            continue
        assert all((ROOT / f).is_file() and f.startswith("benchmarks/results/") for f in files), kind
        assert all(Path(f).name in body for f in files), kind


def test_a_hand_edited_figure_is_found_and_put_back(tmp_path: Path) -> None:
    readme = copy_readme(tmp_path)
    text = readme.read_text(encoding="utf-8")
    block = next(b for b in BLOCK.finditer(text) if b["kind"] == "serving")
    figure = re.search(r"\d+\.\d requests/s", block["body"])[0]
    readme.write_text(text.replace(figure, "99.9 requests/s", 1), encoding="utf-8")
    check = run_make("report", f"REPORT_ARGS=--readme {readme} --check")
    assert check.returncode != 0 and "run make report" in check.stderr
    assert run_make("report", f"REPORT_ARGS=--readme {readme}").returncode == 0
    assert readme.read_text(encoding="utf-8") == text


def test_a_missing_source_file_is_named(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("<!-- make report: serving benchmarks/results/nowhere.json -->\n<!-- end make report -->\n",
                      encoding="utf-8")
    done = run_make("report", f"REPORT_ARGS=--readme {readme}")
    assert done.returncode != 0 and "source files missing: ['benchmarks/results/nowhere.json']" in done.stderr


def test_ci_time_comes_from_the_record_ci_run_writes(tmp_path: Path) -> None:
    """.ci/run's logs/ci-run.json, committed as a results file, gives the README's CI time."""
    record = tmp_path / "benchmarks" / "results" / "ci-run.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"schema_version": 1, "command": "bash .ci/run", "seconds": 1110, "cpus": 2, '
                      '"finished_at": "2026-12-05T15:00:00Z", "commit": "abc1234"}\n', encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text("CI (<!-- make report: ci-time benchmarks/results/ci-run.json --><!-- end make report -->)\n",
                      encoding="utf-8")
    done = run_make("report", f"REPORT_ARGS=--readme {readme} --root {tmp_path}")
    assert done.returncode == 0, done.stderr
    assert readme.read_text(encoding="utf-8") == ("CI (<!-- make report: ci-time benchmarks/results/ci-run.json -->"
                                                  "18 min on 2 CPUs, `ci-run.json`<!-- end make report -->)\n")
