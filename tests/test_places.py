"""The place index of the user's own geotagged photos (``landmark.places``, ``app.index``) end to end, on the
tiny model and the real porto5 photos: a library of copies of porto5/train carrying their place's GPS EXIF
(written by ``app.exif``, so the EXIF path is read back), built, rebuilt incrementally, resumed after a kill,
refused for another model; its answers offline, in the tagger, on Ray and served by TorchServe agree; XMP
sidecars read back by exiftool; a HEIC copy answered like its JPEG; a full or read-only destination stops
with one line and resumes.

The tiny model's embedding cannot tell Porto's landmarks apart (the trained models' figures come from
``benchmarks/places_figures.py``), so the photos located here are the library's own photos without their GPS
(a photo whose geotagged twin is in the library), and the synthetic photos the model itself tags.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT, run_module
from PIL import Image
from test_tag_ray import RAY, tag_ray
from test_tagger import digests

from app.exif import with_gps
from handlers.archive import build as build_archive
from handlers.process import TorchServe
from landmark.places import (
    PlaceIndex,
    haversine_km,
    heldout_scores,
    operating_point,
)
from landmark.predict import SOURCE_MODEL, SOURCE_PLACES, Predictor

EXIFTOOL = ROOT / ".tools" / "exiftool"
LOCAL = ("--device", "cpu", "--threads", "1")


def locations(porto: Path) -> dict:
    return json.loads((porto / "locations.json").read_text())


@pytest.fixture(scope="module")
def porto(shared_data: Path) -> Path:
    if not (shared_data / "porto5" / "train").is_dir():
        pytest.skip(f"{shared_data / 'porto5'} missing")
    return shared_data / "porto5"


@pytest.fixture(scope="module")
def library(porto: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of porto5/train, each carrying its landmark's GPS EXIF (the project's own EXIF writer)."""
    lib = tmp_path_factory.mktemp("library")
    table = locations(porto)
    for p in sorted((porto / "train").rglob("*")):
        if p.is_file():
            where = table[p.parent.name]
            out = lib / p.relative_to(porto / "train")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(with_gps(p.read_bytes(), where["lat"], where["lon"], where["place"]))
    return lib


def index_cli(src: Path, out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_module("app.index", "--src", str(src), "--out", str(out), "--model-dir", str(model), "--threads", "1",
                      *extra, timeout=600)


@pytest.fixture(scope="module")
def index(library: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "places.npz"
    done = index_cli(library, out, tiny_model)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def queries(porto: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos without GPS: originals of library photos (twins), porto5 test photos, synthetic photos of the
    model's classes, and a HEIC copy of a twin."""
    src = tmp_path_factory.mktemp("queries")
    for place in sorted((porto / "train").iterdir()):
        for p in sorted(place.glob("*.jpg"))[:2]:
            shutil.copyfile(p, src / f"twin_{p.name}")
        for p in sorted((porto / "test" / place.name).glob("*.jpg"))[:2]:
            shutil.copyfile(p, src / f"test_{p.name}")
    for p in sorted((tiny_data / "test" / "taj mahal").glob("*.jpg"))[:3]:
        shutil.copyfile(p, src / f"synthetic_{p.name}")
    first = sorted(src.glob("twin_*.jpg"))[0]
    with Image.open(first) as img:
        img.save(src / "twin_heic.heic", quality=95)
    for p in src.iterdir():
        p.chmod(0o644)
    return src


def twin_of(name: str, library: Path) -> Path | None:
    """The library photo a query is the GPS-less original of."""
    if not name.startswith("twin_"):
        return None
    stem = name.removeprefix("twin_")
    if stem == "heic.heic":
        return None
    found = list(library.rglob(stem))
    return found[0] if found else None


def test_heldout_operating_point_on_known_vectors() -> None:
    """Two places of two identical photos each: left-one-out finds the twin (right), left-place-out the other
    place 50 km away (wrong); 98 % precision puts the threshold at the twins' similarity."""
    v = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]], np.float32)
    coords = np.array([[41.15, -8.61], [41.15, -8.61], [41.6, -8.61], [41.6, -8.61]])
    scores, correct = heldout_scores(v, coords, np.array([0, 0, 1, 1]), 1.0)
    assert sorted(zip(scores.round(6), correct, strict=True)) == [(0.0, False)] * 4 + [(1.0, True)] * 4
    op = operating_point(scores, correct, 0.98, 1.0)
    assert op.threshold == 1.0 and op.located == 4 and op.queries == 8 and op.precision == 1.0


