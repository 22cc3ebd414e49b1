"""Hostile bytes into the packet path: never an exception, always a counted outcome."""

from __future__ import annotations

import io
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.flows.conntrack import ConnTracker
from gateway.flows.packets import Packet, PacketDecoder
from gateway.flows.pcap import CaptureError, CaptureStats, iter_frames, records_from_frames

LINKTYPES = [0, 1, 12, 14, 101, 108, 113, 228, 229, 276]

# A valid Ethernet/IPv4/TCP header to mutate: random bytes alone rarely get past the IP checks.
SEED_FRAME = bytes.fromhex(
    "020000000002020000000001080045000034000040004006"
    "0000c0a80001c0a800029c40005000000064000000005002ffff00000000"
) + b"payload-bytes"


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
