"""Train the scratch CNN or the transfer network on a landmark photo folder.

  python -m train.train --recipe transfer --data-dir ../shared/data/indian_monuments49 --out artifacts/transfer
  python -m train.train --recipe wh13 --out artifacts/wh13
A recipe (``recipes/<name>.yaml``, or a path to such a file) sets the defaults, a data set's recipe
also its data folder and negatives; any flag overrides them; ``--arch scratch|transfer`` alone
means the recipe of that name. Writes best.pt / last.pt
(resumable with --resume), log.jsonl, metrics.json (naming the recipe), curves.png and
confusion.png to --out. ``python -m train.export --run-dir <out>`` then exports the model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image

from landmark.cli import fraction_below_half, non_negative_int, positive_int, precision
from landmark.labels import build_classes
from landmark.meta import ModelRecord
from landmark.open_set import DEFAULT_MIN_PRECISION
from landmark.preprocess import ImageError, PreprocessConfig
from landmark.run_files import LAST
from train import distributed
from train.data import DataSplits, PhotoDataset, train_augment
from train.engine import Run, pick_device, seed_everything
from train.evaluate import write_report
from train.nets import IMAGENET_LITE_MEAN, IMAGENET_LITE_STD, build
from train.stages import scratch_stages, transfer_stages

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
REQUIRED = ("lr", "batch_size", "weight_decay", "patience", "min_scale")  # no default but a recipe's


class UsageError(Exception):
    """Bad arguments or data found before anything is written: one line on stderr, exit 2."""


def _auto_or_fraction(value: str) -> str | float:
    if value == "auto":
        return value
    try:
        return fraction_below_half(value)
    except argparse.ArgumentTypeError:  # say that 'auto' is allowed too
        raise argparse.ArgumentTypeError(f"expected 'auto' or a fraction in [0, 0.5), got {value!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help=f"a recipe name in {RECIPES_DIR.name}/ or a .yaml path (default: the --arch's)")
    p.add_argument("--arch", choices=["scratch", "transfer"])
    p.add_argument("--data-dir", type=Path, help="folder with train/<class>/ and test/<class>/ (or the recipe's)")
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
    p.add_argument("--negatives", type=Path, nargs="*", default=[],
                   help="folders of photos showing no landmark of this data set: export fits the open-set decision "
                        "on them (everyday scenes, another landmark set's train/)")
    p.add_argument("--min-precision", type=precision, default=DEFAULT_MIN_PRECISION,
                   help="the open-set operating point export stores: the precision its validation tags must reach")
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


def read_recipe(name: str, parser: argparse.ArgumentParser, seen: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """A recipe file's settings, over those of the recipe it names as ``base``."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        parser.error(f"recipe {name!r} not found ({path}); known recipes: {known}")
    if path.stem in seen:
        parser.error(f"recipe {path}: its bases loop ({' -> '.join((*seen, path.stem))})")
    settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(settings, dict):
        parser.error(f"recipe {path}: expected a mapping of setting: value")
    base = settings.pop("base", None)
    return path, ({**read_recipe(str(base), parser, (*seen, path.stem))[1], **settings} if base else settings)


def load_recipe(name: str, parser: argparse.ArgumentParser) -> dict[str, object]:
    """A recipe's settings as parser defaults. Values go in as strings, so every flag's own type
    checks them as it checks the command line (booleans stay booleans: they are switches; lists are
    lists of folders)."""
    path, settings = read_recipe(name, parser)
    dests = {a.dest for a in parser._actions}
    defaults: dict[str, object] = {"recipe": path.stem}
    for key, value in settings.items():
        dest = str(key).replace("-", "_")
        if dest not in dests or dest in ("recipe", "out", "resume"):
            parser.error(f"recipe {path}: {key!r} is not a training setting")
        if isinstance(value, list):
            value = [Path(v) for v in value]
        defaults[dest] = value if isinstance(value, (bool, list)) else str(value)
    return defaults


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    first, _ = parser.parse_known_args(argv)
    name = first.recipe or first.arch
    if name is None:
        parser.error("give --recipe NAME (recipes/*.yaml) or --arch scratch|transfer")
    parser.set_defaults(**load_recipe(name, parser))
    args = parser.parse_args(argv)
    if args.arch is None:
        parser.error(f"recipe {args.recipe!r} names no arch")
    if args.data_dir is None:
        parser.error(f"recipe {args.recipe!r} names no data-dir: give --data-dir")
    args.data_dir = Path(args.data_dir)
    missing = [str(p) for p in args.negatives if not Path(p).is_dir()]
    if missing:  # found now, not by the export after an hour of training
        parser.error(f"negatives folder(s) not found: {', '.join(missing)}")
    unset = [f"--{dest.replace('_', '-')}" for dest in REQUIRED if getattr(args, dest) is None]
    if unset:  # a recipe with no base sets these itself: found now, not as a traceback once the photos are read
        parser.error(f"recipe {args.recipe!r} sets no {', '.join(unset)}: give them, or a base recipe that does")
    least_epochs = 0 if args.arch == "transfer" else 1  # transfer with 0: the linear head only
    if args.epochs is None or args.epochs < least_epochs:
        parser.error(f"--epochs {args.epochs}: {args.arch} needs at least {least_epochs}")
    return args


