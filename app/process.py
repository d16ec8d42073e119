"""Supervise one ``python -m app.web`` process, as ``make app`` runs it: for the tests and the benchmarks
that measure the path users take (page / client -> app -> TorchServe), never an app inside their own process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from handlers.process import free_ports
from handlers.settings import HOST

ROOT = Path(__file__).resolve().parents[1]


class AppProcess:
    """The app on a free loopback port, in front of TorchServe at ``inference_url`` with the keys of
    ``key_file``; ``args`` are more of its flags (--max-in-flight, --management-url, ...)."""

    def __init__(self, inference_url: str, key_file: Path, log: Path, *args: str) -> None:
        [self.port] = free_ports(1)
        self.url = f"http://{HOST}:{self.port}"
        self.cmd = [sys.executable, "-m", "app.web", "--port", str(self.port), "--inference-url", inference_url,
                    "--key-file", str(key_file), *args]
        self.log = Path(log)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> AppProcess:
        """Launch and wait until it answers /api/config; raise with its output otherwise."""
        env = {k: v for k, v in os.environ.items() if k != "TORCHSERVE_TOKEN"}  # the key file's keys, renewable
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/config", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the app did not answer within {timeout:.0f} s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> AppProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
