"""Data discovery, split reproducibility, display names, locations and preprocessing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, synthetic_photo
from PIL import Image

from landmark.labels import build_classes, display_name
from landmark.preprocess import ImageError, PreprocessConfig, decode, load_input
from train.data import DataSplits, PhotoDataset, find_classes, stratified_split, train_augment

CFG = PreprocessConfig(32, 36, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_class_names_follow_folder_order_and_display_names(tiny_data: Path) -> None:
    assert find_classes(tiny_data / "train") == sorted(TINY_CLASSES)
    assert display_name("09.Golden_Gate_Bridge") == "Golden Gate Bridge"
    assert display_name("taj mahal") == "Taj Mahal"
    assert display_name("Fatehpur Sikri Fort") == "Fatehpur Sikri Fort"
    assert display_name("petra_jordan") == "Petra Jordan"


def test_split_is_stratified_and_reproducible(tiny_data: Path) -> None:
    a = DataSplits.load(tiny_data, val_fraction=0.25, seed=1)
    b = DataSplits.load(tiny_data, val_fraction=0.25, seed=1)
    c = DataSplits.load(tiny_data, val_fraction=0.25, seed=2)
    assert a.val == b.val and a.train == b.train
    assert a.val != c.val
    assert not set(a.val) & set(a.train)
    per_class = np.bincount([label for _, label in a.val], minlength=len(a.classes))
    assert per_class.tolist() == [4, 4, 4]  # 25% of 16 per class
    assert a.fingerprint() == b.fingerprint() == c.fingerprint()  # same photos, another split


def test_split_keeps_a_training_image_for_tiny_classes() -> None:
    samples = [(Path(f"/c{c}/{i}.jpg"), c) for c in range(3) for i in range(c + 1)]
    train, val = stratified_split(samples, 0.5, seed=0)
    assert {label for _, label in train} == {0, 1, 2}
    assert sorted(label for _, label in val) == [1, 2, 2]  # 0 of 1, 1 of 2, round(1.5) of 3


def test_locations_builtin_and_custom(tmp_path: Path) -> None:
    classes = build_classes(["16.Eiffel_Tower", "my cabin", "taj mahal"], None)
    assert classes[0].location.country == "France"
    assert abs(classes[0].location.lat - 48.8584) < 1e-6
    assert classes[1].location is None
    assert classes[2].location.place.startswith("Taj Mahal")
    (tmp_path / "locations.json").write_text(json.dumps({"my cabin": {"lat": 60.1, "lon": 24.9, "country": "Finland"}}))
    assert build_classes(["my cabin"], tmp_path)[0].location.country == "Finland"
    (tmp_path / "locations.json").write_text(json.dumps({"my cabin": {"lat": 600, "lon": 24.9}}))
    with pytest.raises(ValueError, match="out of range"):
        build_classes(["my cabin"], tmp_path)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_corrupt_empty_truncated_and_bomb_images_raise_clear_errors() -> None:
    jpeg = _encode(synthetic_photo(0, np.random.default_rng(0), (80, 60)), "JPEG")
    with pytest.raises(ImageError, match="empty"):
        decode(b"")
    with pytest.raises(ImageError, match="not an image"):
        decode(b"hello, this is text")
    with pytest.raises(ImageError, match=r"truncated|corrupt"):
        decode(jpeg[: len(jpeg) // 2])
    bomb = _encode(Image.new("L", (9000, 9000)), "PNG")  # 81 MP, ~100 kB on the wire
    with pytest.raises(ImageError, match="too large"):
        decode(bomb, max_pixels=40_000_000)


def test_every_mode_becomes_rgb_and_exif_orientation_is_applied() -> None:
    base = synthetic_photo(1, np.random.default_rng(0), (90, 50))
    for img in (base.convert("L"), base.convert("RGBA"), base.convert("CMYK"), base.convert("P"),
                Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)):
        fmt = "JPEG" if img.mode == "CMYK" else "PNG"
        out = decode(_encode(img, fmt))
        assert out.mode == "RGB" and out.size == (90, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = decode(_encode(base, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (50, 90)


def test_dataset_eval_view_equals_the_shared_preprocessing(tiny_data: Path) -> None:
    """Training's eval path and the serving path (load_input) give identical bytes."""
    splits = DataSplits.load(tiny_data, 0.0, 0)
    ds = PhotoDataset(splits.test[:5], CFG)
    for i, (path, _) in enumerate(splits.test[:5]):
        np.testing.assert_array_equal(ds[i][0].numpy(), load_input(path, CFG))
        assert ds[i][0].shape == (3, 32, 32)


def test_corrupt_training_photo_names_the_file(tmp_path: Path, tiny_data: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match=r"bad\.jpg"):
        PhotoDataset([(bad, 0)], CFG)


def test_translate_augmentation_moves_objects_without_resizing_them() -> None:
    """--translate shifts the view but keeps an object's size; the random-resized crop zooms."""
    cfg = PreprocessConfig(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    canvas = np.zeros((32, 32, 3), np.uint8)
    canvas[12:20, 12:20] = 255  # an 8x8 square; shifts of up to 8 px keep it inside the view
    photo = Image.fromarray(canvas)

    def square(view: Image.Image) -> tuple[int, int, int]:
        gray = np.asarray(view, dtype=np.float32).mean(2)
        ys, xs = np.nonzero(gray > (gray.max() + gray.min()) / 2)
        return len(ys), int(ys.min()), int(xs.min())

    torch.manual_seed(0)
    shifted = [square(train_augment(cfg, translate=0.25)(photo)) for _ in range(30)]
    assert {area for area, _, _ in shifted} == {64}
    assert len({(y, x) for _, y, x in shifted}) > 5
    zoomed = [square(train_augment(cfg, scale=(0.5, 1.0))(photo))[0] for _ in range(30)]
    assert max(zoomed) > 64
