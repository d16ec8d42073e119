"""The soak, the fault runs and the proxy benchmark, short, on the tiny model: a real TorchServe and the
real app in front of it loaded by real Locust, workers and servers SIGKILLed for real, a read-only and a
full tmpfs under the server's folder. The figures of the full runs (``make soak``, ``make faults``,
``make bench-proxy``) are in the README; here each run must judge every request and meet the bars that
do not depend on this machine's speed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest

from benchmarks import faults, proxy, readme, soak, sweep
from benchmarks.load import own_app, own_server
from handlers.archive import build
from handlers.settings import BATCH_SIZE


def test_soak_judges_every_request_and_bad_inputs_get_a_400(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    rc = soak.main(["--model-dir", str(tiny_model), "--requests", "200", "--window", "50", "--bad-every", "10",
                    "--workers", "1", "--photos", str(tiny_data / "test"), "--memory-every", "0.5",
                    "--out-dir", str(tmp_path)])
    [result_file] = tmp_path.glob("soak-*.json")
    result = json.loads(result_file.read_text())
    verdict = result["verdict"]
    assert result["requests"] == 200 and result["unexpected"]["count"] == 0, result["unexpected"]
    # the bars that do not depend on this machine's speed hold; the p99 one decides the exit status alone
    assert verdict["passed"]["unexpected_errors"] and verdict["measured"]["unexpected_errors"] == 0
    assert verdict["passed"]["pss_growth_pct"], verdict["measured"]  # no worker grows > 5% after warm-up
    assert verdict["measured"]["pss_growth_pct"] == result["memory"]["max_growth_pct"] <= soak.BARS["pss_growth_pct"]
    first, last = result["windows"][0]["p99_ms"], result["windows"][-1]["p99_ms"]
    assert verdict["measured"]["p99_last_over_first"] == pytest.approx(last / first)
    assert rc == (0 if verdict["passed"]["p99_last_over_first"] else 1)
    photos = result["outcomes"].pop("photo")
    assert photos == {"200": 180}
    assert result["outcomes"] and all(got == {"400": n} for got, n in
                                      ((v, sum(v.values())) for v in result["outcomes"].values()))
    assert sum(n for v in result["outcomes"].values() for n in v.values()) == 20
    assert [w["to"] for w in result["windows"]] == [50, 100, 150, 200] and all(w["p99_ms"] > 0
                                                                              for w in result["windows"])
    assert result["via"] == "app" and result["app"]["end"]["rss_mb"] > 0  # the path users hit, by default
    assert result["workers_replaced"] == [] and len(result["memory"]["end"]) == 1
    assert all(v["pss_mb"] > 0 for v in result["memory"]["end"].values()) and result["memory"]["trace"]
    assert result_file.with_suffix(".md").read_text().startswith("# Soak: 200 requests")
    assert result_file.with_suffix(".png").stat().st_size > 10_000


def soak_result(p99s: list[float], pss: tuple[float, float], unexpected: int = 0) -> dict:
    """A soak result with these window p99s, a worker's PSS when warm and at the end, and error count."""
    warm, end = ({"1": {"pss_mb": v}} for v in pss)
    return {"windows": [{"p99_ms": v} for v in p99s], "unexpected": {"count": unexpected},
            "memory": soak.memory_growth([{"t": 1.0, "workers": warm}], 0.5, warm, end)}


@pytest.mark.parametrize(("p99s", "pss", "unexpected", "failed"), [
    ([10.0, 12.0, 15.0], (500.0, 520.0), 0, set()),  # every bar met: p99 1.5x (the bar), PSS +4%
    ([10.0, 12.0, 15.1], (500.0, 500.0), 0, {"p99_last_over_first"}),
    ([10.0, 9.0, 8.0], (500.0, 530.0), 0, {"pss_growth_pct"}),
    ([10.0, 10.0], (500.0, 400.0), 1, {"unexpected_errors"}),
    ([10.0], (500.0, 500.0), 0, set()),  # one window is its own first and last
])
def test_soak_verdict_judges_each_bar(p99s: list[float], pss: tuple[float, float], unexpected: int,
                                      failed: set[str]) -> None:
    verdict = soak.verdict(soak_result(p99s, pss, unexpected))
    assert {bar for bar, ok in verdict["passed"].items() if not ok} == failed
    assert verdict["pass"] == (not failed)
    assert verdict["measured"]["p99_last_over_first"] == pytest.approx(p99s[-1] / p99s[0])


