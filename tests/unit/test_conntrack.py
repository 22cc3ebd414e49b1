"""Connection tracking rules (pure): packets in, Zeek conn records out, no files."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.flows.conntrack import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TCP_TRANSITIONS,
    ConnTracker,
    IllegalTransition,
    TcpEndpoint,
    TcpState,
    tcp_conn_state,
    likely_server_ports_for,
)
from gateway.flows.packets import Packet

A = ipaddress.ip_address("10.0.0.1").packed
B = ipaddress.ip_address("93.184.216.34").packed


def tcp(ts, src, sport, dst, dport, flags, seq, ack=0, data=b"", *, ok=True, win=65535, opts=b""):
    return Packet(ts, src, dst, 6, sport, dport, 40 + len(data), len(data), flags, seq & 0xFFFFFFFF,
                  ack & 0xFFFFFFFF, win, ok, data, opts)


def udp(ts, src, sport, dst, dport, data=b"", *, ok=True):
    return Packet(ts, src, dst, 17, sport, dport, 28 + len(data), len(data), checksum_ok=ok, payload=data)


def icmp(ts, src, dst, itype, code, n=56):
    return Packet(ts, src, dst, 1, itype, code, 28 + n, n)


def run(packets, **kwargs):
    tracker = ConnTracker(**kwargs)
    out = []
    for p in packets:
        out.extend(tracker.feed(p))
    out.extend(tracker.flush())
    return out


def handshake_session(t0=100.0, c=1000, s=5000, req=b"GET / HTTP/1.1\r\n\r\n", resp=b"HTTP/1.1 200 OK\r\n\r\nhello"):
    """A complete HTTP exchange: SYN, SYN-ACK, ACK, request, ack, response, FINs, last ACK."""
    return [
        tcp(t0 + 0.0, A, 40000, B, 80, SYN, c),
        tcp(t0 + 0.1, B, 80, A, 40000, SYN | ACK, s, c + 1),
        tcp(t0 + 0.2, A, 40000, B, 80, ACK, c + 1, s + 1),
        tcp(t0 + 0.3, A, 40000, B, 80, PSH | ACK, c + 1, s + 1, req),
        tcp(t0 + 0.4, B, 80, A, 40000, ACK, s + 1, c + 1 + len(req)),
        tcp(t0 + 0.5, B, 80, A, 40000, PSH | ACK, s + 1, c + 1 + len(req), resp),
        tcp(t0 + 0.6, A, 40000, B, 80, FIN | ACK, c + 1 + len(req), s + 1 + len(resp)),
        tcp(t0 + 0.7, B, 80, A, 40000, FIN | ACK, s + 1 + len(resp), c + 2 + len(req)),
        tcp(t0 + 0.8, A, 40000, B, 80, ACK, c + 2 + len(req), s + 2 + len(resp)),
    ]


def test_full_tcp_session_like_zeek():
    req, resp = b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\nhello"
    (rec,) = run(handshake_session(req=req, resp=resp))
    assert (rec.orig_h, rec.orig_p, rec.resp_h, rec.resp_p, rec.proto) == ("10.0.0.1", 40000, "93.184.216.34", 80, "tcp")
    assert rec.history == "ShADadFf"
    assert rec.conn_state == "SF"
    assert rec.orig_bytes == len(req) and rec.resp_bytes == len(resp)
    assert rec.orig_pkts == 5 and rec.resp_pkts == 4
    assert rec.orig_ip_bytes == 5 * 40 + len(req)
    # the ACK after both FINs does not extend the duration
    assert rec.duration == pytest.approx(0.7)
    assert rec.service == "http"
    assert rec.local_orig is True and rec.local_resp is False
    assert rec.missed_bytes == 0
    assert rec.uid.startswith("C") and len(rec.uid) >= 12


def test_uid_is_stable_across_runs():
    assert run(handshake_session())[0].uid == run(handshake_session())[0].uid
    assert run(handshake_session())[0].uid != run(handshake_session(t0=200.0))[0].uid


def test_unanswered_syn_is_s0_and_ends_after_attempt_delay():
    tracker = ConnTracker()
    assert not tracker.feed(tcp(1.0, A, 40001, B, 443, SYN, 7))
    # retransmitted SYN with the same ISN: no new record, one S
    assert not tracker.feed(tcp(2.0, A, 40001, B, 443, SYN, 7))
    done = tracker.feed(udp(7.5, A, 5353, B, 9999))  # any packet advances network time
    (rec,) = [r for r in done if r.proto == "tcp"]
    assert rec.conn_state == "S0" and rec.history == "S"
    assert rec.orig_pkts == 2 and rec.resp_pkts == 0
    # a later SYN with the same 5-tuple starts a new record
    tracker.feed(tcp(8.0, A, 40001, B, 443, SYN, 7))
    later = [r for r in tracker.flush() if r.proto == "tcp"]
    assert len(later) == 1 and later[0].ts == 8.0


def test_rejected_syn_is_rej():
    (rec,) = run([tcp(1.0, A, 40002, B, 22, SYN, 100), tcp(1.01, B, 22, A, 40002, RST | ACK, 0, 101)])
    assert rec.conn_state == "REJ"
    assert rec.history == "Sr"


def test_originator_reset_after_data_is_rsto():
    pk = handshake_session()[:6] + [tcp(100.6, A, 40000, B, 80, RST | ACK, 1019, 5026)]
    (rec,) = run(pk)
    assert rec.conn_state == "RSTO"
    assert rec.history.endswith("R")


def test_half_close_without_reply_is_sh():
    (rec,) = run([tcp(1.0, A, 40003, B, 23, SYN, 1), tcp(1.5, A, 40003, B, 23, FIN | ACK, 2, 0)])
    assert rec.conn_state == "SH"
    assert rec.history == "SF"


def test_mid_stream_connection_is_flipped_by_server_port():
    # first packet seen is the server's data: orientation from likely_server_ports
    (rec,) = run([
        tcp(1.0, B, 80, A, 40004, ACK | PSH, 500, 900, b"x" * 10),
        tcp(1.1, A, 40004, B, 80, ACK, 900, 510),
    ])
    assert (rec.orig_p, rec.resp_p) == (40004, 80)
    assert rec.history.startswith("^")
    assert rec.conn_state == "OTH"


def test_syn_ack_first_flips_and_establishes():
    c, s = 1000, 9000
    (rec,) = run([
        tcp(1.0, B, 80, A, 40005, SYN | ACK, s, c + 1),
        tcp(1.1, A, 40005, B, 80, ACK, c + 1, s + 1),
        tcp(1.2, A, 40005, B, 80, FIN | ACK, c + 1, s + 1),
        tcp(1.3, B, 80, A, 40005, FIN | ACK, s + 1, c + 2),
    ])
    assert rec.orig_p == 40005
    assert rec.history == "^hAFf"
    assert rec.conn_state == "SF"


def test_retransmission_and_zero_window_letters_scale():
    pk = handshake_session()[:4]
    # the same request retransmitted 10 times: T on the 1st and 10th
    req = pk[3]
    pk += [req._replace(ts=100.3 + i * 0.001) for i in range(1, 11)]
    pk.append(tcp(100.5, B, 80, A, 40000, ACK, 5001, 1019, win=0))
    (rec,) = run(pk)
    assert rec.history.count("T") == 2
    assert "w" in rec.history


def test_bad_checksum_counts_nowhere_but_history():
    (rec,) = run([tcp(1.0, A, 40006, B, 80, SYN, 1, ok=False)])
    assert rec.history == "C"
    assert rec.orig_pkts == 0 and rec.orig_ip_bytes == 0
    assert rec.conn_state == "OTH"
    assert rec.duration is None and rec.orig_bytes is None


def test_new_syn_with_new_isn_after_close_is_a_new_connection():
    pk = handshake_session()
    pk.append(tcp(101.0, A, 40000, B, 80, SYN, 77777))
    recs = run(pk)
    assert len(recs) == 2
    assert sorted(r.history for r in recs) == ["S", "ShADadFf"]


def test_content_gap_counts_missed_bytes():
    c, s = 1000, 5000
    pk = [
        tcp(1.0, A, 40007, B, 80, SYN, c),
        tcp(1.1, B, 80, A, 40007, SYN | ACK, s, c + 1),
        tcp(1.2, A, 40007, B, 80, ACK, c + 1, s + 1),
        tcp(1.3, A, 40007, B, 80, ACK | PSH, c + 1, s + 1, b"a" * 100),
        # the next 50 bytes are never seen, but acknowledged
        tcp(1.4, A, 40007, B, 80, ACK | PSH, c + 151, s + 1, b"b" * 20),
        tcp(1.5, B, 80, A, 40007, ACK, s + 1, c + 171),
    ]
    (rec,) = run(pk)
    assert rec.missed_bytes == 50
    assert "G" in rec.history
    assert rec.orig_bytes == 170  # gaps count as sent
    assert rec.conn_state == "S1"


def test_udp_request_reply_and_states():
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x03www\x00\x00\x01\x00\x01"
    r = b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + b"\x03www\x00\x00\x01\x00\x01" + b"x" * 16
    (rec,) = run([udp(1.0, A, 33333, B, 53, q), udp(1.02, B, 53, A, 33333, r)])
    assert (rec.history, rec.conn_state, rec.service) == ("Dd", "SF", "dns")
    assert (rec.orig_bytes, rec.resp_bytes) == (len(q), len(r))
    (one,) = run([udp(1.0, A, 33334, B, 9999, b"abc"), udp(1.5, A, 33334, B, 9999, b"")])
    assert (one.history, one.conn_state, one.orig_pkts, one.orig_bytes) == ("D", "S0", 2, 3)


def test_udp_reply_first_is_flipped_to_the_client():
    r = b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + b"\x00" * 8
    (rec,) = run([udp(1.0, B, 53, A, 33335, r)])
    assert (rec.orig_h, rec.orig_p, rec.resp_p) == ("10.0.0.1", 33335, 53)
    assert rec.history == "^d"
    assert rec.conn_state == "SHR"


def test_dns_reply_from_originator_flips_when_ports_cannot_tell():
    r = b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + b"\x00" * 8
    (rec,) = run([udp(1.0, A, 5353, B, 5353, r)])
    assert rec.history == "D^"
    assert rec.orig_h == "93.184.216.34"
    # as in Zeek: the request/reply sizes do not move with the flip, and ConnSize counts the
    # packet after the DNS analyzer flipped the roles
    assert (rec.orig_pkts, rec.resp_pkts, rec.conn_state) == (1, 0, "S0")


def test_udp_inactivity_timeout_starts_a_new_record():
    recs = run([udp(1.0, A, 40000, B, 9999, b"a"), udp(62.0, A, 40000, B, 9999, b"b")])
    assert [r.ts for r in recs] == [1.0, 62.0]
    # within the minute: one record
    assert len(run([udp(1.0, A, 40000, B, 9999, b"a"), udp(50.0, A, 40000, B, 9999, b"b")])) == 1


def test_udp_dns_sessions_end_after_dns_session_timeout():
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x00" * 5
    # 10 s timer, with a second of slack: 15 s apart is two sessions, 5 s apart is one
    assert len(run([udp(1.0, A, 40000, B, 53, q), udp(16.0, A, 40000, B, 53, q)])) == 2
    assert len(run([udp(1.0, A, 40000, B, 53, q), udp(6.0, A, 40000, B, 53, q)])) == 1


def test_udp_bad_checksum():
    (rec,) = run([udp(1.0, A, 1, B, 2, b"zz", ok=False)])
    assert (rec.history, rec.orig_pkts, rec.conn_state) == ("C", 0, "OTH")
    # scaled like Zeek's HandleBadChecksum: 1st and 10th
    (rec,) = run([udp(1.0 + i, A, 1, B, 2, b"zz", ok=False) for i in range(12)])
    assert rec.history == "CC"


def test_icmp_echo_pairs_into_one_record():
    recs = run([icmp(1.0, A, B, 8, 0), icmp(1.1, B, A, 0, 0), icmp(2.0, A, B, 8, 0), icmp(2.1, B, A, 0, 0)])
    (rec,) = recs
    assert (rec.proto, rec.orig_p, rec.resp_p, rec.conn_state, rec.history) == ("icmp", 8, 0, "OTH", None)
    assert (rec.orig_pkts, rec.resp_pkts, rec.orig_bytes, rec.resp_bytes) == (2, 2, 112, 112)


def test_icmp_unreachable_uses_code_as_responder_port():
    (rec,) = run([icmp(1.0, B, A, 3, 3, n=36)])
    assert (rec.orig_p, rec.resp_p) == (3, 3)
    assert rec.duration is None and rec.orig_bytes is None and rec.orig_pkts == 1
    # one-way messages keep their direction: the same message the other way is another record
    recs = run([icmp(1.0, B, A, 3, 3, n=36), icmp(1.5, A, B, 3, 3, n=36), icmp(2.0, B, A, 3, 3, n=36)])
    assert sorted((r.orig_h, r.orig_pkts, r.resp_pkts) for r in recs) == [
        ("10.0.0.1", 1, 0), ("93.184.216.34", 2, 0)]


def test_unknown_ip_protocol_is_one_record_per_address_pair():
    gre = Packet(1.0, A, B, 47, 0, 0, 100, 0)
    recs = run([gre, gre._replace(ts=1.5), gre._replace(ts=2.0, src=B, dst=A)])
    (rec,) = recs
    assert (rec.proto, rec.ip_proto, rec.orig_p, rec.resp_p) == ("unknown_transport", 47, 0, 0)
    assert (rec.orig_pkts, rec.resp_pkts, rec.orig_bytes, rec.resp_bytes) == (2, 1, 0, 0)


def test_local_nets_configurable_and_optional():
    (rec,) = run(handshake_session(), local_nets=("93.184.0.0/16",))
    assert (rec.local_orig, rec.local_resp) == (False, True)
    (rec,) = run(handshake_session(), local_nets=())
    assert (rec.local_orig, rec.local_resp) == (None, None)


def test_bare_mode_ports_do_not_flip_unknown_services():
    pk = [tcp(1.0, B, 80, A, 40004, ACK | PSH, 500, 900, b"x" * 10)]
    (rec,) = run(pk, likely_server_ports=likely_server_ports_for(["ftp"]), protocols=["ftp"])
    assert rec.orig_p == 80 and not rec.history.startswith("^")


def test_illegal_transition_raises_typed_error():
    tracker = ConnTracker()
    tracker.feed(tcp(1.0, A, 1, B, 2, SYN, 1))
    (conn,) = tracker.conns.values()
    ep: TcpEndpoint = conn.orig
    assert ep.state is TcpState.SYN_SENT
    with pytest.raises(IllegalTransition) as info:
        ep.set_state(TcpState.PARTIAL)
    assert info.value.old is TcpState.SYN_SENT
    # every state can stay where it is
    ep.set_state(TcpState.SYN_SENT)
    assert all(isinstance(a, TcpState) and isinstance(b, TcpState) for a, b in TCP_TRANSITIONS)


@pytest.mark.parametrize(
    "orig,resp,expected",
    [
        (TcpState.SYN_SENT, TcpState.INACTIVE, "S0"),
        (TcpState.ESTABLISHED, TcpState.ESTABLISHED, "S1"),
        (TcpState.CLOSED, TcpState.CLOSED, "SF"),
        (TcpState.SYN_SENT, TcpState.RESET, "REJ"),
        (TcpState.CLOSED, TcpState.ESTABLISHED, "S2"),
        (TcpState.ESTABLISHED, TcpState.CLOSED, "S3"),
        (TcpState.RESET, TcpState.ESTABLISHED, "RSTO"),
        (TcpState.ESTABLISHED, TcpState.RESET, "RSTR"),
        (TcpState.INACTIVE, TcpState.RESET, "RSTRH"),
        (TcpState.CLOSED, TcpState.INACTIVE, "SH"),
        (TcpState.INACTIVE, TcpState.CLOSED, "SHR"),
        (TcpState.PARTIAL, TcpState.PARTIAL, "OTH"),
    ],
)
def test_conn_state_table(orig, resp, expected):
    tracker = ConnTracker()
    tracker.feed(tcp(1.0, A, 1, B, 2, SYN, 1))
    (conn,) = tracker.conns.values()
    conn.orig.state, conn.resp.state = orig, resp
    assert tcp_conn_state(conn.orig.state, conn.orig.size(), conn.resp.state, conn.resp.size(), "S") == expected


def test_rstos0_needs_syn_then_reset_in_history():
    tracker = ConnTracker()
    tracker.feed(tcp(1.0, A, 1, B, 2, SYN, 1))
    (conn,) = tracker.conns.values()
    conn.orig.state, conn.resp.state = TcpState.RESET, TcpState.INACTIVE
    assert tcp_conn_state(conn.orig.state, conn.orig.size(), conn.resp.state, conn.resp.size(), "SR") == "RSTOS0"
    assert tcp_conn_state(conn.orig.state, conn.orig.size(), conn.resp.state, conn.resp.size(), "R") == "OTH"


def test_tracker_validates_configuration():
    with pytest.raises(ValueError):
        ConnTracker(max_connections=0)
    with pytest.raises(ValueError):
        ConnTracker(local_nets=("not-a-net",))


def test_connection_table_is_bounded():
    tracker = ConnTracker(max_connections=10)
    out = []
    for i in range(25):
        out.extend(tracker.feed(udp(1.0 + i * 0.01, A, 1000 + i, B, 9999, b"x")))
    assert tracker.open_connections <= 10
    assert tracker.skipped["connection_table_full"] == 15
    assert len(out) + len(tracker.flush()) == 25


def test_a_full_table_ends_the_connection_idle_longest():
    """Eviction takes the smallest last-packet time (then the oldest), not the oldest start."""
    tracker = ConnTracker(max_connections=3)
    for i in range(3):
        tracker.feed(udp(1.0 + i, A, 1000 + i, B, 9999, b"x"))
    tracker.feed(udp(4.0, A, 1000, B, 9999, b"x"))  # the first connection is active again
    (ended,) = tracker.feed(udp(5.0, A, 2000, B, 9999, b"x"))
    assert ended.orig_p == 1001  # idle since 2.0
    (ended,) = tracker.feed(udp(6.0, A, 2001, B, 9999, b"x"))
    assert ended.orig_p == 1002
    assert sorted(r.orig_p for r in tracker.flush()) == [1000, 2000, 2001]
    # the idle heap stays bounded when nothing is ever evicted: connections come and go
    tracker = ConnTracker(max_connections=1_000_000)
    for i in range(5000):
        tracker.feed(udp(10.0 + i * 30, A, 1000 + i % 7, B, 9999, b"x"))  # each one times out
    assert tracker.open_connections <= 3 and len(tracker._idle) < 2 * 3 + 1024 + 2


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 0x3F), st.integers(0, 6), st.integers(0, 6),
                          st.integers(0, 3), st.booleans()), min_size=1, max_size=25))
def test_any_tcp_packet_sequence_stays_within_the_transition_table(steps):
    """Random flags, sequence numbers, directions and checksums: no IllegalTransition, sane output."""
    tracker = ConnTracker()
    out = []
    t = 1.0
    for from_orig, flags, seq_step, ack_step, length, ok in steps:
        t += 0.5
        seq, ack = 1000 + seq_step * 100, 5000 + ack_step * 100
        if from_orig:
            p = tcp(t, A, 40000, B, 80, flags, seq, ack, b"x" * length, ok=ok)
        else:
            p = tcp(t, B, 80, A, 40000, flags, ack, seq, b"y" * length, ok=ok)
        out.extend(tracker.feed(p))
    out.extend(tracker.flush())
    assert out
    for rec in out:
        assert rec.conn_state in {"S0", "S1", "SF", "REJ", "S2", "S3", "RSTO", "RSTR", "RSTOS0", "RSTRH",
                                  "SH", "SHR", "OTH"}
        assert rec.orig_pkts >= 0 and rec.resp_pkts >= 0
