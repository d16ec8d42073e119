"""The served endpoint under load: real JPEG bytes over HTTP with the inference token, at several
concurrencies, against the in-process cost of the same bytes (decode + preprocess + model),
measured in the same run so the difference is TorchServe's own overhead."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from benchmarks.load import archive_settings, own_server, worker_memory
from benchmarks.stats import summarize_ms, time_loop
from handlers.tokens import Keys
from landmark.run_files import model_file


@dataclass
class Load:
    concurrency: int
    max_requests: int
    budget_s: float
    timeout_s: float = 60.0


def token_keys(path: Path, management_url: str | None) -> Keys:
    """TorchServe's key_file.json (renewed at ``management_url`` when expired), or a file holding just the key."""
    text = Path(path).read_text(encoding="utf-8").strip()
    return Keys(path, management_url) if text.startswith("{") else Keys(None, token=text)


def load_test(url: str, headers: dict, body: bytes, load: Load) -> dict:
    """Closed loop: ``concurrency`` clients each send the next request when the previous returns."""
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    deadline = time.perf_counter() + load.budget_s

    def client() -> None:
        nonlocal sent
        with httpx.Client(timeout=load.timeout_s) as session:
            while True:
                with lock:
                    if sent >= load.max_requests or time.perf_counter() >= deadline:
                        return
                    sent += 1
                t = time.perf_counter()
                try:
                    r = session.post(url, content=body, headers=headers)
                    ok, what = r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, what = False, f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t
                with lock:
                    (latencies.append(dt) if ok else errors.append(what))

    start = time.perf_counter()
    with ThreadPoolExecutor(load.concurrency) as pool:
        for f in [pool.submit(client) for _ in range(load.concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    out = {"concurrency": load.concurrency, "requests": len(latencies) + len(errors), "errors": len(errors),
           "error_examples": sorted(set(errors))[:3], "wall_s": wall, "throughput_rps": len(latencies) / wall}
    if latencies:
        out.update(summarize_ms(latencies))
    return out


def inprocess_reference(model_file: Path, body: bytes, threads: int, budget_s: float) -> dict:
    """What one request costs without the server: decode + preprocess, model, and both end to end."""
    from landmark.predict import Predictor

    predictor = Predictor(model_file, device="cpu", threads=threads)
    crop = predictor.preprocess(body)[None]
    parts = {
        "decode_preprocess": lambda: predictor.preprocess(body),
        "model": lambda: predictor.outputs(crop),
        "end_to_end": lambda: predictor.predict([body], 5),
    }
    return {name: summarize_ms(time_loop(fn, budget_s, min_iters=20, max_iters=500)[0]) for name, fn in parts.items()}


def server_memory(server) -> dict:
    """RSS and PSS of each worker after the load, and the RSS of the rest of the server's process tree
    (Java frontend, launcher)."""
    workers = worker_memory(server)
    try:
        rest = [p for p in psutil.Process(server.pid).children(recursive=True) if str(p.pid) not in workers]
    except psutil.Error:
        rest = []
    rss = 0
    for p in rest:
        with contextlib.suppress(psutil.Error):
            rss += p.memory_info().rss
    return {"workers": workers, "frontend_rss_mb": round(rss / 2**20, 1) or None}


def run_loads(url: str, keys: Keys, body: bytes, loads: list[Load], warmup: int = 4) -> list[dict]:
    """The key is taken (and renewed if expired) per level, not per request, to keep file reads out of the timings."""
    def headers() -> dict:
        return {**keys.inference_headers(), "Content-Type": "image/jpeg"}

    load_test(url, headers(), body, Load(1, warmup, 30.0))  # first calls: ORT session warm-up, connection setup
    return [load_test(url, headers(), body, load) for load in loads]


def bench_own_server(model_dir: Path, backend: str, body: bytes, loads: list[Load], ref_budget_s: float,
                     max_batch_delay: int | None = None, start_timeout: float = 240) -> dict:
    """Archive ``model_dir`` as ``make archive`` does (optionally another batching delay), start an
    isolated TorchServe on free loopback ports, load it, stop it."""
    settings = archive_settings() if max_batch_delay is None else archive_settings(max_batch_delay=max_batch_delay)
    with own_server(model_dir, backend, settings, start_timeout=start_timeout) as server:
        cold = server.cold_start_s
        levels = run_loads(server.url(), server.keys, body, loads)
        memory = server_memory(server)
    ref = inprocess_reference(model_file(model_dir, backend), body, settings["threads"], ref_budget_s)
    return {"server": "own", "backend": backend, "archive": settings, "cold_start_s": cold, **memory,
            "levels": levels, "inprocess": ref, **overhead(levels, ref)}


def bench_external(url: str, keys: Keys, body: bytes, loads: list[Load]) -> dict:
    return {"server": url, "levels": run_loads(url, keys, body, loads),
            "cold_start_s": None, "note": "external server: cold start, RSS and in-process reference not measured"}


def overhead(levels: list[dict], ref: dict) -> dict:
    """Served p50 at concurrency 1 minus the in-process end-to-end p50 of the same bytes."""
    one = next((lv for lv in levels if lv["concurrency"] == 1 and "p50_ms" in lv), None)
    if one is None:
        return {}
    base = ref["end_to_end"]["p50_ms"]
    return {"overhead_ms": one["p50_ms"] - base, "served_over_inprocess": one["p50_ms"] / base}

