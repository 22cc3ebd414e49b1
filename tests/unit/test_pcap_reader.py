"""Capture file formats and link layers: bytes in (built in memory), records out."""

from __future__ import annotations

import gzip
import io
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.l2 import CookedLinux, Dot1AD, Dot1Q, Ether
from scapy.layers.ppp import PPP, PPPoE
from scapy.packet import raw
from scapy.layers.inet import fragment

from gateway.flows.packets import PacketDecoder
from gateway.flows.pcap import (
    CaptureStats,
    NotACaptureError,
    UnsupportedLinkTypeError,
    is_capture_file,
    iter_frames,
    pcap_records,
)


def pcap_bytes(frames, *, linktype=1, endian="<", nano=False):
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)]
    for ts, data in frames:
        sec = int(ts)
        frac = round((ts - sec) * (1e9 if nano else 1e6))
        out.append(struct.pack(endian + "IIII", sec, frac, len(data), len(data)) + data)
    return b"".join(out)


def _block(btype, body):
    body += b"\x00" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def pcapng_bytes(interfaces, packets):
    """interfaces: [(linktype, tsresol or None)]; packets: [(if_id, ticks, data)]."""
    out = [_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))]
    for linktype, tsresol in interfaces:
        opts = b""
        if tsresol is not None:
            opts = struct.pack("<HH", 9, 1) + bytes([tsresol]) + b"\x00" * 3 + struct.pack("<HH", 0, 0)
        out.append(_block(1, struct.pack("<HHI", linktype, 0, 0) + opts))
    for if_id, ticks, data in packets:
        out.append(_block(6, struct.pack("<IIIII", if_id, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data)) + data))
    return b"".join(out)


C, S = "10.0.0.1", "192.0.2.80"


def ETH(**kw):
    # explicit MACs: scapy would otherwise try to resolve them on the network
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **kw)


def tcp_session(l2=lambda p: ETH() / p, ip=lambda: IP(src=C, dst=S), rip=lambda: IP(src=S, dst=C)):
    """An HTTP-ish session, one frame per packet."""
    req, resp = b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100
    c, s = 1000, 5000
    pk = [
        ip() / TCP(sport=40000, dport=80, flags="S", seq=c),
        rip() / TCP(sport=80, dport=40000, flags="SA", seq=s, ack=c + 1),
        ip() / TCP(sport=40000, dport=80, flags="A", seq=c + 1, ack=s + 1),
        ip() / TCP(sport=40000, dport=80, flags="PA", seq=c + 1, ack=s + 1) / req,
        rip() / TCP(sport=80, dport=40000, flags="PA", seq=s + 1, ack=c + 1 + len(req)) / resp,
        ip() / TCP(sport=40000, dport=80, flags="FA", seq=c + 1 + len(req), ack=s + 1 + len(resp)),
        rip() / TCP(sport=80, dport=40000, flags="FA", seq=s + 1 + len(resp), ack=c + 2 + len(req)),
        ip() / TCP(sport=40000, dport=80, flags="A", seq=c + 2 + len(req), ack=s + 2 + len(resp)),
    ]
    return [(1000.0 + i * 0.01, raw(l2(p))) for i, p in enumerate(pk)], len(req), len(resp)


def records_of(blob, **kwargs):
    stats = CaptureStats()
    recs = list(pcap_records(io.BytesIO(blob), stats=stats, **kwargs))
    return recs, stats


def test_is_capture_file_recognises_formats():
    frames, *_ = tcp_session()
    assert is_capture_file(pcap_bytes(frames)[:64])
    assert is_capture_file(pcap_bytes(frames, endian=">")[:64])
    assert is_capture_file(pcapng_bytes([(1, None)], [])[:64])
    assert is_capture_file(gzip.compress(pcap_bytes(frames))[:64])
    assert not is_capture_file(b"#separator \\x09\n#fields\tts")
    assert not is_capture_file(gzip.compress(b"just text")[:64])
    assert not is_capture_file(b"")


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_variants_give_the_same_record(endian, nano):
    frames, nreq, nresp = tcp_session()
    (rec,), stats = records_of(pcap_bytes(frames, endian=endian, nano=nano))
    assert rec.history == "ShADdFf"
    assert (rec.orig_bytes, rec.resp_bytes, rec.conn_state) == (nreq, nresp, "SF")
    assert rec.duration == pytest.approx(0.06)
    assert stats.packets == 8 and stats.flows == 1 and stats.skipped_total == 0