def test_index_from_gps_exif(index: Path, library: Path, porto: Path, tiny_model: Path) -> None:
    built = PlaceIndex.load(index)
    m = built.meta
    files = sorted(p.relative_to(library).as_posix() for p in library.rglob("*") if p.is_file())
    assert [r.path for r in m.references] == files and {r.located_by for r in m.references} == {"gps"}
    assert m.source == str(library) and m.search.kind == "exact" and m.complete
    table = locations(porto)
    assert len(m.places) == len(table)
    for place_id, place in enumerate(m.places):
        folders = {Path(r.path).parts[0] for r in m.references if r.place == place_id}
        assert len(folders) == 1, folders  # GPS grouping found the landmarks, 0.55 km apart at the closest
        where = table[folders.pop()]
        assert place.lat == pytest.approx(where["lat"], abs=1e-4) and place.lon == pytest.approx(where["lon"], abs=1e-4)
        assert place.name and place.country == "Portugal"  # offline reverse geocoding
    op = m.operating_point
    assert op.min_precision == 0.98 and op.queries == 2 * len(files)  # left-one-out + left-place-out
    assert op.precision is None or op.precision >= 0.98
    assert built.vectors.shape[0] == len(files)
    assert np.allclose(np.linalg.norm(built.vectors, axis=1), 1, atol=1e-5)


