"""What CI itself promises: ``.ci/run`` fails loudly without the real photo sets instead of letting their
tests skip, tests that find a set missing fail under it, and logs get no progress bars."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import conftest
import pytest
from conftest import ROOT

from landmark.progress import progress_bar


def test_ci_run_fails_in_one_line_without_the_photo_sets(tmp_path: Path) -> None:
    """A checkout whose ../shared/data is absent: .ci/run stops before `make test`, exit 1, one line."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / "Makefile").write_text("test:\n\t@echo make test ran\n", encoding="utf-8")
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "make test ran" not in done.stdout
    assert done.stderr.strip().splitlines() == [
        ".ci/run: ../shared/data not found (the real photo sets CI tests on): CI fails rather than skip them"]
    (tmp_path / "shared" / "data").mkdir(parents=True)  # present: on to make test, with the data required
    (repo / "Makefile").write_text("test:\n\t@echo make test ran with LANDMARK_REQUIRE_DATA=$$LANDMARK_REQUIRE_DATA\n",
                                   encoding="utf-8")
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LANDMARK_REQUIRE_DATA": ""})
    assert done.returncode == 0, done.stderr
    assert "make test ran with LANDMARK_REQUIRE_DATA=1" in done.stdout
    assert (repo / "logs" / "ci-run.json").is_file()


def test_missing_data_skips_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "REQUIRE_DATA", False)
    with pytest.raises(pytest.skip.Exception, match="no photos here"):
        conftest.missing_data("no photos here")
    monkeypatch.setattr(conftest, "REQUIRE_DATA", True)
    with pytest.raises(pytest.fail.Exception, match=r"no photos here: \.ci/run needs it"):
        conftest.missing_data("no photos here")


def test_progress_bars_only_on_a_terminal() -> None:
    log = io.StringIO()
    assert list(progress_bar(range(50), file=log, desc="decode")) == list(range(50))
    assert log.getvalue() == ""  # a log file gets nothing, not a carriage-return line per step
    leader, follower = os.openpty()
    with open(follower, "w") as tty:
        assert list(progress_bar(range(50), file=tty, desc="decode")) == list(range(50))
    drawn = os.read(leader, 65536).decode()
    os.close(leader)
    assert "decode" in drawn and "50/50" in drawn