def test_gzip_and_pcapng_multi_interface():
    frames, nreq, nresp = tcp_session()
    # interface 0: microseconds; interface 1: nanoseconds (tsresol 9)
    packets = []
    for i, (ts, data) in enumerate(frames):
        if i % 2:
            packets.append((1, round(ts * 1e9), data))
        else:
            packets.append((0, round(ts * 1e6), data))
    blob = pcapng_bytes([(1, None), (1, 9)], packets)
    (rec,), _ = records_of(gzip.compress(blob))
    assert (rec.orig_bytes, rec.resp_bytes, rec.conn_state) == (nreq, nresp, "SF")
    assert rec.duration == pytest.approx(0.06)


@pytest.mark.parametrize(
    "linktype,l2",
    [
        (1, lambda p: ETH() / Dot1Q(vlan=10) / p),
        (1, lambda p: ETH() / Dot1AD(vlan=20) / Dot1Q(vlan=30) / p),
        (113, lambda p: CookedLinux(proto=0x0800) / p),
        (101, lambda p: p),
        (0, lambda p: struct.pack("<I", 2) + raw(p)),
        (1, lambda p: raw(ETH(type=0x8847)) + struct.pack("!I", (16 << 12) | 0x100 | 64) + raw(p)),
        (1, lambda p: ETH() / PPPoE(sessionid=1) / PPP(proto=0x0021) / p),
        (276, lambda p: struct.pack("!HHIHBB8s", 0x0800, 0, 1, 1, 0, 6, b"\x00" * 8) + raw(p)),
    ],
    ids=["vlan", "qinq", "sll", "raw", "null", "mpls", "pppoe", "sll2"],
)
def test_link_layers_and_encapsulations(linktype, l2):
    frames, nreq, nresp = tcp_session(l2=lambda p: l2(p) if not isinstance(l2(p), bytes) else l2(p))
    (rec,), stats = records_of(pcap_bytes(frames, linktype=linktype))
    assert (rec.orig_h, rec.resp_p, rec.orig_bytes, rec.resp_bytes) == (C, 80, nreq, nresp)
    assert rec.orig_ip_bytes == 5 * 40 + nreq and rec.resp_ip_bytes == 3 * 40 + nresp
    assert rec.history == "ShADdFf"
    assert stats.skipped_total == 0


def test_ip_bytes_are_ip_lengths_not_frame_lengths():
    p = ETH() / IP(src=C, dst=S) / UDP(sport=1234, dport=9999) / b"hi"
    data = raw(p) + b"\x00" * 30  # Ethernet padding must not count
    (rec,), _ = records_of(pcap_bytes([(1.0, data)]))
    assert rec.orig_ip_bytes == 20 + 8 + 2
    assert rec.orig_pkts == 1 and rec.duration is None and rec.orig_bytes is None


def test_ipv6_extension_headers_count_in_ip_bytes():
    p = ETH() / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(
        sport=5000, dport=6000) / b"abcd"
    q = p.copy()
    frames = [(1.0, raw(p)), (1.5, raw(q))]
    (rec,), _ = records_of(pcap_bytes(frames))
    assert rec.proto == "udp" and rec.orig_p == 5000
    assert rec.orig_ip_bytes == 2 * (40 + 8 + 8 + 8 + 4)
    assert rec.orig_bytes == 8 and rec.local_orig is True


def test_ipv4_fragments_are_reassembled_like_zeek():
    big = IP(src=C, dst=S, id=77) / UDP(sport=1111, dport=2222) / (b"z" * 3000)
    frags = fragment(big, fragsize=1000)
    assert len(frags) > 1
    frames = [(1.0 + i * 0.001, raw(ETH() / f)) for i, f in enumerate(reversed(frags))]
    (rec,), stats = records_of(pcap_bytes(frames))
    assert rec.orig_pkts == 1
    assert rec.orig_ip_bytes == 20 + 8 + 3000
    assert stats.skipped_total == 0


