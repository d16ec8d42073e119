"""The ``make serve / ready / predict / stop`` command line (the work is in ``handlers.control``).

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
import sys
from pathlib import Path

from handlers.control import clear_stale, format_answer, predict, ready, serve
from handlers.process import TorchServe
from handlers.settings import CONFIG, KEY_FILE_NAME, MODEL_NAME, MODEL_STORE, WORKDIR, config_ports
from handlers.tokens import TokenError
from landmark.cli import positive_float, positive_int


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m handlers.server",
                                description="Start / query / stop a local TorchServe for the landmark model.")
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
    return p


def start(args: argparse.Namespace) -> int:
    server = TorchServe(args.store, args.name.split(","), args.workdir, args.config, config_ports(args.config))
    if why := clear_stale(server):
        print(why, file=sys.stderr)
        return 1
    try:
        if args.cmd == "serve":
            return serve(server, args.timeout)
        server.start(args.timeout)
    except (FileNotFoundError, RuntimeError, TimeoutError) as e:
        print(f"serve: {e}", file=sys.stderr)
        return 1
    print(f"TorchServe ready in {server.cold_start_s:.1f} s: {server.url()} (workers {server.worker_pids()}); "
          f"keys in {args.workdir / KEY_FILE_NAME}, logs in {args.workdir / 'logs'}")
    return 0


def predict_all(server: TorchServe, images: list[Path], topk: int | None) -> int:
    status = 0
    for image in images:
        if not image.is_file():
            print(f"{image}: no such file", file=sys.stderr)
            status = 1
            continue
        try:
            code, body = predict(server, image, topk)
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


def main(args: argparse.Namespace) -> int:
    if args.cmd in ("start", "serve"):
        return start(args)
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
    return predict_all(server, args.images, args.topk)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
