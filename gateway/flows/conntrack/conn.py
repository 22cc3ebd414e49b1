"""A tracked connection, its uid, and the conn.log record it ends as.

:class:`Conn` is the state every protocol shares (5-tuple, times, ConnSize counters,
history, service); TCP adds two endpoints (:mod:`.tcp`).  :func:`build_record` turns an
ended connection into a :class:`ConnRecord`; it reads the connection's attributes only,
so the compiled tracker's connections go through it too.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import socket

from gateway.flows.conntrack.timers import UDP_INACTIVITY
from gateway.flows.record import ConnRecord

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
        self.orig = None  # TCP: the two TcpEndpoints
        self.resp = None
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

    def check_history(self, mask: int, code: str) -> None:
        """Add ``code`` the first time ``mask`` is seen (Connection::CheckHistory)."""
        if not self.hist_mask & mask:
            self.hist_mask |= mask
            self.history += code

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


def conn_key(proto: int, src: bytes, sport: int, dst: bytes, dport: int) -> tuple:
    """Zeek's ConnKey: the 5-tuple with the smaller (address, port) end first."""
    if src < dst or (src == dst and sport < dport):
        return (proto, src, sport, dst, dport)
    return (proto, dst, dport, src, sport)


# ---------------------------------------------------------------------------- uids

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62_BYTES = bytes(ord(_B62[i % 62]) for i in range(256))


def conn_uid(conn) -> str:
    """A stable Zeek-like uid: 'C' + base62 of a 96-bit hash of the 5-tuple and start time."""
    if conn.uid is None:
        conn.uid = _base62_uid(b"%d|%b|%d|%b|%d|%d" % (conn.proto, conn.orig_h, conn.orig_p, conn.resp_h,
                                                        conn.resp_p, round(conn.start_time * 1e6)))
    return conn.uid


def tunnel_uid(outer: bytes) -> str:
    """uid of a GRE/IP-in-IP tunnel, from its outer protocol and addresses."""
    return _base62_uid(b"tunnel|" + outer)


def _base62_uid(data: bytes) -> str:
    # each of 17 hash bytes picks one of 62 letters/digits: ~101 bits, Zeek's uid length
    return "C" + hashlib.blake2b(data, digest_size=17).digest().translate(_B62_BYTES).decode("ascii")


# ---------------------------------------------------------------------------- records

class AddressBook:
    """Address text and local-ness (``Site::local_nets``) of raw addresses, cached."""

    __slots__ = ("local_nets", "_ranges", "_cache")

    CACHE_SIZE = 200_000

    def __init__(self, local_nets):
        self.local_nets = tuple(ipaddress.ip_network(n, strict=False) for n in local_nets)
        self._ranges = _address_ranges(self.local_nets)
        self._cache: dict[bytes, tuple[str, bool | None]] = {}

    def lookup(self, raw: bytes) -> tuple[str, bool | None]:
        hit = self._cache.get(raw)
        if hit is None:
            # dotted quad by hand, IPv6 by inet_ntop: ipaddress's text (RFC 5952), several
            # times faster; ipaddress itself for ::/80, which inet_ntop writes as IPv4
            # (::1.2.3.4, ::ffff:1.2.3.4) and ipaddress does not
            if len(raw) == 4:
                text = "%d.%d.%d.%d" % tuple(raw)
            elif raw[:10] != _ZERO10:
                text = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                text = str(ipaddress.ip_address(raw))
            local = None
            if self.local_nets:
                starts, ends = self._ranges[len(raw)]
                value = int.from_bytes(raw, "big")
                i = bisect.bisect_right(starts, value) - 1
                local = i >= 0 and value <= ends[i]
            hit = (text, local)
            if len(self._cache) > self.CACHE_SIZE:
                self._cache.clear()
            self._cache[raw] = hit
        return hit


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


_tuple_new = tuple.__new__
_ZERO10 = bytes(10)


def build_record(book: AddressBook, conn, pname: str, conn_state: str, orig_bytes: int, resp_bytes: int,
                 history: str | None) -> ConnRecord:
    """The conn.log record of an ended connection; the protocol module gives its name,
    ``conn_state``, payload byte counts and history."""
    orig_h, local_orig = book.lookup(conn.orig_h)
    resp_h, local_resp = book.lookup(conn.resp_h)
    duration = conn.last_time - conn.start_time
    if duration > 0:
        dur: float | None = round(duration, 6)
    else:
        # a single-packet flow: Zeek leaves duration and both byte counts unset
        dur = None
        orig_bytes = resp_bytes = None  # type: ignore[assignment]
    service = conn.service
    # tuple.__new__ is what ConnRecord(...) calls; label, detailed_label, extra: defaults
    return _tuple_new(ConnRecord, (
        conn.start_time, conn_uid(conn), orig_h, conn.orig_p, resp_h, conn.resp_p, pname,
        ",".join(sorted(service)) if service else None,
        dur, orig_bytes, resp_bytes, conn_state, local_orig, local_resp,
        conn.missed_bytes,
        history, conn.orig_pkts, conn.orig_ip_bytes, conn.resp_pkts, conn.resp_ip_bytes,
        conn.parents, conn.ip_proto, None, None, (),
    ))
