"""UDP connections as Zeek tracks them (``UDP.cc``, ``UDPSessionAdapter.cc``): a
connection per 5-tuple, oriented by ``likely_server_ports`` unless the destination is
broadcast, history ``D``/``d`` once per direction and ``C``/``c`` for bad checksums on the
1st, 10th, 100th ...; payload bytes are the UDP length fields less 8.  The port's
analyzer (DNS, NTP, DHCP) sees the first payloads (:func:`.services.udp_app`).
"""

from __future__ import annotations

from gateway.flows.conntrack import timers
from gateway.flows.conntrack.conn import Conn, conn_key
from gateway.flows.conntrack.services import app_for, udp_app
from gateway.flows.packets import PROTO_UDP, Packet

HIST_ORIG_DATA_PKT, HIST_RESP_DATA_PKT = 0x1, 0x2  # Connection HIST_* values
_BROADCAST = b"\xff\xff\xff\xff"


def udp_packet(tr, pkt: Packet, t: float) -> Conn:
    """One UDP datagram; returns its connection (a UDP tunnel's inner packet needs it)."""
    src, dst, sport, dport = pkt.src, pkt.dst, pkt.sport, pkt.dport
    key = conn_key(PROTO_UDP, src, sport, dst, dport)
    conn = tr.conns.get(key)
    if conn is None:
        lsp = tr.likely_server_ports
        flip = (PROTO_UDP, sport) in lsp and (PROTO_UDP, dport) not in lsp and dst != _BROADCAST
        conn = tr.new_conn(key, PROTO_UDP, src, sport, dst, dport, t)
        if flip:
            conn.flip_roles()
        conn.app = app_for(PROTO_UDP, conn.resp_p, tr.protocols)
        tr.timers.push(t + timers.UDP_INACTIVITY, timers.INACTIVITY, conn)
        if conn.app == "dns":
            tr.timers.push(t + timers.DNS_SESSION_TIMEOUT, timers.DNS, conn)
    is_orig = src == conn.orig_h and sport == conn.orig_p
    if not pkt.checksum_ok:
        # UDPSessionAdapter::HandleBadChecksum: C/c on the 1st, 10th, 100th ...
        chk = conn.chk
        if chk is None:
            chk = conn.chk = [0, 1, 0, 1]
        i = 0 if is_orig else 2
        chk[i] += 1
        if chk[i] == chk[i + 1]:
            conn.history += "C" if is_orig else "c"
            chk[i + 1] *= 10
        return conn
    conn.last_time = t
    ulen = pkt.payload_len
    if is_orig:
        conn.check_history(HIST_ORIG_DATA_PKT, "D")
        conn.orig_size = ulen if conn.orig_size < 0 else conn.orig_size + ulen
    else:
        conn.check_history(HIST_RESP_DATA_PKT, "d")
        conn.resp_size = ulen if conn.resp_size < 0 else conn.resp_size + ulen
    if not conn.app_done and conn.app is not None:
        udp_app(conn, pkt.payload, is_orig)
    if not pkt.flags & 1:  # a datagram cut by the snap length is not counted
        conn.count(is_orig, pkt.ip_len)
    return conn


def udp_summary(conn) -> tuple[str, str, int, int, str | None]:
    """(proto name, conn_state, orig_bytes, resp_bytes, history) of an ended UDP connection."""
    os_, rs_ = conn.orig_size, conn.resp_size
    if os_ >= 0:
        state = "SF" if rs_ >= 0 else "S0"
    else:
        state = "SHR" if rs_ >= 0 else "OTH"
    return "udp", state, max(os_, 0), max(rs_, 0), conn.history or None
