"""The gateway's other sources, for real: a watched pcap directory (each capture read once,
a restart reads nothing again, a damaged file counted and the rest kept) and live
capture on the loopback interface (root only: skipped otherwise)."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest

from sqlalchemy import func, select

from gateway_helpers import RuleClassifier, gateway_config, store_counts, wait_until
from gateway.service import GatewayService
from gateway.store.db import open_store
from gateway.store.models import Detection, Flow

pytestmark = pytest.mark.integration


def test_pcap_directory_is_watched_and_each_capture_read_once(tmp_path, fixtures_dir):
    pcaps = tmp_path / "pcaps"
    pcaps.mkdir()
    cfg = gateway_config(tmp_path, http="", source={"zeek_log": None, "pcap_dir": str(pcaps),
                                                     "pcap_scan_interval_s": 0.2})
    samples = fixtures_dir / "zeek-samples"
    service = GatewayService(cfg, classifier=RuleClassifier()).start()
    try:
        shutil.copy(samples / "core.tcp.reassembly-known-ports" / "get.pcap", pcaps / "a.pcap")
        assert wait_until(lambda: store_counts(cfg.database_url)[0] > 0, 20)
        first = store_counts(cfg.database_url)
        assert first[0] == first[2]  # every flow has its detection
        shutil.copy(samples / "core.vlan-mpls" / "mixed-vlan-mpls.pcap", pcaps / "b.pcap")
        assert wait_until(lambda: store_counts(cfg.database_url)[0] > first[0], 20)
        (pcaps / "c.pcap").write_bytes((samples / "core.pppoe" / "pppoe.pcap").read_bytes()[:700])  # cut short
        assert wait_until(lambda: service.metrics.value("fedgate_gw_rejected_total",
                                                        source=str((pcaps / "c.pcap").resolve())) >= 1, 20)
        (pcaps / "notes.txt").write_text("not a capture")  # not matched by *.pcap*
        time.sleep(0.6)
        total = store_counts(cfg.database_url)
    finally:
        service.stop()
    again = GatewayService(cfg, classifier=RuleClassifier()).start()
    try:
        time.sleep(1.0)  # several scans
        assert store_counts(cfg.database_url) == total
        assert again.status()["flows"] == 0  # nothing re-read: the files are marked done
    finally:
        again.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="live capture needs root (CAP_NET_RAW)")
def test_live_capture_on_loopback(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # no capture filter: scapy compiles BPF with libpcap, which this box may lack; other
    # loopback traffic is captured too, so the check counts the flows to our port
    cfg = gateway_config(tmp_path, source={"zeek_log": None, "interface": "lo",
                                           "capture_batch": 4, "capture_max_wait_s": 0.2})
    service = GatewayService(cfg, classifier=RuleClassifier()).start()
    try:
        assert service.capture_listening.wait(30)  # the capture is up
        senders = []
        for _ in range(5):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.sendto(b"hello fedgate", ("127.0.0.1", port))
            senders.append(s)
        time.sleep(0.5)
    finally:
        service.stop()  # open connections are flushed as Zeek does at the end, then committed
        for s in senders:
            s.close()
    engine, sessions = open_store(cfg.database_url)
    with sessions() as s:
        ours = s.execute(select(Flow.uid, Flow.orig_p, Flow.proto).where(Flow.resp_p == port)).all()
        dets = s.scalar(select(func.count()).select_from(Detection).where(
            Detection.uid.in_([u for u, _, _ in ours])))
    engine.dispose()
    assert len(ours) == 5 and {p for _, _, p in ours} == {"udp"}
    assert len({o for _, o, _ in ours}) == 5 and dets == 5
    assert service.status()["flows_by_source"]["capture:lo"] >= 5
