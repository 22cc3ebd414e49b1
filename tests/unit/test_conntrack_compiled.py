"""The compiled tracker gives the records of the pure-Python reference, field for field.

``gateway.flows._compiled.Tracker`` holds the one compiled copy of the TCP state machine;
``ConnTracker`` is the reference.  Random packet sequences (hypothesis) - sequence jumps
and wrap-arounds, bad checksums, snapped payloads, timers, reuse, a tiny table that
evicts - and the real sample traces must give identical records both ways, through
``feed`` and ``feed_many``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.flows.conntrack import ACK, FIN, PSH, RST, SYN, ConnTracker, IllegalTransition
from gateway.flows.conntrack.conn import AddressBook
from gateway.flows.packets import Packet, PacketDecoder
from gateway.flows.pcap import iter_frames
from gateway.flows.record import ConnRecord

A = ipaddress.ip_address("10.0.0.1").packed
B = ipaddress.ip_address("93.184.216.34").packed
SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "zeek-samples"

PLAIN = (ACK, ACK | PSH)
FLAGS = st.one_of(
    st.sampled_from(PLAIN), st.sampled_from(PLAIN), st.sampled_from(PLAIN),  # mostly plain segments
    st.sampled_from((SYN, SYN | ACK, FIN | ACK, RST, RST | ACK, 0, PSH, FIN | RST)),
    st.integers(0, 0x3F),
)
PAYLOADS = st.sampled_from((b"", b"x", b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n", b"SSH-2.0-x\r\n",
                            b"\x16\x03\x01\x00\x05\x01\x00", b"220 ftp ready\r\n"))
# small moves around the running sequence numbers (in order, retransmissions, gaps) and
# now and then a jump anywhere (wrap-arounds)
SMALL_MOVE = st.integers(-3, 3).map(lambda k: k * 10)
MOVE = st.one_of(SMALL_MOVE, SMALL_MOVE, SMALL_MOVE, SMALL_MOVE, SMALL_MOVE, st.integers(0, 0xFFFFFFFF))
STEP = st.tuples(
    st.booleans(),                      # from the first sender
    st.integers(0, 1),                  # which of 2 port pairs (port 80, an ephemeral one)
    FLAGS,
    MOVE,  # seq move
    MOVE,  # ack move
    PAYLOADS,
    st.integers(0, 40),                 # extra payload length not captured (snap length) when > 30
    st.sampled_from((0, 1, 512, 65535)),  # window
    st.sampled_from((True, True, True, True, False)),  # checksum ok
    st.sampled_from((0.001, 0.001, 0.5, 0.5, 0.5, 7.0, 400.0)),  # time step (timers, reuse, inactivity)
)


def _run(tracker, packets, many: bool = False):
    out = []
    if many:  # feed_many, over batches of a few packets
        for i in range(0, len(packets), 7):
            out.extend(tracker.feed_many(packets[i:i + 7]))
    else:
        for p in packets:
            out.extend(tracker.feed(p))
    out.extend(tracker.flush())
    return out


def _both(compiled, packets, **options):
    """The reference's records; asserts the compiled tracker's are the same."""
    want = _run(ConnTracker(**options), packets)
    assert _run(compiled.Tracker(**options), packets) == want
    assert _run(compiled.Tracker(**options), packets, many=True) == want
    return want


def _packets(steps, base_seq: int):
    """Turn hypothesis steps into a time-ordered packet list; sequence numbers near the
    senders' running values (with occasional jumps anywhere, wrap-arounds included)."""
    seqs = {}
    t = 1000.0
    out = []
    for from_a, pair, flags, seq_move, ack_move, data, extra, win, ok, dt in steps:
        t += dt
        cport, sport = 40000 + pair, 80 if pair == 0 else 50000 + pair  # service guess and flips on 80
        a_seq = seqs.setdefault((pair, True), base_seq + pair * 7919)
        b_seq = seqs.setdefault((pair, False), (base_seq * 3 + 12345) & 0xFFFFFFFF)
        mine, theirs = (a_seq, b_seq) if from_a else (b_seq, a_seq)
        seq = (mine + seq_move) & 0xFFFFFFFF
        ack = (theirs + ack_move) & 0xFFFFFFFF
        length = len(data) + (extra - 30 if extra > 30 else 0)  # payload_len > captured bytes
        if from_a:
            p = Packet(t, A, B, 6, cport, sport, 40 + length, length, flags, seq, ack, win, ok, data)
        else:
            p = Packet(t, B, A, 6, sport, cport, 40 + length, length, flags, seq, ack, win, ok, data)
        out.append(p)
        seqs[(pair, from_a)] = (seq + length + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF
    return out


@settings(max_examples=400, deadline=None)
@given(st.lists(STEP, min_size=1, max_size=40), st.sampled_from((1000, 0xFFFFFF00, 0x7FFFFFF0, 0)),
       st.sampled_from((1, 2, 3, 1_000_000)), st.sampled_from((None, ("http",), ())))
def test_compiled_records_equal_the_reference(compiled, steps, base_seq, max_connections, protocols):
    _both(compiled, _packets(steps, base_seq), max_connections=max_connections, protocols=protocols)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.sampled_from((0.001, 0.5, 30.0, 61.0, 400.0)),
                          st.booleans()), min_size=1, max_size=30),
       st.sampled_from((1, 2, 1000)))
