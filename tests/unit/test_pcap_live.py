"""live_records: the capture loop, fed by an in-memory socket with scapy's listen-socket API.

(Sniffing a real interface needs root and libpcap for BPF; the loop logic is tested here.)
"""

from __future__ import annotations

import time

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from gateway.flows.pcap import CaptureStats, live_records


class FrameSocket:
    """Stands in for scapy's L2ListenSocket: select / recv_raw / close, frames from a list."""

    LL = Ether

    def __init__(self, frames, **kwargs):
        self.frames = list(frames)
        self.kwargs = kwargs
        self.closed = False
        self.idle_polls = 0

    def select(self, sockets, timeout):
        if self.frames:
            return sockets
        self.idle_polls += 1
        return []

    def recv_raw(self):
        ts, data = self.frames.pop(0)
        return Ether, data, ts

    def close(self):
        self.closed = True


def _frame(sport, payload=b"x"):
    pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.0.0.5", dst="10.0.0.9") / UDP(
        sport=sport, dport=9999) / payload
    return raw(pkt)


def test_live_records_yields_flows_and_flushes_on_stop():
    now = time.time()
    frames = [(now, _frame(1000)), (now + 0.01, _frame(1000, b"yy")), (now + 0.02, _frame(2000))]
    made = {}

    def factory(**kwargs):
        made["sock"] = FrameSocket(frames, **kwargs)
        return made["sock"]

    stats = CaptureStats()
    records = list(live_records("eth-test", bpf="udp", stats=stats, poll_interval=0.01,
                                stop=lambda: "sock" in made and made["sock"].idle_polls >= 2,
                                socket_factory=factory))
    sock = made["sock"]
    assert sock.kwargs == {"iface": "eth-test", "filter": "udp"}
    assert sock.closed
    assert sorted((r.orig_p, r.orig_pkts, r.orig_bytes) for r in records) == [(1000, 2, 3), (2000, 1, None)]
    assert stats.packets == 3 and stats.flows == 2


def test_live_records_ends_idle_connections_by_wall_clock():
    old = time.time() - 120  # older than UDP's 60 s inactivity timeout
    frames = [(old, _frame(3000))]
    polls = {"n": 0}

    def stop():
        polls["n"] += 1
        return polls["n"] > 3

    records = []
    gen = live_records("eth-test", poll_interval=0.01, stop=stop,
                       socket_factory=lambda **kw: FrameSocket(frames, **kw))
    for rec in gen:
        records.append((rec, polls["n"]))
    (rec, seen_at), = records
    assert rec.orig_p == 3000
    assert seen_at <= 3  # ended by the idle timer, before the stop flush


def test_tcpdump_method_captures_loopback_traffic():
    """The default method where tcpdump is installed: libpcap's ring, a pcap stream into the
    compiled reader; flows to our port come out, with libpcap's drop counter (0 here)."""
    import os
    import shutil
    import socket
    import threading

    import pytest

    if os.geteuid() != 0 or shutil.which("tcpdump") is None:
        pytest.skip("live capture needs root and tcpdump")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready, done = threading.Event(), threading.Event()
    stats = CaptureStats()
    records = []

    def capture():
        for rec in live_records("lo", method="tcpdump", bpf=f"udp port {port}", stats=stats, poll_interval=0.1,
                                stop=done.is_set, on_ready=ready.set):
            records.append(rec)

    worker = threading.Thread(target=capture)
    worker.start()
    assert ready.wait(30)  # tcpdump is listening
    senders = []
    for i in range(4):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        for _ in range(i + 1):
            s.sendto(b"hello", ("127.0.0.1", port))
        senders.append(s)
    done.set()  # a stop waits for libpcap to hand over what it holds
    worker.join(30)
    for s in senders:
        s.close()
    ours = sorted(r.orig_pkts for r in records if r.resp_p == port)
    assert ours == [1, 2, 3, 4]
    assert stats.packets == 10 and stats.dropped == 0
