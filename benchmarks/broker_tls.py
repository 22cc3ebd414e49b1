"""Production broker costs: certificate issuance, mutual-TLS connection set-up (accepted
and refused), and model-sized payloads through the TLS broker with the ACL on.

It starts a real mosquitto from broker_config/production.conf (through the same helper
the security tests use, tests/prodbroker.py) with certificates from gateway.certs, on a
free loopback port, and measures:

* ``issue``: one key + certificate + index update (ECDSA P-256, RSA-3072);
* ``connect``: TCP + TLS handshake with client certificate + MQTT CONNECT/CONNACK;
* ``refused``: how long a revoked certificate takes to be turned away;
* ``deliver``: aggregator publishes QoS 1 on the global topic, a gateway receives it:
  latency and throughput per payload size (both hops TLS, both ends on this machine).

    python -m benchmarks.broker_tls
    python -m benchmarks.broker_tls --connects 50 --json

The machine's cores are shared with other work while this runs, so figures are a floor.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for extra in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from gateway.certs import CertificateAuthority  # noqa: E402
from gateway.output import emit_json, emit_rows  # noqa: E402
from prodbroker import PREFIX, Client, Pki, start_production_broker, tls_probe  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _row(what: str, unit: str, samples: list[float], **extra) -> dict:
    return {"measure": what, "n": len(samples), "p50": _pct(samples, 0.5),
            "p95": _pct(samples, 0.95), "mean": statistics.fmean(samples), "unit": unit, **extra}


def bench_issue(root: Path, n_ec: int, n_rsa: int) -> list[dict]:
    ca = CertificateAuthority.init(root / "issue-ca")
    rows = []
    for key_type, n in (("ec", n_ec), ("rsa", n_rsa)):
        times = []
        for i in range(n):
            t = time.perf_counter()
            ca.issue_gateway(f"{key_type}{i}", key_type=key_type)
            times.append((time.perf_counter() - t) * 1000)
        rows.append(_row(f"issue gateway certificate ({key_type})", "ms", times))
    return rows


def bench_broker(root: Path, connects: int, sizes: list[int], repeats: int) -> list[dict]:
    ca = CertificateAuthority.init(root / "ca")
    pki = Pki(root=root, ca=ca)
    for issued in (ca.issue_gateway("bench-gw"), ca.issue_gateway("bench-revoked"),
                   ca.issue_aggregator(), ca.issue_broker("localhost", ip_addresses=["127.0.0.1"])):
        pki.bundles[issued.bundle] = ca.bundle_dir(issued.bundle)
    ca.revoke("gateway-bench-revoked")
    broker = start_production_broker(pki, root / "broker")
    rows = []
    try:
        times = []
        for i in range(connects):
            c = Client(broker.port, client_id=f"bench-{i}", ca=pki.ca_file(),
                       cert=pki.cert("gateway-bench-gw"), key=pki.key("gateway-bench-gw"))
            t = time.perf_counter()
            ok = c.connect(timeout=10)
            times.append((time.perf_counter() - t) * 1000)
            c.close()
            if not ok:
                raise RuntimeError(f"connect failed: {c.error} {c.connect_reason}")
        rows.append(_row("mTLS connect + CONNACK", "ms", times))

        times = []
        for _ in range(max(5, connects // 3)):
            t = time.perf_counter()
            _, alert = tls_probe(broker.port, ca=pki.ca_file(), cert=pki.cert("gateway-bench-revoked"),
                                 key=pki.key("gateway-bench-revoked"))
            times.append((time.perf_counter() - t) * 1000)
            if "revoked" not in alert:
                raise RuntimeError(f"revoked certificate not refused: {alert!r}")
        rows.append(_row("revoked certificate refused", "ms", times))

        sub = Client(broker.port, client_id="bench-sub", ca=pki.ca_file(),
                     cert=pki.cert("gateway-bench-gw"), key=pki.key("gateway-bench-gw"))
        pub = Client(broker.port, client_id="bench-pub", ca=pki.ca_file(),
                     cert=pki.cert("aggregator"), key=pki.key("aggregator"))
        try:
            assert sub.connect() and pub.connect()
            topic = f"{PREFIX}/global/control"
            assert sub.subscribe(topic) == [1]
            for size in sizes:
                times = []
                for r in range(repeats):
                    payload = os.urandom(16) + bytes(size - 16)
                    t = time.perf_counter()
                    pub.client.publish(topic, payload, qos=1)
                    got = sub.wait_for(lambda m, p=payload: m.payload[:16] == p[:16], timeout=60)
                    if got is None:
                        raise RuntimeError(f"{size} bytes not delivered")
                    times.append((time.perf_counter() - t) * 1000)
                rows.append(_row(f"deliver {size / 1e6:g} MB (QoS 1, TLS both hops)", "ms", times,
                                 mb_per_s=round(size / 1e6 / (statistics.median(times) / 1000), 1)))
        finally:
            sub.close()
            pub.close()
    finally:
        broker.stop()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=30, help="mTLS connections to time")
    parser.add_argument("--issue-ec", type=int, default=30, help="EC certificates to issue")
    parser.add_argument("--issue-rsa", type=int, default=5, help="RSA-3072 certificates to issue")
    parser.add_argument("--sizes", default="100000,1000000,4000000",
                        help="payload sizes in bytes, comma separated")
    parser.add_argument("--repeats", type=int, default=5, help="deliveries per size")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-tls-") as tmp:
        rows = bench_issue(Path(tmp), args.issue_ec, args.issue_rsa)
        rows += bench_broker(Path(tmp), args.connects, sizes, args.repeats)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}"
    if args.json:
        emit_json({"machine": machine, "rows": rows})
        return
    emit_rows(rows, ["measure", "n", "p50", "p95", "mean", "unit", "mb_per_s"],
              title=f"production broker (mosquitto, mTLS, ACL) - {machine}")


if __name__ == "__main__":
    main()
