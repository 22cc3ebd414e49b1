"""Live capture measured: packets/s captured with zero kernel drops, and where drops begin.

    sudo python -m benchmarks.live_capture [--methods tcpdump,scapy] [--rates 50000,100000,200000,top]
                                           [--packets 300000] [--json]

Makes two test hosts in network namespaces (``fgcap-tx`` 198.18.0.1, ``fgcap-rx``
198.18.0.2, RFC 2544's benchmarking range) joined by a veth pair, and nothing else: no
other interface, no route.  It writes a pcap of TCP sessions between the two hosts (dst
MAC not the receiver's, so its kernel leaves them to the capture), then for each capture
method and each rate: the gateway's capture (:func:`gateway.flows.pcap.live_records`, the
function the service's capture thread runs, with that ``method``) runs in ``fgcap-rx``;
Debian's ``tcpreplay`` replays ``--packets`` packets into the veth from ``fgcap-tx`` at
the rate (``top`` = as fast as it can, the pcap preloaded in memory); then the capture is
stopped and reports what its pipeline counted, the kernel's drop counter (libpcap's for
tcpdump, PACKET_STATISTICS for the scapy socket), the flows and its CPU seconds per
packet (capture process and tcpdump, so 1e6 / that is what one core could keep up with).  The veth's own rx drop counter is read too.  The
namespaces are removed at the end.  Needs root, ``ip``, ``tcpreplay`` and ``tcpdump``
(``apt-get install tcpreplay tcpdump``).

The sender and the capture share the machine's cores: a rate tcpreplay cannot reach shows
as a lower "sent pps"; quote rates from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TX_NS, RX_NS, TX_IF, RX_IF = "fgcap-tx", "fgcap-rx", "fgtx0", "fgrx0"
TX_ADDR, RX_ADDR = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def setup_hosts() -> None:
    teardown_hosts()
    _ip("netns", "add", TX_NS)
    _ip("netns", "add", RX_NS)
    _ip("link", "add", TX_IF, "netns", TX_NS, "type", "veth", "peer", "name", RX_IF, "netns", RX_NS)
    _ip("-n", TX_NS, "addr", "add", "198.18.0.1/30", "dev", TX_IF)
    _ip("-n", RX_NS, "addr", "add", "198.18.0.2/30", "dev", RX_IF)
    for ns, ifname in ((TX_NS, TX_IF), (RX_NS, RX_IF)):
        _ip("-n", ns, "link", "set", ifname, "up")
        _ip("-n", ns, "link", "set", "lo", "up")


def teardown_hosts() -> None:
    for ns in (TX_NS, RX_NS):
        _ip("netns", "del", ns, check=False)


def write_sessions(path: Path, packets: int) -> int:
    """TCP sessions between the two test hosts (handshake, a request and its reply, both
    FINs), as a pcap; returns the sessions written."""
    from benchmarks.pcap import _pcap_bytes, _tcp_frame

    frames = []
    ts = 1_700_000_000.0
    q, r = b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 200
    i = 0
    while len(frames) < packets:
        cp, cs, ss = 1024 + i % 60000, 1000 * i & 0xFFFFFFFF, 7 * i & 0xFFFFFFFF
        steps = [(True, 0x02, cs, 0, b""), (False, 0x12, ss, cs + 1, b""), (True, 0x10, cs + 1, ss + 1, b""),
                 (True, 0x18, cs + 1, ss + 1, q), (False, 0x18, ss + 1, cs + 1 + len(q), r),
                 (True, 0x11, cs + 1 + len(q), ss + 1 + len(r), b""),
                 (False, 0x11, ss + 1 + len(r), cs + 2 + len(q), b""),
                 (True, 0x10, cs + 2 + len(q), ss + 2 + len(r), b"")]
        for fwd, flags, seq, ack, data in steps:
            a, b, pa, pb = (TX_ADDR, RX_ADDR, cp, 80) if fwd else (RX_ADDR, TX_ADDR, 80, cp)
            frames.append((ts, _tcp_frame(a, b, pa, pb, flags, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, data)))
            ts += 1e-5
        i += 1
    path.write_bytes(_pcap_bytes(frames[:packets]))
    return i


def _veth_rx() -> tuple[int, int]:
    doc = json.loads(_ip("-n", RX_NS, "-s", "-j", "link", "show", RX_IF).stdout)[0]["stats64"]["rx"]
    return doc["packets"], doc["dropped"]


def measure(method: str, rate: str, pcap: Path, packets: int) -> dict:
    before = _veth_rx()
    cap = subprocess.Popen(["ip", "netns", "exec", RX_NS, sys.executable, "-m", "benchmarks.live_capture",
                            "--child", method], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cap.stdout is not None
    if cap.stdout.readline().strip() != "ready":
        cap.kill()
        raise SystemExit(f"capture {method} did not start: {cap.stderr.read() if cap.stderr else ''}")
    time.sleep(1.0)  # tcpdump opens its ring after the child says ready
    speed = ["--topspeed"] if rate == "top" else [f"--pps={rate}"]
    replay = subprocess.run(["ip", "netns", "exec", TX_NS, "tcpreplay", "-i", TX_IF, "--preload-pcap", *speed,
                             f"--limit={packets}", str(pcap)], capture_output=True, text=True)
    m_sent = re.search(r"Actual: (\d+) packets .* sent in ([\d.]+) seconds", replay.stdout)
    m_pps = re.search(r"Rated: .*?([\d.]+) pps", replay.stdout)
    time.sleep(1.5)  # let the capture drain what is in flight
    cap.send_signal(signal.SIGTERM)
    out, err = cap.communicate(timeout=120)
    if cap.returncode != 0:
        raise SystemExit(f"capture {method} failed: {err[-500:]}")
    got = json.loads(out.strip().splitlines()[-1])
    after = _veth_rx()
    sent = int(m_sent.group(1)) if m_sent else None
    return {"method": method, "rate": rate, "sent": sent, "sent_pps": float(m_pps.group(1)) if m_pps else None,
            "captured": got["packets"], "kernel_drops": got["dropped"], "flows": got["flows"],
            "veth_rx": after[0] - before[0], "veth_drops": after[1] - before[1],
            "capture_cpu_us_per_packet": got["cpu_seconds"] / max(got["packets"], 1) * 1e6}


def child(method: str) -> None:
    """Runs in the receiving namespace: the gateway's capture until SIGTERM."""
    from gateway.flows.pcap import CaptureStats, live_records

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    import resource

    def cpu() -> float:
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    if method == "scapy":
        import scapy.arch  # noqa: F401 - imported before the CPU count starts, as tcpdump's start-up is not in it

    stats = CaptureStats()
    start = cpu()  # after start-up and imports
    print("ready", flush=True)
    flows = sum(1 for _ in live_records(RX_IF, method=method, stats=stats, stop=lambda: bool(stopping),
                                        poll_interval=0.2))
    # this process and tcpdump (waited for): CPU of the whole capture, idle waits excluded
    print(json.dumps({"packets": stats.packets, "dropped": stats.dropped, "flows": flows,
                      "cpu_seconds": cpu() - start}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="tcpdump,scapy")
    ap.add_argument("--rates", default="50000,100000,200000,400000,top")
    ap.add_argument("--packets", type=int, default=300_000, help="packets replayed per measurement")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    missing = [t for t in ("ip", "tcpreplay", "tcpdump") if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        print(f"needs root and {', '.join(missing) or 'ip, tcpreplay, tcpdump'} (apt-get install tcpreplay tcpdump)",
              file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pcap = Path(tmp) / "sessions.pcap"
        sessions = write_sessions(pcap, args.packets)
        setup_hosts()
        try:
            for method in args.methods.split(","):
                for rate in args.rates.split(","):
                    rows.append(measure(method, rate, pcap, args.packets))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            teardown_hosts()
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"rows": rows, "sessions": sessions, "load_1min": load}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"live capture on a veth, {args.packets:,} packets of TCP sessions per run")
    for col in ("method", "target pps", "sent pps", "captured", "kernel drops", "veth drops", "lost", "CPU us/pkt"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        lost = (r["sent"] - r["captured"]) if r["sent"] is not None else None
        table.add_row(r["method"], r["rate"], f"{r['sent_pps']:,.0f}" if r["sent_pps"] else "-", f"{r['captured']:,}",
                      "-" if r["kernel_drops"] is None else f"{r['kernel_drops']:,}", f"{r['veth_drops']:,}",
                      "-" if lost is None else f"{lost:,}", f"{r['capture_cpu_us_per_packet']:.2f}")
    Console().print(table)
    for method in args.methods.split(","):
        clean = [r["sent_pps"] for r in rows if r["method"] == method and r["sent_pps"] and not r["kernel_drops"]
                 and r["captured"] >= (r["sent"] or 0)]
        dropping = [r["sent_pps"] for r in rows if r["method"] == method and r["sent_pps"] and r["kernel_drops"]]
        print(f"{method}: zero drops up to {max(clean, default=0):,.0f} packets/s sent"
              + (f"; drops from {min(dropping):,.0f} packets/s" if dropping else "; no drops at any rate reached"))
    print(f"1-min load average {load:.1f} at the end ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
