"""Supervise one isolated TorchServe: the test fixture, ``make serve/predict/stop`` and the benchmarks.

Each server gets its own working directory holding its config, key_file.json, logs, and TMPDIR /
TEMP (TorchServe's pid file and the workers' unix sockets live there), plus its own ports, so two
servers on one machine never collide. ``torchserve --start`` exits 0 even when the server fails,
so ``start`` waits until every worker reports READY on the management API and raises otherwise.
Afterwards ``ready`` (a READY worker) and ``live`` (the frontend answers) come from handlers.health.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import psutil

from handlers import health
from handlers.settings import (
    CONFIG,
    HOST,
    KEY_FILE_NAME,
    METRICS_CONFIG,
    MODEL_NAME,
    PORT_KEYS,
    STATE_FILE,
    WORKDIR,
    base_url,
    write_properties,
)
from handlers.tokens import Keys, TokenError

MIN_FREE_BYTES = 64 * 2**20  # logs and TorchServe's temporary files, beside the unpacked archives


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


class TorchServe:
    """One isolated TorchServe serving ``<model>.mar`` (one or several models) from ``model_store``."""

    def __init__(self, model_store: Path, model: str | Sequence[str] = MODEL_NAME, workdir: Path | None = None,
                 config: Path = CONFIG, ports: dict | None = None, workers: int | None = None,
                 venv: Path | None = None) -> None:
        self.model_store = Path(model_store).resolve()
        self.models = [model] if isinstance(model, str) else list(model)
        self.model = self.models[0]
        self.workdir = Path(workdir or WORKDIR).resolve()
        self.config = Path(config)
        self.ports = ports or dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS)), strict=True))
        self.workers = workers
        # the environment TorchServe and its workers run in (their interpreter is the launcher's): this
        # one, or a lean serving venv (make serve-venv: CPU-only torch, half the memory per worker)
        self.torchserve = (Path(venv).resolve() / "bin" if venv else Path(sys.executable).parent) / "torchserve"
        self.inference_url = base_url(self.ports["inference"])
        self.management_url = base_url(self.ports["management"])
        self.metrics_url = base_url(self.ports["metrics"])
        self.keys = Keys(self.workdir / KEY_FILE_NAME, self.management_url)
        self.pid: int | None = None
        self.cold_start_s: float | None = None

    def __enter__(self) -> TorchServe:
        return self if self.pid is not None else self.start()  # `with TorchServe(...).start(180) as s:` too

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, model: str | None = None) -> str:
        return f"{self.inference_url}/predictions/{model or self.model}"

    def headers(self) -> dict[str, str]:
        return self.keys.inference_headers()

    def management_headers(self) -> dict[str, str]:
        return self.keys.management_headers()

    def describe(self, model: str | None = None) -> dict:
        return health.describe(self.management_url, self.keys, model or self.model)

    def unready(self, model: str | None = None) -> str | None:
        """None while the model has a READY worker, else why not."""
        return health.unready(self.management_url, self.keys, model or self.model)

    def ready(self, model: str | None = None) -> bool:
        return self.unready(model) is None

    def live(self) -> bool:
        return health.live(self.inference_url, self.keys)

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
        p = self.ports
        overrides = {
            "inference_address": self.inference_url, "management_address": self.management_url,
            "metrics_address": self.metrics_url, "grpc_inference_port": p["grpc_inference"],
            "grpc_management_port": p["grpc_management"], "model_store": self.model_store,
            "allowed_urls": f"file://{self.model_store}/.*",  # the local model store only
            "metrics_config": METRICS_CONFIG,
        }
        if self.workers:
            overrides["default_workers_per_model"] = self.workers
        return write_properties(self.workdir / "config.properties", self.config, overrides)

    def start(self, timeout: float = 60) -> TorchServe:
        """Launch, then wait until every worker of every model is READY; raise with the log tail otherwise."""
        t0 = time.monotonic()
        proc = self.launch()
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"TorchServe exited with {proc.returncode} during start\n{self.log_tail()}")
            if self._worker_died():
                self.stop()
                raise RuntimeError(f"a TorchServe worker died while loading the model\n{self.log_tail()}")
            if self._ready():
                self.cold_start_s = time.monotonic() - t0
                (self.workdir / KEY_FILE_NAME).chmod(0o600)  # the keys are for this user only
                (self.workdir / STATE_FILE).write_text(json.dumps(self._state()), encoding="utf-8")
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"TorchServe workers not READY within {timeout:.0f} s\n{self.log_tail()}")

    def launch(self) -> subprocess.Popen:
        """Start the server process and return at once, ready or not (``start`` waits)."""
        missing = [m for m in self.models if not (self.model_store / f"{m}.mar").is_file()]
        if missing:
            raise FileNotFoundError(f"no {', '.join(m + '.mar' for m in missing)} in {self.model_store}: "
                                    "run `make archive` first")
        busy = [f"{k}={v}" for k, v in self.ports.items() if port_in_use(v)]
        if busy:
            raise RuntimeError(f"ports in use ({', '.join(busy)}): is another TorchServe running? `make stop`")
        tmp, logs = self._prepare_workdir()
        for stale in (KEY_FILE_NAME, "logs/model_log.log"):
            (self.workdir / stale).unlink(missing_ok=True)
        env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(logs),
               "METRICS_LOCATION": str(logs)}
        if not self.torchserve.is_file():
            raise FileNotFoundError(f"no {self.torchserve}: `make serve-venv` builds the serving venv")
        cmd = [str(self.torchserve), "--start", "--foreground", "--ncs",
               "--ts-config", str(self._write_config()), "--model-store", str(self.model_store),
               "--models", *[f"{m}={m}.mar" for m in self.models]]
        with open(logs / "console.log", "ab") as console:
            proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=console, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = proc.pid
        return proc

    def _prepare_workdir(self) -> tuple[Path, Path]:
        """The workdir's tmp/ and logs/, checked writable and with room for the unpacked archives: a
        read-only or full disk fails here, naming the folder, instead of as a worker that never loads."""
        tmp, logs = self.workdir / "tmp", self.workdir / "logs"
        try:
            for d in (tmp, logs):
                d.mkdir(parents=True, exist_ok=True)
            probe = logs / ".write-probe"
            probe.write_bytes(bytes(2**16))
            probe.unlink()
        except OSError as e:
            raise RuntimeError(f"cannot write to the server folder {self.workdir} ({e.strerror}): it holds "
                               "TorchServe's logs, keys and unpacked archives: make it writable, or start with "
                               "`python -m handlers.server --workdir <folder> start`") from e
        need = sum((self.model_store / f"{m}.mar").stat().st_size for m in self.models) + MIN_FREE_BYTES
        free = shutil.disk_usage(self.workdir).free
        if free < need:
            raise RuntimeError(f"only {free / 2**20:.0f} MB free in the server folder {self.workdir}; TorchServe "
                               f"needs about {need / 2**20:.0f} MB there (the unpacked archives plus logs)")
        return tmp, logs

    def _ready(self) -> bool:
        try:
            return all(
                (d := self.describe(m))["workers"] and all(w["status"] == "READY" for w in d["workers"])
                for m in self.models
            )
        except (OSError, KeyError, ValueError, httpx.HTTPError, TokenError):
            return False  # not listening yet, no key file yet, or the model still loading

    def _state(self) -> dict:
        return {"pid": self.pid, "ports": self.ports, "models": self.models, "model_store": str(self.model_store)}

    @classmethod
    def attach(cls, workdir: Path = WORKDIR) -> TorchServe:
        """The server a previous ``start`` left running in ``workdir`` (for make predict / stop)."""
        state_path = Path(workdir) / STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"no server state in {workdir}: start one with `make serve`")
        state = json.loads(state_path.read_text(encoding="utf-8"))
        server = cls(Path(state["model_store"]), state["models"], workdir, ports=state["ports"])
        server.pid = state["pid"]
        return server

    def _launcher(self) -> psutil.Process | None:
        """The live TorchServe launcher of ``self.pid``; None when it is gone or the pid was reused."""
        with contextlib.suppress(psutil.Error, TypeError):
            root = psutil.Process(self.pid)
            if "torchserve" in " ".join(root.cmdline()):
                return root
        return None

    def running(self) -> bool:
        return self._launcher() is not None

    def stop(self, grace: float = 20) -> None:
        """Stop the Java frontend (it stops its workers), then kill whatever of the tree outlives ``grace``."""
        if self.pid is not None:
            procs, frontend = [], []
            root = self._launcher()
            if root is not None:
                with contextlib.suppress(psutil.Error):
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
