"""ICMP "connections" (``ICMP.cc``) and the catch-all for other IP protocols
(``unknown_ip_transport``).

ICMP: orig_p is the type; a request/reply pair (``ICMP4_counterpart``,
``ICMP6_counterpart``) shares one connection whose resp_p is the counterpart type; a
one-way message keeps its code as resp_p and stays directional.  Payload bytes are the IP
payload less the 8-byte ICMP header; conn_state is always OTH and there is no history.
Other protocols: one connection per address pair, ports 0, bytes 0.
"""

from __future__ import annotations

from gateway.flows.conntrack import timers
from gateway.flows.conntrack.conn import conn_key
from gateway.flows.packets import PROTO_ICMP, Packet

# ICMP request/reply counterparts (ICMP.cc ICMP4_counterpart / ICMP6_counterpart).
ICMP4_COUNTERPART = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
ICMP6_COUNTERPART = {128: 129, 129: 128, 133: 134, 134: 133, 135: 136, 136: 135,
                     130: 131, 131: 130, 139: 140, 140: 139, 144: 145, 145: 144}


def icmp_packet(tr, pkt: Packet, t: float) -> None:
    src, dst, itype, code = pkt.src, pkt.dst, pkt.sport, pkt.dport
    table = ICMP4_COUNTERPART if pkt.proto == PROTO_ICMP else ICMP6_COUNTERPART
    other = table.get(itype)
    if other is None:
        # one-way message (unreachable, MLD report ...): Zeek's ConnKey keeps it
        # directional, so the same message back is another connection
        other = code
        key = (pkt.proto, src, itype, dst, other, 1)
    else:
        key = conn_key(pkt.proto, src, itype, dst, other)
    conn = tr.conns.get(key)
    if conn is None:
        conn = tr.new_conn(key, pkt.proto, src, itype, dst, other, t)
        conn.inactivity_timeout = timers.ICMP_INACTIVITY
        tr.timers.push(t + timers.ICMP_INACTIVITY, timers.INACTIVITY, conn)
    if not pkt.checksum_ok:
        tr.skip("bad_ICMP_checksum")
        return
    conn.last_time = t
    n = pkt.payload_len
    is_orig = src == conn.orig_h and itype == conn.orig_p
    if is_orig:
        conn.orig_size = n if conn.orig_size < 0 else conn.orig_size + n
    else:
        conn.resp_size = n if conn.resp_size < 0 else conn.resp_size + n
    conn.count(is_orig, pkt.ip_len)


def unknown_packet(tr, pkt: Packet, t: float) -> None:
    src, dst = pkt.src, pkt.dst
    key = (pkt.proto, src, dst) if src < dst else (pkt.proto, dst, src)
    conn = tr.conns.get(key)
    if conn is None:
        conn = tr.new_conn(key, pkt.proto, src, 0, dst, 0, t)
        conn.inactivity_timeout = timers.UNKNOWN_INACTIVITY
        tr.timers.push(t + timers.UNKNOWN_INACTIVITY, timers.INACTIVITY, conn)
    conn.last_time = t
    is_orig = src == conn.orig_h
    if is_orig:
        conn.orig_size = 0
    else:
        conn.resp_size = 0
    conn.count(is_orig, pkt.ip_len)


def icmp_summary(conn) -> tuple[str, str, int, int, None]:
    return "icmp", "OTH", max(conn.orig_size, 0), max(conn.resp_size, 0), None


def unknown_summary(conn) -> tuple[str, str, int, int, None]:
    return "unknown_transport", "OTH", 0, 0, None
