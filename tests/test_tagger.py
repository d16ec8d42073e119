"""The batch tagger end to end, in local ONNX mode on the tiny model: real JPEG/PNG/WebP files
(plus the real Udacity sample photos where ../shared/data is present), a corrupt file, a photo
that already has GPS, GPS EXIF read back with Pillow, originals untouched, and a rerun doing no work."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, run_module, synthetic_photo
from PIL import ExifTags, Image

from app.exif import read_gps, with_gps
from landmark.predict import Predictor
from landmark.run_files import read_meta


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def photos(tmp_path: Path, tiny_data: Path) -> Path:
    """tiny_data's test split, a WebP, a corrupt JPEG, a photo with camera EXIF + GPS, and real photos."""
    src = tmp_path / "src"
    shutil.copytree(tiny_data / "test", src)
    rng = np.random.default_rng(1)
    synthetic_photo(1, rng, (90, 70)).save(src / "16.Eiffel_Tower" / "extra.webp", quality=80)
    good = (src / "16.Eiffel_Tower" / "001.jpg").read_bytes()
    (src / "broken.jpg").write_bytes(good[: len(good) // 2])
    (src / "notes.txt").write_text("not a photo, not a photo suffix: ignored")
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "TestCam"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "2024:05:01 10:00:00"
    img = synthetic_photo(1, rng, (80, 60))
    img.save(src / "16.Eiffel_Tower" / "camera.jpg", exif=exif)
    (src / "has_gps.jpg").write_bytes(with_gps((src / "16.Eiffel_Tower" / "camera.jpg").read_bytes(), -33.8568,
                                               151.2153, "Sydney Opera House"))
    samples = SHARED_DATA / "udacity_samples"
    if samples.is_dir():
        shutil.copytree(samples, src / "udacity")
    return src


def tag(src: Path, dst: Path, *extra: str):
    return run_module("app.tag", "--src", str(src), "--dst", str(dst), *extra, timeout=300)


def test_tag_local_end_to_end(photos: Path, tiny_model: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    before = digests(photos)
    local = ("--local", str(tiny_model), "--device", "cpu", "--threads", "1")
    first = tag(photos, dst, *local)
    assert first.returncode == 0, first.stderr[-3000:]
    assert digests(photos) == before, "an original was modified"

    report = json.loads((dst / "tag_report.json").read_text())
    rows = {r["path"]: r for r in report["photos"]}
    expected = {p for p in before if not p.endswith(".txt")}
    assert set(rows) == expected
    assert "broken.jpg" in first.stderr
    assert rows["broken.jpg"]["action"] == "error" and "truncated" in rows["broken.jpg"]["error"]
    assert rows["has_gps.jpg"]["action"] == "untagged" and rows["has_gps.jpg"]["reason"] == "already has GPS"
    assert not (dst / "has_gps.jpg").exists()
    csv_lines = (dst / "tag_report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("path,action,reason,landmark,name,probability") and len(csv_lines) == len(rows) + 1

    # the tagger writes exactly the model's decisions: GPS where the open-set decision says "known landmark"
    predictor = Predictor.from_dir(tiny_model, "onnx", device="cpu", threads=1)
    labels, top1_right = {c.label for c in predictor.classes}, []
    for rel, r in rows.items():
        if rel in ("broken.jpg", "has_gps.jpg"):
            continue
        answer = predictor.predict([photos / rel])[0]
        assert (r["action"] == "tagged") == (answer["landmark"] is not None), rel
        assert r["reason"] == ("" if answer["landmark"] else answer["reason"]), rel
        if Path(rel).parent.name in labels:  # a photo in its class's folder grades the top-1
            top1_right.append(answer["top_k"][0]["label"] == Path(rel).parent.name)
    assert report["summary"]["graded"] == len(top1_right) > 0
    locations = {c.label: asdict(c.location) for c in read_meta(tiny_model).classes}
    tagged = [r for r in rows.values() if r["action"] == "tagged"]
    assert len(tagged) >= len(list((photos / "taj mahal").iterdir()))  # the synthetic classes are easy
    for r in tagged:
        out = dst / r["output"]
        assert r["output"] == r["path"]
        with Image.open(out) as copy, Image.open(photos / r["path"]) as original:
            lat, lon = read_gps(copy.getexif())
            where = locations[r["landmark"]]
            assert abs(lat - where["lat"]) < 1e-5 and abs(lon - where["lon"]) < 1e-5
            assert copy.getexif()[ExifTags.Base.ImageDescription] == r["name"]
            assert copy.format == original.format
            assert np.array_equal(np.asarray(copy), np.asarray(original)), "pixels were re-encoded"
    with Image.open(dst / "16.Eiffel_Tower" / "camera.jpg") as copy:  # camera fields survive
        assert copy.getexif()[ExifTags.Base.Make] == "TestCam"
        assert copy.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] == "2024:05:01 10:00:00"
    assert report["summary"]["accuracy"] == pytest.approx(sum(top1_right) / len(top1_right), abs=1e-6)
    assert not list(dst.rglob("*.tmp"))

    outputs = digests(dst)
    mtimes = {p: p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file() and not p.name.startswith("tag_report")}
    second = tag(photos, dst, *local)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(rows)} done before, 0 to tag" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert digests(dst) == outputs
    assert digests(photos) == before


def test_tag_operating_point_overwrite_and_resume(photos: Path, tiny_model: Path, tmp_path: Path) -> None:
    """A lower target precision tags a superset; --overwrite-gps retags the GPS photo; a deleted output is redone."""
    local = ("--local", str(tiny_model), "--device", "cpu", "--threads", "1")

    def tagged(dst: Path, *extra: str) -> set[str]:
        done = tag(photos, dst, *local, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = json.loads((dst / "tag_report.json").read_text())["photos"]
        assert {r["reason"] for r in rows if r["action"] == "untagged"} <= {
            "unknown place", "below operating point", "already has GPS"}
        return {r["path"] for r in rows if r["action"] == "tagged"}

    assert tagged(tmp_path / "strict", "--min-precision", "1") <= tagged(tmp_path / "loose", "--min-precision", "0.3")
    bad = tag(photos, tmp_path / "bad", *local, "--min-precision", "1.5")
    assert bad.returncode == 2 and "precision in (0, 1]" in bad.stderr and not (tmp_path / "bad").exists()

    dst = tmp_path / "strict"
    over = tag(photos, dst, *local, "--min-precision", "0.3", "--overwrite-gps")
    assert over.returncode == 0, over.stderr[-3000:]
    assert "0 done before" in over.stderr  # other settings: a fresh run
    with Image.open(dst / "has_gps.jpg") as copy:
        assert read_gps(copy.getexif()) != pytest.approx((-33.8568, 151.2153), abs=1e-3)
    (dst / "has_gps.jpg").unlink()
    again = tag(photos, dst, *local, "--min-precision", "0.3", "--overwrite-gps")
    assert again.returncode == 0 and "1 to tag" in again.stderr, again.stderr[-3000:]
    assert (dst / "has_gps.jpg").is_file()


def test_tag_clear_failures(photos: Path, tmp_path: Path) -> None:
    missing = tag(tmp_path / "nowhere", tmp_path / "dst")
    assert missing.returncode != 0 and "source folder not found" in missing.stderr
    same = tag(photos, photos, "--local", "unused")
    assert same.returncode != 0 and "originals are never modified" in same.stderr
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = tag(photos, tmp_path / "dst", "--inference-url", f"http://127.0.0.1:{port}")
    assert down.returncode != 0 and "not reachable" in down.stderr and "make serve" in down.stderr
    assert not (tmp_path / "dst" / "tag_report.json").exists()