@pytest.mark.parametrize(("killed", "via"), [(1, "torchserve"), (2, "torchserve"), (1, "app")],
                         ids=["one-worker", "every-worker", "one-worker-through-the-app"])
def test_a_killed_worker_fails_only_its_batch_and_is_back(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                          killed: int, via: str) -> None:
    photos = sorted((tiny_data / "test").rglob("*.jpg"))
    args = Namespace(requests=600, kill_after=1.5, concurrency=8, after_requests=100)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(own_server(tiny_model, workers=2))
        app = stack.enter_context(own_app(server, tmp_path / "app")) if via == "app" else None
        r = faults.kill_workers_under_load(server, photos, args, tmp_path, killed, app)
    print(f"\n{killed} of 2 workers SIGKILLed ({via}): {r['failed']} failed of {r['in_flight_at_kill']} in flight, "
          f"back in {r['recovery_s']:.1f} s")
    assert r["failed"] <= BATCH_SIZE * killed, r["failed_examples"]
    # TorchServe answers 507 when it has already read the worker's exit status 137, 500 when the socket
    # closed first (WorkerThread's finally block): the same "Worker died." either way, and a race. The app
    # says 502 (its gateway failed) with TorchServe's words.
    statuses = (500, 507) if via == "torchserve" else (502,)
    assert all(e["status"] in statuses and "Worker died" in e["error"] for e in r["failed_examples"]), \
        [(e["status"], e["error"]) for e in r["failed_examples"]]
    assert r["recovery_s"] is not None and r["recovery_s"] <= faults.RECOVERY_BAR_S
    assert r["failed_after_recovery"] == 0 and r["requests_after_recovery"] >= args.after_requests
    assert r["ready_went_false"] == (killed == 2)  # ready while one worker is left, not while none is
    assert r["pass"]


def test_a_killed_server_restarts_over_its_stale_state_and_stop_leaves_nothing(tiny_model: Path,
                                                                               tmp_path: Path) -> None:
    store = tmp_path / "store"
    build(tiny_model, "onnx", "landmark", "1.0", store)
    r = faults.kill_server_and_restart(store, tmp_path / "restart")
    assert r["killed_processes"] >= 3  # launcher, frontend, at least one worker
    assert {"server.json", "tmp/.model_server.pid"} <= set(r["stale_files"])
    assert r["restart_rc"] == 0 and "stale state" in r["restart_output"], r["restart_output"]
    assert r["ready_rc"] == 0 and r["stop_rc"] == 0 and r["processes_left"] == [] and r["pass"]