def test_compiled_other_protocols_equal_the_reference(compiled, steps, max_connections):
    """UDP (DNS/NTP analyzers, bad checksums, snapped datagrams), ICMP, other IP protocols."""
    dns_query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    dns_reply = b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
    ntp = bytes([0x1B]) + bytes(47)
    t = 1000.0
    packets = []
    for kind, k, dt, fwd in steps:
        t += dt
        src, dst = (A, B) if fwd else (B, A)
        if kind == 0:  # DNS both ways
            sp, dp = (40000 + k, 53) if fwd else (53, 40000 + k)
            packets.append(Packet(t, src, dst, 17, sp, dp, 40, 12, k == 5, 0, 0, 0, k != 4,
                                  dns_query if fwd else dns_reply))
        elif kind == 1:  # NTP, sometimes from the server side first
            sp, dp = (123, 123) if k < 2 else ((40000, 123) if fwd else (123, 40000))
            packets.append(Packet(t, src, dst, 17, sp, dp, 76, 48, 0, 0, 0, 0, True, ntp))
        elif kind == 2:  # ICMP echo / unreachable, IPv4 and v6
            proto = 1 if k < 3 else 58
            itype = (8, 0, 3)[k % 3] if proto == 1 else (128, 129, 1)[k % 3]
            packets.append(Packet(t, src, dst, proto, itype, 0, 84, 56, 0, 0, 0, 0, k != 2, b"x" * 4))
        else:  # another IP protocol
            packets.append(Packet(t, src, dst, 47 + k, 0, 0, 60, 0, 0, 0, 0, 0, True))
    _both(compiled, packets, max_connections=max_connections)


