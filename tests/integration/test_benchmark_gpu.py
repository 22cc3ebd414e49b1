"""benchmarks.gpu: one clear line and exit 0 without CUDA; its measuring code run on the
CPU (tiny teacher, short timings), so the GPU path is not first executed on a GPU box."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks import gpu
from gateway_helpers import DEFAULT_MODEL, REPO

pytestmark = pytest.mark.integration


@pytest.mark.skipif(gpu.cuda_status()[0], reason="this machine has CUDA: the benchmark would really run")
def test_without_cuda_one_line_and_exit_0():
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA here" in lines[0] and "no GPU figure claimed" in lines[0]


def test_measuring_code_runs_on_the_cpu(tmp_path, iot23_dir):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(DEFAULT_MODEL, student)
    teacher = gpu.make_teacher_dir(student, tmp_path / "teacher", shape={"hidden": 32, "layers": 2, "heads": 2,
                                                                         "ffn": 64})
    assert (teacher / "model.fp16.onnx").is_file()
    result = gpu.measure(student, teacher, iot23_dir, provider="cpu", batches=[1, 64], seconds=0.05,
                         finetune_epochs=2, device="cpu", log=lambda s: None)
    assert len(result["rows"]) == 2 * 2 * 2  # models x precisions x batches
    assert all(r["provider"] == "CPUExecutionProvider" and r["flows_per_s"] > 0 for r in result["rows"])
    checks = {c["check"]: c for c in result["checks"]}
    for name in ("student", "teacher"):
        for precision in ("fp32", "fp16"):
            assert checks[f"{name} {precision} ran on"]["ok"]
        assert checks[f"{name} fp16 vs fp32 (tolerance ratio)"]["ok"]
    tune = next(c for c in result["checks"] if c["check"].startswith("fine-tune"))
    assert tune["ok"] and "steps/s" in tune["value"]
