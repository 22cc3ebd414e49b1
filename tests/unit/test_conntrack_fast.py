"""The tracker's fast paths give the same records as its general path, field for field.

``ConnTracker(fast_path=False)`` runs every packet through the general TCP state machine; the
default takes shortcuts for plain ACK/PSH segments on established connections.  Random packet
sequences (hypothesis) and the real sample traces must give identical records both ways.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hypothesis import given, settings, target
from hypothesis import strategies as st

from gateway.flows.conntrack import ACK, FIN, PSH, RST, SYN, ConnTracker
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


def _run(packets, fast: bool, counter: list | None = None, many: bool = False):
    tracker = ConnTracker(fast_path=fast)
    if counter is not None:
        inner = tracker._tcp_established

        def counted(conn, pkt, t):
            took = inner(conn, pkt, t)
            counter[0] += took
            return took

        tracker._tcp_established = counted  # type: ignore[method-assign]
    out = []
    if many:  # feed_many, over batches of a few packets
        for i in range(0, len(packets), 7):
            out.extend(tracker.feed_many(packets[i:i + 7]))
    else:
        for p in packets:
            out.extend(tracker.feed(p))
    out.extend(tracker.flush())
    return out


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
@given(st.lists(STEP, min_size=1, max_size=40), st.sampled_from((1000, 0xFFFFFF00, 0x7FFFFFF0, 0)))
def test_fast_path_records_equal_general_path(steps, base_seq):
    packets = _packets(steps, base_seq)
    taken = [0]
    assert _run(packets, True, taken) == _run(packets, False) == _run(packets, True, many=True)
    target(float(taken[0]))  # steer the search toward streams that use the shortcut a lot


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


def test_fast_path_is_taken_for_established_data_and_acks():
    """The shortcut must actually run (or the equality tests prove nothing)."""
    packets = _session(50, base=1000)
    counter = [0]
    fast = _run(packets, True, counter)
    # the handshake's last ACK (the SYN-ACK established both ends), every data segment and
    # every pure ACK; not the FINs nor the ACK after them
    assert counter[0] == 101
    assert fast == _run(packets, False)
    counter = [0]
    assert _run(packets, True, counter, many=True) == fast and counter[0] == 101  # feed_many shortcuts too
    (rec,) = fast
    # records are built with tuple.__new__: they must be whole ConnRecords, defaults included
    assert len(rec) == len(ConnRecord._fields) and rec == ConnRecord(*rec[:22])
    assert (rec.conn_state, rec.history, rec.orig_bytes, rec.resp_bytes) == ("SF", "ShADaFf", 15000, 0)


def test_fast_path_hands_sequence_wraparound_to_the_general_path():
    packets = _session(30)  # the originator's sequence numbers wrap after a few segments
    counter = [0]
    fast = _run(packets, True, counter)
    assert 0 < counter[0] < 60
    assert fast == _run(packets, False)
    assert fast[0].orig_bytes == 9000


def _decoded(path: Path):
    decoder = PacketDecoder()
    with open(path, "rb") as f:
        for ts, linktype, frame, wire_len in iter_frames(f):
            pkt = decoder.decode(linktype, frame, ts, wire_len)
            if pkt is not None and pkt.__class__ is not str:
                yield pkt


def test_fast_path_equals_general_path_on_the_sample_traces():
    traces = sorted(p for p in SAMPLES.rglob("*") if p.suffix in (".pcap", ".pcapng", ".gz"))
    assert traces
    for trace in traces:
        packets = list(_decoded(trace))
        assert _run(packets, True) == _run(packets, False) == _run(packets, True, many=True), trace.name


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
    tracker = ConnTracker() if nets is None else ConnTracker(local_nets=nets)
    for raw in addrs:
        ip = ipaddress.ip_address(raw)
        local = any(ip in net for net in tracker.local_nets if net.version == ip.version) if tracker.local_nets else None
        assert tracker._addr(raw) == (str(ip), local)


@given(st.binary(max_size=40), st.sampled_from([b"", b"port", b"PoRt", b"EPRT", b"ePrT", b"por", b"PRT"]),
       st.binary(max_size=10))
def test_ftp_port_command_hint_equals_lowercase_search(head, word, tail):
    from gateway.flows.conntrack import _FTP_PORT_COMMAND

    payload = head + word + tail
    low = payload.lower()
    assert (_FTP_PORT_COMMAND.search(payload) is not None) == (b"port" in low or b"eprt" in low)
