"""Data-parallel training under ``torchrun`` (DDP): one process per CPU share or GPU, gloo on CPU, NCCL
on CUDA. Outside torchrun every function here is the single-process identity, so training code calls
them unconditionally.

What DDP changes in a run: every rank sees the same data (the transfer net's trunk cache is computed
whole on each), and each training batch is split across the ranks (``ShardedShuffle``, with the
per-rank share of the recipe's batch), so the global batch, the learning-rate schedule and the
averaged gradient stay the single process's. So do the two things a half-batch would change:
BatchNorm takes its statistics over the whole batch (``sync_batch_stats``; torch's SyncBatchNorm
refuses CPU tensors), and dropout applies the rows of the mask a single process would draw for the
whole batch. Validation runs whole on every rank (so every rank takes the same early-stopping and
best-checkpoint decisions); only rank 0 writes files.
"""

from __future__ import annotations

import os
import types

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
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
    single-process gradient (with ``sync_batch_stats``)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n // world()

    def __iter__(self):
        """Drawn as RandomSampler draws: at the first index (after the loader's iterator has drawn its
        base seed from the same generator), and once more, for nothing, when the epoch is drained (its
        ``randperm(n)[:num_samples % n]``), so the next epoch's permutation is one process's too."""
        perm = torch.randperm(self.n, generator=self.generator)[: len(self) * world()]
        yield from perm[rank()::world()].tolist()
        torch.randperm(self.n, generator=self.generator)


def per_rank_batch(batch_size: int) -> int:
    return max(1, batch_size // world())


def _whole_batch_dropout(self: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """This rank's rows (every world-th, as ``ShardedShuffle`` deals them) of the mask that one process
    draws for the whole batch: the same draw (CPU dropout is ``empty_like(x).bernoulli_(1 - p)``), so
    the generator stays in step with one process's too."""
    if not self.training or self.p == 0:
        return type(self).forward(self, x)
    noise = x.new_empty((x.shape[0] * world(), *x.shape[1:])).bernoulli_(1 - self.p)[rank()::world()]
    return x * noise.div_(1 - self.p)


def _whole_batch_norm(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm (timm's BatchNormAct2d included) in training with the mean and variance of the whole
    batch: per-channel sums all-reduced in float64, differentiably, so the gradient is the whole batch's."""
    if not self.training:
        return type(self).forward(self, x)
    dims, c = [0, *range(2, x.dim())], x.shape[1]
    local = x.double()
    n = torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)
    sums = dist_nn.all_reduce(torch.cat([local.sum(dims), (local * local).sum(dims), n]))
    count = sums[-1]
    mean = sums[:c] / count
    var = sums[c:2 * c] / count - mean * mean
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
            self.running_mean.mul_(1 - m).add_(mean.to(x.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_((var * count / (count - 1)).to(x.dtype), alpha=m)
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype) + self.eps).view(shape)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if hasattr(self, "act"):  # timm's BatchNormAct2d: dropout, then the activation
        y = self.act(self.drop(y))
    return y


def sync_batch_stats(module: nn.Module) -> nn.Module:
    """Under DDP, the BatchNorm and dropout layers of ``module`` behave as over one process's whole batch."""
    if active() and world() > 1:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.forward = types.MethodType(_whole_batch_norm, m)
            elif isinstance(m, nn.Dropout):
                m.forward = types.MethodType(_whole_batch_dropout, m)
    return module


def wrap(module: nn.Module) -> nn.Module:
    """``module`` with its gradients averaged across ranks (on CPU no device ids, as gloo wants), and
    its batch statistics and dropout masks those of the whole batch."""
    if not active():
        return module
    sync_batch_stats(module)
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
