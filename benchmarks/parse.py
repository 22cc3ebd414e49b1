"""Zeek conn.log parse throughput, per format: records/s by wall clock and by CPU time.

Builds an IoT-23-format conn.log of ``--lines`` lines (default 1,000,000) from
``data/iot23`` with a fresh uid on every line (``benchmarks.ingest.build_conn_log``,
shared with the ingest benchmark), derives the other formats from it, and times
``gateway.flows.zeek.iter_record_batches`` over each:

* iot23-tsv: the built file (IoT-23 ``conn.log.labeled`` layout);
* zeek-tsv: the same records written by ``ZeekTsvWriter`` in Zeek's own layout;
* iot23-tsv.gz: the built file gzip-compressed (level 6, as Zeek's archiver);
* zeek-json: ``--json-lines`` lines (default 200,000) of Zeek JSON.

    python -m benchmarks.parse                  # table
    python -m benchmarks.parse --lines 200000 --json
    python -m benchmarks.parse --repeat 3       # best of three runs per format

CPU seconds are this process's user+system time: on a box shared with other work they
are a fairer figure than wall seconds, though cache contention still lowers both.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/parse.py` as well as `-m`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.ingest import build_conn_log  # noqa: E402 - the one log builder

GOAL_PER_S = 250_000


def time_parse(path: Path, repeat: int) -> dict:
    from gateway.flows.zeek import ZeekLogParser, iter_record_batches

    best: dict | None = None
    for _ in range(repeat):
        parser = ZeekLogParser(source_name=str(path))
        wall0, cpu0 = time.perf_counter(), time.process_time()
        n = 0
        for batch in iter_record_batches(path, parser=parser):
            n += len(batch)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        run = {"records": n, "rejected": parser.rejected, "wall_s": wall, "cpu_s": cpu}
        if best is None or wall < best["wall_s"]:
            best = run
    assert best is not None
    return best


def derive_formats(src: Path, workdir: Path, json_lines: int, console) -> dict[str, Path]:
    from gateway.flows.zeek import LogHeader, ZeekTsvWriter, iter_record_batches

    paths = {"iot23-tsv": src}
    zeek_path = workdir / "conn.log"
    json_path = workdir / "conn.json.log"
    gz_path = workdir / "conn.log.labeled.gz"
    with console.status("writing the Zeek TSV and JSON copies"):
        with open(zeek_path, "wb") as out, open(json_path, "w") as jout:
            writer = ZeekTsvWriter(out, header=LogHeader.zeek_conn(labelled=True))
            left = json_lines
            for batch in iter_record_batches(src):
                writer.write(batch)
                for rec in batch[: max(left, 0)]:
                    jout.write(json.dumps(_json_obj(rec)) + "\n")
                left -= len(batch)
            writer.close()
    with console.status("gzip-compressing the IoT-23 copy"):
        with open(src, "rb") as fin, gzip.open(gz_path, "wb", compresslevel=6) as gout:
            shutil.copyfileobj(fin, gout, 1 << 20)
    paths.update({"zeek-tsv": zeek_path, "iot23-tsv.gz": gz_path, "zeek-json": json_path})
    return paths


def _json_obj(rec) -> dict:
    from gateway.flows.record import COLUMN_BY_FIELD

    obj = {}
    for name, value in zip(rec._fields, rec):
        if name == "extra" or value is None:
            continue
        obj[COLUMN_BY_FIELD[name]] = list(value) if isinstance(value, tuple) else value
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000, help="data lines (default 1,000,000)")
    ap.add_argument("--json-lines", type=int, default=200_000, help="lines of the JSON copy (default 200,000)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per format; the fastest is shown")
    ap.add_argument("--keep", type=Path, default=None, help="build the logs in this directory and keep them")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.lines < 1 or args.repeat < 1 or args.json_lines < 0:
        ap.error("--lines and --repeat must be >= 1, --json-lines >= 0")

    from rich.console import Console

    from gateway.output import emit_json, emit_rows

    console = Console(stderr=True)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="fedgate-parse-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        src = workdir / "conn.log.labeled"
        with console.status(f"building a {args.lines:,}-line conn.log in {workdir}"):
            build_conn_log(src, args.lines)
        paths = derive_formats(src, workdir, args.json_lines, console)
        for fmt, path in paths.items():
            with console.status(f"parsing {fmt}"):
                r = time_parse(path, args.repeat)
            rows.append({
                "format": fmt,
                "records": r["records"],
                "bad": r["rejected"],
                "MiB": round(path.stat().st_size / 2**20, 1),
                "wall_s": round(r["wall_s"], 2),
                "cpu_s": round(r["cpu_s"], 2),
                "rec/s_wall": round(r["records"] / r["wall_s"]),
                "rec/s_cpu": round(r["records"] / r["cpu_s"]) if r["cpu_s"] else None,
                "goal/s": GOAL_PER_S if fmt != "zeek-json" else None,
            })  # fmt: skip
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = {
        "cpu_cores": os.cpu_count(),
        "load_avg_1m_at_start": round(load1, 2) if load1 is not None else None,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "repeat": args.repeat,
    }
    if args.json:
        emit_json({"machine": machine, "results": rows})
    else:
        emit_rows(rows, list(rows[0]), title="Zeek conn.log parse throughput (one process, one core)")
        emit_rows([{"item": k, "value": v} for k, v in machine.items()], ["item", "value"], title="machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
