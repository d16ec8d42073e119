"""Load through Locust (a standard load tool, not a hand-written loop) against an isolated TorchServe,
directly or through the app in front of it (the path users hit), with the worker memory and per-request
records the soak, the fault runs, the sweep and the proxy benchmark judge.

``own_server`` archives a run folder as ``make archive`` does and starts it on free loopback ports in
a temporary workdir; ``own_app`` starts ``python -m app.web`` in front of it; ``Plan`` is the ordered
list of bodies (real photos, every n-th one a bad input); ``run_locust`` sends it headless to an
``Endpoint`` and returns one record per request.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from app.process import AppProcess
from benchmarks.bad_inputs import bad_inputs
from benchmarks.inputs import list_photos
from benchmarks.stats import percentile
from handlers.process import TorchServe
from landmark import atomic
from landmark.run_files import META

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


def archive_settings(**overrides: int) -> dict[str, int]:
    """The batching/thread settings ``make archive`` uses (handlers.settings), with ``overrides``."""
    from handlers.settings import BATCH_SIZE, MAX_BATCH_DELAY_MS, THREADS

    return {"batch_size": BATCH_SIZE, "max_batch_delay": MAX_BATCH_DELAY_MS, "threads": THREADS, **overrides}


@contextlib.contextmanager
def own_server(model_dir: Path, backend: str = "onnx", settings: dict[str, int] | None = None,
               workers: int | None = None, start_timeout: float = 240,
               venv: Path | None = None) -> Iterator[TorchServe]:
    """``model_dir`` archived with ``settings`` (default: ``make archive``'s) and served until the block ends."""
    from handlers.archive import build

    with tempfile.TemporaryDirectory(prefix="load-serve-") as tmp:
        store = Path(tmp) / "store"
        build(model_dir, backend, "landmark", "load", store, force=True, **(settings or archive_settings()))
        server = TorchServe(store, "landmark", workdir=Path(tmp) / "ts", workers=workers, venv=venv)
        with server.start(start_timeout):
            yield server


def photos_in(folders: list[Path], per_folder: int) -> list[Path]:
    """Up to ``per_folder`` photos spread over each folder that exists (benchmarks.inputs.list_photos)."""
    return [f for d in folders if d.is_dir() for f in list_photos(d, per_folder)]


@dataclass
class Plan:
    """Bodies on disk and the order to send them in; ``expect`` is each body's right status."""
    folder: Path
    items: list[dict] = field(default_factory=list)
    schedule: list[int] = field(default_factory=list)

    def add(self, kind: str, body: bytes, content_type: str, expect: int) -> int:
        path = self.folder / f"body-{len(self.items)}"
        path.write_bytes(body)
        self.items.append({"kind": kind, "file": str(path), "content_type": content_type, "expect": expect})
        return len(self.items) - 1

    @classmethod
    def mixed(cls, folder: Path, photos: list[Path], n: int, bad_every: int = 0) -> Plan:
        """n requests cycling through ``photos``; with ``bad_every`` k, every k-th is the next bad input."""
        if not photos:
            raise ValueError("no photos to send")
        folder.mkdir(parents=True, exist_ok=True)
        plan = cls(folder)
        good = [plan.add("photo", p.read_bytes(), CONTENT_TYPES.get(p.suffix.lower(), "image/jpeg"), 200)
                for p in photos]
        bad = ([plan.add(kind, body, "application/octet-stream", 400)
                for kind, body in bad_inputs(photos[0].read_bytes()).items()] if bad_every else [])
        for i in range(n):
            if bad and i % bad_every == bad_every - 1:
                plan.schedule.append(bad[(i // bad_every) % len(bad)])
            else:
                plan.schedule.append(good[i % len(good)])
        return plan


@contextlib.contextmanager
def own_app(server: TorchServe, work: Path, *args: str) -> Iterator[AppProcess]:
    """``python -m app.web`` in front of ``server`` (its keys, its management API) until the block ends;
    ``args`` are more of the app's flags (--max-in-flight)."""
    work.mkdir(parents=True, exist_ok=True)
    with AppProcess(server.inference_url, server.keys.key_file, work / "app.log",
                    "--management-url", server.management_url, *args) as app:
        yield app


@dataclass(frozen=True)
class Endpoint:
    """Where a Locust run posts its bodies: TorchServe's predictions API with its inference key, or the
    app's /api/predict, which holds the key itself (the client sends none)."""
    via: str  # "torchserve" or "app"
    host: str
    path: str
    key_file: str | None = None
    management_url: str | None = None

    @classmethod
    def of(cls, target: TorchServe | AppProcess | Endpoint) -> Endpoint:
        if isinstance(target, Endpoint):
            return target
        if isinstance(target, AppProcess):
            return cls("app", target.url, "/api/predict")
        return cls("torchserve", target.inference_url, f"/predictions/{target.model}", str(target.keys.key_file),
                   target.management_url)


def run_locust(target: TorchServe | AppProcess | Endpoint, plan: Plan, concurrency: int, timeout_s: float,
               wait_on_503: bool = False) -> list[dict]:
    """Send ``plan`` with ``concurrency`` Locust users; one record per request, in plan order. With
    ``wait_on_503`` a user that got a 503 waits its Retry-After (1 s where TorchServe sends none) before
    its next request, as a well-behaved client does; without, it sends at once, as ``hey`` does."""
    endpoint = Endpoint.of(target)
    records = plan.folder / "records.json"
    plan_file = plan.folder / "plan.json"
    plan_file.write_text(json.dumps({
        "path": endpoint.path, "key_file": endpoint.key_file, "management_url": endpoint.management_url,
        "wait_on_503": wait_on_503, "items": plan.items, "schedule": plan.schedule,
        "records": str(records)}), encoding="utf-8")
    cmd = [str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE), "--headless",
           "-u", str(concurrency), "-r", str(concurrency), "--host", endpoint.host,
           "--run-time", f"{int(timeout_s)}s", "--stop-timeout", "30", "--only-summary", "--loglevel", "WARNING",
           "--exit-code-on-error", "0"]
    env = {**os.environ, "LANDMARK_LOAD_PLAN": str(plan_file), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s + 60)
    if done.returncode != 0 or not records.is_file():
        raise RuntimeError(f"locust exited with {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(records.read_text(encoding="utf-8"))


def worker_memory(server: TorchServe) -> dict[str, dict[str, float]]:
    """RSS and PSS (shared pages split among the processes sharing them) of each worker, in MB, by pid
    (a string, as it reads back from JSON)."""
    out = {}
    for pid in server.worker_pids():
        with contextlib.suppress(psutil.Error):
            info = psutil.Process(pid).memory_full_info()
            out[str(pid)] = {"rss_mb": round(info.rss / 2**20, 1), "pss_mb": round(info.pss / 2**20, 1)}
    return out


class MemoryTrace:
    """Worker memory every ``every_s`` seconds in a background thread, while the load runs."""

    def __init__(self, server: TorchServe, every_s: float = 5.0) -> None:
        self.server, self.every_s, self.samples = server, every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a worker being restarted is missing from one sample
                self.samples.append({"t": time.time(), "workers": worker_memory(self.server)})
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemoryTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def app_memory(app: AppProcess) -> dict[str, float]:
    """The app process's RSS (MB) and the CPU seconds it has used so far (user + system)."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(app.proc.pid)
        cpu = proc.cpu_times()
        return {"rss_mb": round(proc.memory_info().rss / 2**20, 1), "cpu_s": cpu.user + cpu.system}
    return {}


def latency_ms(records: list[dict]) -> dict:
    """p50 / p99 / max of the records' latencies (ms)."""
    ms = [r["ms"] for r in records]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


def outcomes(records: list[dict]) -> dict[str, dict[str, int]]:
    """kind -> {status: count}, e.g. {"photo": {"200": 9500}, "empty": {"400": 72}}."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        by_status = out.setdefault(r["kind"], {})
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    return out


def missing_model(model_dir: Path) -> str | None:
    """Why ``model_dir`` cannot be served, or None."""
    if (model_dir / META).is_file():
        return None
    return f"--model-dir {model_dir}: no exported model ({META}): run make train first"


def run_header(args, started: float) -> dict:
    """When, where and with which arguments a load run ran: the head of its result record."""
    from benchmarks.machine import machine_info

    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "machine": machine_info(1),
            "settings": {k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
                         for k, v in vars(args).items()}}


def publish(out_dir: Path, kind: str, started: float, result: dict, text: str, chart=None) -> Path:
    """``<kind>-<host>-<time>``.json and .md (and .png from ``chart(result, path)``) in ``out_dir``."""
    from benchmarks.report import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{kind}-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}"
    if chart is not None:
        result["chart"] = stem.with_suffix(".png").name
        chart(result, stem.with_suffix(".png"))
    write_json(stem.with_suffix(".json"), result)
    atomic.write_text(stem.with_suffix(".md"), text)
    print(text)
    print(f"wrote {stem}.json, .md{', .png' if chart else ''}")
    return stem


def unexpected(records: list[dict]) -> list[dict]:
    """Requests whose status is not the one their body deserves (0 = no HTTP answer at all), or whose
    refusal came without a JSON {"error"} saying why (records from before that was recorded: status only)."""
    return [r for r in records if r["status"] != r["expect"] or not r.get("json_error", True)]
