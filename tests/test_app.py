"""The web app against a real TorchServe serving the tiny model: its JSON API over HTTP, the
served mode of the batch tagger, and the page in a real headless Chromium (Debian's, driven by
PyPI's playwright). Screenshots go to $SCREENSHOT_DIR when set (docs/ for the README):
SCREENSHOT_DIR=docs .venv/bin/python -m pytest tests/test_app.py -k page"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import SHARED_DATA, broken_store, free_port, run_module, serve, start_app, stop_app, synthetic_photo

from benchmarks.bad_inputs import bad_inputs, png_bomb
from handlers import tokens
from handlers.process import TorchServe
from handlers.settings import CONFIG, RETRY_AFTER_S, write_properties
from handlers.tokens import Keys
from landmark.predict import Predictor

LIMIT_MB = 1
KEY_MINUTES = 0.25


def sample_photo(tmp: Path) -> Path:
    """A real Udacity sample photo where ../shared/data is present, else a synthetic JPEG. Screenshots
    for docs/ use the synthetic one: the real photos are not licensed for the repository."""
    real = SHARED_DATA / "udacity_samples" / "16.Eiffel_Tower" / "3828627c8730f160.jpg"
    if real.is_file() and not os.environ.get("SCREENSHOT_DIR"):
        return real
    path = tmp / "eiffel.jpg"
    synthetic_photo(1, np.random.default_rng(0), (320, 240)).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def store(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store")
    built = run_module("handlers.archive", "--model-dir", str(tiny_model), "--backend", "onnx", "--name", "landmark",
                       "--store", str(store))
    assert built.returncode == 0, built.stderr[-3000:]
    return store


@pytest.fixture(scope="module")
def served(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    yield from serve(store, tmp_path_factory.mktemp("ts"))


@pytest.fixture(scope="module")
def short_key_served(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """A server whose inference and management keys expire 15 s after they are made, not 60 min."""
    work = tmp_path_factory.mktemp("ts_short_key")
    config = work.parent / "short_key.properties"  # TorchServe reads token_expiration_min as a float
    config.write_text(CONFIG.read_text(encoding="utf-8") + f"token_expiration_min={KEY_MINUTES}\n", encoding="utf-8")
    yield from serve(store, work, config)


@pytest.fixture(scope="module")
def app_url(served: TorchServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_app(served.inference_url, served.workdir / "key_file.json",
                          tmp_path_factory.mktemp("app") / "app.log", LIMIT_MB)
    try:
        yield url
    finally:
        stop_app(proc)


@pytest.fixture(scope="module")
def down_app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app pointed at a port where no TorchServe listens."""
    tmp = tmp_path_factory.mktemp("down_app")
    proc, url = start_app(f"http://127.0.0.1:{free_port()}", tmp / "key_file.json", tmp / "app.log")
    try:
        yield url
    finally:
        stop_app(proc)


