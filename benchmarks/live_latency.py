"""Live tail latency: from a line appended to conn.log to its detection committed.

A writer process appends IoT-23 conn lines (fresh uids, ``ts`` = the wall-clock time of
the write) to a conn.log at a fixed rate; the gateway service (in this process, the
real :class:`gateway.service.GatewayService` with its live tail, ONNX engine and SQLite
store) follows it.  For every record, latency = the time its batch's transaction
(flows + detections + tail position) committed minus the ``ts`` written in its line.

    python -m benchmarks.live_latency                     # 1,000 and 5,000 flows/s, 20 s each
    python -m benchmarks.live_latency --quick             # 5 s each
    python -m benchmarks.live_latency --rates 1000 --seconds 60 --json
    python -m benchmarks.live_latency --model none        # no classification (store only)
    python -m benchmarks.live_latency --no-mqtt           # no broker, no alerts

With mosquitto installed (the default then) a local broker is started and the gateway
publishes alerts through its durable outbox, as in production.

The writer is also what the fault drills and the soak run use to put load on a live
log (``python -m benchmarks.live_latency write --path conn.log --rate 500 --count 5000``).

Target: p99 <= 50 ms at 1,000 flows/s.  The machine's cores are shared with whatever
else runs (the table prints the load average): figures are pessimistic on a busy box.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data" / "iot23"
DEFAULT_MODEL = REPO_ROOT / "models" / "default"
TICK_S = 0.005  # the writer appends a chunk every 5 ms


# ---------------------------------------------------------------- the load writer


def templates(data_dir: Path = DATA_DIR) -> tuple[list[bytes], list[list[bytes]]]:
    """IoT-23 header lines (without #close) and data lines split into fields."""
    from benchmarks.ingest import iot23_templates

    return iot23_templates(data_dir)


def make_line(fields: list[bytes], uid: str, ts: float) -> bytes:
    out = list(fields)
    out[0] = b"%.6f" % ts
    out[1] = uid.encode()
    return b"\t".join(out) + b"\n"


def write_at_rate(path: Path, *, rate: float, count: int, uid_offset: int = 0, rotate_every: int = 0,
                  stop: threading.Event | None = None) -> int:
    """Append ``count`` lines to ``path`` at ``rate`` lines/s (header first if the file is
    new).  ``rotate_every`` > 0 renames the log Zeek-style (``conn.log`` ->
    ``conn.log.<n>``) after that many lines and starts a new one.  Returns lines written."""
    from benchmarks.ingest import fresh_uid

    header, body = templates()
    head = b"\n".join(header) + b"\n"
    fh = open(path, "ab")
    if fh.tell() == 0:
        fh.write(head)
        fh.flush()
    written, rotations = 0, 0
    started = time.perf_counter()
    try:
        while written < count and not (stop and stop.is_set()):
            due = min(count, int((time.perf_counter() - started) * rate) + 1)
            chunk = []
            while written < due:
                chunk.append(make_line(body[(uid_offset + written) % len(body)], fresh_uid(uid_offset + written),
                                       time.time()))
                written += 1
                if rotate_every and written % rotate_every == 0 and written < count:
                    fh.write(b"".join(chunk))
                    chunk = []
                    fh.close()
                    rotations += 1
                    os.replace(path, f"{path}.{rotations}")
                    fh = open(path, "ab")
                    fh.write(head)
            if chunk:
                fh.write(b"".join(chunk))
                fh.flush()
            time.sleep(TICK_S)
    finally:
        fh.close()
    return written


def start_writer(path: Path, *, rate: float, count: int, uid_offset: int = 0, rotate_every: int = 0
                 ) -> subprocess.Popen:
    """The writer as its own process (a real, killable load source)."""
    cmd = [sys.executable, "-m", "benchmarks.live_latency", "write", "--path", str(path), "--rate", str(rate),
           "--count", str(count), "--uid-offset", str(uid_offset), "--rotate-every", str(rotate_every)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT)


# ---------------------------------------------------------------- the measurement


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[k]


def gateway_config(workdir: Path, *, model: str | None, poll_interval_s: float, batch_size: int = 256,
                   threads: int | None = None, mqtt_port: int | None = None):
    from gateway.config import config_from_dict

    doc = {
        "gateway": {"id": "bench", "database": f"sqlite:///{workdir / 'gw.db'}"},
        "source": {"zeek_log": str(workdir / "conn.log"), "poll_interval_s": poll_interval_s},
        "inference": {"batch_size": batch_size, **({"threads": threads} if threads else {})},
        "mqtt": {"enabled": mqtt_port is not None, "port": mqtt_port or 1883},
        "fl": {"enabled": False},
        "http": {"listen": ""},
    }
    doc["gateway"]["model"] = model or "none"  # none: store only (the bundled model is the default)
    return config_from_dict(doc)


class LatencyProbe:
    """Records commit time minus line ``ts`` for every committed record."""

    def __init__(self, warmup_s: float):
        self.latencies: list[float] = []
        self.records = 0
        self.warmup_until = time.time() + warmup_s

    def __call__(self, records, now: float) -> None:
        self.records += len(records)
        if now >= self.warmup_until:
            self.latencies.extend(now - r.ts for r in records)


def measure(rate: int, seconds: float, *, model: str | None, poll_interval_s: float = 0.01,
            warmup_s: float = 1.0, threads: int | None = None, workdir_root: str | None = None,
            mqtt: bool = False) -> dict:
    from gateway.service import GatewayService

    with tempfile.TemporaryDirectory(prefix="fedgate-live-", dir=workdir_root) as tmp:
        workdir = Path(tmp)
        (workdir / "conn.log").touch()
        broker = None
        if mqtt:  # alerts then go through the durable outbox to a real broker, as in production
            from cloud_aggregator.broker import LocalBroker

            broker = LocalBroker(workdir=workdir / "broker").start()
        cfg = gateway_config(workdir, model=model, poll_interval_s=poll_interval_s, threads=threads,
                             mqtt_port=broker.port if broker else None)
        probe = LatencyProbe(warmup_s)

        class ProbedService(GatewayService):
            def after_commit(self, source, records, verdicts):
                probe(records, time.time())
                super().after_commit(source, records, verdicts)

        service = ProbedService(cfg).start()
        count = int(rate * seconds)
        writer = start_writer(workdir / "conn.log", rate=rate, count=count)
        started = time.perf_counter()
        writer.wait()
        write_s = time.perf_counter() - started
        deadline = time.monotonic() + 30
        while probe.records < count and time.monotonic() < deadline:
            time.sleep(0.05)
        service.stop()
        if broker is not None:
            broker.stop()
        lat = probe.latencies
        return {
            "rate": rate, "seconds": seconds, "warmup_s": warmup_s, "lines": count, "committed": probe.records,
            "offered_per_s": round(count / write_s, 1),
            "model": service.classifier.model_version if service.classifier else "none",
            "p50_ms": round(1000 * percentile(lat, 50), 1), "p99_ms": round(1000 * percentile(lat, 99), 1),
            "max_ms": round(1000 * max(lat), 1) if lat else None,
            "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None,
            "inference_batches": int(service.metrics.value("fedgate_gw_inference_seconds_count")),
            "alerts": int(service.metrics.value("fedgate_gw_alerts_total")), "mqtt": mqtt,
        }


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["write"]:
        p = argparse.ArgumentParser(prog="live_latency write")
        p.add_argument("--path", required=True, type=Path)
        p.add_argument("--rate", type=float, required=True)
        p.add_argument("--count", type=int, required=True)
        p.add_argument("--uid-offset", type=int, default=0)
        p.add_argument("--rotate-every", type=int, default=0)
        a = p.parse_args(argv[1:])
        write_at_rate(a.path, rate=a.rate, count=a.count, uid_offset=a.uid_offset, rotate_every=a.rotate_every)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="1000,5000", help="flows/s to measure, comma separated")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of load per rate")
    p.add_argument("--quick", action="store_true", help="5 s per rate (what make bench runs)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory, or 'none' to store only")
    p.add_argument("--poll", type=float, default=0.01, help="tail poll interval in seconds")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads ([inference] threads)")
    p.add_argument("--mqtt", action=argparse.BooleanOptionalAction, default=None,
                   help="start a local mosquitto (broker_config/dev.conf) so alerts go through the outbox to "
                        "a broker, as in production (default: when mosquitto is installed)")
    p.add_argument("--workdir", default=None, help="where the log and the SQLite store go (default: $TMPDIR)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds left out at the start (default 1 with --quick, else 5): the engine's "
                        "verdict cache and SQLite's page cache are cold then")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    seconds = 5.0 if a.quick else a.seconds
    model = None if a.model == "none" else a.model
    if model and not Path(model).is_dir():
        print(f"note: no model at {model}; measuring store-only latency (no classification)", file=sys.stderr)
        model = None
    warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else 5.0)
    if a.mqtt is None:
        from cloud_aggregator.broker import find_mosquitto

        a.mqtt = find_mosquitto() is not None
    rows = [measure(int(r), seconds, model=model, poll_interval_s=a.poll, threads=a.threads, workdir_root=a.workdir,
                    warmup_s=warmup, mqtt=a.mqtt) for r in a.rates.split(",")]
    info = machine()
    if a.json:
        print(json.dumps({"machine": info, "results": rows}))
        return 0
    from gateway.output import emit_rows

    shown = [{"flows/s": r["rate"], "s": r["seconds"], "committed": r["committed"], "offered/s": r["offered_per_s"],
              "p50 ms": r["p50_ms"], "p99 ms": r["p99_ms"], "max ms": r["max_ms"],
              "batches": r["inference_batches"], "alerts": r["alerts"] if r["mqtt"] else "-"} for r in rows]
    emit_rows(shown, title=f"live tail latency, line appended -> detection committed; model {rows[0]['model']}; "
                           f"warm-up {warmup:g} s left out (cpus {info['cpus']}, load {info['load_avg_1m']}, "
                           f"python {info['python']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
