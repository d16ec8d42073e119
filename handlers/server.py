"""The ``make serve / ready / predict / stop`` command line around ``handlers.process.TorchServe``.

``start`` leaves the server running in ``--workdir`` (its config, keys, logs and a server.json
naming its pid and ports), so ``ready``, ``predict`` and ``stop`` in a later process find it again.
``ready`` exits 0 while every model has a READY worker, else 1 with the reason (for probes and scripts);
``live`` exits 0 while the frontend answers /ping (a liveness signal only). ``serve`` is ``start`` in
the foreground, for a container's main process: it returns when TorchServe exits (1) or on SIGTERM (0,
after stopping it), so the container lives exactly as long as the server.

Usage: python -m handlers.server start --store model_store --name landmark
       python -m handlers.server --workdir /srv/ts serve
       python -m handlers.server ready
       python -m handlers.server predict photo.jpg --topk 5
       python -m handlers.server stop
"""

from __future__ import annotations

import argparse
import mimetypes
import signal
import sys
import time
from pathlib import Path

import requests

from handlers.process import TorchServe
from handlers.settings import CONFIG, KEY_FILE_NAME, MODEL_NAME, MODEL_STORE, STATE_FILE, WORKDIR, config_ports
from handlers.tokens import TokenError
from landmark.cli import positive_float, positive_int


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
    r = server.keys.send(lambda h: requests.post(server.url(), data=data, timeout=60, headers=h), headers)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Start / query / stop a local TorchServe for the landmark model.")
    p.add_argument("--workdir", type=Path, default=WORKDIR, help="config, keys, logs, TMPDIR of the server")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, text in (("start", "start and wait until the workers are READY"),
                      ("serve", "start, then stay in the foreground until TorchServe exits or SIGTERM")):
        s = sub.add_parser(cmd, help=text)
        s.add_argument("--store", type=Path, default=MODEL_STORE)
        s.add_argument("--name", default=MODEL_NAME, help="model name(s), comma-separated: <store>/<name>.mar")
        s.add_argument("--config", type=Path, default=CONFIG)
        s.add_argument("--timeout", type=positive_float, default=120)
    q = sub.add_parser("predict", help="top-k landmarks for photos from the running server")
    q.add_argument("images", nargs="+", type=Path)
    q.add_argument("--topk", type=positive_int, help="1..number of classes (default: the server's 5, or all if fewer)")
    sub.add_parser("ready", help="exit 0 while every model has a READY worker, else 1 and why")
    sub.add_parser("live", help="exit 0 while the frontend answers /ping (even with every worker dead)")
    sub.add_parser("stop", help="stop the server started by `start`")
    args = p.parse_args(argv)

    if args.cmd in ("start", "serve"):
        server = TorchServe(args.store, args.name.split(","), args.workdir, args.config, config_ports(args.config))
        if (args.workdir / STATE_FILE).is_file():
            try:
                previous = TorchServe.attach(args.workdir)
            except (ValueError, KeyError, TypeError):  # a state file cut short by a crash
                previous = TorchServe(args.store, args.name.split(","), args.workdir, args.config)
            if previous.running():
                print(f"TorchServe from {args.workdir} is running (pid {previous.pid}): `make stop` first",
                      file=sys.stderr)
                return 1
            print(f"the server of {args.workdir} (pid {previous.pid}) is gone: starting over its stale state")
            previous.stop()  # removes the state file; TorchServe itself drops its orphaned pid file
        if args.cmd == "serve":
            try:
                return serve(server, args.timeout)
            except (FileNotFoundError, RuntimeError, TimeoutError) as e:
                print(f"serve: {e}", file=sys.stderr)
                return 1
        try:
            server.start(args.timeout)
        except (FileNotFoundError, RuntimeError, TimeoutError) as e:
            print(f"serve: {e}", file=sys.stderr)
            return 1
        print(f"TorchServe ready in {server.cold_start_s:.1f} s: {server.url()} (workers {server.worker_pids()}); "
              f"keys in {args.workdir / KEY_FILE_NAME}, logs in {args.workdir / 'logs'}")
        return 0
    try:
        server = TorchServe.attach(args.workdir)
    except FileNotFoundError as e:
        if args.cmd == "stop":
            print("no server running")
            return 0
        print(f"{args.cmd}: {e}", file=sys.stderr)
        return 1
    if args.cmd == "ready":
        return ready(server)
    if args.cmd == "live":
        alive = server.live()
        print(f"/ping at {server.inference_url}: {'answers' if alive else 'no answer'}")
        return 0 if alive else 1
    if args.cmd == "stop":
        server.stop()
        print("TorchServe stopped")
        return 0
    status = 0
    for image in args.images:
        if not image.is_file():
            print(f"{image}: no such file", file=sys.stderr)
            status = 1
            continue
        try:
            code, body = predict(server, image, args.topk)
        except TokenError as e:
            print(f"predict: {e}", file=sys.stderr)
            return 1
        if code != 200:
            print(f"{image}: HTTP {code}: {body['error'] if isinstance(body, dict) and 'error' in body else body}",
                  file=sys.stderr)
            status = 1
            continue
        print(format_answer(str(image), body))
    return status


if __name__ == "__main__":
    sys.exit(main())