@dataclass
class Data:
    splits: DataSplits
    cfg: PreprocessConfig
    train: PhotoDataset
    val: PhotoDataset
    test: PhotoDataset


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


def load_data(args: argparse.Namespace) -> Data:
    """Splits, the preprocessing that follows the photos (input size, crop policy), and every photo
    decoded before training, so an unreadable one fails in seconds rather than after an epoch."""
    try:
        splits = DataSplits.load(args.data_dir, args.val_fraction, args.seed)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from e
    short = _median_short_side(splits)
    size = int(min(224, max(64, round(short / 32) * 32))) if args.input_size in (None, "auto") else int(args.input_size)
    if args.translate == "auto":  # thumbnails: zooming in shows a scale the test never has (docs/experiments.md)
        args.translate = 0.125 if short <= size else 0.0
    cfg = PreprocessConfig(size, round(size / args.crop_fraction), IMAGENET_LITE_MEAN, IMAGENET_LITE_STD)
    crops = f"shifted by <= {args.translate:.1%}" if args.translate else f"random-resized >= {args.min_scale:.0%}"
    print(f"{args.data_dir}: {len(splits.classes)} classes, {len(splits.train)} train / {len(splits.val)} val / "
          f"{len(splits.test)} test, input {cfg.input_size} px (resize {cfg.resize_size}), crops {crops}")
    try:
        train_ds = PhotoDataset(splits.train, cfg, train_augment(cfg, (args.min_scale, 1.0), args.translate),
                                "decode train")
        val_ds = PhotoDataset(splits.val, cfg, desc="decode val")
        test_ds = PhotoDataset(splits.test, cfg, desc="decode test")
    except ImageError as e:
        raise UsageError(str(e)) from e
    if args.arch == "scratch":  # normalised by the data's own statistics, measured on held-out photos
        mean, std = _channel_stats(val_ds if len(val_ds) else train_ds)
        cfg = PreprocessConfig(cfg.input_size, cfg.resize_size, mean, std)  # the crops stay the same
    return Data(splits, cfg, train_ds, val_ds, test_ds)


def model_record(args: argparse.Namespace, data: Data) -> ModelRecord:
    if args.arch == "scratch":
        model_args = {"dropout": args.dropout, "widths": [int(w) for w in args.widths.split(",")],
                      "depths": [int(d) for d in args.depths.split(",")]}
    else:
        model_args = {"backbone": args.backbone, "drop_path": args.drop_path}
    return ModelRecord(args.arch, model_args, data.cfg, build_classes(data.splits.classes, args.data_dir),
                       data.splits.fingerprint(), str(args.data_dir), args.recipe, _plain(vars(args)))


def _plain(settings: dict) -> dict:
    """The run's settings as JSON values (paths as strings), for the record."""
    def plain(v: object) -> object:
        return [plain(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v

    return {k: plain(v) for k, v in settings.items()}


def start_run(args: argparse.Namespace, record: ModelRecord, device: torch.device) -> Run:
    """The network (ImageNet weights for transfer) and its run folder, resumed or new."""
    if (args.out / LAST).exists() and not args.resume:
        raise UsageError(f"{args.out} holds a previous run: pass --resume to continue it, or use another --out")
    net = build(record, pretrained=args.arch == "transfer").to(device)
    args.out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails its checks leaves nothing
    run = Run(net, record, args.out, device, args.label_smoothing)
    if args.resume:
        run.resume()
    return run


def fit(run: Run, data: Data, args: argparse.Namespace) -> None:
    stages = (scratch_stages(run.net, data.train, data.val, args) if args.arch == "scratch"
              else transfer_stages(run.net, data.train, data.val, args, run.device))
    for stage in stages:
        run.fit(stage)


def main(args: argparse.Namespace) -> int:
    """Single-process, or one rank of ``torchrun --nproc_per_node N -m train.train`` (train.distributed)."""
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    distributed.init(device)
    device = distributed.device_of(device)
    t0 = time.perf_counter()
    try:
        data = load_data(args)
        run = start_run(args, model_record(args, data), device)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.barrier()  # every rank has checked --out before rank 0 writes into it
    print(f"recipe {args.recipe}, {args.arch}, device {device}, rank {distributed.rank()} of "
          f"{distributed.world()}, {torch.get_num_threads()} threads -> {args.out}")
    fit(run, data, args)
    if not distributed.is_main():
        distributed.close()
        return 0
    metrics = write_report(run, data.test, time.perf_counter() - t0)
    print(f"test accuracy {metrics['test_accuracy']:.4f}  top-5 {metrics['test_top5']:.4f}  "
          f"n={metrics['n_test']}  {metrics['seconds']:.0f}s  -> {args.out}")
    distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
