"""``make gpu-check`` (issue 24): the GPU code paths that never run on CPU, checked in one go on a machine
with CUDA, each part a pass / fail / not-run verdict with its reason, written as JSON + Markdown.

Parts (``--parts``), in this order:
  train      a tiny scratch CNN trained on CUDA (AMP) from synthetic photos and exported; served uses it
             when no exported model is given
  providers  ONNX Runtime's session.get_providers() really lists CUDAExecutionProvider (it falls back silently)
  parity     each model's CUDA outputs against its CPU outputs (ONNX Runtime and TorchScript): probabilities,
             top-1 and the open-set decisions, on the model's own test crops (synthetic where absent)
  bench      ``make bench``'s CUDA rows (ORT CUDA, TorchScript CUDA) with their CPU rows, batch 1 / 8 / 32
  served     the archives under TorchServe with a GPU worker: the worker's device, served = offline answers
  ddp        one DDP step over NCCL against one process (2 or more GPUs)

Without a usable GPU it refuses in one line (exit 2) before running or writing anything. Otherwise it
writes ``gpu-check-<host>-<date>.json`` / ``.md`` and the bench run's files into ``--out-dir`` at the end,
and exits 1 if any part failed. On a lent device machine: ``make gpu-pack`` here, then
``bash benchmarks/gpu_check.sh --out-dir "$OUT"`` there (docs/gpu-check.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.gpu_record import FAIL, NOT_RUN, PASS, Check, GpuCheckRecord, cuda_rows, write
from landmark import atomic
from landmark.cli import positive_float, positive_int
from landmark.run_files import META, model_file

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu-carry"  # what make gpu-pack puts beside the working tree for a lent device machine
DEFAULT_MODELS = (ROOT / "artifacts" / "wh13", ROOT / "artifacts" / "im49")
PARTS = ("train", "providers", "parity", "bench", "served", "ddp")
BENCH_BACKENDS = ("torchscript", "onnx-cpu", "onnx-cuda", "torchscript-cuda")
ORT_CUDA = "CUDAExecutionProvider"
TINY_CLASSES = ("00.Synthetic_A", "01.Synthetic_B", "02.Synthetic_C")
TINY_TRAIN = ("--arch", "scratch", "--input-size", "32", "--epochs", "3", "--widths", "8,16", "--depths", "1,1",
              "--batch-size", "16", "--lr", "3e-3", "--device", "cuda")
SERVED_PHOTOS = 6


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dirs", nargs="*", type=Path,
                   help=f"exported model folders (default: {CARRY.name}/models/* where make gpu-pack made them, "
                        "else artifacts/wh13 and artifacts/im49 where exported)")
    p.add_argument("--crops-dir", type=Path, default=CARRY / "crops",
                   help="<model name>.npy uint8 crops from make gpu-pack (default: the model's test photos, "
                        "else synthetic ones)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 8, 32])
    p.add_argument("--budget", type=positive_float, default=2.0, help="bench: seconds of timed calls per cell")
    p.add_argument("--bench-timeout", type=positive_float, default=420.0, help="seconds for the whole bench part")
    p.add_argument("--tolerance", type=positive_float, default=1e-2,
                   help="largest |CUDA - CPU| probability accepted (cuDNN convolutions run in TF32 by default)")
    return p


@dataclass
class Run:
    args: argparse.Namespace
    work: Path
    models: list[Path]
    tiny: Path | None = None  # the model the train part made
    bench: dict | None = None
    bench_files: list[Path] = field(default_factory=list)

    def all_models(self) -> list[Path]:
        return [*self.models, *([self.tiny] if self.tiny else [])]


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def no_gpu_reason() -> str | None:
    """None where torch sees a CUDA device, else why not, in one line (torch's warnings kept quiet)."""
    from benchmarks.machine import cuda_unavailable_reason

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reason = cuda_unavailable_reason()
    return None if reason is None else one_line(reason)


def default_models(carry: Path = CARRY) -> list[Path]:
    carried = sorted(d for d in (carry / "models").glob("*") if (d / META).is_file())
    return carried or [d for d in DEFAULT_MODELS if (d / META).is_file()]


def python(*args: str, timeout: float, capture: bool = True) -> subprocess.CompletedProcess:
    """``python -m ...`` from the repository root, with this interpreter (the device's own python3)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=capture, text=True, timeout=timeout)


def tail(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


# --- the parts -------------------------------------------------------------------------------------------


def synthetic_set(root: Path, n_train: int = 12, n_test: int = 4) -> Path:
    """``root/{train,test}/<class>/`` of small synthetic JPEGs (benchmarks.inputs): data for the tiny model."""
    from benchmarks.inputs import synthetic_jpeg

    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(TINY_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed = 1000 * c + i + (500 if split == "test" else 0)
                (folder / f"{i:03d}.jpg").write_bytes(synthetic_jpeg(seed, (96 + 8 * c, 72)))
    return root


def part_train(run: Run) -> Check:
    start = time.perf_counter()
    data, out = synthetic_set(run.work / "tiny_data"), run.work / "tiny"
    for module, extra in (("train.train", (*TINY_TRAIN, "--data-dir", str(data), "--out", str(out))),
                          ("train.export", ("--run-dir", str(out)))):
        done = python("-m", module, *extra, timeout=300)
        if done.returncode != 0:
            return Check("train", FAIL, f"{module} exited {done.returncode}: {tail(done)}",
                         {"output": (done.stdout + done.stderr)[-3000:]})
    run.tiny = out
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return Check("train", PASS, f"tiny scratch CNN trained with --device cuda and exported (parity passed) in "
                 f"{time.perf_counter() - start:.0f} s", {"test_accuracy": metrics.get("test_accuracy")})


def part_providers(run: Run) -> Check:
    import onnxruntime as ort

    from landmark.runtime import OnnxRunner

    models = [m for m in run.all_models() if model_file(m, "onnx").is_file()]
    if not models:
        return Check("providers", NOT_RUN, "no model.onnx to open a session on")
    seen = {m.name: OnnxRunner(model_file(m, "onnx"), device="auto").providers for m in models}
    data = {"onnxruntime": ort.__version__, "available": ort.get_available_providers(), "session_providers": seen}
    off = {name: p for name, p in seen.items() if ORT_CUDA not in p}
    if off:
        return Check("providers", FAIL, f"session.get_providers() is {next(iter(off.values()))} for "
                     f"{', '.join(off)}: ONNX Runtime {ort.__version__} runs on CPU here (available providers "
                     f"{ort.get_available_providers()}), so no ORT CUDA figure is measured", data)
    return Check("providers", PASS, f"session.get_providers() starts with {ORT_CUDA} for {', '.join(seen)}", data)


def own_crops(model_dir: Path, n: int = 8) -> tuple[np.ndarray, str]:
    """n crops of the model's own test photos where its data folder is here, else synthetic ones."""
    from benchmarks.inputs import model_inputs
    from landmark.run_files import read_meta

    meta = read_meta(model_dir)
    crops, info = model_inputs(meta.preprocess, Path(meta.model.data_dir) if meta.model.data_dir else None, n)
    return crops, info["source"]


def model_crops(model_dir: Path, crops_dir: Path) -> tuple[np.ndarray, str]:
    """The crops make gpu-pack carried for this model, else its own."""
    carried = crops_dir / f"{model_dir.name}.npy"
    return (np.load(carried), str(carried)) if carried.is_file() else own_crops(model_dir)


def decision(answer: dict) -> tuple[str | None, str]:
    return (answer["landmark"]["name"] if answer["landmark"] else None, answer["reason"])


def compare_backend(model_dir: Path, backend: str, crops: np.ndarray, tolerance: float) -> dict:
    """CPU vs CUDA outputs of one exported file on the same crops."""
    from landmark.labels import softmax
    from landmark.predict import Predictor, rows

    path = model_file(model_dir, backend)
    row: dict = {"model": model_dir.name, "backend": backend, "n": len(crops)}
    cpu = Predictor(path, device="cpu")
    try:
        gpu = Predictor(path, device="cuda")
    except RuntimeError as e:  # ONNX Runtime without CUDA: the runner refuses rather than fall back
        return {**row, "status": NOT_RUN, "why": one_line(e)}
    a, b = cpu.outputs(crops), gpu.outputs(crops)
    pa, pb = softmax(a.logits), softmax(b.logits)
    da = [decision(cpu.answer(r)) for r in rows(a)]
    db = [decision(gpu.answer(r)) for r in rows(b)]
    row.update(device=gpu.runner.device, providers=gpu.runner.providers,
               max_abs_prob_diff=float(np.abs(pa - pb).max()),
               top1_agrees=float((pa.argmax(1) == pb.argmax(1)).mean()),
               decisions_agree=sum(x == y for x, y in zip(da, db, strict=True)))
    ok = row["max_abs_prob_diff"] <= tolerance and row["top1_agrees"] == 1 and row["decisions_agree"] == len(crops)
    return {**row, "status": PASS if ok else FAIL}


def part_parity(run: Run) -> Check:
    rows, sources = [], {}
    for m in run.all_models():
        crops, sources[m.name] = model_crops(m, run.args.crops_dir)
        rows += [compare_backend(m, b, crops, run.args.tolerance) for b in ("onnx", "torchscript")
                 if model_file(m, b).is_file()]
    data = {"rows": rows, "inputs": sources, "tolerance": run.args.tolerance}
    ran = [r for r in rows if r["status"] != NOT_RUN]
    text = "; ".join(f"{r['model']} {r['backend']}: " + (
        f"max|dp| {r['max_abs_prob_diff']:.1e}, top-1 {r['top1_agrees']:.0%}, decisions {r['decisions_agree']}/{r['n']}"
        if r["status"] != NOT_RUN else f"not run ({r['why']})") for r in rows)
    if not ran:
        return Check("parity", NOT_RUN, text or "no exported model", data)
    return Check("parity", FAIL if any(r["status"] == FAIL for r in ran) else PASS, text, data)


def part_bench(run: Run) -> Check:
    if not run.models:
        return Check("bench", NOT_RUN, "no exported model given or carried (make gpu-pack)")
    out = run.work / "bench"
    args = ["-m", "benchmarks.run", "--model-dirs", *map(str, run.models), "--backends", *BENCH_BACKENDS,
            "--batch-sizes", *map(str, run.args.batch_sizes), "--budget", str(run.args.budget), "--no-serve",
            "--out-dir", str(out)]
    done = python(*args, timeout=run.args.bench_timeout, capture=False)  # its progress goes to the log
    found = sorted(out.glob("*.json"))
    if done.returncode != 0 or not found:
        return Check("bench", FAIL, f"benchmarks.run exited {done.returncode} without a result")
    run.bench = json.loads(found[0].read_text(encoding="utf-8"))
    run.bench_files = [p for p in (found[0], found[0].with_suffix(".md"), found[0].with_suffix(".png")) if p.is_file()]
    rows = cuda_rows(run.bench)
    missing = [f"{r['model']} {name}: {why}" for r in rows for name, why in r.get("not_run", {}).items()]
    missing += [f"{r['model']}: {r['status']}" for r in rows if r["status"] != "ok"]
    firsts = [f"{r['model']} batch-1 ORT CUDA / TorchScript CUDA = {r['batch1_ort_over_ts_cuda']:.2f}x"
              for r in rows if r.get("batch1_ort_over_ts_cuda") is not None]
    text = "; ".join(firsts + [one_line(m) for m in missing]) or "all rows ran"
    return Check("bench", FAIL if missing else PASS, text, {"result": found[0].name})


def served_unavailable() -> str | None:
    """Why TorchServe cannot start here (its Python package, its launcher beside this interpreter, Java)."""
    if importlib.util.find_spec("ts") is None:
        return "the torchserve package is not installed (make gpu-pack GPU_PACK_ARGS=--served carries it)"
    if not (Path(sys.executable).parent / "torchserve").is_file():
        return f"no torchserve launcher beside {sys.executable}"
    java = Path(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    if not java or not Path(java).is_file():
        return "no Java runtime for TorchServe's frontend (make gpu-pack GPU_PACK_ARGS=--served carries one)"
    return None


def served_answers(server, name: str, bodies: list[bytes]) -> tuple[dict, list[dict]]:
    """The worker's own describe (device, providers) and the served answer of each body."""
    import httpx

    r = httpx.get(f"{server.management_url}/models/{name}", params={"customized": "true"},
                     headers=server.management_headers(), timeout=60)
    r.raise_for_status()
    described = r.json()[0]["customizedMetadata"]
    described = json.loads(described) if isinstance(described, str) else described
    answers = []
    for body in bodies:
        resp = httpx.post(server.url(name), content=body, timeout=60,
                             headers={**server.headers(), "Content-Type": "image/jpeg"})
        answers.append(resp.json() if resp.status_code == 200 else {"error": f"HTTP {resp.status_code}: {resp.text}"})
    return described, answers


def same_answer(served: dict, offline: dict, tolerance: float) -> bool:
    if "error" in served:
        return False
    probs = [abs(s["probability"] - o["probability"]) for s, o in zip(served["top_k"], offline["top_k"], strict=False)]
    return (decision(served) == decision(offline) and [c["name"] for c in served["top_k"]] ==
            [c["name"] for c in offline["top_k"]] and max(probs, default=0.0) <= tolerance)


def part_served(run: Run) -> Check:
    if reason := served_unavailable():
        return Check("served", NOT_RUN, reason)
    model = (run.models or [run.tiny])[0]
    if model is None:
        return Check("served", NOT_RUN, "no exported model (none given, and the train part did not make one)")
    from benchmarks.inputs import synthetic_jpeg
    from benchmarks.load import archive_settings
    from handlers.archive import build
    from handlers.process import TorchServe
    from landmark.predict import Predictor
    from landmark.runtime import OnnxRunner

    names = {f"landmark_{b}": b for b in ("torchscript", "onnx") if model_file(model, b).is_file()}
    store = run.work / "store"
    for name, backend in names.items():
        build(model, backend, name, "gpu", store, force=True, **archive_settings())
    bodies = [synthetic_jpeg(i) for i in range(SERVED_PHOTOS)]
    rows = []
    with TorchServe(store, list(names), workdir=run.work / "ts", workers=1).start(240) as server:
        for name, backend in names.items():
            described, answers = served_answers(server, name, bodies)
            offline = Predictor(model_file(model, backend), device="cpu").predict(bodies)
            # where ONNX Runtime has no CUDA here, an ONNX worker on CPU is right (the providers part fails)
            want = "cuda" if backend == "torchscript" else OnnxRunner(model_file(model, "onnx"), "auto").device
            same = sum(same_answer(s, o, run.args.tolerance) for s, o in zip(answers, offline, strict=True))
            rows.append({"model": name, "device": described.get("device"), "expected_device": want,
                         "providers": described.get("providers"), "same_as_offline": same, "n": len(bodies),
                         "examples": answers[:2]})
    text = "; ".join(f"{r['model']} ({model.name}) worker on {r['device']} (expected {r['expected_device']}), "
                     f"served = offline CPU answers {r['same_as_offline']}/{r['n']}" for r in rows)
    ok = all(r["device"] == r["expected_device"] and r["same_as_offline"] == r["n"] for r in rows)
    return Check("served", PASS if ok else FAIL, text, {"rows": rows})


def part_ddp(run: Run) -> Check:
    import torch

    n = torch.cuda.device_count()
    if n < 2:
        return Check("ddp", NOT_RUN, f"{n} GPU here: one NCCL DDP step needs 2 or more")
    out = run.work / "ddp"
    done = python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "train.ddp_step",
                  str(out), "--device", "cuda", timeout=300)
    if done.returncode != 0:
        return Check("ddp", FAIL, f"train.ddp_step under torchrun exited {done.returncode}: {tail(done)}")
    ranks = [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(n)]
    worst = max(max(g["synced"].values()) for g in ranks)
    ok = all(g["backend"] == "nccl" and g["batches"] and g["rng"] for g in ranks) and worst < 1e-4
    return Check("ddp", PASS if ok else FAIL, f"{n} ranks over {ranks[0]['backend']}: largest gap from one "
                 f"process {worst:.1e} (outputs, gradients, BatchNorm buffers)", {"ranks": ranks})


PART_FUNCTIONS: dict[str, Callable[[Run], Check]] = {
    "train": part_train, "providers": part_providers, "parity": part_parity, "bench": part_bench,
    "served": part_served, "ddp": part_ddp}


def run_part(name: str, run: Run) -> Check:
    """A part that raises is that part's failure, with the cause; the others still run."""
    try:
        check = PART_FUNCTIONS[name](run)
    except Exception as e:
        check = Check(name, FAIL, f"{type(e).__name__}: {one_line(e)}"[:500],
                      {"traceback": traceback.format_exc()[-3000:]})
    print(f"[gpu-check] {check.name}: {check.status}: {check.detail}", flush=True)
    return check


def versions() -> dict:
    import onnxruntime as ort
    import torch

    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
            "driver": driver.stdout.strip() if driver and driver.returncode == 0 else None,
            "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if reason := no_gpu_reason():
        print(f"gpu-check: refused: no usable GPU here ({reason}); nothing was run or written", file=sys.stderr)
        return 2
    models = default_models() if args.model_dirs is None else args.model_dirs
    if bad := [str(d) for d in models if not (d / META).is_file()]:
        print(f"gpu-check: not an exported model folder (no {META}): {', '.join(bad)}", file=sys.stderr)
        return 2
    import torch

    t0 = time.time()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"[gpu-check] {', '.join(gpus)}; models {[m.name for m in models] or 'none'}; parts {args.parts}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        run = Run(args, Path(tmp), [m.resolve() for m in models])
        checks = [run_part(name, run) for name in PARTS if name in args.parts]
        record = GpuCheckRecord(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), socket.gethostname(), gpus,
                                versions(), checks, round(time.time() - t0, 1),
                                run.bench_files[0].name if run.bench_files else None,
                                cuda_rows(run.bench) if run.bench else [])
        for f in run.bench_files:  # the bench's own JSON / Markdown / chart, beside the record
            with atomic.atomic_path(args.out_dir / f.name) as dst:
                shutil.copyfile(f, dst)
        stem = f"gpu-check-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(t0))}"
        json_path, md_path = write(record, args.out_dir, stem)
    failed = record.failed()
    print(f"[gpu-check] wrote {json_path}, {md_path.name}" + "".join(f", {f.name}" for f in run.bench_files)
          + (f"; FAILED: {', '.join(c.name for c in failed)}" if failed else "; no part failed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