def test_checksums_checked_by_default_and_ignorable():
    good = IP(src=C, dst=S) / UDP(sport=1, dport=2) / b"data"
    bad = raw(ETH() / good)
    bad = bad[:-1] + bytes([bad[-1] ^ 0xFF])
    (rec,), _ = records_of(pcap_bytes([(1.0, bad)]))
    assert (rec.history, rec.orig_pkts) == ("C", 0)
    (rec,), _ = records_of(pcap_bytes([(1.0, bad)]), ignore_checksums=True)
    assert (rec.history, rec.orig_pkts) == ("D", 1)
    broken_ip = bytearray(raw(ETH() / good))
    broken_ip[14 + 10] ^= 0xFF  # IP header checksum
    recs, stats = records_of(pcap_bytes([(1.0, bytes(broken_ip))]))
    assert recs == [] and stats.skipped == {"bad_IP_checksum": 1}


def test_icmp_through_the_file_path():
    frames = [
        (1.0, raw(ETH() / IP(src=C, dst=S) / ICMP(type=8) / (b"p" * 56))),
        (1.2, raw(ETH() / IP(src=S, dst=C) / ICMP(type=0) / (b"p" * 56))),
    ]
    (rec,), _ = records_of(pcap_bytes(frames))
    assert (rec.proto, rec.orig_p, rec.resp_p, rec.orig_bytes, rec.resp_bytes) == ("icmp", 8, 0, 56, 56)


def test_truncated_file_keeps_flows_and_warns(caplog):
    frames, *_ = tcp_session()
    blob = pcap_bytes(frames)
    recs, stats = records_of(blob[:-10])
    assert len(recs) == 1 and recs[0].orig_pkts + recs[0].resp_pkts == 7
    assert stats.truncated and "truncated" in stats.warnings[0]
    assert "truncated" in caplog.text


def test_not_a_capture_names_the_file(tmp_path):
    path = tmp_path / "conn.log"
    path.write_bytes(b"#separator \\x09\n")
    with open(path, "rb") as f, pytest.raises(NotACaptureError, match="conn.log"):
        list(pcap_records(f))


def test_unsupported_link_type_names_it():
    with pytest.raises(UnsupportedLinkTypeError, match="119.*Prism"):
        list(iter_frames(io.BytesIO(pcap_bytes([], linktype=119))))
    with pytest.raises(UnsupportedLinkTypeError, match="187"):
        list(iter_frames(io.BytesIO(pcapng_bytes([(187, None)], []))))


def test_non_ip_and_malformed_frames_are_counted_not_raised():
    decoder = PacketDecoder()
    assert decoder.decode(1, raw(ETH(type=0x0806) / (b"\x00" * 28)), 1.0) is None
    assert decoder.decode(1, b"\x00" * 5, 1.0) == "truncated_link_header"
    assert decoder.decode(1, raw(ETH(type=0x0800)) + b"\x45\x00", 1.0) == "truncated_IP"
    assert decoder.decode(999, b"\x00" * 40, 1.0) == "unsupported_link_type"
    assert decoder.skipped == {"non_ip_packet": 1, "truncated_link_header": 1, "truncated_IP": 1,
                               "unsupported_link_type": 1}


def _inner_udp():
    return IP(src="172.16.0.1", dst="172.16.0.2") / UDP(sport=1000, dport=2000) / b"inner!"


def test_vxlan_carrier_and_inner_connection():
    from scapy.layers.vxlan import VXLAN

    outer = ETH() / IP(src=C, dst=S) / UDP(sport=50000, dport=4789) / VXLAN(vni=42) / ETH() / _inner_udp()
    recs, stats = records_of(pcap_bytes([(1.0, raw(outer)), (1.5, raw(outer))]))
    by_port = {r.resp_p: r for r in recs}
    carrier, inner = by_port[4789], by_port[2000]
    assert carrier.service == "vxlan" and carrier.orig_pkts == 2
    assert inner.orig_h == "172.16.0.1" and inner.orig_pkts == 2 and inner.orig_bytes == 12
    assert inner.orig_ip_bytes == 2 * (20 + 8 + 6)
    assert inner.tunnel_parents == (carrier.uid,)
    assert stats.skipped_total == 0


def test_gre_and_ip_in_ip_carry_connections_with_a_tunnel_parent():
    from scapy.layers.l2 import GRE

    gre = ETH() / IP(src=C, dst=S) / GRE() / _inner_udp()
    ipip = ETH() / IP(src=C, dst=S, proto=4) / _inner_udp()
    for frame in (gre, ipip):
        (rec,), stats = records_of(pcap_bytes([(1.0, raw(frame))]))
        assert (rec.orig_h, rec.resp_p, rec.orig_ip_bytes) == ("172.16.0.1", 2000, 34)
        assert rec.tunnel_parents and rec.tunnel_parents[0].startswith("C")


