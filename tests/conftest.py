"""Shared fixtures: a small synthetic landmark data set made on the fly (the real photos are
never copied into the repository), a tiny model trained and exported from it, and the
path of the shared real data sets (tests that need them skip with a reason where absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from PIL import Image

from app.process import AppProcess
from handlers.process import TorchServe, free_ports
from handlers.settings import CONFIG, PORT_KEYS, base_url, write_properties

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# set by .ci/run: CI always has the real photo sets, so a test that finds one missing fails instead of skipping
REQUIRE_DATA = os.environ.get("LANDMARK_REQUIRE_DATA") == "1"
VENV = Path(sys.executable).parent.parent  # the venv running the tests: `make` runs its commands with it too
# Udacity-style names: a numeric prefix, underscores, and a folder with spaces.
TINY_CLASSES = ["09.Golden_Gate_Bridge", "16.Eiffel_Tower", "taj mahal"]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def synthetic_photo(class_index: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A class-specific pattern (stripes / checks / rings) in a class colour, with noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 6.28)
    pattern = [np.sin(yy / 4 + phase), np.sin(xx / 5 + phase) * np.sin(yy / 5),
               np.sin(np.hypot(xx - w / 2, yy - h / 2) / 3 + phase)][class_index % 3]
    colour = np.array([[220, 60, 40], [40, 160, 220], [230, 200, 60]][class_index % 3], np.float32)
    img = 127 + 0.45 * (colour - 127)[None, None, :] * (1 + pattern[..., None])
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_dataset(root: Path, n_train: int = 16, n_test: int = 6, seed: int = 0) -> Path:
    """``root/train/<class>/`` and ``root/test/<class>/`` of JPEG and PNG files of varied sizes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(TINY_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (int(rng.integers(48, 120)), int(rng.integers(48, 120)))
                ext = "png" if i % 4 == 0 else "jpg"
                synthetic_photo(c, rng, size).save(folder / f"{i:03d}.{ext}")
    return root


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` from the repository root, as the Makefile does."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def run_make(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``make args`` in the repository root with this venv, as the README says to run it. Its install
    stamp is a fresh file, so neither make nor a sub-make reinstalls the venv the tests run in."""
    stamp = Path(os.environ.get("TMPDIR", "/tmp")) / f"landmark-tests-{os.getpid()}.installed"
    stamp.touch()
    return subprocess.run(["make", "--no-print-directory", f"VENV={VENV}", f"STAMP={stamp}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def missing_data(reason: str) -> NoReturn:
    """Skip for want of ../shared/data, or fail under .ci/run (LANDMARK_REQUIRE_DATA=1), which always has it."""
    if REQUIRE_DATA:
        pytest.fail(f"{reason}: .ci/run needs it (LANDMARK_REQUIRE_DATA=1)")
    pytest.skip(reason)


TINY_TRAIN_ARGS = ("--arch", "scratch", "--input-size", "32", "--epochs", "8", "--widths", "8,16",
                   "--depths", "1,1", "--batch-size", "16", "--lr", "3e-3", "--threads", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_model(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch CNN trained for a few seconds on ``tiny_data`` and exported (ts + onnx + meta)."""
    out = tmp_path_factory.mktemp("tiny_model")
    trained = run_module("train.train", *TINY_TRAIN_ARGS, "--data-dir", str(tiny_data), "--out", str(out))
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = run_module("train.export", "--run-dir", str(out))
    assert exported.returncode == 0, exported.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        missing_data(f"real photo sets not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA


def free_port() -> int:
    return free_ports(1)[0]


def free_port_config(path: Path, **overrides: object) -> Path:
    """serve_config/config.properties on free loopback ports (plus ``overrides``), written to ``path``: a
    server started from it by ``make serve SERVE_ARGS="--config <path>"`` never meets another one."""
    ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS)), strict=True))
    addresses = {key: base_url(ports[name]) if key.endswith("_address") else ports[name]
                 for name, key in PORT_KEYS.items()}
    return write_properties(path, CONFIG, {**addresses, **overrides})


def broken_store(tmp_path: Path) -> Path:
    """A store whose broken.mar never loads: its handler raises on import."""
    store = tmp_path / "store"
    store.mkdir()
    with zipfile.ZipFile(store / "broken.mar", "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"runtime": "python", "model": {
            "modelName": "broken", "serializedFile": "model.onnx", "handler": "landmark_handler.py",
            "modelVersion": "1.0"}}))
        z.writestr("landmark_handler.py", "raise ImportError('deliberately broken handler')\n")
    return store


def serve(store: Path, workdir: Path, config: Path = CONFIG) -> Iterator[TorchServe]:
    server = TorchServe(store, "landmark", workdir=workdir, workers=1, config=config)
    server.start(timeout=180)
    try:
        yield server
    finally:
        server.stop()


def start_app(inference_url: str, key_file: Path, log: Path, max_upload_mb: float = 10, *args: str,
              ) -> tuple[AppProcess, str]:
    """``python -m app.web`` on a free port, as ``make app`` runs it, with more of its flags in ``args``;
    its output goes to ``log``."""
    app = AppProcess(inference_url, key_file, log, "--max-upload-mb", str(max_upload_mb), *args).start()
    return app, app.url


def stop_app(app: AppProcess) -> None:
    app.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} missing: `make browser-deps` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
