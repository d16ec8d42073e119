"""The benchmark harness: percentiles against numpy, the timing loop's budget, unavailable backends
reported with their reason (CUDA on a CPU host, an ONNX Runtime provider that is not there), and one
CI-sized run of the real ``python -m benchmarks.run`` on the tiny model, TorchServe included, whose
JSON and PNG are checked."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_module

from benchmarks.backends import Unavailable, assert_provider, make_backend
from benchmarks.inputs import SUFFIXES, model_inputs
from benchmarks.served import token_keys
from benchmarks.stats import percentile, summarize_ms, time_loop
from landmark.preprocess import PreprocessConfig

NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentiles_match_numpy(n: int) -> None:
    samples = list(np.random.default_rng(n).lognormal(-4, 0.5, n))
    stats = summarize_ms(samples)
    ms = np.array(samples) * 1e3
    for q in (50, 90, 99):
        assert stats[f"p{q}_ms"] == pytest.approx(np.percentile(ms, q), rel=1e-12)
    assert stats["mean_ms"] == pytest.approx(ms.mean(), rel=1e-12)
    assert stats["n"] == n
    assert stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]


def test_percentile_known_values() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0, 1.0, 3.0], 0) == 1.0
    assert percentile([5.0, 1.0, 3.0], 100) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)


class FakeClock:
    """``time.perf_counter`` for ``benchmarks.stats``: each call of ``work`` takes exactly ``step`` seconds, so
    the loop's stopping rules are checked call by call, whatever the machine's load (speed: ``make bench``)."""

    def __init__(self, step: float) -> None:
        self.now, self.step, self.calls = 0.0, step, 0

    def perf_counter(self) -> float:
        return self.now

    def work(self) -> None:
        self.calls += 1
        self.now += self.step


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], FakeClock]:
    def make(step: float) -> FakeClock:
        fake = FakeClock(step)
        monkeypatch.setattr("benchmarks.stats.time", fake)
        return fake

    return make


def test_time_loop_stops_at_budget_after_min_iters(clock: Callable[[float], FakeClock]) -> None:
    fake = clock(1 / 8)  # binary fractions: every sum below is exact
    samples, first = time_loop(fake.work, budget_s=1.0, min_iters=5, max_iters=10_000, warmup=2)
    assert first == 1 / 8 and samples == [1 / 8] * 8  # the budget (8 calls of 1/8 s) reached past min_iters
    assert fake.calls == 1 + 2 + 8  # first call, warm-up, timed calls


def test_time_loop_keeps_min_iters_until_twice_the_budget(clock: Callable[[float], FakeClock]) -> None:
    fake = clock(1 / 4)
    samples, _ = time_loop(fake.work, budget_s=1.0, min_iters=12, max_iters=10_000, warmup=0)
    assert samples == [1 / 4] * 8  # min_iters not reached at 1 s: goes on, but stops at 2 s


def test_time_loop_slow_call_is_capped_at_twice_the_budget(clock: Callable[[float], FakeClock]) -> None:
    fake = clock(1 / 2)
    samples, first = time_loop(fake.work, budget_s=1 / 4, min_iters=1000, warmup=5)
    assert first == 1 / 2 and samples == [1 / 2]  # one call already spends twice the budget
    assert fake.calls == 1 + 2 + 1  # warm-up beyond MIN_WARMUP (2) calls stops at half the budget


def test_time_loop_max_iters_and_at_least_one_sample(clock: Callable[[float], FakeClock]) -> None:
    fake = clock(1 / 8)
    samples, _ = time_loop(fake.work, budget_s=10, min_iters=1, max_iters=7, warmup=0)
    assert samples == [1 / 8] * 7
    samples, _ = time_loop(fake.work, budget_s=0.0, min_iters=1, warmup=0)
    assert samples == [1 / 8]


@pytest.mark.skipif(not NO_GPU, reason="this host has a GPU: the CUDA backends are available")
@pytest.mark.parametrize("backend", ["onnx-cuda", "torchscript-cuda"])
def test_cuda_backends_unavailable_without_gpu(tiny_model: Path, backend: str) -> None:
    with pytest.raises(Unavailable) as info:
        make_backend(backend, tiny_model, threads=1)
    message = str(info.value)
    assert "CUDA" in message or "NVIDIA" in message or "cuda" in message, message


def test_ort_provider_that_is_not_there_is_detected(tiny_model: Path) -> None:
    """ONNX Runtime warns and runs on CPU when asked for a provider it lacks; the check catches it."""
    import onnxruntime as ort

    wanted = "CUDAExecutionProvider" if NO_GPU else "NoSuchExecutionProvider"
    session = ort.InferenceSession(str(tiny_model / "model.onnx"), providers=[wanted, "CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(Unavailable, match="fell back"):
        assert_provider(session.get_providers(), wanted)
    assert_provider(session.get_providers(), "CPUExecutionProvider")


def test_missing_model_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match=r"model\.onnx not found"):
        make_backend("onnx-cpu", tmp_path, threads=1)
    with pytest.raises(Unavailable, match=r"best\.pt not found"):
        make_backend("eager", tmp_path, threads=1)


def test_synthetic_inputs_are_deterministic(tmp_path: Path) -> None:
    cfg = PreprocessConfig(32, 40, (0.5,) * 3, (0.5,) * 3)
    a, info = model_inputs(cfg, tmp_path / "absent", 4)
    b, _ = model_inputs(cfg, None, 4)
    assert info["source"] == "synthetic" and a.dtype == np.uint8 and a.shape == (4, 3, 32, 32)
    assert np.array_equal(a, b)


def test_token_file_is_a_key_file_or_a_bare_key(tmp_path: Path) -> None:
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "abc"}, "management": {"key": "m"}}))
    (tmp_path / "plain").write_text("xyz\n")
    assert token_keys(tmp_path / "key_file.json", None).key() == "abc"
    assert token_keys(tmp_path / "plain", None).key() == "xyz"


@pytest.fixture(scope="module")
def bench_run(tiny_model: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """One CI-sized run of the real CLI: every backend, two batch sizes, a missing folder, TorchServe."""
    out = tmp_path_factory.mktemp("bench")
    done = run_module("benchmarks.run", "--model-dirs", str(tiny_model), str(out / "missing"),
                      "--batch-sizes", "1", "4", "--budget", "0.3", "--min-iters", "3", "--warmup", "1",
                      "--threads", "1", "--peak-size", "256", "--photos", str(tiny_data), "--out-dir", str(out),
                      "--concurrency", "1", "2", "--serve-requests", "8", "--serve-budget", "10", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), out, done.stdout


def test_cli_writes_json_chart_and_table(bench_run: tuple[dict, Path, str]) -> None:
    result, out, stdout = bench_run
    png = out / result["chart"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(out.glob("*.tmp"))
    machine = result["machine"]
    assert machine["cpu"] and machine["cores_logical"] >= 1 and machine["versions"]["torch"]
    assert machine["gpu"] != "none" or machine["gpu_reason"]
    assert machine["threads"]["intra_op_threads"] == 1 and machine["threads"]["OMP_NUM_THREADS"] == "1"
    assert machine["threads"]["torch_num_threads"] == 1
    assert result["peak"]["gflops"] > 0
    assert "TorchScript" in stdout and "ONNX Runtime CPU" in stdout and "batch 1 p50: TorchScript" in stdout


def test_cli_backend_rows(bench_run: tuple[dict, Path, str]) -> None:
    result, _, _ = bench_run
    model, missing = result["models"]
    assert missing["status"].startswith("skipped: folder not found")
    assert model["status"] == "ok" and model["inputs"]["unique_photos"] > 0 and model["flops_per_image"] > 0
    rows = {r["backend"]: r for r in model["backends"]}
    assert set(rows) == {"eager", "torchscript", "onnx-cpu", "onnx-int8", "onnx-cuda", "torchscript-cuda"}
    assert rows["onnx-int8"]["status"] == "unavailable: model.int8.onnx not found in " + model["path"]  # no quantize
    for name in ("eager", "torchscript", "onnx-cpu"):
        row = rows[name]
        assert row["status"] == "ok", row["status"]
        assert row["device"] == "cpu" and row["max_abs_prob_diff"] < 1e-4 and row["top1_agrees"] == 1.0
        assert [c["batch"] for c in row["cells"]] == [1, 4]
        for c in row["cells"]:
            assert c["n"] >= 1 and 0 < c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"]
            assert c["images_per_s"] == pytest.approx(c["batch"] / c["mean_ms"] * 1e3)
            assert c["gflops"] > 0 and c["pct_of_peak"] > 0 and c["peak_rss_mb"] > 0
    assert rows["onnx-cpu"]["providers"] == ["CPUExecutionProvider"]
    ort_settings = rows["onnx-cpu"]["runtime_settings"]
    assert ort_settings["ort_intra_op_num_threads"] == 1 and ort_settings["OMP_NUM_THREADS"] == "1"
    assert ort_settings["ort_graph_optimization_level"].endswith("ORT_ENABLE_ALL")
    assert rows["torchscript"]["runtime_settings"]["torch_num_threads"] == 1
    if NO_GPU:
        for name in ("onnx-cuda", "torchscript-cuda"):
            assert rows[name]["status"].startswith("unavailable: "), rows[name]
            assert "cells" not in rows[name]


def test_cli_served_endpoint(bench_run: tuple[dict, Path, str]) -> None:
    served = bench_run[0]["served"]
    assert "status" not in served, served.get("status")
    assert served["cold_start_s"] > 0 and served["workers"] and served["frontend_rss_mb"] > 0
    assert all(0 < w["pss_mb"] <= w["rss_mb"] for w in served["workers"].values())
    assert [lv["concurrency"] for lv in served["levels"]] == [1, 2]
    for lv in served["levels"]:
        assert lv["errors"] == 0, lv["error_examples"]
        assert lv["requests"] >= 1 and lv["p50_ms"] > 0 and lv["throughput_rps"] > 0
    ref = served["inprocess"]
    assert {"decode_preprocess", "model", "end_to_end"} <= set(ref)
    assert served["overhead_ms"] == pytest.approx(served["levels"][0]["p50_ms"] - ref["end_to_end"]["p50_ms"])


def test_remote_url_is_refused() -> None:
    from benchmarks.run import main

    assert main(["--url", "http://example.com/predictions/landmark", "--token-file", "/dev/null"]) == 2


def test_bench_decode_measures_both_ways_on_the_own_test_split_and_phone_size(tiny_model: Path, tiny_data: Path,
                                                                               tmp_path: Path) -> None:
    """The draft is what the model was evaluated with, so its accuracy there is the run's own test figure;
    phone-size copies (12 MP) are always decoded at a reduced scale."""
    from benchmarks import decode

    assert decode.main(["--model-dir", str(tiny_model), "--photos", str(tiny_data / "train"),
                        "--phone-size", str(tiny_data / "test"), "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    [out] = tmp_path.glob("decode-*.json")
    [run] = json.loads(out.read_text())["runs"]
    own, other, phone = run["sets"]
    n_test = sum(p.suffix in SUFFIXES for p in (tiny_data / "test").rglob("*"))
    assert own["set"] == str((tiny_data / "test").resolve()) and own["photos"] == n_test
    recorded = json.loads((tiny_model / "metrics.json").read_text())["test_accuracy"]
    assert abs(own["top1_accuracy"]["draft"] - recorded) <= 1 / n_test + 1e-9
    assert other["photos"] == sum(p.suffix in SUFFIXES for p in (tiny_data / "train").rglob("*"))
    assert "top1_accuracy" not in other and phone["photos"] == n_test and phone["drafted"] == n_test
    for s in run["sets"]:
        assert all(s["ms"][w]["median"] > 0 for w in ("draft", "full"))
        # a photo decoded at full scale either way gets the same answer: only drafted photos may disagree
        n = s["photos"]
        assert round((1 - s["decision_agree"]) * n) <= s["drafted"] and round((1 - s["top1_agree"]) * n) <= s["drafted"]
        assert abs(s["tag_rate"]["draft"] - s["tag_rate"]["full"]) <= 1 - s["decision_agree"] + 1e-9
    assert out.with_suffix(".md").read_text().count("\n| `") == 3
    assert decode.main(["--model-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)]) == 1
