"""Train the scratch CNN or the transfer network on a landmark photo folder.

  python -m train.train --arch transfer --data-dir ../shared/data/indian_monuments49 --out artifacts/transfer
Writes best.pt / last.pt (resumable with --resume), log.jsonl, metrics.json, curves.png and
confusion.png to --out. ``python -m train.export --run-dir <out>`` then exports the model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from train.cli import fraction_below_half, non_negative_int, positive_int
from train.data import DataSplits, PhotoDataset, train_augment
from train.engine import Run, pick_device, seed_everything
from train.evaluate import write_report
from train.labels import build_classes
from train.nets import IMAGENET_LITE_MEAN, IMAGENET_LITE_STD, build
from train.preprocess import ImageError, PreprocessConfig
from train.stages import scratch_stages, transfer_stages

RECIPES = {  # per-arch defaults; every one can be overridden on the command line
    "scratch": {"epochs": 60, "lr": 2e-3, "batch_size": 32, "weight_decay": 0.2, "patience": 10,
                "min_scale": 0.8},
    "transfer": {"epochs": 4, "lr": 2e-3, "batch_size": 64, "weight_decay": 0.01, "patience": 4,
                 "input_size": 224, "min_scale": 0.75},
}


def _auto_or_fraction(value: str) -> str | float:
    if value == "auto":
        return value
    try:
        return fraction_below_half(value)
    except argparse.ArgumentTypeError:  # say that 'auto' is allowed too, as before
        raise argparse.ArgumentTypeError(f"expected 'auto' or a fraction in [0, 0.5), got {value!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(RECIPES), required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="folder with train/<class>/ and test/<class>/")
    p.add_argument("--out", type=Path, required=True, help="output folder of this run")
    p.add_argument("--input-size", default=None,
                   help="crop side in px; 'auto' = median photo short side, clamped to 64..224")
    p.add_argument("--crop-fraction", type=float, default=1.0, help="input_size / resize_size")
    p.add_argument("--epochs", type=int, help="epochs (transfer: of block fine-tuning; 0 = linear head only)")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--patience", type=positive_int, help="early stopping: epochs without a better val loss")
    p.add_argument("--opt", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--val-fraction", type=fraction_below_half, default=0.1,
                   help="share of every training class held out for checkpoint choice and early stopping; "
                        "0 = train on every photo and keep each stage's last epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch intra-op threads (0 = all cores)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--min-scale", type=float, help="RandomResizedCrop's smallest area fraction")
    p.add_argument("--translate", default="auto", type=_auto_or_fraction,
                   help="shift crops by up to this fraction of the side instead of random-resized crops; "
                        "'auto' = 0.125 when the photos are no bigger than the input (thumbnails), else 0")
    g = p.add_argument_group("transfer")
    g.add_argument("--backbone", default="lite0", choices=["lite0", "lite1", "lite2"])
    g.add_argument("--cut", type=int, default=5, choices=range(8), metavar="{0..7}",
                   help="block stages below this stay frozen, and cached unless --stream (every Lite backbone has 7)")
    g.add_argument("--views", type=positive_int, default=3, help="augmented views cached per training photo")
    g.add_argument("--stream", action="store_true",
                   help="fine-tune on fresh augmentations each epoch, recomputing the frozen trunk per batch "
                        "(with --cut 0: end to end); --views then only feeds the head. Meant for a GPU: on CPU one "
                        "streamed epoch (one view per photo) costs about an epoch over 3 cached views")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block")
    g.add_argument("--head-epochs", type=positive_int, default=30)
    g.add_argument("--head-lr", type=float, default=3e-3)
    g.add_argument("--head-lr-scale", type=float, default=1.0, help="head LR / block LR while fine-tuning")
    g = p.add_argument_group("scratch")
    g.add_argument("--widths", default="32,64,128,256", help="channels per stage")
    g.add_argument("--depths", default="1,1,1,1", help="residual blocks per stage")
    g.add_argument("--dropout", type=float, default=0.3)
    g.add_argument("--mix", type=int, default=0, choices=[0, 1], help="MixUp/CutMix batches (1 = on; needs long runs)")
    return p


def _median_short_side(splits: DataSplits) -> float:
    """Over ~200 training photos, headers only; an unreadable one is left to PhotoDataset's clear error."""
    shorts = []
    for path, _ in splits.train[:: max(1, len(splits.train) // 200)]:
        try:
            with Image.open(path) as img:
                shorts.append(min(img.size))
        except OSError:
            continue
    return statistics.median(shorts) if shorts else 0.0


def _channel_stats(ds: PhotoDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = torch.stack([ds[i][0] for i in range(0, len(ds), max(1, len(ds) // 500))]).float() / 255
    return tuple(round(v, 4) for v in x.mean((0, 2, 3)).tolist()), tuple(round(v, 4) for v in x.std((0, 2, 3)).tolist())


def main(args: argparse.Namespace) -> int:
    for key, value in RECIPES[args.arch].items():
        if getattr(args, key.replace("-", "_"), None) is None:
            setattr(args, key, value)
    least_epochs = 0 if args.arch == "transfer" else 1  # transfer with 0: the linear head only
    if args.epochs < least_epochs:
        print(f"error: --epochs {args.epochs}: {args.arch} needs at least {least_epochs}", file=sys.stderr)
        return 2
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    t0 = time.perf_counter()

    try:
        splits = DataSplits.load(args.data_dir, args.val_fraction, args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    short = _median_short_side(splits)
    size = int(min(224, max(64, round(short / 32) * 32))) if args.input_size in (None, "auto") else int(args.input_size)
    if args.translate == "auto":  # thumbnails: zooming in shows a scale the test never has (README)
        args.translate = 0.125 if short <= size else 0.0
    mean, std = IMAGENET_LITE_MEAN, IMAGENET_LITE_STD
    cfg = PreprocessConfig(size, round(size / args.crop_fraction), mean, std)
    crops = f"shifted by <= {args.translate:.1%}" if args.translate else f"random-resized >= {args.min_scale:.0%}"
    print(f"{args.data_dir}: {len(splits.classes)} classes, {len(splits.train)} train / {len(splits.val)} val / "
          f"{len(splits.test)} test, input {cfg.input_size} px (resize {cfg.resize_size}), crops {crops}, "
          f"device {device}")
    augment = train_augment(cfg, (args.min_scale, 1.0), args.translate)
    try:  # every photo is decoded before training, so an unreadable one fails in seconds, not after it
        train_ds = PhotoDataset(splits.train, cfg, augment, "decode train")
        val_ds = PhotoDataset(splits.val, cfg, desc="decode val")
        test_ds = PhotoDataset(splits.test, cfg, desc="decode test")
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.arch == "scratch":
        mean, std = _channel_stats(val_ds if len(val_ds) else train_ds)
        cfg = PreprocessConfig(cfg.input_size, cfg.resize_size, mean, std)
        model_args = {"num_classes": len(splits.classes), "mean": mean, "std": std, "dropout": args.dropout,
                      "widths": tuple(int(w) for w in args.widths.split(",")),
                      "depths": tuple(int(d) for d in args.depths.split(","))}
    else:
        model_args = {"num_classes": len(splits.classes), "mean": mean, "std": std, "backbone": args.backbone,
                      "input_size": cfg.input_size, "drop_path": args.drop_path}
    net = build(args.arch, **model_args, **({"pretrained": True} if args.arch == "transfer" else {}))
    net.to(device)
    record = {"arch": args.arch, "model_args": model_args, "preprocess": cfg.to_dict(),
              "classes": build_classes(splits.classes, args.data_dir), "data_fingerprint": splits.fingerprint(),
              "data_dir": str(args.data_dir), "args": {k: str(v) for k, v in vars(args).items()}}

    args.out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails its checks leaves nothing
    run = Run(net, record, args.out, device, args.label_smoothing)
    if args.resume:
        run.resume()
    elif (args.out / "last.pt").exists():
        print(f"{args.out} holds a previous run: pass --resume to continue it, or use another --out",
              file=sys.stderr)
        return 2
    stages = (scratch_stages(net, train_ds, val_ds, args) if args.arch == "scratch"
              else transfer_stages(net, train_ds, val_ds, args, device))
    for stage in stages:
        run.fit(stage)
    train_seconds = time.perf_counter() - t0

    metrics = write_report(run, test_ds, train_seconds)
    print(f"test accuracy {metrics['test_accuracy']:.4f}  top-5 {metrics['test_top5']:.4f}  "
          f"n={metrics['n_test']}  {metrics['seconds']:.0f}s  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
