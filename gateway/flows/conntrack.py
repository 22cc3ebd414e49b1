"""Connection tracking with Zeek's conn.log semantics, as a pure state machine.

:class:`ConnTracker` is fed decoded :class:`gateway.flows.packets.Packet` tuples in time order
and returns :class:`ConnRecord` values when connections end (timeouts, closes, reuse) or when
``flush()`` is called.  It does no I/O: time is the packets' time, so the same packets always
give the same records.

The rules follow Zeek (``src/packet_analysis/protocol/tcp/TCPSessionAdapter.cc``,
``TCP_Endpoint.cc``, ``UDP.cc``, ``ICMP.cc``, ``scripts/base/protocols/conn/main.zeek``):

* TCP endpoints move through :class:`TcpState` along ``TCP_TRANSITIONS`` (an illegal move raises
  :class:`IllegalTransition`); ``conn_state`` is derived from the two endpoint states.
* byte counts come from sequence numbers (gaps count as sent), ``*_ip_bytes`` from IP lengths;
  packets with a bad checksum add ``C``/``c`` to the history and count nowhere.
* history letters follow Zeek's once-per-direction and 1/10/100 scaling rules.
* orientation: ``likely_server_ports`` flip at creation (``^``), SYN/SYN-ACK reversal, and the
  DNS/NTP first-message flips.
* timers: an unanswered SYN ends after ``tcp_attempt_delay``; closed/reset connections
  ``tcp_close_delay`` after their last packet; inactivity (UDP/ICMP 1 min, UDP DNS 10 s,
  TCP 1 min during the handshake then 5 min); a new SYN with a new ISN starts a new record
  (reuse).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import ipaddress
import re
from collections.abc import Iterable
from enum import IntEnum

from gateway.flows.packets import PROTO_ICMP, PROTO_ICMP6, PROTO_TCP, PROTO_UDP, UDP_TUNNEL_PORTS, Packet
from gateway.flows.record import ConnRecord

# ---------------------------------------------------------------------------- configuration

# Ports each of Zeek's base protocol scripts adds to ``likely_server_ports``
# (``redef likely_server_ports += { ports }`` in scripts/base/protocols/*/main.zeek).
# IRC, POP3 and others register analyzers for ports but do not add them here.
TCP, UDP = PROTO_TCP, PROTO_UDP
PROTOCOL_SERVER_PORTS: dict[str, frozenset[tuple[int, int]]] = {
    "dce-rpc": frozenset({(TCP, 135)}),
    "dhcp": frozenset({(UDP, 67)}),
    "dnp3": frozenset({(TCP, 20000), (UDP, 20000)}),
    "dns": frozenset({(UDP, 53), (TCP, 53), (UDP, 137), (UDP, 5353), (UDP, 5355)}),
    "ftp": frozenset({(TCP, 21), (TCP, 2811)}),
    "http": frozenset({(TCP, p) for p in (80, 81, 631, 1080, 3128, 8000, 8080, 8888)}),
    "krb": frozenset({(UDP, 88), (TCP, 88)}),
    "ldap": frozenset({(TCP, 389), (TCP, 3268), (UDP, 389)}),
    "modbus": frozenset({(TCP, 502)}),
    "mysql": frozenset({(TCP, 1434), (TCP, 3306)}),
    "ntp": frozenset({(UDP, 123)}),
    "radius": frozenset({(UDP, 1812)}),
    "rdp": frozenset({(TCP, 3389), (UDP, 3389)}),
    "sip": frozenset({(UDP, 5060)}),
    "smb": frozenset({(TCP, 139), (TCP, 445)}),
    "smtp": frozenset({(TCP, 25), (TCP, 587)}),
    "snmp": frozenset({(UDP, 161), (UDP, 162)}),
    "socks": frozenset({(TCP, 1080)}),
    "ssh": frozenset({(TCP, 22)}),
    "ssl": frozenset({(TCP, p) for p in (443, 563, 585, 614, 636, 989, 990, 992, 993, 995, 5223)}
                     | {(UDP, 443)}),
    "syslog": frozenset({(UDP, 514)}),
    "tunnels": frozenset({(UDP, 5072), (UDP, 3544), (UDP, 2152), (UDP, 2123), (UDP, 4789), (UDP, 6081)}),
    "xmpp": frozenset({(TCP, 5222), (TCP, 5269)}),
}
DEFAULT_LIKELY_SERVER_PORTS: frozenset[tuple[int, int]] = frozenset().union(*PROTOCOL_SERVER_PORTS.values())

# Site::private_address_space (scripts/base/utils/site.zeek, the IANA special-purpose
# registries with their 6to4 images): Zeek's default local_nets.
DEFAULT_LOCAL_NETS: tuple[str, ...] = (
    "0.0.0.0/8", "2002::/24", "10.0.0.0/8", "2002:a00::/24", "100.64.0.0/10", "2002:6440::/26",
    "127.0.0.0/8", "2002:7f00::/24", "169.254.0.0/16", "2002:a9fe::/32", "172.16.0.0/12",
    "2002:ac10::/28", "192.0.0.0/24", "2002:c000::/40", "192.0.2.0/24", "2002:c000:200::/40",
    "192.168.0.0/16", "2002:c0a8::/32", "198.18.0.0/15", "2002:c612::/31", "198.51.100.0/24",
    "2002:c633:6400::/40", "203.0.113.0/24", "2002:cb00:7100::/40", "240.0.0.0/4", "2002:f000::/20",
    "255.255.255.255/32", "2002:ffff:ffff::/48",
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:2::/48", "2001:db8::/32",
    "fc00::/7", "fe80::/10",
)

# Timeouts from scripts/base/init-bare.zeek (seconds).
TCP_ATTEMPT_DELAY = 5.0
TCP_CLOSE_DELAY = 5.0
TCP_RESET_DELAY = 5.0
TCP_SYN_TIMEOUT = 5.0
TCP_SESSION_TIMER = 6.0
TCP_CONNECTION_LINGER = 5.0
TCP_INACTIVITY = 300.0
UDP_INACTIVITY = 60.0
ICMP_INACTIVITY = 60.0
UNKNOWN_INACTIVITY = 60.0
DNS_SESSION_TIMEOUT = 10.0  # dns_session_timeout: UDP DNS sessions end sooner
# scripts/base/protocols/conn/inactivity.zeek: long-lived interactive services.
PORT_INACTIVITY = {21: 3600.0, 22: 3600.0, 23: 3600.0, 513: 3600.0}
ANALYZER_INACTIVITY = {"ssh": 3600.0, "ftp": 3600.0}


def likely_server_ports_for(protocols: Iterable[str] | None) -> frozenset[tuple[int, int]]:
    """``likely_server_ports`` when only ``protocols`` are loaded (``None``: all, Zeek's default)."""
    if protocols is None:
        return DEFAULT_LIKELY_SERVER_PORTS
    # the tunnel packet analyzers (base/packet-protocols) are loaded even in bare mode
    ports: set[tuple[int, int]] = set(PROTOCOL_SERVER_PORTS["tunnels"])
    for name in protocols:
        ports |= PROTOCOL_SERVER_PORTS.get(name, frozenset())
    return frozenset(ports)


# ---------------------------------------------------------------------------- TCP state machine

class TcpState(IntEnum):
    """A TCP endpoint's state (Zeek's ``TCP_ENDPOINT_*``)."""

    INACTIVE = 0
    SYN_SENT = 1
    SYN_ACK_SENT = 2
    PARTIAL = 3
    ESTABLISHED = 4
    CLOSED = 5
    RESET = 6


INACTIVE, SYN_SENT, SYN_ACK_SENT, PARTIAL, ESTABLISHED, CLOSED, RESET = (
    TcpState.INACTIVE, TcpState.SYN_SENT, TcpState.SYN_ACK_SENT, TcpState.PARTIAL,
    TcpState.ESTABLISHED, TcpState.CLOSED, TcpState.RESET,
)

# Every move Zeek's TCPSessionAdapter makes (UpdateInactiveState, UpdateSYN_SentState,
# UpdateEstablishedState, UpdateClosedState, SYN/SYN-ACK reversal); nothing else is legal.
TCP_TRANSITIONS: frozenset[tuple[TcpState, TcpState]] = frozenset({
    (INACTIVE, SYN_SENT), (INACTIVE, SYN_ACK_SENT), (INACTIVE, ESTABLISHED), (INACTIVE, PARTIAL),
    (INACTIVE, CLOSED), (INACTIVE, RESET),
    (SYN_SENT, ESTABLISHED), (SYN_SENT, CLOSED), (SYN_SENT, RESET),
    (SYN_ACK_SENT, ESTABLISHED), (SYN_ACK_SENT, CLOSED), (SYN_ACK_SENT, RESET),
    (PARTIAL, SYN_SENT), (PARTIAL, ESTABLISHED), (PARTIAL, CLOSED), (PARTIAL, RESET),
    (ESTABLISHED, CLOSED), (ESTABLISHED, RESET),
    (CLOSED, RESET), (RESET, CLOSED),
})
_HANDSHAKE = frozenset({INACTIVE, SYN_SENT, SYN_ACK_SENT})


class IllegalTransition(Exception):
    """A TCP endpoint was asked to make a move Zeek's state machine never makes."""

    def __init__(self, old: TcpState, new: TcpState):
        super().__init__(f"illegal TCP endpoint transition {old.name} -> {new.name}")
        self.old = old
        self.new = new


# TCP flag bits
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

# History masks (Zeek's TCP_Endpoint HIST_* and Connection HIST_* values); responder << 16.
HIST_SYN_PKT, HIST_FIN_PKT, HIST_RST_PKT, HIST_FIN_RST_PKT = 0x1, 0x2, 0x4, 0x8
HIST_DATA_PKT, HIST_ACK_PKT, HIST_MULTI_FLAG_PKT = 0x10, 0x20, 0x40
HIST_ORIG_DATA_PKT, HIST_RESP_DATA_PKT = 0x1, 0x2
HIST_ORIG_CORRUPT_PKT, HIST_RESP_CORRUPT_PKT = 0x4, 0x8

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
TOO_LARGE_SEQ_DELTA = 1048576


def seq_delta(a: int, b: int) -> int:
    """Signed 32-bit difference a - b."""
    d = (a - b) & M32
    return d - 0x100000000 if d & 0x80000000 else d


def _seq_between(s: int, low: int, high: int) -> bool:
    return seq_delta(s, low) >= 0 and seq_delta(s, high) <= 0


# ICMP request/reply counterparts (ICMP.cc ICMP4_counterpart / ICMP6_counterpart).
ICMP4_COUNTERPART = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
ICMP6_COUNTERPART = {128: 129, 129: 128, 133: 134, 134: 133, 135: 136, 136: 135,
                     130: 131, 131: 130, 139: 140, 140: 139, 144: 145, 145: 144}


class TcpEndpoint:
    """One side of a TCP connection (Zeek's TCP_Endpoint, the parts conn.log needs)."""

    __slots__ = (
        "conn", "is_orig", "peer", "state", "prev_state", "start_seq", "last_seq", "ack_seq",
        "seq_wraps", "ack_wraps", "window", "window_scale", "window_seq", "window_ack_seq",
        "fin_cnt", "rst_cnt", "fin_seq", "did_close", "hist_last_syn", "hist_last_fin",
        "hist_last_rst", "chk_cnt", "chk_thresh", "rxmt_cnt", "rxmt_thresh", "win0_cnt",
        "win0_thresh", "gap_cnt", "gap_thresh", "reassem_seq", "blocks",
    )

    def __init__(self, conn: Conn, is_orig: bool):
        self.conn = conn
        self.is_orig = is_orig
        self.peer: TcpEndpoint = self
        self.state = INACTIVE
        self.prev_state = INACTIVE
        self.start_seq = self.last_seq = self.ack_seq = 0
        self.seq_wraps = self.ack_wraps = 0
        self.window = 0
        self.window_scale = 0
        self.window_seq = self.window_ack_seq = 0
        self.fin_cnt = self.rst_cnt = 0
        self.fin_seq = 0
        self.did_close = False
        self.hist_last_syn = self.hist_last_fin = self.hist_last_rst = 0
        self.chk_cnt = self.rxmt_cnt = self.win0_cnt = self.gap_cnt = 0
        self.chk_thresh = self.rxmt_thresh = self.win0_thresh = self.gap_thresh = 1
        self.reassem_seq = 1  # next relative sequence number the reassembler expects
        self.blocks: dict[int, int] | None = None  # out-of-order data: start -> end

    def set_state(self, new: TcpState) -> None:
        old = self.state
        if new == old:
            return
        if (old, new) not in TCP_TRANSITIONS:
            raise IllegalTransition(old, new)
        if new not in _HANDSHAKE and old in _HANDSHAKE and self.peer.state in _HANDSHAKE:
            self.conn.inactivity_timeout = TCP_INACTIVITY
        self.prev_state = old
        self.state = new

    def size(self) -> int:
        if (self.prev_state == SYN_SENT and self.state == RESET and self.peer.state == INACTIVE
                and not self.no_data_acked()):
            return 0
        last64 = (self.seq_wraps << 32) | self.last_seq
        ack64 = (self.ack_wraps << 32) | self.ack_seq
        size = ((last64 if last64 > ack64 else ack64) - self.start_seq) & M64
        if size:
            size -= 1
        if self.fin_cnt > 0 and size:
            size -= 1
        return size

    def no_data_acked(self) -> bool:
        ack = (self.ack_wraps << 32) | self.ack_seq
        return ack == self.start_seq or ack == self.start_seq + 1

    def update_last_seq(self, s: int) -> None:
        if s < self.last_seq:
            self.seq_wraps += 1
        self.last_seq = s

    def update_ack_seq(self, s: int) -> None:
        if s < self.ack_seq:
            self.ack_wraps += 1
        self.ack_seq = s

    def scaled(self, code: str, counter: str, thresh: str) -> None:
        """Zeek's ScaledHistoryEntry: add the letter on the 1st, 10th, 100th ... event."""
        n = getattr(self, counter) + 1
        setattr(self, counter, n)
        if n == getattr(self, thresh):
            self.conn.history += code if self.is_orig else code.lower()
            setattr(self, thresh, n * 10)

    def check_history(self, mask: int, code: str) -> bool:
        """Add ``code`` the first time ``mask`` is seen; True if it had been seen before."""
        if not self.is_orig:
            mask <<= 16
            code = code.lower()
        c = self.conn
        if c.hist_mask & mask:
            return True
        c.hist_mask |= mask
        c.history += code
        return False

    def add_history(self, code: str) -> None:
        self.conn.history += code if self.is_orig else code.lower()

    # ------------------------------------------------------------ reassembly (gaps only)
    def data_sent(self, seq: int, length: int) -> None:
        end = seq + length
        if end <= self.reassem_seq:
            return
        if seq <= self.reassem_seq:
            self.reassem_seq = end
            blocks = self.blocks
            if blocks:
                self._merge_blocks()
            return
        if self.blocks is None:
            self.blocks = {}
        if len(self.blocks) < 4096:
            prev = self.blocks.get(seq, 0)
            if end > prev:
                self.blocks[seq] = end

    def _merge_blocks(self) -> None:
        blocks = self.blocks
        assert blocks is not None
        moved = True
        while moved and blocks:
            moved = False
            for start in sorted(blocks):
                if start <= self.reassem_seq:
                    end = blocks.pop(start)
                    if end > self.reassem_seq:
                        self.reassem_seq = end
                    moved = True
                else:
                    break

    def ack_received(self, up_to: int) -> None:
        """The peer acknowledged our data up to ``up_to``: unseen bytes below it are a gap."""
        if self.fin_cnt > 0 and up_to >= self.fin_seq:
            up_to = self.fin_seq - 1
        if up_to <= self.reassem_seq:
            return
        conn = self.conn
        if up_to <= 2 and conn.is_partial:
            return
        missing = up_to - self.reassem_seq
        if self.blocks:
            for start in sorted(self.blocks):
                end = self.blocks[start]
                if start >= up_to:
                    break
                lo = max(start, self.reassem_seq)
                hi = min(end, up_to)
                if hi > lo:
                    missing -= hi - lo
        self.reassem_seq = up_to
        if self.blocks:
            self._merge_blocks()
        if missing > 0 and _is_clean(self) and _is_clean(self.peer):
            conn.missed_bytes += missing
            self.scaled("G", "gap_cnt", "gap_thresh")


def _is_clean(e: TcpEndpoint) -> bool:
    return e.state == ESTABLISHED or (e.state == CLOSED and e.prev_state == ESTABLISHED)


# ---------------------------------------------------------------------------- connections

class Conn:
    """One tracked connection (any protocol)."""

    __slots__ = (
        "key", "proto", "orig_h", "orig_p", "resp_h", "resp_p", "start_time", "last_time",
        "history", "hist_mask", "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes",
        "orig", "resp", "orig_size", "resp_size", "removed", "inactivity_timeout", "service",
        "missed_bytes", "is_partial", "first_packet_seen", "is_active", "app", "app_done",
        "seq_no", "ip_proto", "parents", "uid", "chk",
    )

    def __init__(self, key, proto: int, orig_h: bytes, orig_p: int, resp_h: bytes, resp_p: int, t: float):
        self.key = key
        self.proto = proto
        self.ip_proto = proto
        self.orig_h = orig_h
        self.orig_p = orig_p
        self.resp_h = resp_h
        self.resp_p = resp_p
        self.start_time = t
        self.last_time = t
        self.history = ""
        self.hist_mask = 0
        self.orig_pkts = self.orig_ip_bytes = self.resp_pkts = self.resp_ip_bytes = 0
        self.orig: TcpEndpoint | None = None
        self.resp: TcpEndpoint | None = None
        self.orig_size = self.resp_size = -1  # UDP/ICMP payload totals; -1 = never sent
        self.removed = False
        self.inactivity_timeout = UDP_INACTIVITY
        self.service: set[str] | None = None
        self.missed_bytes = 0
        self.is_partial = False
        self.first_packet_seen = 0
        self.is_active = True
        self.app: str | None = None  # application analyzer guessed from the ports
        self.app_done = False
        self.seq_no = 0
        self.parents: tuple[str, ...] | None = None  # uids of enclosing tunnel connections
        self.uid: str | None = None
        self.chk: list[int] | None = None  # UDP bad-checksum counters and thresholds

    def count(self, is_orig: bool, ip_len: int) -> None:
        """Zeek's ConnSize analyzer: packets and IP bytes per direction."""
        if is_orig:
            self.orig_pkts += 1
            self.orig_ip_bytes += ip_len
        else:
            self.resp_pkts += 1
            self.resp_ip_bytes += ip_len

    def flip_roles(self) -> None:
        """Swap originator and responder (Zeek's Connection::FlipRoles); appends ``^``."""
        self.orig_h, self.resp_h = self.resp_h, self.orig_h
        self.orig_p, self.resp_p = self.resp_p, self.orig_p
        # ConnSize swaps its counters; the UDP/ICMP request/reply sizes stay where they are
        # (Zeek's UDP session adapter has no FlipRoles), TCP sizes move with the endpoints
        self.orig_pkts, self.resp_pkts = self.resp_pkts, self.orig_pkts
        self.orig_ip_bytes, self.resp_ip_bytes = self.resp_ip_bytes, self.orig_ip_bytes
        if self.orig is not None:
            self.orig, self.resp = self.resp, self.orig
            self.orig.is_orig = True
            self.resp.is_orig = False
            fps = self.first_packet_seen
            self.first_packet_seen = (2 if fps & 1 else 0) | (1 if fps & 2 else 0)
            self.is_partial = False
        self.history += "^"


_ORIG, _RESP = 1, 2
_ACK_PSH = ACK | PSH
# timer kinds
_T_INACTIVITY, _T_ATTEMPT, _T_DELETE, _T_EXPIRE, _T_RESET, _T_DNS = 0, 1, 2, 3, 4, 5

# Application analyzers attached by port (what Zeek's DPD would try first) for `service`.
_APP_BY_PORT = {
    (TCP, 80): "http", (TCP, 81): "http", (TCP, 631): "http", (TCP, 1080): "http",
    (TCP, 3128): "http", (TCP, 8000): "http", (TCP, 8080): "http", (TCP, 8888): "http",
    (TCP, 21): "ftp", (TCP, 2811): "ftp", (TCP, 22): "ssh", (TCP, 25): "smtp", (TCP, 587): "smtp",
    (TCP, 443): "ssl", (TCP, 563): "ssl", (TCP, 585): "ssl", (TCP, 614): "ssl", (TCP, 636): "ssl",
    (TCP, 989): "ssl", (TCP, 990): "ssl", (TCP, 992): "ssl", (TCP, 993): "ssl", (TCP, 995): "ssl",
    (TCP, 5223): "ssl", (TCP, 53): "dns", (UDP, 53): "dns", (UDP, 137): "dns", (UDP, 5353): "dns",
    (UDP, 5355): "dns", (UDP, 123): "ntp", (UDP, 67): "dhcp", (UDP, 68): "dhcp",
    (TCP, 110): "pop3", (TCP, 143): "imap", (TCP, 6666): "irc", (TCP, 6667): "irc",
    (TCP, 6668): "irc", (TCP, 6669): "irc", (UDP, 161): "snmp", (UDP, 162): "snmp",
    (UDP, 514): "syslog", (UDP, 5060): "sip", (TCP, 3306): "mysql", (TCP, 1883): "mqtt",
}

_HTTP_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"CONNECT ",
                 b"TRACE ", b"PATCH ", b"PROPFIND ")


