"""Training under torchrun with 2 processes (DDP over gloo on this CPU), against the same run in one
process: one step of BatchNorm + dropout layers gives one process's outputs, gradients and running
statistics; the same seed gives the same test accuracy on the tiny set, only rank 0 writes the run's
files, the transfer path (sharded trunk cache, head, fine-tuning) runs too, and --resume works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, TINY_TRAIN_ARGS, run_module

TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "train.train", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_one_ddp_step_with_batchnorm_and_dropout_is_one_process_step(tmp_path: Path) -> None:
    """Each rank's loader deals every other photo of one process's batch, leaving the global generator
    where one process leaves it; plain DDP differs from one process in BatchNorm statistics and dropout
    masks, the synced layers do not."""
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "train.ddp_step",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for gaps in ranks:
        assert gaps["batches"] and gaps["rng"], gaps  # one process's batches, split; its dropout draws
        assert max(gaps["synced"].values()) < 1e-5, gaps
        assert gaps["plain"]["out"] > 1e-2 and gaps["plain"]["grad"] > 1e-3 and gaps["plain"]["buf"] > 1e-3, gaps


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_two_ranks_train_like_one_process_and_only_rank_0_writes(tiny_data: Path, tmp_path: Path) -> None:
    args = (*TINY_TRAIN_ARGS, "--data-dir", str(tiny_data))
    one = run_module("train.train", *args, "--out", str(tmp_path / "one"))
    two = torchrun(*args, "--out", str(tmp_path / "two"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0 of 2" in two.stdout and "rank 1 of 2" in two.stdout
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert abs(m1["test_accuracy"] - m2["test_accuracy"]) <= 1 / m1["n_test"] + 1e-9  # at most one photo apart
    log = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in log] == list(range(1, 9))  # one writer: no line twice
    assert two.stdout.count("test accuracy") == 1 and two.stdout.count("[scratch] epoch   8/8") == 1
    exported = run_module("train.export", "--run-dir", str(tmp_path / "two"))
    assert exported.returncode == 0, exported.stderr[-2000:]

    again = torchrun(*args, "--out", str(tmp_path / "two"), "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("resumed from") == 2 and "[scratch] epoch" not in again.stdout  # nothing left to train
    assert len((tmp_path / "two" / "log.jsonl").read_text().splitlines()) == 8


def test_transfer_trains_under_torchrun(tiny_data: Path, tmp_path: Path) -> None:
    done = torchrun("--arch", "transfer", "--backbone", "lite0", "--input-size", "64", "--epochs", "2",
                    "--head-epochs", "3", "--views", "1", "--batch-size", "16", "--threads", "1",
                    "--data-dir", str(tiny_data), "--out", str(tmp_path / "t"))
    assert done.returncode == 0, done.stderr[-3000:]
    stages = [json.loads(row)["stage"] for row in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    assert stages == ["head"] * 3 + ["finetune"] * 2
    assert metrics(tmp_path / "t")["processes"] == 2 and metrics(tmp_path / "t")["test_accuracy"] > 0.5
