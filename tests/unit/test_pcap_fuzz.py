"""Hostile bytes into the packet path: never an exception, always a counted outcome."""

from __future__ import annotations

import io
import struct

from hypothesis import HealthCheck, given, settings
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6MLReport2, IPv6, IPv6ExtHdrHopByHop, RouterAlert
from scapy.layers.l2 import Dot1Q, Ether
from scapy.layers.ppp import PPP, PPPoE
from scapy.packet import raw
from hypothesis import strategies as st

from gateway.flows.conntrack import ConnTracker
from gateway.flows.packets import Packet, PacketDecoder
from gateway.flows.pcap import (
    CaptureError,
    CaptureStats,
    iter_frames,
    new_frame_tracker,
    record_batches,
    records_from_frames,
)

LINKTYPES = [0, 1, 9, 12, 14, 50, 101, 105, 108, 113, 127, 228, 229, 276]

# A valid Ethernet/IPv4/TCP frame (checksums right) to mutate: random bytes alone rarely get
# past the IP checks.
SEED_FRAME = raw(
    Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    / IP(src="192.168.0.1", dst="192.168.0.2", flags="DF")
    / TCP(sport=40000, dport=80, seq=100, flags="S", window=65535)
    / b"payload-bytes"
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linktype=st.sampled_from(LINKTYPES), frame=st.binary(max_size=200), checks=st.booleans())
def test_random_frames_never_raise(linktype, frame, checks):
    decoder = PacketDecoder(ignore_checksums=checks)
    tracker = ConnTracker()
    out = decoder.decode(linktype, frame, 1.0, len(frame))
    assert out is None or isinstance(out, (str, Packet))
    if isinstance(out, str):
        assert decoder.skipped[out] >= 1
    if isinstance(out, Packet):
        tracker.feed(out)
        for rec in tracker.flush():
            assert rec.orig_pkts >= 0 and rec.conn_state


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, len(SEED_FRAME) - 1), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, len(SEED_FRAME)),
)
def test_mutated_tcp_frames_never_raise(edits, cut):
    frame = bytearray(SEED_FRAME)
    for pos, value in edits:
        frame[pos] = value
    frame = bytes(frame[:cut]) if cut else bytes(frame)
    decoder = PacketDecoder(ignore_checksums=True)
    tracker = ConnTracker()
    for ts in (1.0, 2.0):
        out = decoder.decode(1, frame, ts, len(frame))
        if isinstance(out, Packet):
            tracker.feed(out)
    tracker.flush()


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=400))
def test_random_files_raise_only_capture_errors(blob):
    stats = CaptureStats()
    for head in (b"", struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)):
        try:
            frames = iter_frames(io.BytesIO(head + blob), stats)
            for _ in records_from_frames(frames, stats=stats):
                pass
        except CaptureError:
            assert not head  # a valid pcap header never makes the file itself an error


SEED_FRAME6 = raw(
    Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    / IPv6(src="2001:db8::1", dst="2001:db8::2")
    / TCP(sport=40000, dport=80, seq=100, flags="PA", window=65535)
    / b"odd-payload"
)
SEED_VLAN = raw(
    Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=7)
    / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=5353, dport=53) / (b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 10)
)
SEED_PPPOE4 = raw(
    Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / PPPoE(sessionid=3) / PPP(proto=0x21)
    / IP(src="10.2.0.1", dst="10.2.0.2") / TCP(sport=1234, dport=443, flags="PA", seq=5, ack=9) / b"data"
)
SEED_PPPOE6 = raw(
    Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / PPPoE(sessionid=3) / PPP(proto=0x57)
    / IPv6(src="2001:db8::5", dst="2001:db8::6") / UDP(sport=4000, dport=4001) / b"v6 over pppoe"
)
SEED_HBH6 = raw(  # an MLD-like ICMPv6 message behind a hop-by-hop header (a router alert)
    Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IPv6(src="fe80::1", dst="ff02::16")
    / IPv6ExtHdrHopByHop(options=[RouterAlert()]) / ICMPv6MLReport2()
)
# (seed frame, offset of its IP protocol / next-header byte)
SEEDS = [(SEED_FRAME, 23), (SEED_FRAME6, 20), (SEED_VLAN, 27), (SEED_PPPOE4, 31), (SEED_PPPOE6, 28), (SEED_HBH6, 54)]


def _frames_records(frames, compiled: bool, ignore: bool):
    """Frames through one frame tracker: (records, skipped, weirds)."""
    ft = new_frame_tracker(ignore_checksums=ignore, compiled=compiled)
    out = []
    for ts, frame in frames:
        out.extend(ft.feed_frame(1, frame, ts, len(frame)))
    out.extend(ft.flush())
    return out, ft.decoder.skipped, ft.decoder.notes, ft.skipped


@settings(max_examples=400, deadline=None)
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(12, len(SEED_FRAME6) - 1), st.integers(0, 255)), max_size=6),
    udp=st.booleans(),
    checks=st.booleans(),
    cut=st.integers(0, 8),
)
def test_compiled_decoding_agrees_with_the_reference(compiled, seed, edits, udp, checks, cut):
    """Mutated common frames (any header byte, cut short): the compiled decoder and the
    reference decoder give the same records and count the same skips and weirds."""
    base, proto_at = seed
    frame = bytearray(base)
    if udp:  # same bytes read as UDP: its checksum is then wrong unless -C
        frame[proto_at] = 17
    for pos, value in edits:
        if pos < len(frame):
            frame[pos] = value
    frame = bytes(frame[:len(frame) - cut])
    frames = [(1.0, frame), (1.5, base), (2.0, frame)]
    assert _frames_records(frames, True, checks) == _frames_records(frames, False, checks)


def test_seed_frames_take_the_compiled_path(compiled):
    class Counting(PacketDecoder):
        calls = 0

        def decode(self, *args):
            Counting.calls += 1
            return super().decode(*args)

    tracker = compiled.Tracker(decoder=Counting())
    records = []
    for i, (frame, _) in enumerate(SEEDS):
        records += tracker.feed_frame(1, frame, 1.0 + i * 0.1, len(frame))
    assert Counting.calls == 0 and len(records + tracker.flush()) == len(SEEDS)
    tracker.feed_frame(1, SEED_FRAME[:30], 9.0, len(SEED_FRAME))  # snapped: the reference decides
    assert Counting.calls == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(st.tuples(st.one_of(st.binary(max_size=120), st.just(SEED_FRAME)), st.integers(0, 80)),
                        max_size=12),
       tail=st.binary(max_size=40), linktype=st.sampled_from([1, 101, 113]), little=st.booleans(),
       nano=st.booleans(), snaplen=st.sampled_from([0, 64, 65535]))
def test_random_files_compiled_route_equals_the_reference(compiled, records, tail, linktype, little, nano, snaplen):
    """Hostile files: the compiled route's records, counts and truncation warnings are the
    reference's."""
    e = "<" if little else ">"
    blob = struct.pack(e + "IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype)
    for i, (frame, extra) in enumerate(records):  # extra: bytes the wire had beyond the capture
        blob += struct.pack(e + "IIII", 1_600_000_000 + i, i * 999_983, len(frame), len(frame) + extra) + frame
    blob += tail  # a cut or garbage record at the end
    runs = []
    for flag in (False, True):
        stats = CaptureStats()
        ft = new_frame_tracker(compiled=flag)
        recs = [r for batch in record_batches(io.BytesIO(blob), stats, ft) for r in batch]
        runs.append((recs, stats.packets, stats.bytes, stats.skipped, stats.weird, stats.truncated, stats.warnings))
    assert runs[0] == runs[1]