def test_api_predicts_like_local_model_and_keeps_token(app_url: str, served: TorchServe, tiny_model: Path,
                                                       tmp_path: Path) -> None:
    photo = sample_photo(tmp_path)
    r = httpx.post(f"{app_url}/api/predict", content=photo.read_bytes(), headers={"Content-Type": "image/jpeg"},
                   timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    local = Predictor.from_dir(tiny_model, "onnx", device="cpu", threads=1).predict([photo], k=3)[0]
    predictions = answer["top_k"]
    assert [p["label"] for p in predictions] == [p["label"] for p in local["top_k"]]
    assert [p["probability"] for p in predictions] == pytest.approx([p["probability"] for p in local["top_k"]],
                                                                    abs=1e-5)
    assert answer["landmark"] == local["landmark"] and answer["reason"] == local["reason"]
    assert {"lat", "lon", "country", "place"} <= set(predictions[0]["location"])

    token = json.loads((served.workdir / "key_file.json").read_text())["inference"]["key"]
    assert len(token) >= 8
    for path in ("/", "/static/app.js", "/static/style.css", "/api/config", "/api/health"):
        page = httpx.get(f"{app_url}{path}", timeout=10)
        assert page.status_code == 200
        assert token not in page.text and token not in str(page.headers)
        assert "default-src 'none'" in page.headers["content-security-policy"]
    assert token not in r.text and token not in str(r.headers)
    assert httpx.get(f"{app_url}/api/health", timeout=10).json()["server"] == "ok"


def test_every_bad_upload_gets_the_handlers_json_4xx_through_the_app(app_url: str, served: TorchServe,
                                                                      tmp_path: Path) -> None:
    """The app judges no photo itself: each bad body (the soak's corpus, the 40000 x 40000 px PNG bomb of
    194 kB that once got a 500 from the app, a wrong type) gets through the app the status and JSON the
    handler gives it directly, sent plainly or chunked without a length; only the size limit is the app's."""
    jpeg = sample_photo(tmp_path).read_bytes()
    bodies = {**bad_inputs(jpeg), "bomb_40000_px": png_bomb(40_000), "wrong_type": b"just some notes\n"}

    def chunked(data: bytes) -> Iterator[bytes]:  # httpx sends an iterator as Transfer-Encoding: chunked
        yield from (data[i:i + 4096] for i in range(0, len(data), 4096))

    for kind, body in bodies.items():
        direct = httpx.post(served.url(), content=body, timeout=60,
                            headers={**served.headers(), "Content-Type": "application/octet-stream"})
        assert 400 <= direct.status_code < 500 and direct.json()["error"], (kind, direct.text)
        for how, content in (("plain", body), ("chunked", chunked(body))):
            r = httpx.post(f"{app_url}/api/predict", content=content, timeout=60)
            assert (r.status_code, r.json()) == (direct.status_code, direct.json()), (kind, how, r.text)
            assert r.headers["content-type"] == "application/json"
    assert "too large" in httpx.post(f"{app_url}/api/predict", content=png_bomb(40_000), timeout=60).json()["error"]
    good = httpx.post(f"{app_url}/api/predict", content=chunked(jpeg), timeout=60)
    assert good.status_code == 200 and good.json()["top_k"], good.text

    over = b"\xff\xd8" + bytes(LIMIT_MB * 1024 * 1024)
    for content in (over, chunked(over)):
        big = httpx.post(f"{app_url}/api/predict", content=content, timeout=60)
        assert big.status_code == 413 and f"{LIMIT_MB} MB" in big.json()["error"]


def test_the_app_sheds_load_at_once_past_its_limit(served: TorchServe, tmp_path: Path) -> None:
    """With --max-in-flight 1 and one upload still arriving, the next photo gets an immediate JSON 503 with
    Retry-After instead of waiting; once the first is done, photos are served again."""
    jpeg = sample_photo(tmp_path).read_bytes()
    app, url = start_app(served.inference_url, served.workdir / "key_file.json", tmp_path / "app.log", 10,
                         "--max-in-flight", "1")
    release = threading.Event()

    def slow_upload() -> Iterator[bytes]:
        yield jpeg[:100]
        release.wait(60)
        yield jpeg[100:]

    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/api/predict", content=slow_upload(), timeout=90)
            deadline = time.monotonic() + 60
            while httpx.get(f"{url}/api/config", timeout=10).json()["in_flight"] < 1:  # its headers are in
                assert time.monotonic() < deadline and not first.done(), "the slow upload never reached the app"
                time.sleep(0.05)
            shed = httpx.post(f"{url}/api/predict", content=jpeg, timeout=30)
            release.set()
            assert first.result().status_code == 200, first.result().text
        assert shed.status_code == 503 and shed.headers["retry-after"] == str(RETRY_AFTER_S), shed.text
        assert "at capacity (1 requests in progress)" in shed.json()["error"]
        assert httpx.post(f"{url}/api/predict", content=jpeg, timeout=30).status_code == 200
        assert httpx.get(f"{url}/api/config", timeout=10).json()["in_flight"] == 0
    finally:
        release.set()
        stop_app(app)


@pytest.fixture(scope="module")
def full_queue_served(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """A server whose job queue holds one request: a crowd gets TorchServe's own 503s."""
    work = tmp_path_factory.mktemp("ts_full_queue")
    config = write_properties(work.parent / "full_queue.properties", CONFIG, {"job_queue_size": 1})
    yield from serve(store, work, config)


def test_torchserves_503_reaches_the_client_as_json_with_retry_after(full_queue_served: TorchServe,
                                                                     tmp_path: Path) -> None:
    """The app lets more through than TorchServe queues; TorchServe's 503 comes back JSON with Retry-After."""
    jpeg = sample_photo(tmp_path).read_bytes()
    server = full_queue_served
    app, url = start_app(server.inference_url, server.workdir / "key_file.json", tmp_path / "app.log", 10,
                         "--max-in-flight", "64")
    try:
        with ThreadPoolExecutor(24) as pool:
            for _ in range(5):  # a crowd of 24 against a queue of 1 and one worker: some are turned away
                answers = list(pool.map(lambda _: httpx.post(f"{url}/api/predict", content=jpeg, timeout=60),
                                        range(48)))
                if any(r.status_code == 503 for r in answers):
                    break
    finally:
        stop_app(app)
    assert {r.status_code for r in answers} == {200, 503}, [r.text for r in answers if r.status_code != 200]
    for r in (r for r in answers if r.status_code == 503):
        assert r.headers["retry-after"] == str(RETRY_AFTER_S) and "TorchServe is at capacity" in r.json()["error"]


def test_open_inference_protocol_v2_with_tritonclient(app_url: str, tmp_path: Path) -> None:
    """KServe / Triton clients reach the model through the app: health, metadata, and infer with the photo as
    binary tensor data (tritonclient's default), as base64 JSON, or as the bare body with no Content-Type;
    each answer is the /api/predict answer. Errors are the client's exceptions with the app's message."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    jpeg = sample_photo(tmp_path).read_bytes()
    plain = httpx.post(f"{app_url}/api/predict", content=jpeg, timeout=60).json()
    client = triton.InferenceServerClient(app_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("landmark")
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata("landmark")
    assert meta["name"] == "landmark" and meta["versions"] == ["1.0"]
    assert [(t["name"], t["datatype"]) for t in meta["inputs"] + meta["outputs"]] == [("photo", "BYTES"),
                                                                                     ("answer", "BYTES")]

    def photo_input(data: object, binary: bool = True):
        photo = triton.InferInput("photo", [1], "BYTES")
        photo.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=binary)
        return photo

    binary = client.infer("landmark", [photo_input(jpeg)], request_id="r-1")
    assert binary.get_response()["id"] == "r-1" and binary.get_response()["model_version"] == "1.0"
    assert json.loads(binary.as_numpy("answer")[0]) == plain
    as_json = client.infer("landmark", [photo_input(base64.b64encode(jpeg), binary=False)], parameters={"topk": 1},
                           outputs=[triton.InferRequestedOutput("answer", binary_data=False)])
    assert json.loads(as_json.as_numpy("answer")[0])["top_k"] == plain["top_k"][:1]
    bare = httpx.post(f"{app_url}/v2/models/landmark/infer", content=jpeg, timeout=60)
    assert "content-type" not in bare.request.headers and bare.status_code == 200, bare.text
    assert json.loads(bare.json()["outputs"][0]["data"][0]) == plain

    with pytest.raises(InferenceServerException, match="not an image"):
        client.infer("landmark", [photo_input(b"a shopping list, not a photo")])
    with pytest.raises(InferenceServerException, match=r"topk must be in 1\.\.3"):
        client.infer("landmark", [photo_input(jpeg)], parameters={"topk": 9})
    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        client.infer("other", [photo_input(jpeg)])
    no_photo = httpx.post(f"{app_url}/v2/models/landmark/infer", json={"inputs": [
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, timeout=30)
    assert no_photo.status_code == 400 and "v2 request needs one BYTES input" in no_photo.json()["error"]


def test_api_reports_server_down(down_app_url: str, tmp_path: Path) -> None:
    health = httpx.get(f"{down_app_url}/api/health", timeout=10).json()
    assert health["server"] == "down" and "not reachable" in health["error"]
    r = httpx.post(f"{down_app_url}/api/predict", content=sample_photo(tmp_path).read_bytes(), timeout=30)
    assert r.status_code == 503 and "make serve" in r.json()["error"]


def test_api_health_is_not_ok_while_the_model_has_no_ready_worker(tmp_path: Path) -> None:
    """TorchServe's /ping says Healthy for a model that never loads; the app asks for its workers."""
    ts = TorchServe(broken_store(tmp_path), "broken", tmp_path / "ts", workers=1)
    ts.launch()
    proc = None
    try:
        deadline = time.monotonic() + 60
        while not (ts.live() and ts._worker_died()) and time.monotonic() < deadline:
            time.sleep(0.25)
        proc, url = start_app(ts.inference_url, ts.workdir / "key_file.json", tmp_path / "app.log", 10,
                              "--management-url", ts.management_url, "--model", "broken")
        health = httpx.get(f"{url}/api/health", timeout=10).json()
        assert health["server"] == "not_ready" and "broken has no READY worker" in health["error"], health
        ready = httpx.get(f"{url}/v2/health/ready", timeout=10)
        assert ready.status_code == 503 and "broken has no READY worker" in ready.json()["error"]
    finally:
        if proc is not None:
            stop_app(proc)
        ts.stop()


def test_tagger_served_mode_matches_local(served: TorchServe, tiny_model: Path, tiny_data: Path,
                                          tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_data / "test" / "16.Eiffel_Tower", src / "16.Eiffel_Tower")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    common = ("--src", str(src), "--min-precision", "0.4")
    served_run = run_module("app.tag", *common, "--dst", str(tmp_path / "served"), "--inference-url",
                            served.inference_url, "--key-file", str(served.workdir / "key_file.json"))
    assert served_run.returncode == 0, served_run.stderr[-3000:]
    local_run = run_module("app.tag", *common, "--dst", str(tmp_path / "local"), "--local", str(tiny_model),
                           "--device", "cpu", "--threads", "1")
    assert local_run.returncode == 0, local_run.stderr[-3000:]
    rows = {name: {r["path"]: r for r in json.loads((tmp_path / name / "tag_report.json").read_text())["photos"]}
            for name in ("served", "local")}
    assert rows["served"].keys() == rows["local"].keys()
    assert rows["served"]["broken.png"]["action"] == "error"
    for path, local in rows["local"].items():
        mine = rows["served"][path]
        assert (mine["landmark"], mine["action"], mine["reason"]) == (local["landmark"], local["action"],
                                                                       local["reason"]), path
        if local["action"] != "error":  # an unreadable photo has no answer, so no probability
            assert mine["probability"] == pytest.approx(local["probability"], abs=1e-5), path
    again = run_module("app.tag", *common, "--dst", str(tmp_path / "served"), "--inference-url",
                       served.inference_url, "--key-file", str(served.workdir / "key_file.json"))
    assert again.returncode == 0 and "0 to tag" in again.stderr, again.stderr[-3000:]


def wait_until_expired(key_file: Path) -> str:
    """Sleep until the file's inference key has expired on TorchServe's clock (this machine's); return it."""
    entry = json.loads(key_file.read_text())["inference"]
    time.sleep(max(0.0, (datetime.fromisoformat(entry["expiration time"]) - datetime.now(UTC)).total_seconds()) + 1)
    return entry["key"]


@pytest.mark.slow  # about 45 s of real waiting: three of the server's 15-s inference keys expire, one after the other
def test_expired_key_is_renewed_for_the_app_and_the_tagger(short_key_served: TorchServe, tiny_data: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, key_file = short_key_served, short_key_served.workdir / "key_file.json"
    photo = sample_photo(tmp_path).read_bytes()
    proc, app = start_app(server.inference_url, key_file, tmp_path / "app.log")  # it finds the management URL itself
    try:
        def post(headers: dict) -> httpx.Response:
            return httpx.post(server.url(), content=photo, headers={**headers, "Content-Type": "image/jpeg"},
                              timeout=60)

        expired = wait_until_expired(key_file)
        refused = post({"Authorization": f"Bearer {expired}"})
        assert refused.status_code == 400 and refused.json()["type"] == "InvalidKeyException", refused.text
        with monkeypatch.context() as m:  # a key that lapses on its way: the file says valid, TorchServe refuses
            m.setattr(tokens, "expired", lambda entry: False)
            assert Keys(key_file, server.management_url).send(post).status_code == 200
        assert Keys(key_file).key() != expired

        expired = wait_until_expired(key_file)
        r = httpx.post(f"{app}/api/predict", content=photo, headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["top_k"]) == 3 and Keys(key_file).key() != expired
    finally:
        stop_app(proc)

    expired = wait_until_expired(key_file)
    src = tmp_path / "src"
    shutil.copytree(tiny_data / "test" / "16.Eiffel_Tower", src / "16.Eiffel_Tower")
    tagged = run_module("app.tag", "--src", str(src), "--dst", str(tmp_path / "tagged"), "--inference-url",
                        server.inference_url, "--key-file", str(key_file))
    assert tagged.returncode == 0, tagged.stderr[-3000:]
    rows = json.loads((tmp_path / "tagged" / "tag_report.json").read_text())["photos"]
    assert rows and all(row["landmark"] and not row["error"] for row in rows), rows
    assert Keys(key_file).key() != expired


def screenshot(page, tmp_path: Path, name: str) -> None:
    shot = page.screenshot(full_page=True)
    assert shot.startswith(b"\x89PNG")
    (tmp_path / name).write_bytes(shot)
    if os.environ.get("SCREENSHOT_DIR"):
        target = Path(os.environ["SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(shot)


def new_page(browser, url: str, requests: list[str]):
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    page.on("request", lambda req: requests.append(req.url))
    page.goto(url)
    return page


def tagged_photo(tiny_model: Path, tiny_data: Path) -> Path:
    """A test photo that the tiny model tags (its decision says known landmark)."""
    predictor = Predictor.from_dir(tiny_model, "onnx", device="cpu", threads=1)
    photos = sorted((tiny_data / "test" / "16.Eiffel_Tower").glob("*.jpg"))
    return next(p for p in photos if predictor.predict([p])[0]["landmark"])


def test_page_tags_photo_and_reports_errors(browser, app_url: str, tiny_model: Path, tiny_data: Path,
                                            tmp_path: Path) -> None:
    from playwright.sync_api import expect

    requests: list[str] = []
    page = new_page(browser, app_url, requests)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "files"  # the chooser is reachable by keyboard
    chooser = page.get_by_label("Choose photos")
    photo = tagged_photo(tiny_model, tiny_data)
    chooser.set_input_files(str(photo))
    card = page.locator("#results .card").first
    expect(card.locator(".state")).to_contain_text("Eiffel Tower (confidence", timeout=30_000)
    expect(card.locator(".predictions li")).to_have_count(3, timeout=30_000)  # top-k of a 3-class model
    expect(card.locator(".place")).to_contain_text("Place:")
    link = card.get_by_role("link", name="View on OpenStreetMap")
    assert link.get_attribute("href").startswith("https://www.openstreetmap.org/?mlat=")
    assert "#map=15/" in link.get_attribute("href")
    assert photo.name in card.locator("img.thumb").get_attribute("alt")
    assert page.locator("#results").get_attribute("aria-live") == "polite"
    screenshot(page, tmp_path, "app.png")

    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a photo")
    chooser.set_input_files(str(notes))
    expect(page.locator("#results .card.failed").first).to_contain_text("not an image", timeout=30_000)
    big = tmp_path / "huge.jpg"
    big.write_bytes(b"\xff\xd8" + bytes(LIMIT_MB * 1024 * 1024 + 10))
    chooser.set_input_files(str(big))
    expect(page.locator("#results .card.failed").first).to_contain_text("too large", timeout=30_000)
    dropped = page.evaluate_handle("""(b64) => {  // a real drop: a DataTransfer holding the photo
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
        return dt;
    }""", base64.b64encode(photo.read_bytes()).decode())
    page.locator("#upload").dispatch_event("drop", {"dataTransfer": dropped})
    expect(page.locator("#results .card").first.locator(".predictions li")).to_have_count(3, timeout=30_000)
    expect(page.locator("#results .card").first.locator(".filename")).to_have_text("dropped.jpg")
    screenshot(page, tmp_path, "app-errors.png")
    assert all(u.startswith(app_url) or u.startswith("blob:") for u in requests), requests
    page.close()


def test_page_says_when_server_is_down(browser, down_app_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = new_page(browser, down_app_url, [])
    expect(page.locator("#server-status")).to_contain_text("Model server unavailable", timeout=15_000)
    photo = io.BytesIO()
    synthetic_photo(0, np.random.default_rng(2), (120, 90)).save(photo, "JPEG")
    page.get_by_label("Choose photos").set_input_files(
        files=[{"name": "bridge.jpg", "mimeType": "image/jpeg", "buffer": photo.getvalue()}])
    expect(page.locator("#results .card.failed")).to_contain_text("make serve", timeout=30_000)
    screenshot(page, tmp_path, "app-server-down.png")
    page.close()