def test_index_from_locations_json(porto: Path, tiny_model: Path, tmp_path: Path) -> None:
    """A labelled folder (porto5/train has no GPS EXIF) with its locations.json: one place per folder, named by it."""
    out = tmp_path / "labelled.npz"
    done = index_cli(porto / "train", out, tiny_model, "--locations", str(porto / "locations.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    m = PlaceIndex.load(out).meta
    assert {p.name for p in m.places} == {w["place"] for w in locations(porto).values()}
    assert {r.located_by for r in m.references} == {"locations.json"}
    no_table = index_cli(porto / "train", tmp_path / "none.npz", tiny_model)
    assert no_table.returncode == 2 and "no photo with a location" in no_table.stderr
    assert not (tmp_path / "none.npz").exists()


def test_index_is_incremental_resumable_and_refuses_another_model(library: Path, tiny_model: Path,
                                                                  tiny_data: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    shutil.copytree(library, lib, copy_function=shutil.copy2)
    out = tmp_path / "idx" / "places.npz"

    # interrupted: killed once the resume state exists, then resumed
    proc = subprocess.Popen([sys.executable, "-m", "app.index", "--src", str(lib), "--out", str(out),
                             "--model-dir", str(tiny_model), "--threads", "1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out.with_name(out.name + ".partial")
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not out.exists(), "killed before the first save, or finished too fast"
    resumed = index_cli(lib, out, tiny_model)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    saved = int(resumed.stderr.split(" embedded before")[0].rsplit(", ", 1)[1])
    assert saved >= 64 and not partial.exists()
    first = PlaceIndex.load(out)
    assert [f.name for f in out.parent.iterdir()] == ["places.npz"]  # no temporary file left

    # a clean build gives the same index
    clean = tmp_path / "clean.npz"
    assert index_cli(lib, clean, tiny_model).returncode == 0
    assert PlaceIndex.load(clean).meta.references == first.meta.references
    assert np.allclose(PlaceIndex.load(clean).vectors, first.vectors, atol=1e-6)

    # nothing changed: nothing embedded; one removed and one changed: one embedded, one dropped
    again = index_cli(lib, out, tiny_model)
    assert again.returncode == 0 and "0 to embed, 0 removed" in again.stderr, again.stderr[-2000:]
    removed, changed = sorted(lib.rglob("*.jpg"))[:2]
    removed.unlink()
    with Image.open(changed) as img:
        exif = img.getexif()
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, exif=exif)
    update = index_cli(lib, out, tiny_model)
    assert update.returncode == 0 and "1 to embed, 1 removed" in update.stderr, update.stderr[-2000:]
    updated = PlaceIndex.load(out)
    paths = [r.path for r in updated.meta.references]
    assert removed.relative_to(lib).as_posix() not in paths and len(paths) == len(first.meta.references) - 1
    keep = {r.path: i for i, r in enumerate(first.meta.references)}
    for i, r in enumerate(updated.meta.references):
        same = np.allclose(updated.vectors[i], first.vectors[keep[r.path]], atol=1e-6)
        assert same == (r.path != changed.relative_to(lib).as_posix()), r.path

    # another model: refused by name everywhere, the index left as it was
    other = tmp_path / "other_model"
    trained = run_module("train.train", "--arch", "scratch", "--input-size", "32", "--epochs", "1", "--widths", "8,16",
                         "--depths", "1,1", "--batch-size", "16", "--threads", "1", "--seed", "1",
                         "--data-dir", str(tiny_data), "--out", str(other))
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert run_module("train.export", "--run-dir", str(other)).returncode == 0
    before = out.read_bytes()
    for done in (index_cli(lib, out, other),
                 run_module("landmark.predict", "--model-dir", str(other), "--index", str(out),
                            str(sorted(lib.rglob("*.jpg"))[0])),
                 run_module("app.tag", "--src", str(lib), "--dst", str(tmp_path / "dst"), "--local", str(other),
                            "--index", str(out), *LOCAL),
                 run_module("handlers.archive", "--model-dir", str(other), "--index", str(out), "--store",
                            str(tmp_path / "store"))):
        assert done.returncode != 0
        message = done.stderr.strip().splitlines()[-1]
        assert "was built with model 'scratch 1.0'" in message and "not with this model" in message, done.stderr
    assert out.read_bytes() == before


def test_answers_agree_offline_tagger_ray_and_served(index: Path, library: Path, queries: Path, porto: Path,
                                                     tiny_model: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_dir(tiny_model, "onnx", device="cpu", threads=1, index=index)
    offline = {p.name: predictor.predict([p])[0] for p in sorted(queries.iterdir())}
    table = locations(porto)
    for name, a in offline.items():
        assert a["place"] is not None and len(a["place"]["photos"]) == 3
        if a["landmark"] is not None:
            assert a["source"] == SOURCE_MODEL  # the model's own decision comes first
        elif a["place"]["located"]:
            assert a["source"] == SOURCE_PLACES
            assert (a["location"]["lat"], a["location"]["lon"]) == (a["place"]["lat"], a["place"]["lon"])
            assert a["location"]["confidence"] == a["place"]["confidence"]
        else:
            assert a["source"] is None and a["location"] is None  # refused: not like the library enough
        twin = twin_of(name, library)
        if twin is not None:  # the library's own photo without its GPS: found, at its landmark
            assert a["place"]["photos"][0] == {"path": twin.relative_to(library).as_posix(), "similarity": 1.0}
            assert a["place"]["located"], name
            truth = table[twin.parent.name]
            assert haversine_km(np.array([a["place"]["lat"], a["place"]["lon"]]),
                                np.array([truth["lat"], truth["lon"]])) <= 1.0
    assert any(a["source"] == SOURCE_MODEL for n, a in offline.items() if n.startswith("synthetic_"))
    # the tiny model tags some Porto photos as its own landmarks (it knows no negatives); the others are twins
    assert any(a["source"] == SOURCE_PLACES for n, a in offline.items() if n.startswith("twin_"))

    # a HEIC copy is answered like its JPEG
    jpeg = offline[sorted(n for n in offline if n.startswith("twin_") and n.endswith(".jpg"))[0]]
    heic = offline["twin_heic.heic"]
    assert heic["source"] == jpeg["source"] and heic["place"]["located"]
    assert heic["place"]["name"] == jpeg["place"]["name"]
    where = ("lat", "lon", "place")
    assert [heic["location"][k] for k in where] == [jpeg["location"][k] for k in where]
    assert heic["place"]["similarity"] > 0.99

    # the tagger and the Ray tagger write the same rows, from the same answers
    seq = run_module("app.tag", "--src", str(queries), "--dst", str(tmp_path / "seq"), "--local", str(tiny_model),
                     "--index", str(index), "--sidecar", *LOCAL, timeout=300)
    assert seq.returncode == 0, seq.stderr[-3000:]
    rows = {r["path"]: r for r in json.loads((tmp_path / "seq" / "tag_report.json").read_text())["photos"]}
    for name, a in offline.items():
        assert rows[name]["location_source"] == a["source"]
        assert (rows[name]["action"] == "tagged") == (a["location"] is not None)
    ray = tag_ray(queries, tmp_path / "ray", tiny_model, *RAY, "--index", str(index), "--sidecar")
    assert ray.returncode == 0, ray.stderr[-3000:]
    reports = [json.loads((tmp_path / d / "tag_report.json").read_text()) for d in ("seq", "ray")]
    assert reports[0] == reports[1]
    assert digests(tmp_path / "seq") == digests(tmp_path / "ray")  # the same sidecars, byte for byte

    # served from an archive that ships the index: the same answers
    store = tmp_path / "store"
    build_archive(tiny_model, "onnx", "landmark", "1.0", store, index=index)
    server = TorchServe(store, "landmark", workdir=tmp_path / "ts", workers=1)
    with server.start(timeout=180):
        for name, a in offline.items():
            r = httpx.post(server.url("landmark"), content=(queries / name).read_bytes(),
                           headers={**server.headers(), "Content-Type": "application/octet-stream"}, timeout=60)
            assert r.status_code == 200, r.text
            served = r.json()
            assert (served["source"], served["location"], served["landmark"]) == (
                a["source"], a["location"], a["landmark"]), name
            assert served["place"]["name"] == a["place"]["name"]
            assert served["place"]["similarity"] == pytest.approx(a["place"]["similarity"], abs=1e-5)


def exiftool(*args: str) -> list[dict]:
    tool = EXIFTOOL / "usr" / "bin" / "exiftool"
    if not tool.is_file():
        pytest.skip(f"exiftool not found at {tool}: `make exiftool` fetches Debian's libimage-exiftool-perl there")
    env = {**os.environ, "PERL5LIB": str(EXIFTOOL / "usr" / "share" / "perl5")}
    done = subprocess.run(["perl", str(tool), "-j", "-n", "-G1", *args], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(done.stdout)


def test_sidecars_and_copies_read_back_by_exiftool(index: Path, queries: Path, tiny_model: Path,
                                                   tmp_path: Path) -> None:
    before = digests(queries)
    dst = tmp_path / "sidecars"
    done = run_module("app.tag", "--src", str(queries), "--dst", str(dst), "--local", str(tiny_model),
                      "--index", str(index), "--sidecar", *LOCAL, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((dst / "tag_report.json").read_text())["photos"]
    tagged = [r for r in rows if r["action"] == "tagged"]
    assert {r["location_source"] for r in tagged} == {SOURCE_MODEL, SOURCE_PLACES}
    assert "twin_heic.heic" in {r["path"] for r in tagged}  # HEIC: tagged through its sidecar
    assert sorted(p.name for p in dst.iterdir() if not p.name.startswith("tag_report")) == sorted(
        r["path"] + ".xmp" for r in tagged)  # sidecars only, never a photo
    read = {Path(d["SourceFile"]).name: d for d in exiftool(*[str(dst / r["output"]) for r in tagged])}
    for r in tagged:
        x = read[r["output"]]
        assert x["XMP-exif:GPSLatitude"] == pytest.approx(r["lat"], abs=1e-6)
        assert x["XMP-exif:GPSLongitude"] == pytest.approx(r["lon"], abs=1e-6)
        how = f"estimated by landmark-tagging (source: {r['location_source']})"
        assert x["XMP-exif:GPSProcessingMethod"].startswith(how)
        assert x["XMP-landmark:Estimated"] is True and x["XMP-landmark:Source"] == r["location_source"]
        assert float(x["XMP-landmark:Confidence"]) > 0
    assert digests(queries) == before

    # copies: JPEG only (the HEIC is left to --sidecar), the original's mode and times, marked as estimated
    copies = tmp_path / "copies"
    done = run_module("app.tag", "--src", str(queries), "--dst", str(copies), "--local", str(tiny_model),
                      "--index", str(index), *LOCAL, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["path"]: r for r in json.loads((copies / "tag_report.json").read_text())["photos"]}
    assert rows["twin_heic.heic"]["reason"] == "cannot write EXIF into HEIF: use --sidecar"
    made = [r for r in rows.values() if r["action"] == "tagged"]
    assert made
    for r in made:
        copy, original = (copies / r["output"]).stat(), (queries / r["path"]).stat()
        assert stat.S_IMODE(copy.st_mode) == stat.S_IMODE(original.st_mode) == 0o644
        assert copy.st_mtime_ns == original.st_mtime_ns
    read = exiftool(*[str(copies / r["output"]) for r in made])
    for x, r in zip(read, made, strict=True):
        assert x["GPS:GPSProcessingMethod"].startswith("estimated by landmark-tagging")
        assert x["Composite:GPSLatitude"] == pytest.approx(r["lat"], abs=1e-5)
    assert digests(queries) == before


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="a full and a read-only destination are tmpfs mounts: needs root")
@pytest.mark.parametrize("case", ["full", "read_only"])
def test_full_or_read_only_destination_stops_with_one_line_and_resumes(case: str, index: Path, queries: Path,
                                                                       tiny_model: Path, tmp_path: Path) -> None:
    tag = ("--src", str(queries), "--local", str(tiny_model), "--index", str(index), *LOCAL)
    with tmpfs(tmp_path / "dst", "64k", *(("ro",) if case == "read_only" else ())) as dst:
        if case == "full":
            with contextlib.suppress(OSError):
                (dst / "filler").write_bytes(bytes(64 * 1024))
        done = run_module("app.tag", *tag, "--dst", str(dst), timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert errors and "DST is full or read-only; rerun to resume" in errors[-1], done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert "photos:" in done.stdout  # what was done before it stopped
        subprocess.run(["mount", "-o", "remount,rw,size=64m", str(dst)], check=True)
        (dst / "filler").unlink(missing_ok=True)
        again = run_module("app.tag", *tag, "--dst", str(dst), timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        rows = json.loads((dst / "tag_report.json").read_text())["photos"]
        assert all((dst / r["output"]).is_file() for r in rows if r["action"] == "tagged")
        assert not list(dst.rglob(".*.tmp*"))


def test_handler_finds_the_index_shipped_or_mounted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from handlers.landmark_handler import index_path

    monkeypatch.delenv("LANDMARK_INDEX", raising=False)
    assert index_path(tmp_path, {}) is None
    (tmp_path / "places.npz").write_bytes(b"")
    assert index_path(tmp_path, {}) == tmp_path / "places.npz"  # shipped in the archive
    assert index_path(tmp_path, {"index": "/mnt/places.npz"}) == Path("/mnt/places.npz")  # model-config.yaml
    monkeypatch.setenv("LANDMARK_INDEX", "/srv/lib.npz")
    assert index_path(tmp_path, {"index": "/mnt/places.npz"}) == Path("/srv/lib.npz")  # env beats the config
    monkeypatch.setenv("LANDMARK_INDEX", "")
    assert index_path(tmp_path, {}) is None  # empty: none, even where the archive ships one
