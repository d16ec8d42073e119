"""One DDP training step against the same step in one process, on CPU (gloo) or one GPU per rank (NCCL).

Run under torchrun; each rank writes ``<out>/rank<r>.json``: whether its loader dealt its share of one
process's batches and left the global generator where one process leaves it, and the largest gap from
the one-process step (outputs, gradients, buffers) of ``train.distributed.wrap`` ("synced": BatchNorm
statistics and dropout masks of the whole batch) and of plain DDP. tests/test_ddp.py runs it on CPU,
benchmarks.gpu_check with NCCL where a machine has two or more GPUs.

  torchrun --standalone --nproc-per-node 2 -m train.ddp_step /tmp/ddp [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d
from torch import nn
from torch.utils.data import TensorDataset

from train import distributed
from train.stages import loader


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="One DDP step against one process's (run under torchrun).")
    p.add_argument("out", type=Path, help="folder for rank<r>.json")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: NCCL, GPU LOCAL_RANK per rank")
    return p


def net(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                         nn.Flatten(), nn.Dropout(0.5), nn.Linear(128, 3)).to(device)


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    torch.manual_seed(1)  # the dropout draws (CPU and CUDA generators)
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()

    def strip(n: str) -> str:
        return n.removeprefix("module.")

    return (out.detach(), {strip(n): p.grad for n, p in model.named_parameters()},
            {strip(n): b.float() for n, b in model.named_buffers()})


def gap(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def epochs(n: int = 2) -> tuple[list[list[int]], torch.Tensor]:
    """The batches a shuffled training loader deals, and the global generator after them."""
    torch.manual_seed(3)
    data = loader(TensorDataset(torch.arange(40)), 8, True, 0)
    return [b[0].tolist() for _ in range(n) for b in data], torch.get_rng_state()


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda":  # exact float32 on both sides: TF32 would differ between batch shapes
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    device = distributed.device_of(device)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(device)
    y = (torch.arange(8) % 3).to(device)
    ref = step(net(device), x, y)  # one process, the whole batch (before the process group exists)
    ref_batches, ref_rng = epochs()
    distributed.init(device)
    r, w = dist.get_rank(), dist.get_world_size()
    batches, rng = epochs()
    gaps: dict = {"device": str(device), "backend": dist.get_backend(), "world": w,
                  "batches": batches == [b[r::w] for b in ref_batches], "rng": bool(torch.equal(rng, ref_rng))}
    ids = [device.index] if device.type == "cuda" else None
    for name, model in (("synced", distributed.wrap(net(device))),
                        ("plain", nn.parallel.DistributedDataParallel(net(device), device_ids=ids))):
        out, grads, bufs = step(model, x[r::w], y[r::w])
        gaps[name] = {"out": (out - ref[0][r::w]).abs().max().item(), "grad": gap(grads, ref[1]),
                      "buf": gap(bufs, ref[2])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{r}.json").write_text(json.dumps(gaps), encoding="utf-8")
    distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