def test_teredo_carries_ipv6():
    inner6 = IPv6(src="2001:0:4136:e378::1", dst="2001:db8::2") / UDP(sport=3000, dport=4000) / b"v6"
    outer = ETH() / IP(src=C, dst=S) / UDP(sport=40000, dport=3544) / raw(inner6)
    recs, _ = records_of(pcap_bytes([(1.0, raw(outer))]))
    assert {r.proto for r in recs} == {"udp"}
    inner = next(r for r in recs if r.resp_p == 4000)
    assert inner.orig_h == "2001:0:4136:e378::1" and inner.orig_ip_bytes == 40 + 8 + 2
    assert next(r for r in recs if r.resp_p == 3544).service == "teredo"


def test_bad_tcp_header_length_opens_an_empty_record_like_zeek():
    bad = ETH() / IP(src=C, dst=S) / TCP(sport=40000, dport=80, flags="S", dataofs=2)
    (rec,), stats = records_of(pcap_bytes([(1.0, raw(bad))]))
    assert (rec.orig_pkts, rec.resp_pkts, rec.history, rec.conn_state) == (0, 0, None, "OTH")
    assert stats.weird == {"bad_TCP_header_len": 1} and stats.skipped_total == 0


def test_wlan_ppp_and_snap_link_layers():
    from scapy.layers.dot11 import Dot11, RadioTap
    from scapy.layers.l2 import LLC, SNAP

    snap = LLC(dsap=0xAA, ssap=0xAA, ctrl=3) / SNAP(OUI=0, code=0x0800)
    wlan = Dot11(type=2, subtype=0, FCfield=1, addr1="02:00:00:00:00:02", addr2="02:00:00:00:00:01",
                 addr3="02:00:00:00:00:03") / snap
    cases = [
        (127, lambda p: RadioTap() / wlan / p),
        (105, lambda p: wlan / p),
        (9, lambda p: b"\xff\x03\x00\x21" + raw(p)),
        (1, lambda p: raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=len(raw(snap / p))))
         + raw(snap / p)),
    ]
    for linktype, l2 in cases:
        frames, nreq, nresp = tcp_session(l2=l2)
        (rec,), stats = records_of(pcap_bytes(frames, linktype=linktype))
        assert (rec.orig_bytes, rec.resp_bytes, rec.history) == (nreq, nresp, "ShADdFf"), linktype
        assert stats.skipped_total == 0


def test_snap_length_cut_payload_becomes_missed_bytes():
    frames, nreq, nresp = tcp_session()
    # cut every frame to 64 bytes, as a capture with snaplen 64 would
    blob = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 64, 1))
    for ts, data in frames:
        sec, usec = int(ts), round((ts - int(ts)) * 1e6)
        blob += struct.pack("<IIII", sec, usec, min(len(data), 64), len(data)) + data[:64]
    (rec,), stats = records_of(bytes(blob))
    # sizes still come from sequence numbers and IP lengths, checksums are not checked
    assert (rec.orig_bytes, rec.resp_bytes, rec.conn_state) == (nreq, nresp, "SF")
    # both payloads were cut (54 bytes of headers leave 10): a cut segment is not seen at all
    assert rec.missed_bytes == nreq + nresp
    assert "G" in rec.history and "g" in rec.history


def test_worker_processes_give_the_same_records(tmp_path, fixtures_dir):
    from gateway.flows.pcap import convert_captures

    frames = []
    for i in range(6):  # several flows, so both shards get some
        session, *_ = tcp_session(ip=lambda i=i: IP(src=f"10.0.0.{i + 1}", dst=S),
                                  rip=lambda i=i: IP(src=S, dst=f"10.0.0.{i + 1}"))
        frames += [(ts + i * 0.001, data) for ts, data in session]
    frames.sort(key=lambda f: f[0])
    synthetic = tmp_path / "multi.pcap"
    synthetic.write_bytes(pcap_bytes(frames))
    vlan = fixtures_dir / "zeek-samples" / "core.vlan-mpls" / "mixed-vlan-mpls.pcap"
    pppoe = fixtures_dir / "zeek-samples" / "core.pppoe" / "pppoe.pcap"
    records = {}
    for path in (synthetic, vlan, pppoe):
        logs = {}
        for workers in (1, 2):
            buf = io.BytesIO()
            stats = convert_captures([str(path)], buf, workers=workers)
            logs[workers] = (sorted(x for x in buf.getvalue().splitlines() if not x.startswith(b"#")),
                             stats.packets, stats.flows, stats.skipped)
        assert logs[1] == logs[2]
        records[path] = logs[1][0]
    assert len(records[vlan]) == 2  # the vlan-mpls trace without -C: two valid connections
    assert len(records[pppoe]) == 7


