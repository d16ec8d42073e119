"""Landmark photo folders (``train/<class>/``, ``test/<class>/``): discovery, a stratified
seeded validation split, decoded-once in-memory datasets and the train-time augmentation."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from landmark.preprocess import ImageError, PreprocessConfig, center_crop, decode, resize_shorter
from landmark.progress import progress_bar

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

Sample = tuple[Path, int]


def find_classes(split_dir: Path) -> list[str]:
    """Class folders in sorted order (ImageFolder's order, so indices are reproducible)."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} not found: expected <data>/train/<class>/ and <data>/test/<class>/")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{split_dir} has {len(classes)} class folders; need at least 2")
    return classes


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def list_samples(split_dir: Path, classes: list[str]) -> list[Sample]:
    """(path, class index) for every image file, sorted by path."""
    unknown = sorted({d.name for d in split_dir.iterdir() if d.is_dir()} - set(classes))
    if unknown:
        raise ValueError(f"{split_dir} has class folders not in train/: {unknown}")
    samples = [
        (path, index)
        for index, name in enumerate(classes)
        if (split_dir / name).is_dir()
        for path in image_files(split_dir / name)
    ]
    if not samples:
        raise ValueError(f"{split_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``val_fraction`` of every class (at least one image where a class has two)."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for index in sorted(by_class):
        items = sorted(by_class[index])
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction))) if val_fraction > 0 else 0
        val += items[:n_val]
        train += items[n_val:]
    return sorted(train), sorted(val)


def fingerprint(samples: list[Sample]) -> str:
    """Hash of relative paths, labels and sizes: tells whether two runs saw the same data."""
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{path.parent.name}/{path.name}|{label}|{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class DataSplits:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    @classmethod
    def load(cls, root: Path, val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
        classes = find_classes(root / "train")
        train, val = stratified_split(list_samples(root / "train", classes), val_fraction, seed)
        return cls(classes, train, val, list_samples(root / "test", classes))

    def fingerprint(self) -> str:
        """The data set's, not the split's: runs with another seed or val fraction share it."""
        return fingerprint(sorted(self.train + self.val) + self.test)


class PhotoDataset(torch.utils.data.Dataset):
    """Photos decoded once and kept at the eval resize (``resize_size`` shorter side).

    The eval view is then a centre crop of the cached image, bit-identical to
    ``landmark.preprocess.load_input`` on the file; augmented views start from the same image.
    """

    def __init__(self, samples: list[Sample], cfg: PreprocessConfig, augment: v2.Transform | None = None,
                 desc: str = "decode") -> None:
        self.cfg, self.augment = cfg, augment
        self.labels = torch.tensor([label for _, label in samples])
        self.images = [self._load(path) for path, _ in progress_bar(samples, desc=desc, leave=False, unit="img")]

    def _load(self, path: Path) -> Image.Image:
        try:
            return resize_shorter(decode(path, draft_size=self.cfg.resize_size), self.cfg.resize_size)
        except ImageError as e:
            raise ImageError(f"{path}: {e}") from e

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        if self.augment is None:
            x = center_crop(img, self.cfg.input_size)
        else:
            x = np.ascontiguousarray(np.asarray(self.augment(img), dtype=np.uint8).transpose(2, 0, 1))
        return torch.from_numpy(x), self.labels[i]


def train_augment(cfg: PreprocessConfig, scale: tuple[float, float] = (0.35, 1.0),
                  translate: float = 0.0) -> v2.Transform:
    """Random crop/flip/colour on the cached PIL image; the network sees the same size as at eval.

    ``translate`` > 0 replaces the random-resized crop (``scale``) by a shift of up to that fraction
    of the side, reflect-padded, so objects keep the size they have at eval. Zooming in on photos
    that are already tight crops (indian_monuments49's 64 px) teaches a scale the test never shows.
    """
    pad = round(translate * cfg.input_size)
    crop = (v2.RandomCrop(cfg.input_size, padding=pad, pad_if_needed=True, padding_mode="reflect") if pad
            else v2.RandomResizedCrop(cfg.input_size, scale=scale, antialias=True))
    return v2.Compose([
        crop,
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.3, 0.3, 0.3, 0.03),
    ])