def _session(n_data: int, base: int = 0xFFFFF000):
    """A handshake, then ``n_data`` request/ack pairs crossing the 2**32 wrap, then FINs."""
    c, s = base, 777
    pk = [Packet(1.0, A, B, 6, 40000, 80, 40, 0, SYN, c, 0, 65535, True, b"", b"\x03\x03\x07"),
          Packet(1.1, B, A, 6, 80, 40000, 40, 0, SYN | ACK, s, c + 1, 65535, True, b"", b"\x03\x03\x07"),
          Packet(1.2, A, B, 6, 40000, 80, 40, 0, ACK, c + 1, s + 1, 512, True)]
    c, s, t = c + 1, s + 1, 1.2
    for _ in range(n_data):
        t += 0.01
        pk.append(Packet(t, A, B, 6, 40000, 80, 340, 300, ACK | PSH, c & 0xFFFFFFFF, s, 512, True, b"y" * 300))
        c += 300
        pk.append(Packet(t + 0.001, B, A, 6, 80, 40000, 40, 0, ACK, s, c & 0xFFFFFFFF, 512, True))
    pk.append(Packet(t + 1, A, B, 6, 40000, 80, 40, 0, FIN | ACK, c & 0xFFFFFFFF, s, 512, True))
    pk.append(Packet(t + 1.1, B, A, 6, 80, 40000, 40, 0, FIN | ACK, s, (c + 1) & 0xFFFFFFFF, 512, True))
    pk.append(Packet(t + 1.2, A, B, 6, 40000, 80, 40, 0, ACK, (c + 1) & 0xFFFFFFFF, s + 1, 512, True))
    return pk


def test_compiled_session_records(compiled):
    (rec,) = _both(compiled, _session(50, base=1000))
    # records are built with tuple.__new__: they must be whole ConnRecords, defaults included
    assert len(rec) == len(ConnRecord._fields) and rec == ConnRecord(*rec[:22])
    assert (rec.conn_state, rec.history, rec.orig_bytes, rec.resp_bytes) == ("SF", "ShADaFf", 15000, 0)
    (rec,) = _both(compiled, _session(30))  # the originator's sequence numbers wrap
    assert rec.orig_bytes == 9000


def test_compiled_tracker_checks_its_configuration(compiled):
    with pytest.raises(ValueError):
        compiled.Tracker(max_connections=0)
    with pytest.raises(ValueError):
        compiled.Tracker(shard=(2, 2))
    assert IllegalTransition  # the compiled state machine raises the reference's exception


def _decoded(path: Path):
    decoder = PacketDecoder()
    with open(path, "rb") as f:
        for ts, linktype, frame, wire_len in iter_frames(f):
            pkt = decoder.decode(linktype, frame, ts, wire_len)
            if pkt is not None and pkt.__class__ is not str:
                yield pkt


def test_compiled_equals_reference_on_the_sample_traces(compiled):
    traces = sorted(p for p in SAMPLES.rglob("*") if p.suffix in (".pcap", ".pcapng", ".gz"))
    assert traces
    for trace in traces:
        assert _both(compiled, list(_decoded(trace))), trace.name


NETS = st.lists(st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
        lambda a: str(ipaddress.ip_network((a[0], a[1]), strict=False))),
    st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
        lambda a: str(ipaddress.ip_network((a[0], a[1]), strict=False))),
), max_size=6)
ADDRS = st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16),
                  st.sampled_from([ipaddress.ip_address(a).packed for a in
                                   ("10.0.0.1", "192.168.255.255", "::1", "fe80::1", "::ffff:1.2.3.4",
                                    "2001:db8::", "0.0.0.0", "255.255.255.255")]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(NETS, st.just(None)), st.lists(ADDRS, min_size=1, max_size=8))
def test_address_text_and_locality_equal_ipaddress(nets, addrs):
    """The bisection over merged ranges and the hand-made dotted quad agree with ipaddress."""
    book = AddressBook(ConnTracker().local_nets if nets is None else nets)
    for raw in addrs:
        ip = ipaddress.ip_address(raw)
        local = any(ip in net for net in book.local_nets if net.version == ip.version) if book.local_nets else None
        assert book.lookup(raw) == (str(ip), local)


@given(st.binary(max_size=40), st.sampled_from([b"", b"port", b"PoRt", b"EPRT", b"ePrT", b"por", b"PRT"]),
       st.binary(max_size=10))
def test_ftp_port_command_hint_equals_lowercase_search(head, word, tail):
    from gateway.flows.conntrack.services import _FTP_PORT_COMMAND

    payload = head + word + tail
    low = payload.lower()
    assert (_FTP_PORT_COMMAND.search(payload) is not None) == (b"port" in low or b"eprt" in low)