def sniff_service(proto: int, payload: bytes, is_orig: bool) -> str | None:
    """Light payload checks for the protocols Zeek's DPD signatures recognise most often."""
    if not payload:
        return None
    if proto == TCP:
        if is_orig and payload.startswith(_HTTP_METHODS):
            return "http"
        if not is_orig and payload.startswith(b"HTTP/1."):
            return "http"
        if payload.startswith(b"SSH-") and len(payload) > 6:
            return "ssh"
        if (len(payload) >= 6 and payload[0] == 0x16 and payload[1] == 0x03 and payload[2] <= 0x04
                and payload[5] in (1, 2)):
            return "ssl"
        if is_orig and payload[:5].upper() in (b"USER ", b"AUTH "):
            return "ftp"
        if is_orig and payload[:5].upper() in (b"EHLO ", b"HELO "):
            return "smtp"
    return None


def _dns_plausible(payload: bytes) -> bool:
    if len(payload) < 12:
        return False
    qd = payload[4] << 8 | payload[5]
    opcode = (payload[2] >> 3) & 0xF
    return qd <= 16 and opcode in (0, 1, 2, 4, 5)


class ConnTracker:
    """Turns a time-ordered stream of packets into Zeek conn records.

    Keyword-only configuration (defaults are Zeek's):

    * ``local_nets``: CIDR strings for ``local_orig``/``local_resp`` (default: Zeek's private
      address space); an empty tuple leaves both fields unset.
    * ``likely_server_ports``: ``(ip_proto, port)`` pairs used to orient connections that
      start mid-stream (default: every base protocol script's ports).
    * ``protocols``: application analyzers considered for ``service`` and the DNS/NTP flips
      (default ``None``: all, as in a default Zeek; bare mode loads only a few).
    * ``max_connections``: memory bound; beyond it the oldest connection is ended early and
      counted as ``connection_table_full`` (default 1,000,000).
    * ``fast_path`` (default True): plain ACK/PSH segments on a connection whose endpoints are
      both past the handshake skip the general state machine (same records; False forces the
      general path, which the equality tests compare against).
    """

    def __init__(
        self,
        *,
        local_nets: Iterable[str] = DEFAULT_LOCAL_NETS,
        likely_server_ports: frozenset[tuple[int, int]] = DEFAULT_LIKELY_SERVER_PORTS,
        protocols: Iterable[str] | None = None,
        max_connections: int = 1_000_000,
        fast_path: bool = True,
    ):
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        # the shortcut is proved equal to the general path by tests/unit/test_conntrack_fast.py
        self.fast_path = bool(fast_path)
        self.local_nets = tuple(ipaddress.ip_network(n, strict=False) for n in local_nets)
        self._local_ranges = _address_ranges(self.local_nets)
        self.likely_server_ports = frozenset(likely_server_ports)
        self.protocols = None if protocols is None else frozenset(protocols)
        self.max_connections = max_connections
        self.conns: dict[tuple, Conn] = {}
        self.skipped: dict[str, int] = {}
        self.network_time = 0.0
        self._timers: list = []
        self._timer_seq = 0
        self._out: list[ConnRecord] = []
        self._addr_cache: dict[bytes, tuple[str, bool | None]] = {}
        self._uid_counter = 0
        # FTP data channels announced on control connections: (orig_h, resp_h, resp_p) -> expiry
        self._expected: dict[tuple[bytes, bytes, int], float] = {}
        self._expected_limit = 10_000
        self._parent: tuple[str, ...] | None = None  # tunnel parents of the packet being processed

    # ------------------------------------------------------------------ public API
    def feed(self, pkt: Packet) -> list[ConnRecord] | tuple[()]:
        """Process one packet; return the records of connections that ended meanwhile
        (usually none: an empty tuple, so the common case allocates nothing)."""
        t = pkt.ts
        if t > self.network_time:
            self.network_time = t
            if self._timers and self._timers[0][0] <= t:
                self._run_timers(t)
        # an out-of-order packet keeps its own time for the connection (as in Zeek); only
        # network time, which drives the timers, never goes back
        if pkt.proto == PROTO_TCP and pkt.tunnel is None:
            self._tcp(pkt, t)  # the common case, without the dispatch layer
        else:
            self._dispatch(pkt, t)
        if self._out:
            out, self._out = self._out, []
            return out
        return _EMPTY

    def feed_many(self, packets: Iterable[Packet]) -> list[ConnRecord]:
        """:meth:`feed` over many packets: the records of the connections that ended
        meanwhile, in the same order.  The hot loop of a file conversion: the dispatch and
        the established-TCP shortcut's entry checks run inline (no call per packet for them)."""
        conns = self.conns
        timers = self._timers
        established = self._tcp_established if self.fast_path else None
        tcp = self._tcp
        dispatch = self._dispatch
        for pkt in packets:
            t = pkt[0]
            if t > self.network_time:
                self.network_time = t
                if timers and timers[0][0] <= t:
                    self._run_timers(t)
            if pkt[3] == PROTO_TCP and pkt[15] is None:  # proto, tunnel
                flags = pkt[8]
                if (flags == ACK or flags == _ACK_PSH) and established is not None and pkt[12]:  # checksum_ok
                    src, dst, sport, dport = pkt[1], pkt[2], pkt[4], pkt[5]
                    if src < dst or (src == dst and sport < dport):  # _conn_key, as in _tcp
                        conn = conns.get((6, src, sport, dst, dport))
                    else:
                        conn = conns.get((6, dst, dport, src, sport))
                    if conn is not None and conn.first_packet_seen == 3 and established(conn, pkt, t):
                        continue
                tcp(pkt, t)
            else:
                dispatch(pkt, t)
        out, self._out = self._out, []
        return out

    def _dispatch(self, pkt: Packet, t: float, parent: tuple[str, ...] | None = None) -> None:
        if parent is None and pkt.tunnel is not None:
            parent = (_tunnel_uid(pkt.tunnel),)
        self._parent = parent
        proto = pkt.proto
        if proto == PROTO_TCP:
            self._tcp(pkt, t)
        elif proto == PROTO_UDP:
            outer = self._udp(pkt, t)
            inner = pkt.inner
            if inner is not None:
                # a UDP tunnel (VXLAN, Geneve, Teredo, GTP-U): the carrier is a connection of
                # its own, and what it carries is tracked with the carrier as parent
                kind = UDP_TUNNEL_PORTS.get(outer.resp_p) or UDP_TUNNEL_PORTS.get(outer.orig_p)
                if kind and (self.protocols is None or "tunnels" in self.protocols):
                    self._add_service(outer, kind)
                self._dispatch(inner, t, (_uid(outer),))
        elif proto == PROTO_ICMP or proto == PROTO_ICMP6:
            self._icmp(pkt, t)
        else:
            self._unknown(pkt, t)
        self._parent = None

    def advance(self, now: float) -> list[ConnRecord]:
        """Let time pass without a packet (live capture): fire due timers."""
        if now > self.network_time:
            self.network_time = now
            self._run_timers(now)
        out, self._out = self._out, []
        return out

    def flush(self) -> list[ConnRecord]:
        """End every open connection (end of trace) and return their records."""
        for conn in sorted(self.conns.values(), key=lambda c: (c.start_time, c.seq_no)):
            self._remove(conn)
        self._timers.clear()
        out, self._out = self._out, []
        return out

    @property
    def open_connections(self) -> int:
        return len(self.conns)

    # ------------------------------------------------------------------ bookkeeping
    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _timer(self, when: float, kind: int, conn: Conn) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, kind, conn))

    def _run_timers(self, t: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= t:
            when, _, kind, conn = heapq.heappop(timers)
            if conn.removed:
                continue
            if kind == _T_INACTIVITY:
                due = conn.last_time + conn.inactivity_timeout
                if due <= when:
                    self._remove(conn)
                else:
                    self._timer(due, _T_INACTIVITY, conn)
            elif kind == _T_DELETE:
                self._remove(conn)
            elif kind == _T_ATTEMPT:
                o, r = conn.orig, conn.resp
                if conn.is_active and o.state in (SYN_SENT, SYN_ACK_SENT) and r.state == INACTIVE:
                    conn.is_active = False
                    self._remove(conn)
            elif kind == _T_RESET:
                if conn.is_active:
                    self._remove(conn)
            elif kind == _T_EXPIRE:
                self._expire_timer(conn, when)
            elif kind == _T_DNS:
                # DNS_Analyzer::ExpireTimer: a UDP DNS session ends after dns_session_timeout
                # (less a second of slack) without packets
                if when - conn.last_time >= DNS_SESSION_TIMEOUT - 1.0:
                    self._remove(conn)
                else:
                    self._timer(when + DNS_SESSION_TIMEOUT, _T_DNS, conn)

    def _expire_timer(self, conn: Conn, t: float) -> None:
        if not conn.is_active:
            return
        o, r = conn.orig, conn.resp
        if conn.last_time + TCP_CONNECTION_LINGER < t:
            if o.did_close or r.did_close:
                if ((o.did_close and r.did_close) or o.state == RESET or r.state == RESET
                        or o.state == INACTIVE or r.state == INACTIVE):
                    conn.is_active = False
                    self._remove(conn)
                    return
            if r.state == INACTIVE and o.state == INACTIVE:
                self._remove(conn)
                return
        self._timer(t + TCP_SESSION_TIMER, _T_EXPIRE, conn)

    def _new_conn(self, key, proto, orig_h, orig_p, resp_h, resp_p, t) -> Conn:
        if len(self.conns) >= self.max_connections:
            oldest = min(self.conns.values(), key=lambda c: c.last_time)
            self._skip("connection_table_full")
            self._remove(oldest)
        conn = Conn(key, proto, orig_h, orig_p, resp_h, resp_p, t)
        if self._parent is not None:
            conn.parents = self._parent
        self._uid_counter += 1
        conn.seq_no = self._uid_counter
        self.conns[key] = conn
        return conn

    def _remove(self, conn: Conn) -> None:
        if conn.removed:
            return
        conn.removed = True
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        self._out.append(self._record(conn))
        o = conn.orig
        if o is not None:
            # break the conn <-> endpoint cycles: refcounting frees the connection when its
            # last timer fires, instead of a full collection pass over every live object
            # (a removed connection is never touched again: timers skip it first)
            r = conn.resp
            o.conn = o.peer = r.conn = r.peer = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ TCP
    def _tcp(self, pkt: Packet, t: float) -> None:
        src, dst, sport, dport = pkt.src, pkt.dst, pkt.sport, pkt.dport
        if src < dst or (src == dst and sport < dport):  # _conn_key, inlined (hot path)
            key = (6, src, sport, dst, dport)
        else:
            key = (6, dst, dport, src, sport)
        flags = pkt.flags
        conn = self.conns.get(key)
        if (conn is not None and (flags == ACK or flags == _ACK_PSH) and conn.first_packet_seen == 3
                and pkt.checksum_ok and self.fast_path and self._tcp_established(conn, pkt, t)):
            return
        if conn is not None and flags & SYN and pkt.payload_len >= 0 and self._tcp_is_reuse(conn, pkt, t):
            self._remove(conn)
            conn = None
        if conn is None:
            flip = False
            if not flags & SYN or flags & ACK:
                lsp = self.likely_server_ports
                if (TCP, sport) in lsp:
                    if (TCP, dport) in lsp:
                        flip = not flags & SYN and sport < dport
                    else:
                        flip = True
            conn = self._new_conn(key, PROTO_TCP, src, sport, dst, dport, t)
            conn.orig = TcpEndpoint(conn, True)
            conn.resp = TcpEndpoint(conn, False)
            conn.orig.peer = conn.resp
            conn.resp.peer = conn.orig
            if flip:
                conn.flip_roles()
            conn.app = self._app_for(TCP, conn.resp_p)
            if self._expected:
                self._apply_expected(conn, t)
            self._timer(t + TCP_SYN_TIMEOUT, _T_EXPIRE, conn)
            self._timer(t + conn.inactivity_timeout, _T_INACTIVITY, conn)
            new = True
        else:
            new = False
        is_orig = src == conn.orig_h and sport == conn.orig_p
        endpoint = conn.orig if is_orig else conn.resp
        if pkt.payload_len < 0:
            pass  # unusable TCP header: the connection exists, the packet counts nowhere
        elif not pkt.checksum_ok:
            endpoint.scaled("C", "chk_cnt", "chk_thresh")
        else:
            self._tcp_process(conn, endpoint, pkt, t)
            # ConnSize counts every packet the TCP analyzer accepted, under the direction it
            # had when it arrived (a SYN/SYN-ACK reversal flips the counters first)
            conn.count(is_orig, pkt.ip_len)
        if new:
            # new_connection handlers run after the first packet (inactivity.zeek)
            port_timeout = PORT_INACTIVITY.get(conn.resp_p)
            if port_timeout is not None:
                conn.inactivity_timeout = port_timeout

    def _tcp_established(self, conn: Conn, pkt: Packet, t: float) -> bool:
        """:meth:`_tcp_process` + counting for a plain ACK/PSH segment on a connection whose
        endpoints are both ESTABLISHED or PARTIAL (both directions already seen, no sequence
        wrap-around so far): the general path's steps in the same order, with the branches
        that cannot apply left out.  Returns False, having changed nothing, when the packet
        needs the general path."""
        (_ts, src, _dst, _proto, sport, _dport, ip_len, length, flags, base_seq, ack_seq, window,
         _ok, payload, _opts, _tunnel, _inner) = pkt
        if length < 0:
            return False
        is_orig = src == conn.orig_h and sport == conn.orig_p
        if is_orig:
            endpoint, peer = conn.orig, conn.resp
        else:
            endpoint, peer = conn.resp, conn.orig
        st = endpoint.state
        if not (PARTIAL <= st <= ESTABLISHED and PARTIAL <= peer.state <= ESTABLISHED):
            return False
        last = endpoint.last_seq
        if endpoint.seq_wraps or not (base_seq >= last or (last - base_seq) < 0x80000000):
            return False
        pack = peer.ack_seq
        d = (ack_seq - pack) & M32
        delta_ack = d - 0x100000000 if d & 0x80000000 else d
        if peer.ack_wraps or (delta_ack > 0 and ack_seq < pack):
            return False
        # --- from here on the packet is handled; nothing below returns False
        d = (base_seq - endpoint.start_seq) & M32
        rel_seq = d - 0x100000000 if d & 0x80000000 else d
        # update_history: no SYN/FIN/RST
        mask = HIST_DATA_PKT if length else HIST_ACK_PKT
        if not is_orig:
            mask <<= 16
        if not conn.hist_mask & mask:
            conn.hist_mask |= mask
            conn.history += ("D" if length else "A") if is_orig else ("d" if length else "a")
        if window:
            if ((base_seq - endpoint.window_seq) & M32) < 0x80000000 and \
                    ((ack_seq - endpoint.window_ack_seq) & M32) < 0x80000000:
                endpoint.window = window << endpoint.window_scale
                endpoint.window_ack_seq = ack_seq
                endpoint.window_seq = base_seq
        else:
            self._update_window(endpoint, window, base_seq, ack_seq, flags)
        if not (endpoint.did_close and peer.did_close):
            conn.last_time = t
        # ACK: the peer's relative ack and its highest ack
        d = (ack_seq - peer.start_seq) & M32
        rel_ack = d - 0x100000000 if d & 0x80000000 else d
        if rel_ack < 0:
            rel_ack = 0
        elif delta_ack > 0 and not (ack_seq == 0 and delta_ack > TOO_LARGE_SEQ_DELTA):
            peer.ack_seq = ack_seq  # no wrap: excluded above
        # update_last_seq
        seq_one_past = (base_seq + length) & M32
        d = (seq_one_past - last) & M32
        if d and not d & 0x80000000:
            if seq_one_past < last:
                endpoint.seq_wraps += 1
            endpoint.last_seq = seq_one_past
        elif length > 0:
            endpoint.scaled("T", "rxmt_cnt", "rxmt_thresh")
        # the state machine has nothing to do for a plain segment in these states
        if peer.fin_cnt or rel_ack > peer.reassem_seq:
            peer.ack_received(rel_ack)
        if length > 0 and rel_seq >= 0:
            if len(payload) >= length:
                end = rel_seq + length
                if end > endpoint.reassem_seq:
                    if rel_seq <= endpoint.reassem_seq and not endpoint.blocks:
                        endpoint.reassem_seq = end
                    else:
                        endpoint.data_sent(rel_seq, length)
            if not conn.app_done:
                self._detect_service(conn, pkt, is_orig)
        if is_orig:
            conn.orig_pkts += 1
            conn.orig_ip_bytes += ip_len
        else:
            conn.resp_pkts += 1
            conn.resp_ip_bytes += ip_len
        return True

    def _tcp_is_reuse(self, conn: Conn, pkt: Packet, t: float) -> bool:
        """Zeek's TCPSessionAdapter::IsReuse for a SYN on an existing connection."""
        o, r = conn.orig, conn.resp
        conn_orig = o
        if pkt.flags & ACK:
            if o.state != INACTIVE:
                return False
            conn_orig = r
        if not (o.did_close or r.did_close):
            base_seq = pkt.seq
            if base_seq == conn_orig.start_seq:
                return False
            if (not pkt.flags & ACK and conn_orig.state == SYN_ACK_SENT and r.state == INACTIVE
                    and base_seq == r.start_seq):
                return False
        return True

    def _tcp_process(self, conn: Conn, endpoint: TcpEndpoint, pkt: Packet, t: float) -> None:
        flags = pkt.flags
        syn = flags & SYN
        fin = flags & FIN
        rst = flags & RST
        ack = flags & ACK
        peer = endpoint.peer
        base_seq = pkt.seq
        ack_seq = pkt.ack
        length = pkt.payload_len

        # SetPartialStatus
        if endpoint.is_orig:
            if not conn.first_packet_seen & _ORIG:
                conn.is_partial = not syn or bool(ack)
        elif not conn.first_packet_seen & _RESP and not conn.is_partial:
            conn.is_partial = not syn

        seg_len = length + (1 if syn else 0) + (1 if fin else 0)
        if rst:
            seg_len -= length
        seq_one_past = (base_seq + seg_len) & M32

        # init_endpoint
        st = endpoint.state
        if st == INACTIVE:
            if syn:
                endpoint.ack_seq = endpoint.start_seq = base_seq
                last = seq_one_past
            else:
                endpoint.ack_seq = endpoint.start_seq = (base_seq - 1) & M32
                last = base_seq
            endpoint.last_seq = last
        elif syn:
            if st in (SYN_SENT, SYN_ACK_SENT):
                if base_seq != endpoint.start_seq:
                    endpoint.start_seq = endpoint.ack_seq = base_seq
                    endpoint.last_seq = seq_one_past
            elif st in (ESTABLISHED, PARTIAL):
                endpoint.start_seq = endpoint.ack_seq = base_seq
                endpoint.last_seq = seq_one_past
            elif st == RESET and endpoint.prev_state == INACTIVE:
                endpoint.start_seq = endpoint.ack_seq = base_seq
                endpoint.last_seq = seq_one_past

        last = endpoint.last_seq
        if endpoint.seq_wraps == 0 and (base_seq >= last or (last - base_seq) < 0x80000000):
            # common case, no wrap-around: get_relative_seq reduces to seq_delta(seq, start)
            d = (base_seq - endpoint.start_seq) & M32
            rel_seq = d - 0x100000000 if d & 0x80000000 else d
            seq_underflow = rel_seq < 0
        else:
            rel_seq, seq_underflow = self._relative_seq(endpoint, base_seq, last, endpoint.seq_wraps)

        # update_history
        bits = (1 if syn else 0) + (1 if fin else 0) + (1 if rst else 0)
        if bits > 1:
            if fin and rst:
                endpoint.check_history(HIST_FIN_RST_PKT, "I")
            else:
                endpoint.check_history(HIST_MULTI_FLAG_PKT, "Q")
        elif bits == 1:
            if syn:
                code = "H" if ack else "S"
                if endpoint.check_history(HIST_SYN_PKT, code) and rel_seq != endpoint.hist_last_syn:
                    endpoint.add_history(code)
                endpoint.hist_last_syn = rel_seq
            if fin:
                if endpoint.check_history(HIST_FIN_PKT, "F") and rel_seq + length != endpoint.hist_last_fin:
                    endpoint.add_history("F")
                endpoint.hist_last_fin = rel_seq + length
            if rst:
                if endpoint.check_history(HIST_RST_PKT, "R") and rel_seq != endpoint.hist_last_rst:
                    endpoint.add_history("R")
                endpoint.hist_last_rst = rel_seq
        elif length:
            endpoint.check_history(HIST_DATA_PKT, "D")
        elif ack:
            endpoint.check_history(HIST_ACK_PKT, "A")

        window = pkt.window
        if window and not flags & (SYN | FIN | RST) and st != CLOSED and st != RESET:
            # update_window's common case: a non-zero window on a plain segment
            if ((base_seq - endpoint.window_seq) & M32) < 0x80000000 and \
                    ((ack_seq - endpoint.window_ack_seq) & M32) < 0x80000000:
                endpoint.window = window << endpoint.window_scale
                endpoint.window_ack_seq = ack_seq
                endpoint.window_seq = base_seq
        else:
            self._update_window(endpoint, window, base_seq, ack_seq, flags)

        if not (conn.orig.did_close and conn.resp.did_close):
            conn.last_time = t

        if syn:
            scale = _window_scale_option(pkt.tcp_options)
            if scale < 0:
                if ack:
                    endpoint.window_scale = 0
                    peer.window_scale = 0
                else:
                    endpoint.window_scale = 0
            else:
                endpoint.window_scale = min(scale, 14)
                endpoint.window_seq = base_seq
                endpoint.window_ack_seq = ack_seq
                peer.window_seq = ack_seq
                peer.window_ack_seq = base_seq
        if fin:
            endpoint.fin_cnt += 1
            endpoint.fin_seq = rel_seq + seg_len
        if rst:
            endpoint.rst_cnt += 1

        rel_ack = 0
        if ack:
            if peer.state == INACTIVE:
                rel_ack = 1
                s = (ack_seq - 1) & M32
                peer.start_seq = peer.ack_seq = peer.last_seq = s
            else:
                pack = peer.ack_seq
                d = (ack_seq - pack) & M32
                delta_ack = d - 0x100000000 if d & 0x80000000 else d
                if peer.ack_wraps == 0 and not (delta_ack > 0 and ack_seq < pack):
                    # no wrap-around: get_relative_seq reduces to seq_delta(ack, start)
                    d = (ack_seq - peer.start_seq) & M32
                    rel_ack = d - 0x100000000 if d & 0x80000000 else d
                    ack_underflow = rel_ack < 0
                else:
                    rel_ack, ack_underflow = self._relative_seq(peer, ack_seq, pack, peer.ack_wraps)
                if ack_underflow:
                    rel_ack = 0
                elif not rst:
                    if not (ack_seq == 0 and delta_ack > TOO_LARGE_SEQ_DELTA) and delta_ack > 0:
                        peer.update_ack_seq(ack_seq)

        # update_last_seq
        d = (seq_one_past - endpoint.last_seq) & M32
        delta_last = d - 0x100000000 if d & 0x80000000 else d
        if (syn or rst) and (delta_last > TOO_LARGE_SEQ_DELTA or delta_last < -TOO_LARGE_SEQ_DELTA):
            pass
        elif fin and endpoint.last_seq == ((endpoint.start_seq + 1) & M32):
            endpoint.update_last_seq(seq_one_past)
        elif endpoint.state == RESET:
            pass
        elif delta_last > 0:
            endpoint.update_last_seq(seq_one_past)
        elif length > 0:
            endpoint.scaled("T", "rxmt_cnt", "rxmt_thresh")

        do_close, gen_event = self._update_state_machine(conn, endpoint, peer, base_seq, ack_seq, length,
                                                         delta_last, flags, t)
        if ack:
            peer.ack_received(rel_ack)

        if endpoint.is_orig:
            conn.first_packet_seen |= _ORIG
        else:
            conn.first_packet_seen |= _RESP

        if length > 0 and not rst and not seq_underflow:
            # payload cut by the snap length never reaches the reassembler (Zeek's
            # truncated_tcp_payload): once acknowledged it shows up as a content gap
            if len(pkt.payload) >= length:
                endpoint.data_sent(rel_seq + 1 if syn else rel_seq, length)
            if not conn.app_done:
                self._detect_service(conn, pkt, endpoint.is_orig)

        if do_close:
            self._connection_closed(conn, endpoint, peer, gen_event, t)

    @staticmethod
    def _relative_seq(endpoint: TcpEndpoint, cur: int, last: int, wraps: int) -> tuple[int, bool]:
        delta = seq_delta(cur, last)
        if delta < 0:
            if wraps and cur > last:
                wraps -= 1
        elif delta > 0:
            if cur < last:
                wraps += 1
        if wraps == 0:
            d = seq_delta(cur, endpoint.start_seq)
            return d, d < 0
        return ((wraps << 32) | cur) - endpoint.start_seq, False

    @staticmethod
    def _update_window(endpoint: TcpEndpoint, window: int, base_seq: int, ack_seq: int, flags: int) -> None:
        scale = endpoint.window_scale
        window = window << scale
        if (window == 0 and not flags & RST and endpoint.peer.state != CLOSED
                and endpoint.state != RESET):
            endpoint.scaled("W", "win0_cnt", "win0_thresh")
        if (not flags & (SYN | FIN | RST) and endpoint.state != CLOSED and endpoint.state != RESET
                and seq_delta(base_seq, endpoint.window_seq) >= 0
                and seq_delta(ack_seq, endpoint.window_ack_seq) >= 0):
            endpoint.window = window
            endpoint.window_ack_seq = ack_seq
            endpoint.window_seq = base_seq

    def _update_state_machine(self, conn, endpoint, peer, base_seq, ack_seq, length, delta_last, flags, t):
        syn, fin, rst, ack = flags & SYN, flags & FIN, flags & RST, flags & ACK
        do_close = gen_event = False
        st = endpoint.state
        if st == INACTIVE:
            is_orig = endpoint.is_orig
            if syn:
                if is_orig:
                    endpoint.set_state(SYN_ACK_SENT if ack else SYN_SENT)
                    self._timer(t + TCP_ATTEMPT_DELAY, _T_ATTEMPT, conn)
                else:
                    if ack:
                        pass
                    elif peer.state == SYN_ACK_SENT and base_seq == endpoint.start_seq:
                        # SYN/SYN-ACK reversal: flip the endpoints and establish
                        conn.is_partial = False
                        conn.flip_roles()
                        peer.set_state(ESTABLISHED)
                        conn.first_packet_seen |= _ORIG
                    if peer.state == SYN_SENT:
                        peer.set_state(ESTABLISHED)
                    endpoint.set_state(ESTABLISHED)
            if fin:
                endpoint.set_state(CLOSED)
                do_close = gen_event = True
            if rst:
                endpoint.set_state(RESET)
                if endpoint.is_orig:
                    is_reject = peer.state == ESTABLISHED
                else:
                    is_reject = peer.state in (SYN_SENT, SYN_ACK_SENT)
                do_close = True
                gen_event = not is_reject
            if endpoint.state == INACTIVE:
                if not endpoint.is_orig and length == 0 and conn.orig.state == SYN_SENT:
                    pass  # an ACK of the SYN before the SYN-ACK: not a partial connection
                elif ack and peer.state == ESTABLISHED:
                    # SYN-ACK seen but not the SYN, now the ACK: establish
                    endpoint.set_state(ESTABLISHED)
                    conn.is_partial = False
                    conn.first_packet_seen |= _ORIG if endpoint.is_orig else _RESP
                else:
                    endpoint.set_state(PARTIAL)
        elif st == SYN_SENT or st == SYN_ACK_SENT:
            if fin:
                endpoint.set_state(CLOSED)
                do_close = gen_event = True
            if rst:
                endpoint.set_state(RESET)
                conn.is_active = False
                do_close = True
        elif st == ESTABLISHED or st == PARTIAL:
            if syn and st == PARTIAL and peer.state == INACTIVE and not ack:
                endpoint.set_state(SYN_SENT)
            if fin and not rst:
                endpoint.set_state(CLOSED)
                if peer.state == RESET and peer.prev_state == CLOSED:
                    peer.set_state(CLOSED)
                do_close = gen_event = True
            if rst:
                endpoint.set_state(RESET)
                do_close = True
                if peer.state != RESET or peer.prev_state != ESTABLISHED:
                    conn.is_active = False
        elif st == CLOSED:
            if rst and peer.state != CLOSED:
                endpoint.set_state(RESET)
                if not endpoint.did_close:
                    do_close = True
                self._timer(t + TCP_RESET_DELAY, _T_RESET, conn)
        return do_close, gen_event

    def _connection_closed(self, conn: Conn, endpoint: TcpEndpoint, peer: TcpEndpoint, gen_event: bool, t: float) -> None:
        if endpoint.did_close:
            return
        endpoint.did_close = True
        close_complete = endpoint.state == RESET or peer.did_close or peer.state == INACTIVE
        if close_complete:
            if endpoint.prev_state != INACTIVE or peer.state != INACTIVE:
                if gen_event:
                    conn.is_active = False
            self._timer(conn.last_time + TCP_CLOSE_DELAY, _T_DELETE, conn)
        elif endpoint.prev_state != INACTIVE:
            self._timer(conn.last_time + TCP_SESSION_TIMER, _T_EXPIRE, conn)

    # ------------------------------------------------------------------ UDP
    def _udp(self, pkt: Packet, t: float) -> Conn:
        src, dst, sport, dport = pkt.src, pkt.dst, pkt.sport, pkt.dport
        key = _conn_key(17, src, sport, dst, dport)
        conn = self.conns.get(key)
        if conn is None:
            lsp = self.likely_server_ports
            flip = (UDP, sport) in lsp and (UDP, dport) not in lsp and dst != b"\xff\xff\xff\xff"
            conn = self._new_conn(key, PROTO_UDP, src, sport, dst, dport, t)
            if flip:
                conn.flip_roles()
            conn.app = self._app_for(UDP, conn.resp_p)
            self._timer(t + UDP_INACTIVITY, _T_INACTIVITY, conn)
            if conn.app == "dns":
                self._timer(t + DNS_SESSION_TIMEOUT, _T_DNS, conn)
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
            self._conn_check_history(conn, HIST_ORIG_DATA_PKT, "D")
            conn.orig_size = ulen if conn.orig_size < 0 else conn.orig_size + ulen
        else:
            self._conn_check_history(conn, HIST_RESP_DATA_PKT, "d")
            conn.resp_size = ulen if conn.resp_size < 0 else conn.resp_size + ulen
        # port-based analyzers (DNS, NTP) see the packet before ConnSize does, so a flip they
        # make happens before the packet is counted, under its pre-flip direction
        if not conn.app_done and conn.app is not None:
            self._udp_app(conn, pkt, is_orig)
        if not pkt.flags & 1:  # a datagram cut by the snap length is not counted
            conn.count(is_orig, pkt.ip_len)
        return conn

    @staticmethod
    def _conn_check_history(conn: Conn, mask: int, code: str) -> None:
        if not conn.hist_mask & mask:
            conn.hist_mask |= mask
            conn.history += code

    def _udp_app(self, conn: Conn, pkt: Packet, is_orig: bool) -> None:
        app = conn.app
        payload = pkt.payload
        if app == "dns":
            if len(payload) < 12:
                return  # DNS_truncated_len_lt_hdr_len: still waiting for a first message
            conn.app_done = True
            # DNS_Interpreter::ParseMessage: a first message that is a reply from the
            # originator flips the connection (unless the responder is multicast)
            if payload[2] & 0x80 and is_orig and not _is_multicast(conn.resp_h):
                conn.flip_roles()
            if _dns_plausible(payload):
                self._add_service(conn, "dns")
        elif app == "ntp":
            if len(payload) < 48:
                return
            self._add_service(conn, "ntp")
            mode = payload[0] & 7
            # ntp-analyzer.pac: a server message from the originator or a client message
            # from the responder flips the connection, once
            if (mode == 4 and is_orig) or (mode == 3 and not is_orig):
                conn.flip_roles()
                conn.app_done = True
        elif app == "dhcp":
            conn.app_done = True
            if len(payload) >= 240 and payload[236:240] == b"\x63\x82\x53\x63":
                self._add_service(conn, "dhcp")
        else:
            conn.app_done = True

    # ------------------------------------------------------------------ ICMP / other
    def _icmp(self, pkt: Packet, t: float) -> None:
        src, dst, itype, code = pkt.src, pkt.dst, pkt.sport, pkt.dport
        table = ICMP4_COUNTERPART if pkt.proto == PROTO_ICMP else ICMP6_COUNTERPART
        other = table.get(itype)
        if other is None:
            # one-way message (unreachable, MLD report ...): Zeek's ConnKey keeps it
            # directional, so the same message back is another connection
            other = code
            key = (pkt.proto, src, itype, dst, other, 1)
        else:
            key = _conn_key(pkt.proto, src, itype, dst, other)
        conn = self.conns.get(key)
        if conn is None:
            conn = self._new_conn(key, pkt.proto, src, itype, dst, other, t)
            conn.inactivity_timeout = ICMP_INACTIVITY
            self._timer(t + ICMP_INACTIVITY, _T_INACTIVITY, conn)
        if not pkt.checksum_ok:
            self._skip("bad_ICMP_checksum")
            return
        conn.last_time = t
        n = pkt.payload_len
        is_orig = src == conn.orig_h and itype == conn.orig_p
        if is_orig:
            conn.orig_size = n if conn.orig_size < 0 else conn.orig_size + n
        else:
            conn.resp_size = n if conn.resp_size < 0 else conn.resp_size + n
        conn.count(is_orig, pkt.ip_len)

    def _unknown(self, pkt: Packet, t: float) -> None:
        src, dst = pkt.src, pkt.dst
        key = (pkt.proto, src, dst) if src < dst else (pkt.proto, dst, src)
        conn = self.conns.get(key)
        if conn is None:
            conn = self._new_conn(key, pkt.proto, src, 0, dst, 0, t)
            conn.inactivity_timeout = UNKNOWN_INACTIVITY
            self._timer(t + UNKNOWN_INACTIVITY, _T_INACTIVITY, conn)
        conn.last_time = t
        is_orig = src == conn.orig_h
        if is_orig:
            conn.orig_size = 0
        else:
            conn.resp_size = 0
        conn.count(is_orig, pkt.ip_len)

    # ------------------------------------------------------------------ service
    def _app_for(self, proto: int, port: int) -> str | None:
        app = _APP_BY_PORT.get((proto, port))
        if app is None or (self.protocols is not None and app not in self.protocols):
            return None
        return app

    def _apply_expected(self, conn: Conn, t: float) -> None:
        expiry = self._expected.get((conn.orig_h, conn.resp_h, conn.resp_p))
        if expiry is not None:
            if expiry >= t:
                self._add_service(conn, "ftp-data")
                conn.app_done = True
            else:
                del self._expected[(conn.orig_h, conn.resp_h, conn.resp_p)]

    def _ftp_control(self, conn: Conn, payload: bytes, is_orig: bool, t: float) -> None:
        """Note the data channels PORT/EPRT and 227/229 replies announce (ftp/main.zeek)."""
        if is_orig:
            if _FTP_PORT_COMMAND.search(payload) is None:  # (no lower-cased copy per packet)
                return
        elif b"227" not in payload and b"229" not in payload:
            return
        for line in payload.split(b"\n"):
            line = line.strip()
            found = _ftp_data_channel(line, is_orig, conn.orig_h, conn.resp_h)
            if found is not None:
                if len(self._expected) >= self._expected_limit:
                    # drop expired announcements; amortised: the limit doubles if they are live
                    self._expected = {k: v for k, v in self._expected.items() if v >= t}
                    self._expected_limit = max(10_000, 2 * len(self._expected))
                self._expected[found] = t + 300.0

    def _detect_service(self, conn: Conn, pkt: Packet, is_orig: bool) -> None:
        if conn.app == "ftp" and (self.protocols is None or "ftp" in self.protocols):
            self._ftp_control(conn, pkt.payload, is_orig, pkt.ts)
            if conn.service:
                return
        found = sniff_service(PROTO_TCP, pkt.payload, is_orig)
        if found is None and conn.app is not None:
            payload = pkt.payload
            app = conn.app
            if app == "ftp" and not is_orig and payload[:4] in (b"220 ", b"220-"):
                found = "ftp"
            elif app == "smtp" and not is_orig and payload[:4] in (b"220 ", b"220-"):
                found = "smtp"
            elif app == "dns" and len(payload) > 14 and _dns_plausible(payload[2:]):
                found = "dns"
            elif app in ("pop3", "imap") and not is_orig and payload[:3] in (b"+OK", b"* O"):
                found = app
        if found is not None and (self.protocols is None or found in self.protocols):
            self._add_service(conn, found)
            if found in ANALYZER_INACTIVITY:  # inactivity.zeek, on analyzer confirmation
                conn.inactivity_timeout = ANALYZER_INACTIVITY[found]
            if conn.app != "ftp":  # FTP control keeps announcing data channels
                conn.app_done = True

    @staticmethod
    def _add_service(conn: Conn, name: str) -> None:
        if conn.service is None:
            conn.service = set()
        conn.service.add(name)

    # ------------------------------------------------------------------ records
    def _addr(self, raw: bytes) -> tuple[str, bool | None]:
        hit = self._addr_cache.get(raw)
        if hit is None:
            # dotted quad by hand (str(IPv4Address) is the same text, slower); IPv6 keeps
            # ipaddress's RFC 5952 form
            text = "%d.%d.%d.%d" % tuple(raw) if len(raw) == 4 else str(ipaddress.ip_address(raw))
            local = None
            if self.local_nets:
                starts, ends = self._local_ranges[len(raw)]
                value = int.from_bytes(raw, "big")
                i = bisect.bisect_right(starts, value) - 1
                local = i >= 0 and value <= ends[i]
            hit = (text, local)
            if len(self._addr_cache) > 200_000:
                self._addr_cache.clear()
            self._addr_cache[raw] = hit
        return hit

    def _record(self, conn: Conn) -> ConnRecord:
        orig_h, local_orig = self._addr(conn.orig_h)
        resp_h, local_resp = self._addr(conn.resp_h)
        proto = conn.proto
        duration = conn.last_time - conn.start_time
        if proto == PROTO_TCP:
            pname = "tcp"
            o, r = conn.orig, conn.resp
            conn_state = _tcp_conn_state(o, r, conn.history)
            orig_bytes, resp_bytes = o.size(), r.size()
            history = conn.history or None
        elif proto == PROTO_UDP:
            pname = "udp"
            os_, rs_ = conn.orig_size, conn.resp_size
            if os_ >= 0:
                conn_state = "SF" if rs_ >= 0 else "S0"
            else:
                conn_state = "SHR" if rs_ >= 0 else "OTH"
            orig_bytes, resp_bytes = max(os_, 0), max(rs_, 0)
            history = conn.history or None
        elif proto in (PROTO_ICMP, PROTO_ICMP6):
            pname = "icmp"
            conn_state = "OTH"
            orig_bytes, resp_bytes = max(conn.orig_size, 0), max(conn.resp_size, 0)
            history = None
        else:
            pname = "unknown_transport"
            conn_state = "OTH"
            orig_bytes = resp_bytes = 0
            history = None
        if duration > 0:
            dur: float | None = round(duration, 6)
        else:
            dur = None
            orig_bytes = resp_bytes = None  # type: ignore[assignment]
        # tuple.__new__ is what ConnRecord(...) calls; label, detailed_label, extra: defaults
        return _tuple_new(ConnRecord, (
            conn.start_time, _uid(conn), orig_h, conn.orig_p, resp_h, conn.resp_p, pname,
            ",".join(sorted(conn.service)) if conn.service else None,
            dur, orig_bytes, resp_bytes, conn_state, local_orig, local_resp,
            conn.missed_bytes,
            history, conn.orig_pkts, conn.orig_ip_bytes, conn.resp_pkts, conn.resp_ip_bytes,
            conn.parents, conn.ip_proto, None, None, (),
        ))


_EMPTY: tuple[()] = ()
# what a PORT/EPRT command line contains, ASCII case-insensitively (as bytes.lower() + in)
_FTP_PORT_COMMAND = re.compile(rb"(?i)port|eprt")
_tuple_new = tuple.__new__


def _address_ranges(nets) -> dict[int, tuple[list[int], list[int]]]:
    """Networks as merged, sorted [start, end] integer ranges per address length (4, 16), so
    membership is one bisection instead of a test per network."""
    out: dict[int, tuple[list[int], list[int]]] = {}
    for size, version in ((4, 4), (16, 6)):
        spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in nets if n.version == version)
        starts: list[int] = []
        ends: list[int] = []
        for lo, hi in spans:
            if ends and lo <= ends[-1] + 1:
                ends[-1] = max(ends[-1], hi)
            else:
                starts.append(lo)
                ends.append(hi)
        out[size] = (starts, ends)
    return out


