"""The loop every training stage shares: per-step LR schedule, AMP on CUDA, best checkpoint
by validation loss, early stopping, and resume from an atomically written ``last.pt``."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from landmark import atomic
from landmark.meta import ModelRecord
from landmark.progress import progress_bar
from landmark.run_files import BEST, LAST, LOG, load_checkpoint_file, save_checkpoint
from train import distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is available")
    return torch.device(name)


@dataclass
class Stage:
    """One phase of training: which module runs on which batches, with which optimiser."""

    name: str
    module: nn.Module  # maps a loader's x to logits; its parameters belong to the run's net
    train_loader: Iterable
    val_loader: Iterable | None  # None: no validation, so each epoch replaces the best (the schedule's end wins)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epochs: int
    patience: int


def run_epoch(module: nn.Module, loader: Iterable, device: torch.device, criterion: nn.Module,
              optimizer: torch.optim.Optimizer | None = None,
              scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, desc: str = "") -> dict:
    """Train (with an optimiser) or evaluate over one pass; returns mean loss and accuracy. Under DDP a
    training pass covers this rank's part of each batch, so its sums are added over the ranks."""
    training = optimizer is not None
    module.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    amp = device.type == "cuda"
    with torch.set_grad_enabled(training):
        for x, y in progress_bar(loader, desc=desc, leave=False, unit="batch", disable=not distributed.is_main()):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = module(x)
                loss = criterion(logits.float(), y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            total_loss += loss.item() * len(y)
            hard = y.argmax(1) if y.ndim == 2 else y  # MixUp/CutMix batches carry soft targets
            correct += (logits.argmax(1) == hard).sum().item()
            seen += len(y)
    if training:
        total_loss, correct, seen = distributed.sum_all(total_loss, correct, seen)
    return {"loss": total_loss / seen, "acc": correct / seen}


class Run:
    """A training run in ``out_dir``: the net, its rebuild record, history and checkpoints."""

    def __init__(self, net: nn.Module, record: ModelRecord, out_dir: Path, device: torch.device,
                 label_smoothing: float = 0.1) -> None:
        self.net, self.record, self.out_dir, self.device = net, record, out_dir, device
        self.train_criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()
        self.history: list[dict] = []
        self.best_val_loss = float("inf")
        self.done: list[str] = []
        self.resume_state: dict | None = None

    def resume(self) -> bool:
        """Load ``last.pt`` if present; completed stages are then skipped by ``fit``."""
        path = self.out_dir / LAST
        if not path.is_file():
            return False
        _, state = load_checkpoint_file(path)
        self.net.load_state_dict(state["net"])
        self.history, self.best_val_loss, self.done = state["history"], state["best_val_loss"], state["done"]
        self.resume_state = state
        print(f"resumed from {path}: stage {state['stage']!r}, epoch {state['epoch']}, done {self.done}")
        return True

    def _checkpoint(self, stage: Stage, epoch: int, bad_epochs: int) -> None:
        if not distributed.is_main():  # every rank holds the same weights: one writes them
            return
        save_checkpoint(self.out_dir / LAST, self.record, self.net.state_dict(), stage=stage.name, epoch=epoch,
                        bad_epochs=bad_epochs, optimizer=stage.optimizer.state_dict(),
                        scheduler=stage.scheduler.state_dict(), history=self.history,
                        best_val_loss=self.best_val_loss, done=self.done,
                        rng=torch.get_rng_state(), py_rng=random.getstate())

    def fit(self, stage: Stage) -> None:
        """Train one stage to its epoch budget or until val loss stops improving."""
        if stage.name in self.done:
            return
        start, bad_epochs = 0, 0
        state, self.resume_state = self.resume_state, None
        if state is not None and state["stage"] == stage.name:
            stage.optimizer.load_state_dict(state["optimizer"])
            stage.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            random.setstate(state["py_rng"])
            start, bad_epochs = state["epoch"] + 1, state["bad_epochs"]
        module = distributed.wrap(stage.module)
        for epoch in range(start, stage.epochs):
            if bad_epochs >= stage.patience:
                break
            t0 = time.perf_counter()
            tr = run_epoch(module, stage.train_loader, self.device, self.train_criterion,
                           stage.optimizer, stage.scheduler, desc=f"{stage.name} {epoch + 1}/{stage.epochs}")
            va = (run_epoch(stage.module, stage.val_loader, self.device, self.eval_criterion, desc="val")
                  if stage.val_loader is not None else {"loss": None, "acc": None})
            row = {"stage": stage.name, "epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"],
                   "val_loss": va["loss"], "val_acc": va["acc"], "lr": stage.optimizer.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 2)}
            self.history.append(row)
            improved = va["loss"] is None or va["loss"] < self.best_val_loss
            if improved:
                bad_epochs = 0
                if va["loss"] is not None:
                    self.best_val_loss = va["loss"]
                if distributed.is_main():
                    save_checkpoint(self.out_dir / BEST, self.record, self.net.state_dict())
            else:
                bad_epochs += 1
            self._checkpoint(stage, epoch, bad_epochs)
            self._write_log()
            val = "no val" if va["loss"] is None else f"val loss {va['loss']:.3f} acc {va['acc']:.3f}"
            if distributed.is_main():
                print(f"[{stage.name}] epoch {epoch + 1:3d}/{stage.epochs}  train loss {tr['loss']:.3f} acc "
                      f"{tr['acc']:.3f}  {val}  {row['seconds']:.1f}s" + ("  *best" if improved else ""), flush=True)
        self.done.append(stage.name)
        self.load_best()
        self._checkpoint(stage, stage.epochs, bad_epochs)

    def _write_log(self) -> None:
        """log.jsonl is rewritten from the checkpointed history, so a killed run never leaves a
        line for an epoch that ``--resume`` will train again."""
        if distributed.is_main():
            atomic.write_text(self.out_dir / LOG, "".join(json.dumps(row) + "\n" for row in self.history))

    def load_best(self) -> None:
        distributed.barrier()  # rank 0 has written best.pt
        self.net.load_state_dict(load_checkpoint_file(self.out_dir / BEST)[1]["net"])