def test_truncated_gzip_capture_keeps_flows():
    frames, *_ = tcp_session()
    blob = gzip.compress(pcap_bytes(frames))
    (rec,), stats = records_of(blob[: len(blob) - 30])
    # what could be decompressed is kept: the packets before the cut
    assert stats.truncated and "truncated capture" in stats.warnings[0]
    assert 0 < stats.packets < len(frames) and rec.orig_pkts + rec.resp_pkts == stats.packets
    # concatenated gzip members are one stream
    (rec,), stats = records_of(blob + gzip.compress(b""))
    assert not stats.truncated and stats.packets == len(frames)


def test_ayiya_and_gtp_carry_inner_connections():
    inner = raw(_inner_udp())
    ayiya = bytes([0x00, 0x00, 0x01, 4]) + b"\x00" * 4 + b"\x01" + inner  # 1-byte identity, no signature
    gtp = bytes([0x30, 0xFF]) + len(inner).to_bytes(2, "big") + b"\x00\x00\x00\x01" + inner
    for port, header in ((5072, ayiya), (2152, gtp)):
        outer = ETH() / IP(src=C, dst=S) / UDP(sport=40000, dport=port) / header
        recs, _ = records_of(pcap_bytes([(1.0, raw(outer))]))
        carried = next(r for r in recs if r.resp_p == 2000)
        assert carried.orig_h == "172.16.0.1" and carried.orig_ip_bytes == 34
        carrier = next(r for r in recs if r.resp_p == port)
        assert carried.tunnel_parents == (carrier.uid,)


def test_ipv6_fragments_are_reassembled():
    from scapy.layers.inet6 import IPv6ExtHdrFragment, fragment6

    big = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(id=9) / UDP(sport=7000, dport=8000) / (
        b"q" * 3000)
    frags = fragment6(big, 1280)
    assert len(frags) > 2
    frames = [(1.0 + i * 0.001, raw(ETH() / f)) for i, f in enumerate(frags)]
    (rec,), stats = records_of(pcap_bytes(frames))
    # one datagram: payload length rewritten to the reassembled size, fragment header dropped
    assert (rec.orig_pkts, rec.orig_bytes) == (1, None) and rec.orig_ip_bytes == 40 + 8 + 3000
    assert stats.skipped_total == 0


def test_fragment_table_is_bounded_and_drops_the_oldest_first():
    """Past max_fragment_buffers the oldest incomplete datagram goes; while more than a few
    wait, those older than the timeout go; a completed one is never counted."""
    from gateway.flows.fragments import FragmentTable

    dropped = []
    table = FragmentTable(max_buffers=100, timeout=60.0, count=dropped.append)
    for i in range(250):  # first fragments only: none completes
        assert table.add((4, b"a", b"b", i, 17), 0, True, b"x" * 8, b"H" * 20, 1.0 + i * 0.01) is None
    assert len(table) == 100 and dropped == ["fragment_buffer_overflow"] * 150
    # the survivors are the 100 newest: ids 150..249; completing id 200 works
    assert table.add((4, b"a", b"b", 200, 17), 8, False, b"y", b"H" * 20, 5.0) == (b"H" * 20, b"x" * 8 + b"y")
    assert table.add((4, b"a", b"b", 10, 17), 8, False, b"y", b"H" * 20, 5.0) is None  # 10 was dropped
    dropped.clear()
    table.add((4, b"a", b"b", 999, 17), 0, True, b"z" * 8, b"H" * 20, 100.0)  # 60 s later: all expire
    assert dropped == ["fragment_timeout"] * 100 and len(table) == 1
    with pytest.raises(ValueError):
        FragmentTable(max_buffers=0, timeout=1.0, count=print)
