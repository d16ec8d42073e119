"""Data-parallel training under ``torchrun`` (DDP): one process per CPU share or GPU, gloo on CPU, NCCL
on CUDA. Outside torchrun every function here is the single-process identity, so training code calls
them unconditionally.

What DDP changes in a run: every rank sees the same data (the transfer net's trunk cache is computed
whole on each), and each training batch is split across the ranks (``ShardedShuffle``, with the
per-rank share of the recipe's batch), so the global batch, the learning-rate schedule and the
averaged gradient stay the single process's; validation runs whole on every rank (so every rank takes
the same early-stopping and best-checkpoint decisions); only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (nothing without torchrun)."""
    if "RANK" not in os.environ or active():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def device_of(device: torch.device) -> torch.device:
    """This rank's GPU under torchrun (LOCAL_RANK), else ``device``."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


class ShardedShuffle(Sampler[int]):
    """Each epoch, the permutation that a single process's shuffled DataLoader draws from the same
    generator, cut to this rank's every world-th index: the ranks' batches together are the
    single-process batch, so with the per-rank share of the batch the averaged gradient is the
    single-process gradient (but for BatchNorm statistics over the smaller per-rank batch)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n // world()

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator)[: len(self) * world()]
        return iter(perm[rank()::world()].tolist())


def per_rank_batch(batch_size: int) -> int:
    return max(1, batch_size // world())


def wrap(module: nn.Module) -> nn.Module:
    """``module`` with its gradients averaged across ranks (on CPU no device ids, as gloo wants)."""
    if not active():
        return module
    ids = [torch.cuda.current_device()] if next(module.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def sum_all(*values: float) -> list[float]:
    """Each value summed over the ranks (one all-reduce), for metrics of a training pass split across the ranks."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        dist.barrier()


def close() -> None:
    if active():
        dist.destroy_process_group()
