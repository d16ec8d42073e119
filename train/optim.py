"""Optimisers and the per-step learning-rate schedule (linear warm-up, cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """No weight decay on biases and norm parameters; optional per-prefix LR multipliers."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for prefix, s in (lr_scale or {}).items() if name.startswith(prefix)), 1.0)
        decay = 0.0 if p.ndim <= 1 else weight_decay
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": d} for (s, d), ps in groups.items()]


def make_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimiser {name!r}: expected adamw or sgd")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  floor: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch: a short warm-up keeps from-scratch BN nets and new heads stable."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
