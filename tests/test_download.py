"""`make data`: a zip from a URL (here file://) becomes <dest>/train + <dest>/test, atomically."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

from conftest import ROOT, run_module


def _zip_dataset(tiny_data: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(tiny_data.rglob("*")):
            if path.is_file():
                zf.write(path, Path("landmark_images") / path.relative_to(tiny_data))
    return target


def test_make_data_installs_a_local_zip(tiny_data: Path, tmp_path: Path) -> None:
    archive = _zip_dataset(tiny_data, tmp_path / "landmark_images.zip")
    dest = tmp_path / "data" / "landmark_images"
    done = subprocess.run(["make", "-s", "data", f"DATA_URL={archive.as_uri()}", f"DATA_DIR={dest}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (dest / "train").iterdir()) == sorted(p.name for p in (tiny_data / "train").iterdir())
    assert len(list((dest / "test").rglob("*.*"))) == len(list((tiny_data / "test").rglob("*.*")))
    assert [p.name for p in dest.parent.iterdir()] == ["landmark_images"]  # no temp folders left behind
    again = run_module("train.download", "--url", archive.as_uri(), "--dest", str(dest))
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_offline_or_broken_download_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "data" / "landmark_images"
    offline = run_module("train.download", "--url", "http://127.0.0.1:9/landmark_images.zip", "--dest", str(dest),
                         "--timeout", "5")
    assert offline.returncode == 1 and "cannot download" in offline.stderr
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    broken = run_module("train.download", "--url", (tmp_path / "broken.zip").as_uri(), "--dest", str(dest))
    assert broken.returncode == 1 and "not a valid zip" in broken.stderr
    assert not dest.exists() and not [p for p in dest.parent.iterdir() if p.name.startswith(".")]
