"""The serving defaults, stated once: where ``make serve``'s TorchServe lives and listens, and what
``make archive`` puts in model-config.yaml. The server, the CLI, the web app, the tagger and the
benchmarks read them from here, so a changed port or batch size cannot go stale in one of them."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "serve_config" / "config.properties"
METRICS_CONFIG = ROOT / "serve_config" / "metrics.yaml"  # TorchServe's metrics plus the handler's
MODEL_STORE = ROOT / "model_store"  # where `make archive` writes <name>.mar and `make serve` loads it from
WORKDIR = ROOT / "logs" / "torchserve"  # logs/ is git-ignored; make clean removes it
KEY_FILE_NAME = "key_file.json"  # TorchServe writes it into its working directory (the workdir)
KEY_FILE = WORKDIR / KEY_FILE_NAME
STATE_FILE = "server.json"  # written by `start` beside the keys: pid, ports, models of the running server
MODEL_NAME = "landmark"
HOST = "127.0.0.1"  # loopback only, like the addresses in config.properties
PORT_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address",
             "grpc_inference": "grpc_inference_port", "grpc_management": "grpc_management_port"}

# model-config.yaml defaults (handlers/archive.py); test_serving checks TorchServe reports the first two.
# Chosen by measurement (make sweep, 2 workers at concurrency 8; benchmarks/results/sweep-vm-20261202-011002.md
# and -012318.md): on CPU a batch buys no throughput (wh13: 36.0 / 34.9 / 35.1 / 29.8 requests/s at batch
# 1 / 2 / 4 / 8; im49: 136 / 161 / 141 / 142), while each larger batch grows ONNX Runtime's arena (worker
# PSS 473 / 520 / 647 / 836 MB on wh13) and the p99 (326 / 338 / 409 / 522 ms). 2 is best or within noise
# of it on both models, so it is the default; on a GPU, larger batches pay (make archive ARCHIVE_ARGS="--batch-size 8").
BATCH_SIZE = 2  # requests TorchServe may merge into one network call
# TorchServe's batcher polls its queue for up to this long per extra item, so requests that are already
# queued (under load) still fill a batch at once; at low load each request waits the whole delay.
# 5 and 20 ms gave no more throughput than 1 (wh13 32.1 / 32.2 / 35.1 requests/s).
MAX_BATCH_DELAY_MS = 1
THREADS = 1  # intra-op threads per worker: config.properties runs one worker per CPU, more would oversubscribe
# A batch stuck longer than this fails (and its worker is restarted) instead of hanging. The slowest
# request the handler accepts took 0.95 s (an 8.8 MB PNG just under the pixel limit; a JPEG there 0.13 s,
# as it decodes at a reduced scale): 30 s leaves a 15x margin for a full batch on a busy machine.
RESPONSE_TIMEOUT_S = 30

# The app (app.web), the only service a user reaches, forwards at most this many photos to TorchServe at
# once; the next one gets an immediate 503 with Retry-After, instead of a wait that grows with the crowd
# (its thread pool of 40 used to queue every request: p50 2.8 s at 64 clients). A full app holds about
# APP_MAX_IN_FLIGHT / throughput seconds of work: 32 is 0.8 s at wh13's ~40 requests/s, under the 2 s bar
# at concurrency 64 with room for the slowest of them, and never reached at 8 or 16 clients. Below
# TorchServe's own job_queue_size (50) + workers x batch, so the app sheds before TorchServe has to.
# Measured by make bench-proxy (benchmarks/proxy.py: max wait and 503s through the app at concurrency 64;
# its figures are generated into the README section "The path users hit").
APP_MAX_IN_FLIGHT = 32
RETRY_AFTER_S = 1  # what a shed 503 tells the client: a second is a few batches of work here


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def write_properties(path: Path, base: Path, overrides: dict[str, object]) -> Path:
    """``base``'s properties with ``overrides`` in place of its own values of them, written to ``path``."""
    kept = [ln for ln in Path(base).read_text(encoding="utf-8").splitlines()
            if ln.split("=", 1)[0].strip() not in overrides]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*kept, *(f"{k}={v}" for k, v in overrides.items())]) + "\n", encoding="utf-8")
    return path


def config_ports(config: Path = CONFIG) -> dict[str, int]:
    """The ports a config file names (for ``make serve``, which uses the documented 8080/8081/8082)."""
    props = read_properties(config)
    return {name: int(props[key].rsplit(":", 1)[-1]) for name, key in PORT_KEYS.items()}


def base_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def server_urls(workdir: Path = WORKDIR) -> dict[str, str]:
    """Base URL of each API of the server that `start` left running in ``workdir``, else config.properties' ones."""
    try:
        ports = json.loads((Path(workdir) / STATE_FILE).read_text(encoding="utf-8"))["ports"]
    except (OSError, ValueError, KeyError, TypeError):
        ports = config_ports()
    return {kind: base_url(int(ports[kind])) for kind in ("inference", "management", "metrics")}
