"""How far the fp16 and int8 graphs of a model directory are from its fp32 graph.

For each graph: the largest logit difference from ``model.onnx``, the worst ratio to
the fp16 tolerance (``FP16_ATOL + FP16_RTOL * |logit|``, <= 1 is within it), the largest
malicious-score difference and how often the verdict (arg-max class) agrees, on the
distinct prompts of ``--data`` and on random prompts over the whole vocabulary.  It
runs on whatever provider is given (default CPU: ONNX Runtime's CPU provider runs the
float16 graph), so the tolerance is measured on a machine without a GPU too.  A copy of
the model directory is exported with ``--fp16 --int8``; the original is not touched.

    python -m benchmarks.precision                       # models/default, table
    python -m benchmarks.precision --model build/student --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Agreement of logits ``b`` with reference logits ``a`` (same rows)."""
    from gateway.model.export import FP16_ATOL, FP16_RTOL
    from gateway.model.metrics import malicious_score, softmax

    diff = np.abs(a - b)
    sa, sb = malicious_score(softmax(a.astype(np.float64))), malicious_score(softmax(b.astype(np.float64)))
    return {
        "rows": len(a),
        "max_abs_logit": round(float(np.abs(a).max()), 4),
        "max_logit_diff": float(f"{diff.max():.3g}"),
        "tolerance_ratio": round(float((diff / (FP16_ATOL + FP16_RTOL * np.abs(a))).max()), 4),
        "max_score_diff": float(f"{np.abs(sa - sb).max():.3g}"),
        "verdict_agreement": round(float((a.argmax(1) == b.argmax(1)).mean()), 6),
    }


def measure(model: Path, data: Path, *, provider: str = "CPUExecutionProvider", rows: int = 2048) -> list[dict]:
    from gateway.flows.record import ConnRecord  # noqa: F401 - the data loader's records
    from gateway.model.data import load_scenarios
    from gateway.model.export import logits_pair
    from gateway.model.modeldir import export_onnx, validate_model_dir

    out = []
    with tempfile.TemporaryDirectory(prefix="fedgate-precision-") as tmp:
        d = Path(tmp) / "model"
        shutil.copytree(model, d)
        export_onnx(d, int8=True, fp16=True)
        info = validate_model_dir(d)
        records = [r for s in load_scenarios([data]) for r in s.records]
        real = np.unique(info.tokenizer.encode(records), axis=0)
        rand = np.random.default_rng(0).integers(0, info.tokenizer.vocab_size, size=(rows, info.tokenizer.length),
                                                 dtype=np.int64)
        for name in ("model.fp16.onnx", "model.int8.onnx"):
            for what, ids in (("data prompts", real), ("random prompts", rand)):
                a, b = logits_pair(d / "model.onnx", d / name, ids=ids, provider=provider)
                out.append({"graph": name, "prompts": what, **compare(a, b)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "default")
    ap.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "iot23")
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from gateway.model.export import FP16_ATOL, FP16_RTOL
    from gateway.output import emit_rows

    rows = measure(args.model, args.data, provider=args.provider)
    if args.json:
        print(json.dumps({"tolerance": {"atol": FP16_ATOL, "rtol": FP16_RTOL}, "rows": rows}, indent=1))
    else:
        emit_rows(rows, title=f"vs model.onnx on {args.provider} (fp16 tolerance {FP16_ATOL} + {FP16_RTOL} x |logit|)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
