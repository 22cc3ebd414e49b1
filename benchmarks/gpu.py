"""The device check of an edge GPU box: providers, speed, fp16 agreement, a GPU fine-tune.

On a machine with CUDA (torch sees a GPU and ONNX Runtime's CUDA provider really runs
a session), in one process:

1. **provider**: the student loaded with ``provider="cuda"`` (fp32 and fp16, and
   TensorRT when present) must really run its matrix products on that provider
   (from ONNX Runtime's profile, :attr:`gateway.inference.LoadedModel.provider_ran`);
2. **student** flows/s and per-call p99 latency at several batch sizes (ONNX Runtime,
   CUDA provider, IO binding), fp32 and fp16;
3. **teacher** the same for an OPT-125m-shaped teacher (12 layers, 768 wide, 12 heads,
   3072 feed-forward: opt-125m's transformer, on the flow vocabulary, randomly
   initialised and exported like any model directory), or ``--teacher DIR``;
4. **fp16 vs fp32**: the worst logit difference of the fp16 graph on the GPU, as a
   ratio of the export tolerance (``FP16_ATOL + FP16_RTOL x |logit|``; <= 1 passes);
5. **fine-tune**: a short GPU training run of the teacher preset on ``--data`` (autocast),
   steps/s and the loss before and after.

Aims (issue 18): >= 1,000,000 student flows/s at a large batch, >= 20,000 flows/s for a
125M-parameter teacher, fp16 within tolerance.

Without CUDA it prints one line saying so and exits 0: nothing is measured, and no GPU
figure is claimed.

    python -m benchmarks.gpu
    python -m benchmarks.gpu --batches 1,256,4096,65536 --json
    python -m benchmarks.gpu --teacher build/teacher-125m
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

AIMS = {"student_flows_per_s": 1_000_000, "teacher_flows_per_s": 20_000, "fp16_tolerance_ratio": 1.0}
OPT_125M = {"hidden": 768, "layers": 12, "heads": 12, "ffn": 3072}


def cuda_status() -> tuple[bool, str]:
    """(usable, why): CUDA needs both torch and ONNX Runtime's CUDA provider here."""
    import torch

    from gateway.inference import cuda_available

    torch_ok = torch.cuda.is_available()
    ort_ok = cuda_available()
    if torch_ok and ort_ok:
        return True, torch.cuda.get_device_name(0)
    why = []
    if not torch_ok:
        why.append(f"torch {torch.__version__} sees no CUDA GPU")
    if not ort_ok:
        why.append("ONNX Runtime's CUDA provider does not load")
    return False, "; ".join(why)


def time_calls(run, ids: np.ndarray, *, batch: int, seconds: float) -> dict:
    """flows/s and per-call p50/p99 latency of ``run`` on batches of ``batch`` rows."""
    rows = np.resize(ids, (batch, ids.shape[1])) if len(ids) < batch else ids[:batch]
    rows = np.ascontiguousarray(rows)
    for _ in range(3):
        run(rows)  # warm-up: arena growth, kernel selection
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 5:
        t = time.perf_counter()
        run(rows)
        times.append(time.perf_counter() - t)
    total = sum(times)
    return {"flows_per_s": round(batch * len(times) / total), "p50_ms": round(1000 * float(np.percentile(times, 50)), 3),
            "p99_ms": round(1000 * float(np.percentile(times, 99)), 3), "calls": len(times)}


def make_teacher_dir(student_dir: Path, out: Path, *, shape: dict = OPT_125M, seed: int = 0) -> Path:
    """A teacher model directory of ``shape`` on the student's tokenizer and labels,
    with fp32 and fp16 graphs (random weights: speed does not depend on them)."""
    from gateway.model.modeldir import load_student, save_model_dir
    from gateway.model.opt import Preset, build_model

    _, tokenizer, labels, _ = load_student(student_dir)
    preset = Preset(hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"], ffn=shape["ffn"],
                    dropout=0.0, epochs=1, lr=1e-4, batch_size=64)
    model = build_model(preset, tokenizer, labels, seed=seed)
    return save_model_dir(model, tokenizer, labels, out, version=f"teacher-{shape['layers']}x{shape['hidden']}",
                          extra={"preset": "teacher-bench"}, fp16=True).path


