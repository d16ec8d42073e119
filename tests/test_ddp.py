"""Training under torchrun with 2 processes (DDP over gloo on this CPU), against the same run in one
process: one step of BatchNorm + dropout layers gives one process's outputs, gradients and running
statistics; the same seed gives the same test accuracy on the tiny set, only rank 0 writes the run's
files, the transfer path (sharded trunk cache, head, fine-tuning) runs too, and --resume works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, TINY_TRAIN_ARGS, run_module

TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "train.train", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


ONE_STEP = """
import json, sys
import torch, torch.distributed as dist
from timm.layers import BatchNormAct2d
from torch import nn
from torch.utils.data import TensorDataset
from train import distributed
from train.stages import loader

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                         nn.Flatten(), nn.Dropout(0.5), nn.Linear(128, 3))

def step(model, x, y):
    torch.manual_seed(1)  # the dropout draws
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    strip = lambda n: n.removeprefix("module.")
    return (out.detach(), {strip(n): p.grad for n, p in model.named_parameters()},
            {strip(n): b.float() for n, b in model.named_buffers()})

def gap(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)

def epochs(n=2):  # the batches a shuffled training loader deals, and the global generator after them
    torch.manual_seed(3)
    data = loader(TensorDataset(torch.arange(40)), 8, True, 0)
    return [b[0].tolist() for _ in range(n) for b in data], torch.get_rng_state()

x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.arange(8) % 3
ref = step(net(), x, y)  # one process, the whole batch (before the process group exists)
ref_batches, ref_rng = epochs()
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
batches, rng = epochs()
gaps = {"batches": batches == [b[r::w] for b in ref_batches], "rng": bool(torch.equal(rng, ref_rng))}
for name, model in (("synced", distributed.wrap(net())), ("plain", nn.parallel.DistributedDataParallel(net()))):
    out, grads, bufs = step(model, x[r::w], y[r::w])
    gaps[name] = {"out": (out - ref[0][r::w]).abs().max().item(), "grad": gap(grads, ref[1]), "buf": gap(bufs, ref[2])}
open(f"{sys.argv[1]}/rank{r}.json", "w").write(json.dumps(gaps))
dist.destroy_process_group()
"""


def test_one_ddp_step_with_batchnorm_and_dropout_is_one_process_step(tmp_path: Path) -> None:
    """Each rank's loader deals every other photo of one process's batch, leaving the global generator
    where one process leaves it; plain DDP differs from one process in BatchNorm statistics and dropout
    masks, the synced layers do not."""
    script = tmp_path / "one_step.py"
    script.write_text(ONE_STEP)
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
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