def can_mount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", "--version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_mount(), reason="mounting the read-only and the full tmpfs needs root")
def test_a_read_only_or_full_server_folder_fails_at_once_naming_it(tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    build(tiny_model, "onnx", "landmark", "1.0", store)
    r = faults.storage_faults(store, tmp_path / "storage")
    assert set(r) == {"read_only", "full_disk", "nearly_full"}
    assert "Read-only file system" in r["read_only"]["message"]
    assert "No space left on device" in r["full_disk"]["message"]
    assert "MB free in the server folder" in r["nearly_full"]["message"]
    assert all(c["pass"] and c["rc"] == 1 and c["seconds"] < 30 and c["processes_left"] == [] for c in r.values()), r


def test_proxy_benchmark_loads_both_paths_in_one_run_and_writes_the_readme(tiny_model: Path, tiny_data: Path,
                                                                           tmp_path: Path) -> None:
    """The same JPEG at 8, 16 and 64 clients straight to TorchServe and through the app (limited to 8 in
    flight), the in-process ceiling, the bars judged, the result files and the README section written."""
    page = tmp_path / "README.md"
    end = "<!-- end make report -->"
    page.write_text(f"# title\n\n<!-- make report: proxy old.json -->\nold figures\n{end}\n\nafter\n")
    photo = sorted((tiny_data / "test").rglob("*.jpg"))[0]
    args = proxy.get_args_parser().parse_args([
        "--model-dir", str(tiny_model), "--concurrency", "8", "16", "64", "--requests", "64", "--workers", "1",
        "--max-in-flight", "8", "--photo", str(photo), "--batch", "4", "--inprocess-budget", "0.5",
        "--readme", str(page), "--out-dir", str(tmp_path)])
    assert proxy.main(args) == 0
    [out] = tmp_path.glob("proxy-*.json")
    result = json.loads(out.read_text())
    levels = {(lv["via"], lv["concurrency"]): lv for lv in result["levels"]}
    assert list(levels) == [(via, c) for c in (8, 16, 64) for via in ("torchserve", "app")]
    assert all(lv["requests"] == 64 and lv["max_wait_ms"] > 0 for lv in levels.values())
    for key in (("torchserve", 8), ("torchserve", 16), ("app", 8)):  # under TorchServe's queue and the app's limit
        assert levels[key]["statuses"] == {"200": 64} and levels[key]["p50_ms"] > 0, levels[key]
    for c in (16, 64):  # past the app's limit: photos or JSON 503s that say when to retry, nothing else
        lv = levels[("app", c)]
        assert set(lv["statuses"]) <= {"200", "503"} and lv["ok"] > 0, lv
        assert lv["shed"]["retry_after"] == lv["shed"]["json"] == lv["shed"]["count"], lv["shed"]
    assert all(lv["app_cpu_ms_per_request"] > 0 for (via, _), lv in levels.items() if via == "app")
    ref = result["inprocess"]
    assert ref["model_only"]["images_per_s"] > 0 and ref["end_to_end"]["photos_per_s"] > 0
    assert ref["end_to_end"]["processes"] == result["server"]["workers"] == 1
    v = result["verdict"]
    assert all(isinstance(x, float) for x in v["measured"].values()), v
    assert v["passed"]["app_errors_c8"] is True and v["passed"]["app_503_json_retry_after_c64"] is True
    assert out.with_suffix(".md").read_text().startswith("# The path users hit")
    text = page.read_text()
    assert text.startswith(f"# title\n\n<!-- make report: proxy {out.name} -->\nGenerated by `make bench-proxy` from "
                           f"`benchmarks/results/{out.name}`")
    assert "| through the app, c=64 |" in text and "old figures" not in text and text.endswith(f"{end}\n\nafter\n")


def test_sweep_grid_takes_threads_and_its_readme_section_is_generated(tmp_path: Path) -> None:
    assert sweep.grid_cell("2,4,5,1") == (2, 4, 5, 1)
    for bad in ("2,4,5", "0,1,1,1", "1,1,-1,1", "a,b,c,d"):
        with pytest.raises(Exception, match="workers"):
            sweep.grid_cell(bad)
    page = tmp_path / "README.md"
    page.write_text("no markers here\n")
    assert not readme.write_section(page, "sweep", tmp_path / "sweep-x.json")
    assert page.read_text() == "no markers here\n"
    result = {"machine": {"cpu": "cpu", "cores_logical": 2}, "started_at": "t", "model_dir": "m", "backend": "onnx",
              "settings": {"requests": 10, "concurrency": 8},
              "grid": [{"workers": 1, "batch_size": 2, "max_batch_delay": 1, "threads": 2, "ok_per_s": 3.0,
                        "p50_ms": 4.0, "p99_ms": 5.0, "worker_pss_mb": [6.0]}]}
    (tmp_path / "sweep-x.json").write_text(json.dumps(result))
    page.write_text("<!-- make report: sweep old.json -->\nold\n<!-- end make report -->\n")
    assert readme.write_section(page, "sweep", tmp_path / "sweep-x.json")
    assert page.read_text().startswith("<!-- make report: sweep sweep-x.json -->")
    assert "| 1 | 2 | 1 | 2 | 3.0 | 4 | 5 | 6 |" in page.read_text()