def measure(student_dir: Path, teacher_dir: Path, data: Path, *, provider: str, batches: list[int],
            seconds: float, finetune_epochs: int, device: str, log=print) -> dict:
    """Every figure of the device check on ``provider`` / torch ``device`` (the CPU
    works too, for testing this code where there is no GPU)."""
    import torch

    from gateway.inference import EngineOptions, LoadedModel, tensorrt_available
    from gateway.model.data import load_scenarios
    from gateway.model.export import FP16_ATOL, FP16_RTOL
    from gateway.model.modeldir import export_onnx, load_student, validate_model_dir
    from gateway.model.opt import parameter_count

    rows, checks = [], []
    info = validate_model_dir(student_dir)
    records = [r for s in load_scenarios([data]) for r in s.records]
    ids = np.unique(info.tokenizer.encode(records), axis=0)
    for name, d in (("student", student_dir), ("teacher", teacher_dir)):
        if not (d / "model.fp16.onnx").exists():
            export_onnx(d, fp16=True)
        params = parameter_count(load_student(d)[0])
        ref = LoadedModel(d, EngineOptions(provider=provider, precision="fp32", threads=None, cache_size=0))
        for precision in ("fp32", "fp16"):
            m = ref if precision == "fp32" else LoadedModel(
                d, EngineOptions(provider=provider, precision=precision, threads=None, cache_size=0))
            checks.append({"check": f"{name} {precision} ran on", "value": m.provider_ran,
                           "ok": m.provider_ran == m.providers[0]})
            if precision == "fp16":
                a, b = ref.logits(ids), m.logits(ids)
                ratio = float((np.abs(a - b) / (FP16_ATOL + FP16_RTOL * np.abs(a))).max())
                checks.append({"check": f"{name} fp16 vs fp32 (tolerance ratio)", "value": round(ratio, 4),
                               "ok": ratio <= AIMS["fp16_tolerance_ratio"]})
            for batch in batches:
                r = time_calls(m.logits, ids, batch=batch, seconds=seconds)
                rows.append({"model": name, "params": params, "precision": precision, "provider": m.provider_ran,
                             "batch": batch, **r})
                log(f"{name} {precision} batch {batch}: {r['flows_per_s']:,} flows/s, p99 {r['p99_ms']} ms")
    if provider == "cuda" and tensorrt_available():
        try:
            trt = LoadedModel(student_dir, EngineOptions(provider="tensorrt", precision="fp16", threads=None,
                                                         cache_size=0, max_batch=max(batches)))
            checks.append({"check": "student TensorRT ran on", "value": trt.provider_ran,
                           "ok": trt.provider_ran == "TensorrtExecutionProvider"})
            r = time_calls(trt.logits, ids, batch=max(batches), seconds=seconds)
            rows.append({"model": "student", "params": None, "precision": "fp16", "provider": trt.provider_ran,
                         "batch": max(batches), **r})
        except Exception as exc:  # noqa: BLE001 - TensorRT is optional; say why it did not run
            checks.append({"check": "student TensorRT", "value": str(exc)[:60], "ok": False})
    for name in ("student", "teacher"):
        best = max((r["flows_per_s"] for r in rows if r["model"] == name), default=0)
        aim = AIMS[f"{name}_flows_per_s"]
        checks.append({"check": f"{name} best flows/s (aim {aim:,})", "value": best, "ok": best >= aim})
    checks.append(finetune(teacher_dir, data, device=device, epochs=finetune_epochs))
    return {"rows": rows, "checks": checks, "torch_device": str(torch.device(device))}


def finetune(model_dir: Path, data: Path, *, device: str, epochs: int) -> dict:
    """A short fine-tune of ``model_dir``'s weights on ``data`` (paper split's train
    part, deduplicated) on ``device``: steps/s and the loss of the first and last epoch."""
    from gateway.model.data import encode
    from gateway.model.device import Precision, resolve_device
    from gateway.model.modeldir import load_student
    from gateway.model.pipeline import prepare
    from gateway.model.train import train_epochs

    model, tokenizer, labels, _ = load_student(model_dir)
    prepared = prepare([data], seed=23)
    train = encode([prepared.records[i] for i in prepared.split[0]], tokenizer, labels).dedupe()
    dev = resolve_device(device)
    started = time.perf_counter()
    result = train_epochs(model, train, epochs=epochs, lr=1e-4, seed=0, batch_size=64, device=dev, threads=None)
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    losses = result.epoch_losses
    return {"check": f"fine-tune {epochs} epochs on {dev.type} ({Precision.for_device(dev).name})",
            "value": f"{result.steps / seconds:.1f} steps/s, loss {losses[0]:.3f} -> {losses[-1]:.3f}",
            "ok": bool(np.isfinite(losses[-1]) and losses[-1] <= losses[0])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "default", help="student model directory")
    ap.add_argument("--teacher", type=Path, default=None, help="teacher directory [an OPT-125m-shaped one is built]")
    ap.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "iot23")
    ap.add_argument("--batches", default="1,256,4096,65536", help="comma-separated batch sizes")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per figure")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    ok, why = cuda_status()
    if not ok:
        print(f"benchmarks.gpu: no CUDA here ({why}); nothing measured, no GPU figure claimed")
        return 0
    import torch

    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    with tempfile.TemporaryDirectory(prefix="fedgate-gpu-") as tmp:
        student = Path(tmp) / "student"
        shutil.copytree(args.model, student)
        teacher = args.teacher
        if teacher is None:
            print("building an OPT-125m-shaped teacher (export takes a minute) ...", file=sys.stderr)
            teacher = make_teacher_dir(student, Path(tmp) / "teacher")
        else:
            teacher = Path(shutil.copytree(teacher, Path(tmp) / "teacher"))
        result = measure(student, teacher, args.data, provider="cuda", batches=batches, seconds=args.seconds,
                         finetune_epochs=args.finetune_epochs, device="cuda",
                         log=lambda s: print(s, file=sys.stderr))
    result["host"] = {"gpu": why, "torch": torch.__version__, "cuda": torch.version.cuda,
                      "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        from gateway.output import emit_rows

        emit_rows(result["rows"], ["model", "params", "precision", "provider", "batch", "flows_per_s", "p50_ms",
                                   "p99_ms"], title=f"inference on {why}")
        emit_rows(result["checks"], ["check", "value", "ok"], title="checks")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
