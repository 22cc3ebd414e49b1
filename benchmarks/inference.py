"""Inference speed of a model directory: tokenising, ONNX Runtime, torch eager, engine.

Rows (same process, same prompts: the IoT-23 flows of ``--data`` tokenised):

* ``tokenise``: ``FlowTokenizer.encode`` flows/s, with its per-shape cache cold
  (cleared before each pass) and warm;
* ``onnx fp32`` / ``onnx int8``: the session alone, flows/s at batch ``--batch`` and
  single-flow latency p50/p99, for 1 and 2 intra-op threads;
* ``torch eager``: the same weights through ``OPTForSequenceClassification`` (same
  thread counts), so the ONNX speed-up is measured, not assumed;
* ``ort variant``: the fp32/int8 session at 1 thread with one ORT option changed
  (basic optimisation only, i.e. the file as ``fedgate model export`` writes it without
  the fusions a session adds for its provider at load; extended instead of all graph
  optimisations; memory patterns off; intra-op spinning off with denormals as zero;
  IOBinding into a preallocated output), to show which session settings matter for a
  model this small;
* ``engine.classify``: records in, verdicts out (tokenise + distinct-prompt dedupe +
  verdict cache + ONNX), the path replay uses, with the cache on and off.

    python -m benchmarks.inference                       # models/default, table
    python -m benchmarks.inference --model build/student --json
    python -m benchmarks.inference --quick

The 2 cores of the development box are shared with other engineers' jobs while this
runs: figures are pessimistic; the table shows the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GOALS = {"flows_per_s": 20_000, "p99_ms": 2.0, "speedup_vs_torch": 3.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "default")
    ap.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "iot23")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per throughput figure")
    ap.add_argument("--singles", type=int, default=2000, help="single-flow calls per latency figure")
    ap.add_argument("--quick", action="store_true", help="short timings (a smoke run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.singles = 0.5, 200
    os.environ.setdefault("COLUMNS", "140")

    import torch

    from gateway.inference import EngineOptions, InferenceEngine, LoadedModel
    from gateway.model.data import load_scenarios
    from gateway.model.evaluation import measure_latency, measure_throughput
    from gateway.model.modeldir import load_student
    from gateway.model.tokenizer import FlowTokenizer
    from gateway.output import emit_json, emit_rows

    load_start = os.getloadavg()[0]
    records = [r for s in load_scenarios([args.data]) for r in s.records]
    model, tokenizer, _, meta = load_student(args.model)
    rng = np.random.default_rng(0)
    ids_all = tokenizer.encode(records)
    ids = ids_all[rng.permutation(len(ids_all))]
    rows: list[dict] = []

    # tokenising
    fresh = FlowTokenizer(tokenizer.hf, tokenizer.template)
    t = time.perf_counter()
    passes = 0
    while time.perf_counter() - t < args.seconds or passes == 0:
        fresh._cache.clear()
        fresh.encode(records)
        passes += 1
    cold = passes * len(records) / (time.perf_counter() - t)
    t = time.perf_counter()
    passes = 0
    while time.perf_counter() - t < args.seconds or passes == 0:
        fresh.encode(records)
        passes += 1
    warm = passes * len(records) / (time.perf_counter() - t)
    rows.append({"what": "tokenise (cache cold per pass)", "threads": 1, "flows_per_s": round(cold)})
    rows.append({"what": "tokenise (cache warm)", "threads": 1, "flows_per_s": round(warm)})

    def timed(name: str, run, threads: int) -> dict:
        lat = measure_latency(run, ids, n=args.singles)
        fps = measure_throughput(run, ids, batch=args.batch, min_seconds=args.seconds)
        return {"what": name, "threads": threads, "batch": args.batch, "flows_per_s": round(fps),
                "p50_ms": round(lat["p50_ms"], 3), "p99_ms": round(lat["p99_ms"], 3)}

    best = {}
    for threads in (1, 2):
        for int8 in (False, True):
            loaded = LoadedModel(args.model, EngineOptions(provider="cpu", precision="int8" if int8 else "fp32",
                                                           threads=threads, cache_size=0))
            row = timed(f"onnx {'int8' if int8 else 'fp32'}", loaded.logits, threads)
            rows.append(row)
            best.setdefault(row["what"], []).append(row)
        torch.set_num_threads(threads)

        def torch_run(x, _m=model):
            with torch.inference_mode():
                t_ids = torch.from_numpy(x)
                return _m(input_ids=t_ids, attention_mask=torch.ones_like(t_ids)).logits

        row = timed("torch eager", torch_run, threads)
        rows.append(row)
        best.setdefault("torch eager", []).append(row)

    rows.extend(session_variants(args.model, ids, timed))

    # the replay path: records in, verdicts out
    chunk = records[: 20_000] if len(records) >= 20_000 else records
    for cache in (True, False):
        engine = InferenceEngine(args.model, provider="cpu", cache_size=100_000 if cache else 0)
        engine.classify(chunk)
        t = time.perf_counter()
        n = 0
        while time.perf_counter() - t < args.seconds or n == 0:
            engine.classify(chunk)
            n += len(chunk)
        rows.append({"what": f"engine.classify (verdict cache {'on' if cache else 'off'})", "threads": 1,
                     "batch": len(chunk), "flows_per_s": round(n / (time.perf_counter() - t))})

    same_threads = {
        f"speedup_onnx_vs_torch ({t} thread{'s' if t > 1 else ''})":
            round(o["flows_per_s"] / max(1, tr["flows_per_s"]), 2)
        for t, o, tr in zip((1, 2), best["onnx fp32"], best["torch eager"])
    }
    onnx_best = max(r["flows_per_s"] for r in best["onnx fp32"])
    torch_best = max(r["flows_per_s"] for r in best["torch eager"])
    summary = {
        "model": str(args.model.resolve().relative_to(REPO_ROOT)) if args.model.resolve().is_relative_to(REPO_ROOT) else str(args.model),
        "version": meta["version"],
        "parameters": meta.get("parameters"),
        "prompt_length": tokenizer.length,
        "onnx_fp32_best_flows_per_s": onnx_best,
        "torch_eager_best_flows_per_s": torch_best,
        "speedup_onnx_vs_torch (best vs best)": round(onnx_best / torch_best, 2),
        **same_threads,
        "onnx_fp32_best_p99_ms": min(r["p99_ms"] for r in best["onnx fp32"]),
        "goals": "flows/s >= 20,000 at batch 256; >= 3x torch; single p99 <= 2 ms",
        "cpu_cores": os.cpu_count(),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    if args.json:
        emit_json({"summary": summary, "rows": rows})
    else:
        emit_rows(rows, ["what", "threads", "batch", "flows_per_s", "p50_ms", "p99_ms"], title="fedgate inference benchmark")
        emit_rows([{"item": k, "value": v} for k, v in summary.items()], ["item", "value"], title="summary")
    return 0


def session_variants(model_dir: Path, ids: np.ndarray, timed) -> list[dict]:
    """ORT session settings tried for the >= 3x-torch goal, each at 1 intra-op thread."""
    import onnxruntime as ort

    def session(name: str, *, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, mem=True, config=()):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        so.enable_mem_pattern = mem
        so.log_severity_level = 3
        for key, value in config:
            so.add_session_config_entry(key, value)
        return ort.InferenceSession(str(model_dir / name), so, providers=["CPUExecutionProvider"])

    def plain(sess):
        return lambda x: sess.run(None, {"input_ids": x})[0]

    def bound(sess):
        """IOBinding: the output array is allocated once per batch shape and reused."""
        outs: dict[tuple, np.ndarray] = {}
        binding = sess.io_binding()
        out_name, n_labels = sess.get_outputs()[0].name, sess.get_outputs()[0].shape[-1]

        def run(x):
            out = outs.get(x.shape)
            if out is None:
                out = outs[x.shape] = np.empty((x.shape[0], n_labels), np.float32)
            x = np.ascontiguousarray(x)
            binding.bind_cpu_input("input_ids", x)
            binding.bind_output(out_name, "cpu", 0, np.float32, out.shape, out.ctypes.data)
            sess.run_with_iobinding(binding)
            return out

        return run

    no_spin = (("session.intra_op.allow_spinning", "0"), ("session.set_denormal_as_zero", "1"))
    variants = [
        ("fp32 basic optimisation (no load-time fusions)",
         plain(session("model.onnx", level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC))),
        ("fp32 extended optimisation", plain(session("model.onnx", level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED))),
        ("fp32 mem pattern off", plain(session("model.onnx", mem=False))),
        ("fp32 no spinning, denormal=0", plain(session("model.onnx", config=no_spin))),
        ("fp32 IOBinding", bound(session("model.onnx"))),
        ("int8 no spinning, denormal=0", plain(session("model.int8.onnx", config=no_spin))),
    ]
    return [timed(f"ort variant: {name}", run, 1) for name, run in variants]


if __name__ == "__main__":
    sys.exit(main())
