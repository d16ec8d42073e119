"""Every command line refuses an out-of-range number up front: exit 2 with one line naming the
flag, nothing written. Before, `handlers.archive --threads 0` built an archive whose worker
crash-looped (torch.set_num_threads(0)), and `--max-pixels -5` one that refused every photo."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import run_module

from landmark.cli import non_negative_int, port, positive_float, positive_int


@pytest.mark.parametrize(("kind", "good", "bad"), [
    (positive_int, {"1": 1, "32": 32}, ["0", "-3", "2.5", "", "x"]),
    (non_negative_int, {"0": 0, "7": 7}, ["-1", "1e3", "one"]),
    (port, {"1": 1, "8080": 8080, "65535": 65535}, ["0", "65536", "-80"]),
    (positive_float, {"0.5": 0.5, "60": 60.0, "1e-4": 1e-4}, ["0", "-1", "nan", "inf", "soon"]),
])
def test_argument_types(kind, good: dict, bad: list[str]) -> None:
    for text, value in good.items():
        assert kind(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace("\\", "\\\\")):
            kind(text)


@pytest.mark.parametrize("argv", [
    ["handlers.archive", "--model-dir", "{model}", "--store", "{store}", "--threads", "0"],
    ["handlers.archive", "--model-dir", "{model}", "--store", "{store}", "--max-pixels", "-5"],
    ["handlers.archive", "--model-dir", "{model}", "--store", "{store}", "--batch-size", "0"],
    ["handlers.server", "--workdir", "{store}", "predict", "photo.jpg", "--topk", "0"],
    ["handlers.server", "--workdir", "{store}", "start", "--store", "{store}", "--timeout", "-1"],
    ["benchmarks.run", "--out-dir", "{store}", "--batch-sizes", "1", "0"],
    ["benchmarks.run", "--out-dir", "{store}", "--concurrency", "0"],
    ["app.web", "--port", "70000"],
    ["app.tag", "--src", "{model}", "--dst", "{store}", "--timeout", "0"],
    ["train.download", "--dest", "{store}/data", "--timeout", "nan"],
    ["train.export", "--run-dir", "{model}", "--atol", "-1"],
])
def test_bad_numbers_are_usage_errors(argv: list[str], tmp_path: Path) -> None:
    model, store = tmp_path / "model", tmp_path / "store"
    model.mkdir()
    done = run_module(*(a.format(model=model, store=store) for a in argv), timeout=120)
    flag = next(a for a in reversed(argv) if a.startswith("--"))
    assert done.returncode == 2, done.stderr
    assert f"argument {flag}: expected" in done.stderr and "Traceback" not in done.stderr
    assert not store.exists() and list(model.iterdir()) == []