def _conn_key(proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> tuple:
    """Zeek's ConnKey: the 5-tuple with the smaller (address, port) end first."""
    if src < dst or (src == dst and sport < dport):
        return (proto, src, sport, dst, dport)
    return (proto, dst, dport, src, sport)


def _tcp_conn_state(o: TcpEndpoint, r: TcpEndpoint, history: str) -> str:
    """Zeek's conn_state() from the two endpoint states (scripts/base/protocols/conn/main.zeek)."""
    os_, rs_ = o.state, r.state
    o_inactive = os_ == INACTIVE or os_ == PARTIAL
    r_inactive = rs_ == INACTIVE or rs_ == PARTIAL
    if rs_ == RESET:
        if os_ in (SYN_SENT, SYN_ACK_SENT) or (os_ == RESET and o.size() == 0 and r.size() == 0):
            return "REJ"
        if o_inactive:
            return "RSTRH"
        return "RSTR"
    if os_ == RESET:
        if r_inactive:
            return "RSTOS0" if _rstos0(history) else "OTH"
        return "RSTO"
    if rs_ == CLOSED and os_ == CLOSED:
        return "SF"
    if os_ == CLOSED:
        return "SH" if r_inactive else "S2"
    if rs_ == CLOSED:
        return "SHR" if o_inactive else "S3"
    if os_ == SYN_SENT and rs_ == INACTIVE:
        return "S0"
    if os_ == ESTABLISHED and rs_ == ESTABLISHED:
        return "S1"
    return "OTH"


def _rstos0(history: str) -> bool:
    """history matches /^\\^?S[^HAFGIQ]*R.*/ (an originator SYN then RST, no reply)."""
    h = history[1:] if history.startswith("^") else history
    if not h.startswith("S"):
        return False
    for ch in h[1:]:
        if ch == "R":
            return True
        if ch in "HAFGIQ":
            return False
    return False


def _is_multicast(raw: bytes) -> bool:
    if len(raw) == 4:
        return 224 <= raw[0] <= 239
    return raw[0] == 0xFF


def _window_scale_option(opts: bytes) -> int:
    i = 0
    n = len(opts)
    while i < n:
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= n:
            break
        olen = opts[i + 1]
        if olen == 0 or i + olen > n:
            break
        if kind == 3 and olen >= 3:
            return opts[i + 2]
        i += olen
    return -1


_PASV = re.compile(rb"(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})")
_EPSV = re.compile(rb"\((.)\1\1(\d+)\1\)")


def _ftp_data_channel(line: bytes, is_orig: bool, orig_h: bytes, resp_h: bytes):
    """The (orig_h, resp_h, resp_p) an FTP control line announces, or None."""
    upper = line[:5].upper()
    if is_orig and upper == b"PORT ":
        m = _PASV.search(line)
        if m:
            nums = [int(x) for x in m.groups()]
            if all(n < 256 for n in nums):
                return resp_h, bytes(nums[:4]), nums[4] * 256 + nums[5]
    elif is_orig and upper == b"EPRT ":
        parts = line[5:].strip().split(line[5:6] or b"|")
        if len(parts) >= 4:
            try:
                host = ipaddress.ip_address(parts[2].decode()).packed
                return resp_h, host, int(parts[3])
            except ValueError:
                return None
    elif not is_orig and line[:4] == b"227 ":
        m = _PASV.search(line)
        if m:
            nums = [int(x) for x in m.groups()]
            if all(n < 256 for n in nums):
                return orig_h, bytes(nums[:4]), nums[4] * 256 + nums[5]
    elif not is_orig and line[:4] == b"229 ":
        m = _EPSV.search(line)
        if m:
            return orig_h, resp_h, int(m.group(2))
    return None


_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62_BYTES = bytes(ord(_B62[i % 62]) for i in range(256))


def _uid(conn: Conn) -> str:
    """A stable Zeek-like uid: 'C' + base62 of a 96-bit hash of the 5-tuple and start time."""
    if conn.uid is None:
        conn.uid = _base62_uid(b"%d|%b|%d|%b|%d|%d" % (conn.proto, conn.orig_h, conn.orig_p, conn.resp_h,
                                                        conn.resp_p, round(conn.start_time * 1e6)))
    return conn.uid


def _tunnel_uid(outer: bytes) -> str:
    """uid of a GRE/IP-in-IP tunnel, from its outer protocol and addresses."""
    return _base62_uid(b"tunnel|" + outer)


def _base62_uid(data: bytes) -> str:
    # each of 17 hash bytes picks one of 62 letters/digits: ~101 bits, Zeek's uid length
    return "C" + hashlib.blake2b(data, digest_size=17).digest().translate(_B62_BYTES).decode("ascii")
