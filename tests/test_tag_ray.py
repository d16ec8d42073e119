"""The Ray tagger against a real local Ray cluster (no mocks): on the tiny model, synthetic photos and
bad files it writes the same copies and the same report as ``app.tag --local``, a rerun does no work,
a bad file is an error row, and an existing cluster given by RAY_ADDRESS is used as it is.

Opt-in, on the real photos: ``LANDMARK_MODEL_DIR=artifacts/wh13 .venv/bin/python -m pytest
tests/test_tag_ray.py -k real -s`` (world_heritage13/test against ``app.tag --local``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SHARED_DATA, run_module, synthetic_photo
from PIL import Image
from test_tagger import digests

from app.exif import read_gps, with_gps

# 2 logical CPUs as on the 2-core VM: two half-CPU actors + one CPU for reading and writing, small batches
RAY = ("--workers", "2", "--num-cpus", "2", "--worker-cpus", "0.5", "--batch-size", "3", "--object-store-mb", "256")


@pytest.fixture()
def photos(tmp_path: Path, tiny_data: Path) -> Path:
    """tiny_data's test split, a WebP, a truncated JPEG, a text file named .png and a photo that has GPS."""
    src = tmp_path / "src"
    shutil.copytree(tiny_data / "test", src)
    synthetic_photo(1, np.random.default_rng(1), (90, 70)).save(src / "16.Eiffel_Tower" / "extra.webp", quality=80)
    good = (src / "16.Eiffel_Tower" / "001.jpg").read_bytes()
    (src / "broken.jpg").write_bytes(good[: len(good) // 2])
    (src / "notes.png").write_text("a text file with a photo's suffix")
    (src / "has_gps.jpg").write_bytes(with_gps(good, -33.8568, 151.2153, "Sydney Opera House"))
    return src


def tag_ray(src: Path, dst: Path, model: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.tag_ray", "--src", str(src), "--dst", str(dst),
                           "--model-dir", str(model), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def gps_of(root: Path) -> dict[str, tuple[float, float] | None]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("tag_report"):
            with Image.open(p) as img:
                out[p.relative_to(root).as_posix()] = read_gps(img.getexif())
    return out


def assert_same_run(ray_dst: Path, seq_dst: Path) -> dict:
    """The same report (settings, summary, every row) and the same tagged files, byte for byte."""
    ray_report = json.loads((ray_dst / "tag_report.json").read_text())
    seq_report = json.loads((seq_dst / "tag_report.json").read_text())
    assert ray_report["settings"] == seq_report["settings"]
    assert ray_report["photos"] == seq_report["photos"]
    assert ray_report["summary"] == seq_report["summary"]
    assert (ray_dst / "tag_report.csv").read_text() == (seq_dst / "tag_report.csv").read_text()
    assert gps_of(ray_dst) == gps_of(seq_dst)
    assert digests(ray_dst) == digests(seq_dst)
    assert not list(ray_dst.rglob("*.tmp*"))
    return ray_report


def test_tag_ray_matches_sequential_and_resumes(photos: Path, tiny_model: Path, tmp_path: Path) -> None:
    before = digests(photos)
    seq = run_module("app.tag", "--src", str(photos), "--dst", str(tmp_path / "seq"), "--local", str(tiny_model),
                     "--device", "cpu", "--threads", "1", timeout=300)
    assert seq.returncode == 0, seq.stderr[-3000:]

    dst = tmp_path / "ray"
    first = tag_ray(photos, dst, tiny_model, *RAY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "photos/s" in first.stderr
    assert digests(photos) == before, "an original was modified"
    report = assert_same_run(dst, tmp_path / "seq")
    rows = {r["path"]: r for r in report["photos"]}
    assert rows["broken.jpg"]["action"] == "error" and "truncated" in rows["broken.jpg"]["error"]
    assert rows["notes.png"]["action"] == "error" and "not an image" in rows["notes.png"]["error"]
    assert "skipped broken.jpg" in first.stderr and "skipped notes.png" in first.stderr
    assert rows["has_gps.jpg"]["reason"] == "already has GPS" and not (dst / "has_gps.jpg").exists()
    tagged = [r["path"] for r in report["photos"] if r["action"] == "tagged"]
    assert len(tagged) >= 6  # the synthetic classes are easy
    assert gps_of(dst) and all(gps_of(dst).values())

    # a rerun does no work: nothing to tag, so not even a cluster is started, and no file is touched
    def outputs() -> dict[Path, int]:  # the report is rewritten (same content), like app.tag's
        return {p: p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file() and not p.name.startswith("tag_")}

    mtimes, files = outputs(), digests(dst)
    again = tag_ray(photos, dst, tiny_model, *RAY)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(rows)} done before, 0 to tag" in again.stderr and "photos/s" not in again.stderr
    assert outputs() == mtimes and digests(dst) == files

    # the sequential tagger resumes the Ray tagger's report (and the other way round): same settings, same rows
    (dst / tagged[0]).unlink()
    resumed = run_module("app.tag", "--src", str(photos), "--dst", str(dst), "--local", str(tiny_model),
                         "--device", "cpu", "--threads", "1", timeout=300)
    assert resumed.returncode == 0 and f"{len(rows) - 1} done before, 1 to tag" in resumed.stderr, resumed.stderr
    assert_same_run(dst, tmp_path / "seq")
    assert digests(photos) == before


def test_tag_ray_on_an_existing_cluster(photos: Path, tiny_model: Path, tmp_path: Path) -> None:
    """RAY_ADDRESS: the tagger joins that cluster (its code shipped as py_modules) and leaves it running."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             logging_level="WARNING")
    try:
        address = ray.get_runtime_context().gcs_address
        seq = tmp_path / "seq"
        assert run_module("app.tag", "--src", str(photos), "--dst", str(seq), "--local", str(tiny_model),
                          "--device", "cpu", "--threads", "1", timeout=300).returncode == 0
        (photos / "taj mahal" / "001.jpg").unlink()  # a photo fewer than the sequential run: compared below
        env = {**os.environ, "RAY_ADDRESS": address}
        done = tag_ray(photos, tmp_path / "ray", tiny_model, "--workers", "2", "--worker-cpus", "0.5",
                       "--batch-size", "4", env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2  # still up, the same one
        rows = json.loads((tmp_path / "ray" / "tag_report.json").read_text())["photos"]
        seq_rows = [r for r in json.loads((seq / "tag_report.json").read_text())["photos"]
                    if r["path"] != "taj mahal/001.jpg"]
        assert rows == seq_rows
        sized = tag_ray(photos, tmp_path / "sized", tiny_model, "--num-cpus", "4", env=env)  # cannot resize it
        assert sized.returncode == 2 and "names an existing one" in sized.stderr
    finally:
        ray.shutdown()


def test_tag_ray_clear_failures(photos: Path, tiny_model: Path, tmp_path: Path) -> None:
    missing = tag_ray(tmp_path / "nowhere", tmp_path / "dst", tiny_model)
    assert missing.returncode == 2 and "source folder not found" in missing.stderr
    same = tag_ray(photos, photos, tiny_model)
    assert same.returncode == 2 and "originals are never modified" in same.stderr
    no_model = tag_ray(photos, tmp_path / "dst", tmp_path)
    assert no_model.returncode == 2 and "not an exported model folder" in no_model.stderr
    too_small = tag_ray(photos, tmp_path / "dst", tiny_model, "--workers", "2", "--num-cpus", "2")
    assert too_small.returncode == 2 and "cannot hold 2 workers" in too_small.stderr
    no_gpu = tag_ray(photos, tmp_path / "dst2", tiny_model, *RAY, "--num-gpus", "0", "--gpus-per-worker", "1")
    assert no_gpu.returncode == 2 and "GPUs asked for, the local cluster has 0" in no_gpu.stderr


@pytest.mark.skipif(not os.environ.get("LANDMARK_MODEL_DIR"), reason="opt-in: LANDMARK_MODEL_DIR=artifacts/wh13")
def test_tag_ray_real_photos(tmp_path: Path) -> None:
    """world_heritage13/test: the Ray tagger and ``app.tag --local`` write identical copies and reports."""
    model = Path(os.environ["LANDMARK_MODEL_DIR"])
    src = SHARED_DATA / "world_heritage13" / "test"
    if not src.is_dir():
        pytest.skip(f"{src} not found (../shared/data beside the repository)")
    seq = run_module("app.tag", "--src", str(src), "--dst", str(tmp_path / "seq"), "--local", str(model),
                     timeout=1200)
    assert seq.returncode == 0, seq.stderr[-3000:]
    done = tag_ray(src, tmp_path / "ray", model, "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    report = assert_same_run(tmp_path / "ray", tmp_path / "seq")
    print(report["summary"], done.stderr.splitlines()[-2:])
