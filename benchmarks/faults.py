"""Fault runs (``make faults``): what a served model does when its processes die or its disk fails.

1. One worker, then every worker, SIGKILLed while Locust keeps concurrency 8 on the server, through
   the app in front of it (the path users hit; ``--via torchserve`` for TorchServe alone): which
   requests fail (only those the dead workers held may), how long until TorchServe has the worker
   count back READY, whether readiness went false only when no worker was left, and whether every
   request after the recovery succeeds.
2. The whole server SIGKILLed (frontend, launcher and workers at once, as the OOM killer or a lost
   machine does), then the ``make serve`` command started again on the same workdir: it must start
   cleanly over the stale state, pid file and sockets, and ``make stop`` must leave no process.
3. A read-only log folder, a full disk and one with too little room (tmpfs mounts; needs root):
   ``make serve`` must fail at once with a message naming the folder, not hang or start half-way.

Prints a table and writes benchmarks/results/faults-<host>-<time>.{json,md}.

  python -m benchmarks.faults --model-dir artifacts/wh13
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from app.process import AppProcess
from benchmarks.load import (
    Plan,
    archive_settings,
    missing_model,
    own_app,
    own_server,
    photos_in,
    publish,
    run_header,
    run_locust,
    unexpected,
)
from handlers.process import TorchServe, free_ports
from handlers.settings import CONFIG, PORT_KEYS, base_url, write_properties
from landmark.cli import positive_float, positive_int
from landmark.run_files import MODEL_FILES

ROOT = Path(__file__).resolve().parents[1]
RECOVERY_BAR_S = 15.0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="an exported run folder (make train / export)")
    p.add_argument("--backend", choices=list(MODEL_FILES), default="onnx")
    p.add_argument("--via", choices=("app", "torchserve"), default="app",
                   help="load through the app (the exposed path) or TorchServe directly")
    p.add_argument("--concurrency", type=positive_int, default=8)
    p.add_argument("--requests", type=positive_int, default=1500, help="requests of the load a worker dies under")
    p.add_argument("--kill-after", type=positive_float, default=3.0, help="seconds into the load")
    p.add_argument("--after-requests", type=positive_int, default=300, help="requests sent after the recovery")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return p


def wait_for_workers(server: TorchServe, count: int, dead: set[int], timeout: float) -> tuple[float | None, list]:
    """Seconds until ``count`` workers, none of them ``dead``, are READY, and (seconds, ready) polls."""
    t0, polls = time.time(), []
    while time.time() - t0 < timeout:
        with contextlib.suppress(Exception):
            workers = server.describe()["workers"]
            polls.append((round(time.time() - t0, 2), server.ready()))
            fresh = [w for w in workers if w["status"] == "READY" and int(w.get("pid") or 0) not in dead]
            if len(fresh) >= count:
                return time.time() - t0, polls
        time.sleep(0.05)
    return None, polls


def kill_workers_under_load(server: TorchServe, photos: list[Path], args: argparse.Namespace, work: Path,
                            how_many: int, via: AppProcess | None = None) -> dict:
    """SIGKILL ``how_many`` workers ``--kill-after`` s into a Locust run (on ``server``, or through the app
    ``via``); judge every request."""
    target = via or server
    pids = server.worker_pids()
    victims = set(pids[:how_many])
    box: dict = {}
    load = threading.Thread(target=lambda: box.update(
        records=run_locust(target, Plan.mixed(work / f"kill{how_many}", photos, args.requests), args.concurrency,
                           timeout_s=600)))
    load.start()
    time.sleep(args.kill_after)
    t_kill = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    recovery_s, polls = wait_for_workers(server, len(pids), victims, timeout=120)
    load.join()
    after = run_locust(target, Plan.mixed(work / f"after{how_many}", photos, args.after_requests), args.concurrency,
                       timeout_s=600)
    records = box.get("records", [])
    failed = unexpected(records)
    t_back = t_kill + (recovery_s or float("inf"))
    in_flight = [r for r in records if r["start"] <= t_kill <= r["start"] + r["ms"] / 1e3]
    batch = server.describe().get("batchSize", archive_settings()["batch_size"])
    result = {
        "workers": len(pids), "killed": sorted(victims), "requests": len(records),
        "in_flight_at_kill": len(in_flight), "failed": len(failed),
        "failed_examples": failed[:5], "failure_bound": batch * len(victims),
        "recovery_s": recovery_s, "ready_went_false": any(not ready for _, ready in polls),
        "ready_polls": len(polls),
        "failed_after_recovery": sum(r["start"] >= t_back for r in failed) + len(unexpected(after)),
        "requests_after_recovery": sum(r["start"] >= t_back for r in records) + len(after),
    }
    result["pass"] = (result["failed"] <= result["failure_bound"] and recovery_s is not None
                      and recovery_s <= RECOVERY_BAR_S and result["failed_after_recovery"] == 0
                      and result["requests_after_recovery"] > 0
                      and result["ready_went_false"] == (len(victims) == len(pids)))
    return result


def serve_config(work: Path) -> Path:
    """serve_config/config.properties with free ports, so the run never meets a running ``make serve``."""
    ports = dict(zip(PORT_KEYS.values(), free_ports(len(PORT_KEYS)), strict=True))
    return write_properties(work / "config.properties", CONFIG,
                            {k: base_url(v) if k.endswith("_address") else v for k, v in ports.items()})


def server_cli(command: str, workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """What ``make serve`` / ``make stop`` run, on this run's own workdir."""
    return subprocess.run([sys.executable, "-m", "handlers.server", "--workdir", str(workdir), command, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def processes_of(workdir: Path) -> list[psutil.Process]:
    """Every process started from ``workdir``'s server (its config path is on the frontend's command line,
    its TMPDIR in the environment of all of them)."""
    mark = str(workdir)
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        with contextlib.suppress(psutil.Error):
            if mark in " ".join(p.info["cmdline"] or []) or mark in (p.info["environ"] or {}).get("TMPDIR", ""):
                found.append(p)
    return found


def kill_server_and_restart(store: Path, work: Path) -> dict:
    workdir, config = work / "ts", serve_config(work)
    first = server_cli("start", workdir, "--store", str(store), "--name", "landmark", "--config", str(config))
    if first.returncode != 0:
        return {"pass": False, "error": f"first start failed: {first.stderr[-1500:]}"}
    victims = processes_of(workdir)
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(victims, timeout=10)
    stale = sorted(str(p.relative_to(workdir)) for p in [workdir / "server.json", *(workdir / "tmp").glob(".*")]
                   if p.exists())
    t0 = time.time()
    again = server_cli("start", workdir, "--store", str(store), "--name", "landmark", "--config", str(config))
    restart_s = time.time() - t0
    ready = server_cli("ready", workdir)
    stop = server_cli("stop", workdir)
    time.sleep(1)
    left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in processes_of(workdir) if p.is_running()]
    result = {"killed_processes": len(victims), "stale_files": stale, "restart_rc": again.returncode,
              "restart_s": restart_s, "restart_output": (again.stdout + again.stderr)[-600:],
              "ready_rc": ready.returncode, "stop_rc": stop.returncode, "processes_left": left}
    result["pass"] = again.returncode == 0 and ready.returncode == 0 and stop.returncode == 0 and not left
    return result


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def storage_faults(store: Path, work: Path) -> dict:
    """``make serve`` on a read-only workdir and on a full one: a clear error within seconds."""
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount the read-only and the full tmpfs"}
    config, out = serve_config(work), {}
    for case, (options, fill_mb) in {"read_only": (("ro",), 0), "full_disk": ((), 8), "nearly_full": ((), 3)}.items():
        with tmpfs(work / case, "4m", *options) as workdir:
            with contextlib.suppress(OSError):  # a full disk stops the filler where it is full
                if fill_mb:
                    (workdir / "filler").write_bytes(bytes(fill_mb * 2**20))
            t0 = time.time()
            done = server_cli("start", workdir, "--store", str(store), "--name", "landmark", "--config", str(config),
                              "--timeout", "60")
            seconds = time.time() - t0
            left = [p.pid for p in processes_of(workdir) if p.is_running()]
            for p in processes_of(workdir):
                with contextlib.suppress(psutil.Error):
                    p.kill()
            out[case] = {"rc": done.returncode, "seconds": seconds, "message": done.stderr.strip()[-400:],
                         "processes_left": left,
                         "pass": done.returncode != 0 and seconds < 30 and str(workdir) in done.stderr and not left}
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Fault runs: {result['model_dir']} ({result['backend']})", "",
             f"{m['cpu']}, {m['cores_logical']} logical cores; started {result['started_at']}; Locust at "
             f"concurrency {result['concurrency']}, "
             f"{'through the app' if result.get('via') == 'app' else 'to TorchServe directly'}.", "",
             "| fault | requests | in flight | failed (bound) | back READY | failed after | ready false | pass |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["workers"].items():
        back = f"{r['recovery_s']:.1f} s" if r["recovery_s"] is not None else "never"
        lines.append(f"| {name} | {r['requests']} | {r['in_flight_at_kill']} | {r['failed']} ({r['failure_bound']}) | "
                     f"{back} | {r['failed_after_recovery']} of {r['requests_after_recovery']} | "
                     f"{'yes' if r['ready_went_false'] else 'no'} | {'yes' if r['pass'] else 'NO'} |")
    s = result["server"]
    lines += ["", f"Whole server SIGKILLed ({s.get('killed_processes')} processes; stale: "
              f"{', '.join(s.get('stale_files', [])) or 'none'}): restart rc {s.get('restart_rc')} in "
              f"{s.get('restart_s', 0):.1f} s, ready rc {s.get('ready_rc')}, stop rc {s.get('stop_rc')}, "
              f"processes left {len(s.get('processes_left', []))}: {'pass' if s['pass'] else 'FAIL'}"]
    for case, r in result["storage"].items():
        lines.append(f"\n{case}: {r}" if case == "skipped" else
                     f"\n{case}: rc {r['rc']} in {r['seconds']:.1f} s: {'pass' if r['pass'] else 'FAIL'}: "
                     f"`{r['message'].splitlines()[-1] if r['message'] else ''}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if why := missing_model(args.model_dir):
        print(why, file=sys.stderr)
        return 2
    from benchmarks.soak import default_photo_dirs

    t0 = time.time()
    photos = photos_in(default_photo_dirs(args.model_dir), 50)
    result = {**run_header(args, t0), "model_dir": str(args.model_dir), "backend": args.backend,
              "concurrency": args.concurrency, "via": args.via, "workers": {}}
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        work = Path(tmp)
        for name, n in (("one worker SIGKILLed", 1), ("every worker SIGKILLed", None)):
            with contextlib.ExitStack() as stack:
                server = stack.enter_context(own_server(args.model_dir, args.backend))
                app = stack.enter_context(own_app(server, work / "app")) if args.via == "app" else None
                result["workers"][name] = kill_workers_under_load(server, photos, args, work,
                                                                  n or len(server.worker_pids()), app)
            print(f"{name}: {result['workers'][name]}", flush=True)
        from handlers.archive import build

        store = work / "store"
        build(args.model_dir, args.backend, "landmark", "faults", store, force=True, **archive_settings())
        result["server"] = kill_server_and_restart(store, work / "restart")
        print(f"whole server SIGKILLed: {result['server']}", flush=True)
        result["storage"] = storage_faults(store, work / "storage")
    result["pass"] = (all(r["pass"] for r in result["workers"].values()) and result["server"]["pass"]
                      and all(r.get("pass", True) for r in result["storage"].values() if isinstance(r, dict)))
    publish(args.out_dir, "faults", t0, result, markdown(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
