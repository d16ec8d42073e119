"""What ``make serve / ready / predict / stop`` do, as functions over ``handlers.process.TorchServe``
(``handlers.server`` is their command line; the tests call these directly).

``start`` leaves the server running in its workdir (config, keys, logs and a server.json naming its pid
and ports), so ``ready``, ``predict`` and ``stop`` in a later process find it again (``TorchServe.attach``).
"""

from __future__ import annotations

import mimetypes
import signal
import sys
import time
from pathlib import Path

import httpx

from handlers.process import TorchServe
from handlers.settings import STATE_FILE


def format_answer(image: str, answer: dict) -> str:
    """The decision first (the landmark and where it is, or "no known landmark" and why), then the top-k."""
    landmark = answer["landmark"]
    if landmark is None:
        head = f"{image}: no known landmark ({answer['reason']}, confidence {answer['confidence']:.1%})"
    else:
        loc = landmark.get("location")
        where = f" at {loc.get('place') or '?'}, {loc.get('country') or '?'} ({loc['lat']:.4f}, {loc['lon']:.4f})" \
            if loc else " (no location known)"
        head = f"{image}: {landmark['name']}{where}, confidence {answer['confidence']:.1%}"
    lines = [head, f"  closest known landmarks (operating point: {answer['operating_point']['min_precision']:.0%} "
                   "precision):"]
    lines += [f"  {rank}. {p['name']:<32} {p['probability']:7.2%}" for rank, p in enumerate(answer["top_k"], 1)]
    return "\n".join(lines)


def predict(server: TorchServe, image: Path, topk: int | None = None) -> tuple[int, object]:
    """POST the photo's bytes with a binary Content-Type (a form-encoded body is refused by TorchServe itself).

    k goes in the X-Topk header: TorchServe does not pass the query string of /predictions to the handler."""
    content_type = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    headers = {"Content-Type": content_type} | ({"X-Topk": str(topk)} if topk else {})
    data = image.read_bytes()
    with httpx.Client(timeout=60) as client:
        r = server.keys.send(lambda h: client.post(server.url(), content=data, headers=h), headers)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def ready(server: TorchServe) -> int:
    reasons = [r for r in map(server.unready, server.models) if r]
    print("; ".join(reasons) if reasons else f"ready: {', '.join(server.models)} at {server.inference_url}",
          file=sys.stderr if reasons else sys.stdout)
    return 1 if reasons else 0


def serve(server: TorchServe, timeout: float) -> int:
    """Start, then block while TorchServe runs; SIGTERM (a pod's stop) stops it within its grace time."""
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
        raise SystemExit(0)  # unwinds a start still waiting for READY too; the finally stops the server

    earlier = signal.signal(signal.SIGTERM, stop)
    try:
        server.start(timeout)
        print(f"TorchServe ready in {server.cold_start_s:.1f} s: {server.url()}", flush=True)
        while server.running():
            time.sleep(1)
        print(f"serve: TorchServe exited\n{server.log_tail()}", file=sys.stderr)
        return 1  # non-zero: the container is restarted
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, earlier)


def clear_stale(server: TorchServe) -> str | None:
    """Before a start in ``server.workdir``: None when no earlier server is running there (a dead one's state
    is removed), else why this start must not go on."""
    if not (server.workdir / STATE_FILE).is_file():
        return None
    try:
        previous = TorchServe.attach(server.workdir)
    except (ValueError, KeyError, TypeError):  # a state file cut short by a crash
        previous = TorchServe(server.model_store, server.models, server.workdir, server.config)
    if previous.running():
        return f"TorchServe from {server.workdir} is running (pid {previous.pid}): `make stop` first"
    print(f"the server of {server.workdir} (pid {previous.pid}) is gone: starting over its stale state")
    previous.stop()  # removes the state file; TorchServe itself drops its orphaned pid file
    return None
