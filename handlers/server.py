"""Start, query and stop an isolated TorchServe: the test fixture, ``make serve/predict/stop`` and benchmarks.

Each server gets its own working directory holding its config, key_file.json, logs, and TMPDIR /
TEMP (TorchServe's pid file and the workers' unix sockets live there), plus its own ports, so two
servers on one machine never collide. ``torchserve --start`` exits 0 even when the server fails,
so ``start`` waits until every worker reports READY on the management API and raises otherwise.

Usage: python -m handlers.server start --store model_store --name landmark
       python -m handlers.server predict photo.jpg --topk 5
       python -m handlers.server stop
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mimetypes
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import requests

from landmark.cli import positive_float, positive_int

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "serve_config" / "config.properties"
DEFAULT_WORKDIR = ROOT / "logs" / "torchserve"  # logs/ is git-ignored; make clean removes it
STATE_FILE = "server.json"
PORT_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address",
             "grpc_inference": "grpc_inference_port", "grpc_management": "grpc_management_port"}


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def config_ports(config: Path) -> dict[str, int]:
    """The ports a config file names (for ``make serve``, which uses the documented 8080/8081/8082)."""
    props = read_properties(config)
    return {name: int(props[key].rsplit(":", 1)[-1]) for name, key in PORT_KEYS.items()}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class TorchServe:
    """One isolated TorchServe serving ``<model>.mar`` (one or several models) from ``model_store``."""

    def __init__(self, model_store: Path, model: str | Sequence[str] = "landmark", workdir: Path | None = None,
                 config: Path = DEFAULT_CONFIG, ports: dict | None = None, workers: int | None = None) -> None:
        self.model_store = Path(model_store).resolve()
        self.models = [model] if isinstance(model, str) else list(model)
        self.model = self.models[0]
        self.workdir = Path(workdir or DEFAULT_WORKDIR).resolve()
        self.config = Path(config)
        self.ports = ports or dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS)), strict=True))
        self.workers = workers
        self.inference_url = f"http://127.0.0.1:{self.ports['inference']}"
        self.management_url = f"http://127.0.0.1:{self.ports['management']}"
        self.metrics_url = f"http://127.0.0.1:{self.ports['metrics']}"
        self.pid: int | None = None
        self.cold_start_s: float | None = None

    def __enter__(self) -> TorchServe:
        return self if self.pid is not None else self.start()  # `with TorchServe(...).start(180) as s:` too

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, model: str | None = None) -> str:
        return f"{self.inference_url}/predictions/{model or self.model}"

    def _keys(self) -> dict:
        return json.loads((self.workdir / "key_file.json").read_text(encoding="utf-8"))

    def headers(self) -> dict:
        """The inference key; an expired one (token_expiration_min, 60 by default) is renewed first."""
        inference = self._keys()["inference"]
        expires = datetime.fromisoformat(inference["expiration time"])  # e.g. 2026-11-29T08:39:19.716814438Z
        if expires < datetime.now(UTC) + timedelta(seconds=30):
            inference = self.renew_key()
        return {"Authorization": f"Bearer {inference['key']}"}

    def renew_key(self, kind: str = "inference") -> dict:
        """Ask the token API (with the API key) for a new key; TorchServe rewrites key_file.json."""
        r = requests.get(f"{self.management_url}/token", params={"type": kind}, timeout=10,
                         headers={"Authorization": f"Bearer {self._keys()['API']['key']}"})
        r.raise_for_status()
        return self._keys()[kind]

    def management_headers(self) -> dict:
        return {"Authorization": f"Bearer {self._keys()['management']['key']}"}

    def describe(self, model: str | None = None) -> dict:
        r = requests.get(f"{self.management_url}/models/{model or self.model}", headers=self.management_headers(),
                         timeout=10)
        r.raise_for_status()
        return r.json()[0]

    def worker_pids(self, model: str | None = None) -> list[int]:
        return sorted(int(w["pid"]) for w in self.describe(model)["workers"] if w.get("pid"))

    def log_tail(self, chars: int = 3000) -> str:
        text = ""
        for name in ("console.log", "model_log.log"):  # console.log has what ts_log.log has, and launcher errors
            path = self.workdir / "logs" / name
            if path.is_file():
                text += f"--- {path}\n" + path.read_text(encoding="utf-8", errors="replace")[-chars:]
        return text

    def _worker_died(self) -> bool:
        """A worker that dies while loading is retried forever by TorchServe: fail the start instead."""
        path = self.workdir / "logs" / "model_log.log"
        return path.is_file() and "Backend worker process died" in path.read_text(encoding="utf-8", errors="replace")

    def _write_config(self) -> Path:
        props = self.config.read_text(encoding="utf-8")
        p = self.ports
        overrides = {
            "inference_address": self.inference_url, "management_address": self.management_url,
            "metrics_address": self.metrics_url, "grpc_inference_port": p["grpc_inference"],
            "grpc_management_port": p["grpc_management"], "model_store": self.model_store,
            "allowed_urls": f"file://{self.model_store}/.*",  # the local model store only
        }
        if self.workers:
            overrides["default_workers_per_model"] = self.workers
        lines = [ln for ln in props.splitlines() if ln.split("=", 1)[0].strip() not in overrides]
        lines += [f"{k}={v}" for k, v in overrides.items()]
        path = self.workdir / "config.properties"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def start(self, timeout: float = 60) -> TorchServe:
        """Launch, then wait until every worker of every model is READY; raise with the log tail otherwise."""
        missing = [m for m in self.models if not (self.model_store / f"{m}.mar").is_file()]
        if missing:
            raise FileNotFoundError(f"no {', '.join(m + '.mar' for m in missing)} in {self.model_store}: "
                                    "run `make archive` first")
        busy = [f"{k}={v}" for k, v in self.ports.items() if port_in_use(v)]
        if busy:
            raise RuntimeError(f"ports in use ({', '.join(busy)}): is another TorchServe running? `make stop`")
        tmp, logs = self.workdir / "tmp", self.workdir / "logs"
        for d in (tmp, logs):
            d.mkdir(parents=True, exist_ok=True)
        for stale in ("key_file.json", "logs/model_log.log"):
            (self.workdir / stale).unlink(missing_ok=True)
        env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(logs),
               "METRICS_LOCATION": str(logs)}
        cmd = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
               "--ts-config", str(self._write_config()), "--model-store", str(self.model_store),
               "--models", *[f"{m}={m}.mar" for m in self.models]]
        t0 = time.monotonic()
        with open(logs / "console.log", "ab") as console:
            proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=console, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = proc.pid
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"TorchServe exited with {proc.returncode} during start\n{self.log_tail()}")
            if self._worker_died():
                self.stop()
                raise RuntimeError(f"a TorchServe worker died while loading the model\n{self.log_tail()}")
            if self._ready():
                self.cold_start_s = time.monotonic() - t0
                (self.workdir / "key_file.json").chmod(0o600)  # the keys are for this user only
                (self.workdir / STATE_FILE).write_text(json.dumps(self._state()), encoding="utf-8")
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"TorchServe workers not READY within {timeout:.0f} s\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            return all(
                (d := self.describe(m))["workers"] and all(w["status"] == "READY" for w in d["workers"])
                for m in self.models
            )
        except (OSError, KeyError, ValueError, requests.RequestException):
            return False  # not listening yet, no key file yet, or the model still loading

    def _state(self) -> dict:
        return {"pid": self.pid, "ports": self.ports, "models": self.models, "model_store": str(self.model_store)}

    @classmethod
    def attach(cls, workdir: Path = DEFAULT_WORKDIR) -> TorchServe:
        """The server a previous ``start`` left running in ``workdir`` (for make predict / stop)."""
        state_path = Path(workdir) / STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"no server state in {workdir}: start one with `make serve`")
        state = json.loads(state_path.read_text(encoding="utf-8"))
        server = cls(Path(state["model_store"]), state["models"], workdir, ports=state["ports"])
        server.pid = state["pid"]
        return server

    def stop(self, grace: float = 20) -> None:
        """Stop the Java frontend (it stops its workers), then kill whatever of the tree outlives ``grace``."""
        if self.pid is not None:
            procs, frontend = [], []
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(self.pid)
                if "torchserve" in " ".join(root.cmdline()):  # not a stale pid reused by something else
                    procs, frontend = [root, *root.children(recursive=True)], root.children() or [root]
            for p in frontend:  # the launcher exits with the frontend
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            _, alive = psutil.wait_procs(procs, timeout=grace)
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(alive, timeout=5)
            self.pid = None
        (self.workdir / STATE_FILE).unlink(missing_ok=True)


def format_predictions(image: str, predictions: list[dict]) -> str:
    lines = [f"{image}:"]
    for rank, p in enumerate(predictions, 1):
        loc = p.get("location")
        where = f"  {loc.get('place') or ''}, {loc.get('country') or '?'} ({loc['lat']:.4f}, {loc['lon']:.4f})" \
            if loc else ""
        lines.append(f"  {rank}. {p['name']:<32} {p['probability']:7.2%}{where}")
    return "\n".join(lines)


def predict(server: TorchServe, image: Path, topk: int | None = None) -> tuple[int, object]:
    """POST the photo's bytes with a binary Content-Type (a form-encoded body is refused by TorchServe itself).

    k goes in the X-Topk header: TorchServe does not pass the query string of /predictions to the handler."""
    content_type = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    headers = {**server.headers(), "Content-Type": content_type} | ({"X-Topk": str(topk)} if topk else {})
    r = requests.post(server.url(), data=image.read_bytes(), timeout=60, headers=headers)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Start / query / stop a local TorchServe for the landmark model.")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="config, keys, logs, TMPDIR of the server")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start and wait until the workers are READY")
    s.add_argument("--store", type=Path, default=ROOT / "model_store")
    s.add_argument("--name", default="landmark", help="model name(s), comma-separated: <store>/<name>.mar")
    s.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    s.add_argument("--timeout", type=positive_float, default=120)
    q = sub.add_parser("predict", help="top-k landmarks for photos from the running server")
    q.add_argument("images", nargs="+", type=Path)
    q.add_argument("--topk", type=positive_int, help="1..number of classes (default: the server's 5, or all if fewer)")
    sub.add_parser("stop", help="stop the server started by `start`")
    args = p.parse_args(argv)

    if args.cmd == "start":
        server = TorchServe(args.store, args.name.split(","), args.workdir, args.config, config_ports(args.config))
        if (args.workdir / STATE_FILE).is_file():
            print(f"a server from {args.workdir} may still run: `make stop` first", file=sys.stderr)
            return 1
        try:
            server.start(args.timeout)
        except (FileNotFoundError, RuntimeError, TimeoutError) as e:
            print(f"serve: {e}", file=sys.stderr)
            return 1
        print(f"TorchServe ready in {server.cold_start_s:.1f} s: {server.url()} (workers {server.worker_pids()}); "
              f"keys in {args.workdir / 'key_file.json'}, logs in {args.workdir / 'logs'}")
        return 0
    try:
        server = TorchServe.attach(args.workdir)
    except FileNotFoundError as e:
        if args.cmd == "stop":
            print("no server running")
            return 0
        print(f"predict: {e}", file=sys.stderr)
        return 1
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
        code, body = predict(server, image, args.topk)
        if code != 200:
            print(f"{image}: HTTP {code}: {body['error'] if isinstance(body, dict) and 'error' in body else body}",
                  file=sys.stderr)
            status = 1
            continue
        print(format_predictions(str(image), body))
    return status


if __name__ == "__main__":
    sys.exit(main())
