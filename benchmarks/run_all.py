"""``make bench``: every benchmark in ``benchmarks/`` in quick mode, one Markdown report.

Each benchmark runs as its own process (``python -m benchmarks.<name> ...``) with small
sizes: a benchmark whose source offers ``--quick`` gets it; the others get the small
arguments listed in ``QUICK_ARGS``; one with neither is listed as not run (add it to
``QUICK_ARGS``).  ``soak`` is never run here (it takes 10 minutes by design).

The report, ``benchmarks/RESULTS.md`` (or ``--out``), starts with the machine (CPU model,
cores, memory, load average at the start, Python, commit), then a table of
benchmark / command / seconds / exit status, then each benchmark's own printed tables.

    python -m benchmarks.run_all                        # all, writes benchmarks/RESULTS.md
    python -m benchmarks.run_all --only ingest,live_latency
    python -m benchmarks.run_all --list                 # what would run, with which arguments

Quick sizes measure that things work and roughly how fast; the full-size figures come
from running a benchmark on its own without ``--quick``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
NEVER = {"run_all", "soak", "__init__", "__main__"}
TIMEOUT_S = 600

# Small sizes for benchmarks without a --quick flag of their own.
QUICK_ARGS: dict[str, list[str]] = {
    "ingest": ["--lines", "50000", "--batch-size", "10000"],
    "parse": ["--lines", "100000", "--json-lines", "20000"],
    "pcap": ["--packets", "50000", "--scapy-slice", "2000", "--tools", "fedgate-w1,fedgate-auto,nfstream,dpkt,scapy",
             "--table-full", "100000", "--table-packets", "50000"],
    "aggregate": ["--params", "50000", "--clients", "40", "--memory-clients", "10,40", "--submissions", "2"],
    "broker_tls": ["--connects", "10", "--issue-ec", "10", "--issue-rsa", "2", "--sizes", "100000,1000000",
                   "--repeats", "2"],
    "zeek_conformance": [],
}


def discover() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NEVER and not p.stem.startswith("_"))


def quick_args(name: str) -> list[str] | None:
    """The arguments for a quick run, or None when no quick mode is known."""
    source = (HERE / f"{name}.py").read_text(errors="replace")
    if re.search(r"""["']--quick["']""", source):
        return ["--quick"]
    return QUICK_ARGS.get(name)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "?"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_details() -> dict[str, str]:
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    return {
        "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": _cpu_model(),
        "cores": f"{usable} usable of {cores}",
        "memory": _memory_gib(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "commit": _commit(),
    }


def run_one(name: str, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    started = time.perf_counter()
    env = {**os.environ, "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
    try:
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        code, stdout, stderr = out.returncode, out.stdout, out.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = "timeout", exc.stdout or "", f"killed after {TIMEOUT_S}s"
        stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
    return {"name": name, "command": "python -m benchmarks." + " ".join([name, *args]),
            "seconds": round(time.perf_counter() - started, 1), "exit": code, "stdout": stdout, "stderr": stderr}


def report(machine: dict[str, str], results: list[dict], skipped: list[str]) -> str:
    lines = ["# Benchmark results (`make bench`, quick mode)", "",
             "Produced by `python -m benchmarks.run_all`. Quick sizes: figures show that each path works and",
             "its rough speed; full-size figures come from running a benchmark alone without its quick",
             "arguments. The cores were shared with other work when this ran (see the load average).", "",
             "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    lines += ["", "| benchmark | command | seconds | exit |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | `{r['command']}` | {r['seconds']} | {r['exit']} |" for r in results]
    lines += [f"| {name} | (no quick mode known: add it to QUICK_ARGS) | - | not run |" for name in skipped]
    for r in results:
        lines += ["", f"## {r['name']}", "", f"`{r['command']}`", "", "```", r["stdout"].rstrip() or "(no output)"]
        if r["exit"] != 0:
            lines += ["", "stderr (last lines):", *r["stderr"].rstrip().splitlines()[-15:]]
        lines += ["```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--list", action="store_true", help="show what would run and exit")
    a = ap.parse_args(argv)
    names = discover()
    if a.only:
        wanted = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"unknown benchmarks {unknown}; known: {', '.join(names)}")
        names = wanted
    plan = [(n, quick_args(n)) for n in names]
    if a.list:
        for n, args in plan:
            print(f"{n:20s} {'not run (no quick mode)' if args is None else ' '.join(args) or '(no arguments)'}")
        return 0
    machine = machine_details()
    console = Console(stderr=True)
    results, skipped = [], [n for n, args in plan if args is None]
    runnable = [(n, args) for n, args in plan if args is not None]
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("benchmarks", total=len(runnable))
        for name, args in runnable:
            progress.update(task, description=f"benchmarks: {name}")
            r = run_one(name, args)
            results.append(r)
            progress.console.print(f"{name}: exit {r['exit']} in {r['seconds']}s")
            progress.advance(task)
    a.out.write_text(report(machine, results, skipped))
    console.print(f"wrote {a.out}")
    failed = [r["name"] for r in results if r["exit"] != 0]
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
