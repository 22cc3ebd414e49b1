"""Soak run (not in CI, not in ``make bench``): a live tail at a fixed rate for 10 minutes,
memory and latency sampled every 10 s, plotted to a PNG.

The gateway service runs in this process (live tail, ONNX engine when a model is given,
SQLite store); a writer process appends IoT-23 lines at ``--rate`` lines/s
(:func:`benchmarks.live_latency.start_writer`).  Every ``--interval`` seconds it records
the service's resident memory (VmRSS), flows committed, and the p50/p99 of
line-appended -> committed latency over that interval.

    python -m benchmarks.soak                             # 10 min at 1,000 flows/s
    python -m benchmarks.soak --minutes 2 --rate 500 --out /tmp/soak.png

Verdict: memory is "flat" when its largest value after the warm-up (the first
``--warmup`` samples, default 12 = 2 minutes: the bounded caches fill during it, i.e.
SQLite's 64 MiB page cache and the engine's 100,000-prompt verdict cache) is at most 10%
above the value at the end of the warm-up.  The samples are also written as JSON beside
the PNG (``--out`` with ``.json``), and ``--replot FILE.json`` redraws a run's plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.live_latency import DEFAULT_MODEL, gateway_config, machine, percentile, start_writer

HERE = Path(__file__).resolve().parent


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(*, minutes: float, rate: int, interval_s: float, model: str | None, warmup: int,
         mqtt: bool = False) -> dict:
    from rich.progress import Progress

    from gateway.service import GatewayService

    samples: list[dict] = []
    window: list[float] = []
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="fedgate-soak-") as tmp:
        workdir = Path(tmp)
        (workdir / "conn.log").touch()
        broker = None
        if mqtt:  # alerts through the outbox to a real broker, as in production
            from cloud_aggregator.broker import LocalBroker

            broker = LocalBroker(workdir=workdir / "broker").start()
        cfg = gateway_config(workdir, model=model, poll_interval_s=0.01, mqtt_port=broker.port if broker else None)

        class ProbedService(GatewayService):
            def after_commit(self, source, records, verdicts):
                now = time.time()
                with lock:
                    window.extend(now - r.ts for r in records)
                super().after_commit(source, records, verdicts)

        service = ProbedService(cfg).start()
        total_s = minutes * 60
        writer = start_writer(workdir / "conn.log", rate=rate, count=int(rate * total_s))
        started = time.monotonic()
        with Progress() as progress:
            task = progress.add_task(f"soak at {rate} flows/s", total=total_s)
            while writer.poll() is None:
                time.sleep(interval_s)
                with lock:
                    lat, window[:] = list(window), []
                elapsed = time.monotonic() - started
                samples.append({"t_s": round(elapsed, 1), "rss_mib": round(rss_mib(), 1),
                                "flows": service.status()["flows"], "committed_in_window": len(lat),
                                "p50_ms": round(1000 * percentile(lat, 50), 1),
                                "p99_ms": round(1000 * percentile(lat, 99), 1)})
                progress.update(task, completed=min(total_s, elapsed),
                                description=f"soak: {samples[-1]['rss_mib']} MiB, p99 {samples[-1]['p99_ms']} ms")
        service.stop()
        if broker is not None:
            broker.stop()
    samples = [s for s in samples if s["committed_in_window"]]  # the idle tail after the writer ended
    return judge({"rate": rate, "minutes": minutes, "interval_s": interval_s,
                  "model": service.classifier.model_version if service.classifier else "none",
                  "mqtt": mqtt, "alerts": int(service.metrics.value("fedgate_gw_alerts_total")),
                  "samples": samples, "machine": machine()}, warmup)


def judge(result: dict, warmup: int) -> dict:
    """Memory after the warm-up, its largest growth after that, and the verdict."""
    samples = result["samples"]
    base = samples[min(warmup, len(samples)) - 1]["rss_mib"] if samples else float("nan")
    after = [s["rss_mib"] for s in samples[warmup:]] or [base]
    growth = max(after) / base - 1 if base == base and base > 0 else float("nan")
    return {**result, "warmup_samples": warmup, "rss_after_warmup_mib": base, "max_growth": round(growth, 4),
            "memory_flat": bool(growth <= 0.10)}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in result["samples"]]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(t, [s["rss_mib"] for s in result["samples"]], marker="o", color="#2c7be5")
    ax1.axvline(t[result["warmup_samples"] - 1] if len(t) >= result["warmup_samples"] else 0, color="#999",
                linestyle=":", label="end of warm-up")
    ax1.axhline(result["rss_after_warmup_mib"] * 1.10, color="#c0392b", linestyle="--", label="+10% of post-warm-up")
    ax1.set_ylabel("gateway RSS (MiB)")
    ax1.legend(loc="lower right")
    ax1.set_title(f"soak: live tail at {result['rate']} flows/s, model {result['model']}\n"
                  f"RSS growth after warm-up: max {100 * result['max_growth']:.1f}%", fontsize=10)
    ax2.plot(t, [s["p50_ms"] for s in result["samples"]], marker=".", label="p50")
    ax2.plot(t, [s["p99_ms"] for s in result["samples"]], marker=".", label="p99")
    ax2.set_ylabel("line -> committed (ms)")
    ax2.set_xlabel("minutes")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=1000, help="flows/s appended (default 1000)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    ap.add_argument("--warmup", type=int, default=12, help="samples counted as warm-up (default 12)")
    ap.add_argument("--replot", type=Path, help="redraw (and re-judge) a saved run's JSON instead of running")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory, or 'none'")
    ap.add_argument("--out", type=Path, default=HERE / "soak.png")
    ap.add_argument("--mqtt", action=argparse.BooleanOptionalAction, default=None,
                    help="local mosquitto + alerts through the outbox (default: when mosquitto is installed)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.replot:
        result = judge(json.loads(a.replot.read_text()), a.warmup)
        plot(result, a.out)
        print(f"memory after warm-up {result['rss_after_warmup_mib']} MiB, max growth "
              f"{100 * result['max_growth']:.1f}% -> {'flat' if result['memory_flat'] else 'GROWING'}; plot {a.out}")
        return 0
    model = None if a.model == "none" else a.model
    if model and not Path(model).is_dir():
        print(f"note: no model at {model}; soaking store-only (no classification)", file=sys.stderr)
        model = None
    if a.mqtt is None:
        from cloud_aggregator.broker import find_mosquitto

        a.mqtt = find_mosquitto() is not None
    result = soak(minutes=a.minutes, rate=a.rate, interval_s=a.interval, model=model, warmup=a.warmup,
                  mqtt=a.mqtt)
    plot(result, a.out)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    if a.json:
        print(json.dumps(result))
        return 0
    from gateway.output import emit_rows

    emit_rows(result["samples"], ["t_s", "rss_mib", "flows", "committed_in_window", "p50_ms", "p99_ms"],
              title=f"soak at {a.rate} flows/s ({result['machine']})")
    print(f"memory after warm-up {result['rss_after_warmup_mib']} MiB, max growth "
          f"{100 * result['max_growth']:.1f}% -> {'flat' if result['memory_flat'] else 'GROWING'}; plot {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
