"""Test-set evaluation of a finished run: metrics.json, curves.png and confusion.png."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from landmark import atomic
from landmark.meta import ModelRecord
from landmark.run_files import CONFUSION, CURVES, METRICS
from train import distributed
from train.data import PhotoDataset
from train.engine import Run


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@torch.no_grad()
def predict_logits(net: torch.nn.Module, ds: PhotoDataset, device: torch.device) -> np.ndarray:
    """Batches of 32: on world_heritage13's test set a 448 px Lite1 peaked at 10.2 GB of RAM with
    batches of 128 (early activations of 96 x 224 x 224 floats per photo), 3.4 GB with 32, same speed."""
    net.eval()
    return torch.cat([net(x.to(device)).float().cpu() for x, _ in DataLoader(ds, batch_size=32)]).numpy()


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _plot_curves(history: list[dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    x = np.arange(1, len(history) + 1)
    for key, style in (("train", "-"), ("val", "--")):  # without validation (None) the val lines stay empty
        ax_loss.plot(x, np.array([h[f"{key}_loss"] for h in history], dtype=float), style, label=key)
        ax_acc.plot(x, np.array([h[f"{key}_acc"] for h in history], dtype=float), style, label=key)
    stages = [h["stage"] for h in history]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            for ax in (ax_loss, ax_acc):
                ax.axvline(i + 0.5, color="grey", lw=0.8)
    ax_loss.set(xlabel="epoch (all stages)", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch (all stages)", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_confusion(cm: np.ndarray, names: list[str], path: Path) -> None:
    n = len(names)
    size = max(6, 0.22 * n + 3)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="confusion (row-normalised)")
    _save(fig, path)


def evaluate_test(net: torch.nn.Module, record: ModelRecord, test_ds: PhotoDataset,
                  device: torch.device) -> tuple[dict, np.ndarray]:
    """Top-1, top-5 and per-class test accuracy of ``net``, and its confusion matrix."""
    logits = predict_logits(net, test_ds, device)
    y = test_ds.labels.numpy()
    n = len(record.classes)
    top5 = np.argsort(-logits, axis=1)[:, : min(5, n)]
    pred = top5[:, 0]
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class = {c.label: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None)
                 for i, c in enumerate(record.classes)}
    metrics = {
        "arch": record.arch,
        "recipe": record.recipe,
        "test_accuracy": float((pred == y).mean()),
        "test_top5": float((top5 == y[:, None]).any(1).mean()),
        "n_test": len(y),
        "per_class_accuracy": per_class,
        "class_names": [c.name for c in record.classes],
        "device": str(device),
        "threads": torch.get_num_threads(),
        "data_dir": record.data_dir,
        "dataset_fingerprint": record.data_fingerprint,
        "preprocess": record.preprocess.to_dict(),
        "git_commit": git_commit(),
        "torch": torch.__version__,
    }
    return metrics, cm


def write_metrics(out_dir: Path, metrics: dict, cm: np.ndarray) -> None:
    """metrics.json and confusion.png, each written atomically."""
    atomic.write_text(out_dir / METRICS, json.dumps(metrics, indent=2) + "\n")
    _plot_confusion(cm, metrics["class_names"], out_dir / CONFUSION)


def write_report(run: Run, test_ds: PhotoDataset, train_seconds: float) -> dict:
    """Evaluate the best network on the test set and write the run's report files."""
    t0 = time.perf_counter()
    metrics, cm = evaluate_test(run.net, run.record, test_ds, run.device)
    best_val_loss = run.best_val_loss if math.isfinite(run.best_val_loss) else None  # None: no validation
    metrics.update(epochs=len(run.history), best_val_loss=best_val_loss, processes=distributed.world(),
                   seconds=round(train_seconds + time.perf_counter() - t0, 1))
    write_metrics(run.out_dir, metrics, cm)
    _plot_curves(run.history, run.out_dir / CURVES)
    return metrics
