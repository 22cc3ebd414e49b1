"""Ingest throughput: parse-only, parse+store into SQLite, parse+store into PostgreSQL.

Builds a conn.log of ``--lines`` lines (default 1,000,000) in a temporary directory from
the IoT-23 scenarios in ``data/iot23`` (their data lines cycled, each with a fresh uid so
every line is a new flow), then times:

* parse: ``gateway.flows.zeek.iter_record_batches`` over the file;
* sqlite: ``gateway.ingest.replay`` into a fresh SQLite file (WAL) — parse + store;
* postgresql: the same into a fresh schema of ``--pg-url`` (dropped afterwards).

    python -m benchmarks.ingest                 # table
    python -m benchmarks.ingest --lines 200000 --json
    python -m benchmarks.ingest --skip-pg

Numbers depend on the machine and on what else runs on it: the table names the cores
and the load average, and gives records per CPU-second of this process beside records
per wall-clock second (on a shared box the CPU figure is the steadier one; for
PostgreSQL it leaves out the server's own CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data" / "iot23"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def fresh_uid(n: int) -> str:
    """A Zeek-looking uid ("C" + 17 base-62 digits) unique for each n."""
    digits = []
    for _ in range(17):
        n, r = divmod(n, 62)
        digits.append(_ALPHABET[r])
    return "C" + "".join(reversed(digits))


def iot23_templates(data_dir: Path = DATA_DIR, *, maxsplit: int = -1) -> tuple[list[bytes], list[list[bytes]]]:
    """IoT-23 header lines (first file's, without #close) and every data line split on tabs
    (at most ``maxsplit`` times): the material the load-building benchmarks reuse."""
    files = sorted(data_dir.glob("*/conn.log.labeled"))
    if not files:
        raise SystemExit(f"no IoT-23 logs under {data_dir}")
    header: list[bytes] = []
    body: list[list[bytes]] = []
    for i, f in enumerate(files):
        for raw in f.read_bytes().splitlines():
            if raw.startswith(b"#"):
                if i == 0 and not raw.startswith(b"#close"):
                    header.append(raw)
            elif raw:
                body.append(raw.split(b"\t", maxsplit))
    return header, body


def build_conn_log(out: Path, lines: int, *, data_dir: Path = DATA_DIR, uid_offset: int = 0) -> int:
    """Write an IoT-23-format conn.log of ``lines`` data lines with fresh uids; returns bytes."""
    header, body = iot23_templates(data_dir, maxsplit=2)
    with open(out, "wb") as fh:
        fh.write(b"\n".join(header) + b"\n")
        chunk: list[bytes] = []
        for n in range(lines):
            ts, _uid, rest = body[n % len(body)]
            chunk.append(b"%s\t%s\t%s\n" % (ts, fresh_uid(uid_offset + n).encode(), rest))
            if len(chunk) >= 50_000:
                fh.write(b"".join(chunk))
                chunk = []
        fh.write(b"".join(chunk))
        fh.write(b"#close\t2026-01-01-00-00-00\n")
    return out.stat().st_size


def bench_parse(path: Path) -> tuple[int, float, float]:
    """(records, wall seconds, CPU seconds of this process)."""
    from gateway.flows.zeek import iter_record_batches

    c0, t0 = time.process_time(), time.perf_counter()
    n = 0
    for batch in iter_record_batches(path):
        n += len(batch)
    return n, time.perf_counter() - t0, time.process_time() - c0


def bench_store(path: Path, url: str, batch_size: int) -> tuple[int, int, float, float]:
    """(records, stored, wall seconds, CPU seconds of this process) of one replay."""
    from gateway.ingest import replay
    from gateway.store.db import open_store

    engine, factory = open_store(url)
    try:
        c0 = time.process_time()
        summary = replay([path], session_factory=factory, batch_size=batch_size)
        cpu = time.process_time() - c0
    finally:
        engine.dispose()
    if summary.rejected_total:
        print(f"warning: {summary.rejected_total} lines rejected: {summary.rejected}", file=sys.stderr)
    return summary.records, summary.stored, summary.elapsed_s, cpu


def result_row(phase: str, backend: str, n: int, stored, wall: float, cpu: float, goal) -> dict:
    return {"phase": phase, "backend": backend, "records": n, "stored": stored,
            "wall_s": round(wall, 2), "rec_per_s": round(n / wall),
            "cpu_s": round(cpu, 2), "rec_per_cpu_s": round(n / cpu) if cpu > 0 else None,
            "goal_rec_per_s": goal}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000, help="data lines in the built log (default 1,000,000)")
    ap.add_argument("--batch-size", type=int, default=50_000, help="records per transaction (default 50,000)")
    ap.add_argument("--pg-url", default=os.environ.get("FEDGATE_TEST_PG", DEFAULT_PG))
    ap.add_argument("--skip-pg", action="store_true", help="leave PostgreSQL out")
    ap.add_argument("--keep", type=Path, default=None, help="build the log in this directory and keep it")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    # A piped table (quoted in reports) keeps every column: rich reads COLUMNS.
    os.environ.setdefault("COLUMNS", "120")

    from rich.console import Console

    from gateway.output import emit_json, emit_rows

    console = Console(stderr=True)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="fedgate-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        log_path = workdir / "conn.log.labeled"
        with console.status(f"building a {args.lines:,}-line conn.log in {workdir}"):
            size = build_conn_log(log_path, args.lines)
        with console.status("parse only"):
            n, wall, cpu = bench_parse(log_path)
        rows.append(result_row("parse", "-", n, None, wall, cpu, 250_000))
        with console.status("parse + store into SQLite"):
            n, stored, wall, cpu = bench_store(log_path, f"sqlite:///{workdir / 'bench.db'}", args.batch_size)
        rows.append(result_row("parse+store", "sqlite", n, stored, wall, cpu, 50_000))
        if not args.skip_pg:
            rows.append(_bench_pg(console, log_path, args))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine = {
        "cpu_cores": os.cpu_count(),
        "load_avg_1m_at_start": round(load1, 2) if load1 is not None else None,
        "load_avg_1m_at_end": round(load_end, 2) if load_end is not None else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "log_lines": args.lines,
        "log_mib": round(size / 2**20, 1),
        "batch_size": args.batch_size,
    }
    if args.json:
        emit_json({"machine": machine, "results": rows})
    else:
        emit_rows(rows, ["phase", "backend", "records", "wall_s", "rec_per_s", "cpu_s",
                         "rec_per_cpu_s", "goal_rec_per_s"], title="fedgate ingest benchmark")
        emit_rows([{"item": k, "value": v} for k, v in machine.items()], ["item", "value"], title="machine")
    return 0


def _bench_pg(console, log_path: Path, args) -> dict:
    from sqlalchemy import create_engine, text

    schema = f"fedgate_bench_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(args.pg_url, connect_args={"connect_timeout": 5})
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - reported in the table instead
        print(f"PostgreSQL left out: {str(exc).splitlines()[0]}", file=sys.stderr)
        return {"phase": "parse+store", "backend": "postgresql (unreachable)"}
    sep = "&" if "?" in args.pg_url else "?"
    url = f"{args.pg_url}{sep}options={quote(f'-csearch_path={schema}')}"
    try:
        with console.status("parse + store into PostgreSQL"):
            n, stored, wall, cpu = bench_store(log_path, url, args.batch_size)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
    # cpu_s counts this process only; the PostgreSQL server's own work is not in it.
    return result_row("parse+store", "postgresql", n, stored, wall, cpu, None)


if __name__ == "__main__":
    sys.exit(main())
