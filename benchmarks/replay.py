"""Replay with classification: a >= 1,000,000-line conn.log into SQLite, end to end.

Builds an IoT-23-format log of ``--lines`` lines from ``data/iot23`` (the ingest
benchmark's log: data lines cycled, fresh uids; with ``--jitter`` (default) the byte and duration fields of each line are
scaled by a random factor in [0.8, 1.25], so prompts vary like real traffic and the
engine's caches cannot simply replay 43k known answers), then times
``gateway.ingest.replay`` — what ``fedgate replay`` runs — into a fresh SQLite file:

* ``store only``: no classifier (parse + store);
* ``classify (cache on)``: the default engine on the model directory;
* ``classify (cache off)``: verdict cache off, every distinct prompt of a batch
  through ONNX Runtime (tokeniser cache still on).

    python -m benchmarks.replay                      # 1,000,000 lines, models/default
    python -m benchmarks.replay --lines 200000 --json
    python -m benchmarks.replay --quick

The development box's 2 cores are shared with other engineers' jobs: figures are
pessimistic, and the table shows the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# zero-based columns of an IoT-23 line that the jitter scales (duration, bytes)
JITTER_FLOAT = (8,)
JITTER_INT = (9, 10, 17, 19)


def build_log(out: Path, lines: int, data_dir: Path, *, jitter: bool, seed: int = 0) -> int:
    """The ingest benchmark's log (IoT-23 lines cycled, fresh uids), then, with
    ``jitter``, each line's duration and byte counts scaled by a random factor."""
    from benchmarks.ingest import build_conn_log

    if not jitter:
        return build_conn_log(out, lines, data_dir=data_dir)
    plain = out.with_name(out.name + ".plain")
    build_conn_log(plain, lines, data_dir=data_dir)
    rnd = random.Random(seed)
    with open(plain, "rb") as src, open(out, "wb") as dst:
        chunk: list[bytes] = []
        for raw in src:
            if not raw.startswith(b"#"):
                cols = raw.rstrip(b"\n").split(b"\t")
                for c in JITTER_FLOAT:
                    if cols[c] != b"-":
                        cols[c] = b"%.6f" % (float(cols[c]) * rnd.uniform(0.8, 1.25))
                for c in JITTER_INT:
                    if cols[c] != b"-":
                        cols[c] = b"%d" % int(int(cols[c]) * rnd.uniform(0.8, 1.25))
                raw = b"\t".join(cols) + b"\n"
            chunk.append(raw)
            if len(chunk) >= 50_000:
                dst.write(b"".join(chunk))
                chunk = []
        dst.write(b"".join(chunk))
    plain.unlink()
    return out.stat().st_size


def run_replay(log: Path, db: Path, classifier, batch_size: int):
    from gateway.ingest import replay
    from gateway.store.db import open_store

    engine, factory = open_store(f"sqlite:///{db}")
    try:
        c0 = time.process_time()
        summary = replay([log], session_factory=factory, classifier=classifier, batch_size=batch_size)
        return summary, time.process_time() - c0
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "default")
    ap.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "iot23")
    ap.add_argument("--batch-size", type=int, default=None, help="records per transaction [replay's default]")
    ap.add_argument("--no-jitter", action="store_true", help="cycle the IoT-23 lines unchanged")
    ap.add_argument("--skip-store-only", action="store_true")
    ap.add_argument("--skip-cache-off", action="store_true")
    ap.add_argument("--quick", action="store_true", help="50,000 lines")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.lines = 50_000
    os.environ.setdefault("COLUMNS", "140")

    from rich.console import Console

    from gateway.ingest import DEFAULT_BATCH_SIZE
    from gateway.inference import InferenceEngine
    from gateway.output import emit_json, emit_rows

    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    console = Console(stderr=True)
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="fedgate-replay-bench-"))
    rows = []
    try:
        log = work / "conn.log.labeled"
        with console.status(f"building a {args.lines:,}-line log"):
            size = build_log(log, args.lines, args.data, jitter=not args.no_jitter)
        variants = []
        if not args.skip_store_only:
            variants.append(("store only (no model)", None))
        variants.append(("classify (cache on)", lambda: InferenceEngine(args.model, provider="cpu")))
        if not args.skip_cache_off:
            variants.append(("classify (cache off)", lambda: InferenceEngine(args.model, provider="cpu", cache_size=0)))
        for i, (name, make) in enumerate(variants):
            classifier = make() if make else None
            with console.status(f"replay: {name}"):
                summary, cpu = run_replay(log, work / f"b{i}.db", classifier, batch_size)
            rows.append({
                "run": name,
                "records": summary.records,
                "stored": summary.stored,
                "detections": summary.detections,
                "wall_s": round(summary.elapsed_s, 1),
                "flows_per_s": round(summary.records / summary.elapsed_s),
                "cpu_s": round(cpu, 1),
                "accuracy_vs_labels": None if summary.accuracy is None else round(summary.accuracy, 5),
                "goal": 10_000 if classifier else None,
            })
            (work / f"b{i}.db").unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = {
        "lines": args.lines, "log_mib": round(size / 2**20, 1), "jitter": not args.no_jitter,
        "batch_size": batch_size, "model": str(args.model.resolve().relative_to(REPO_ROOT)) if args.model.resolve().is_relative_to(REPO_ROOT) else str(args.model), "cpu_cores": os.cpu_count(),
        "load_avg_1m_start": round(load_start, 2), "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    if args.json:
        emit_json({"machine": machine, "rows": rows})
    else:
        emit_rows(rows, title="fedgate replay benchmark (SQLite, end to end)")
        emit_rows([{"item": k, "value": v} for k, v in machine.items()], ["item", "value"], title="run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
