"""The connection table: packets in (time order), conn records out.

:class:`ConnTracker` dispatches each decoded :class:`~gateway.flows.packets.Packet` to its
protocol (:mod:`.tcp`, :mod:`.udp`, :mod:`.icmp`), fires timers in packet time
(:mod:`.timers`) and returns the records of the connections that ended.  It does no I/O:
the same packets always give the same records.  This is the reference; the compiled
tracker (``tracker.pxi`` beside it, :func:`gateway.flows.conntrack.new_tracker`) gives the
same records faster.

The table is bounded (``max_connections``): when it is full, the connection idle longest
(smallest last packet time, then the oldest) is ended early and counted as
``connection_table_full``.  Candidates come from a heap keyed by the last packet time a
connection had when it was pushed; a stale key is refreshed when it reaches the top, so
the cost is O(log n) amortised per packet whatever the table holds.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from gateway.flows.conntrack import timers
from gateway.flows.conntrack.conn import DEFAULT_LOCAL_NETS, AddressBook, Conn, build_record, conn_uid, tunnel_uid
from gateway.flows.conntrack.icmp import icmp_packet, icmp_summary, unknown_packet, unknown_summary
from gateway.flows.conntrack.services import DEFAULT_LIKELY_SERVER_PORTS, ExpectedChannels, add_service
from gateway.flows.conntrack.tcp import attempt_timer, expire_timer, tcp_packet, tcp_summary
from gateway.flows.conntrack.udp import udp_packet, udp_summary
from gateway.flows.packets import PROTO_ICMP, PROTO_ICMP6, PROTO_TCP, PROTO_UDP, UDP_TUNNEL_PORTS, Packet
from gateway.flows.record import ConnRecord
from gateway.flows.settings import FlowSettings

_EMPTY: tuple[()] = ()
# the idle heap is rebuilt from the live connections when it holds more than twice as
# many entries (plus this slack): bounded memory without eviction ever happening
IDLE_HEAP_SLACK = 1024


class ConnTracker:
    """Turns a time-ordered stream of packets into Zeek conn records.

    Keyword-only configuration (defaults are Zeek's):

    * ``local_nets``: CIDR strings for ``local_orig``/``local_resp`` (default: Zeek's private
      address space); an empty tuple leaves both fields unset.
    * ``likely_server_ports``: ``(ip_proto, port)`` pairs used to orient connections that
      start mid-stream (default: every base protocol script's ports).
    * ``protocols``: application analyzers considered for ``service`` and the DNS/NTP flips
      (default ``None``: all, as in a default Zeek; bare mode loads only a few).
    * ``max_connections``: memory bound (default :attr:`FlowSettings.max_connections`).
    """

    def __init__(
        self,
        *,
        local_nets: Iterable[str] = DEFAULT_LOCAL_NETS,
        likely_server_ports: frozenset[tuple[int, int]] = DEFAULT_LIKELY_SERVER_PORTS,
        protocols: Iterable[str] | None = None,
        max_connections: int = FlowSettings.max_connections,
    ):
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.book = AddressBook(local_nets)
        self.likely_server_ports = frozenset(likely_server_ports)
        self.protocols = None if protocols is None else frozenset(protocols)
        self.max_connections = max_connections
        self.conns: dict[tuple, Conn] = {}
        self.skipped: dict[str, int] = {}
        self.network_time = 0.0
        self.timers = timers.TimerQueue()
        self.expected = ExpectedChannels()
        self._idle: list[tuple[float, int, Conn]] = []  # (last_time when pushed, seq_no, conn)
        self._out: list[ConnRecord] = []
        self._seq = 0
        self._parent: tuple[str, ...] | None = None  # tunnel parents of the packet being processed

    @property
    def local_nets(self):
        return self.book.local_nets

    # ------------------------------------------------------------------ public API
    def feed(self, pkt: Packet) -> list[ConnRecord] | tuple[()]:
        """Process one packet; return the records of connections that ended meanwhile
        (usually none: an empty tuple, so the common case allocates nothing)."""
        t = pkt.ts
        if t > self.network_time:
            self.network_time = t
            if self.timers.due(t):
                self._run_timers(t)
        # an out-of-order packet keeps its own time for the connection (as in Zeek); only
        # network time, which drives the timers, never goes back
        self._dispatch(pkt, t)
        if self._out:
            out, self._out = self._out, []
            return out
        return _EMPTY

    def feed_many(self, packets: Iterable[Packet]) -> list[ConnRecord]:
        """:meth:`feed` over many packets: the records of the connections that ended
        meanwhile, in the same order."""
        out: list[ConnRecord] = []
        for pkt in packets:
            done = self.feed(pkt)
            if done:
                out += done
        return out

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
            self.remove(conn)
        self.timers.clear()
        self._idle.clear()
        out, self._out = self._out, []
        return out

    @property
    def open_connections(self) -> int:
        return len(self.conns)

    # ------------------------------------------------------------------ for the protocols
    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def new_conn(self, key, proto: int, orig_h: bytes, orig_p: int, resp_h: bytes, resp_p: int, t: float) -> Conn:
        if len(self.conns) >= self.max_connections:
            self._evict_idlest()
        conn = Conn(key, proto, orig_h, orig_p, resp_h, resp_p, t)
        if self._parent is not None:
            conn.parents = self._parent
        self._seq += 1
        conn.seq_no = self._seq
        self.conns[key] = conn
        idle = self._idle
        heapq.heappush(idle, (t, conn.seq_no, conn))
        if len(idle) > 2 * len(self.conns) + IDLE_HEAP_SLACK:
            self._idle = [(c.last_time, c.seq_no, c) for c in self.conns.values()]
            heapq.heapify(self._idle)
        return conn

    def remove(self, conn: Conn) -> None:
        if conn.removed:
            return
        conn.removed = True
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        self._out.append(self.record(conn))
        o = conn.orig
        if o is not None:
            # break the conn <-> endpoint cycles: refcounting frees the connection when its
            # last timer fires, instead of a full collection pass over every live object
            # (a removed connection is never touched again: timers skip it first)
            r = conn.resp
            o.conn = o.peer = r.conn = r.peer = None  # type: ignore[assignment]

    def record(self, conn: Conn) -> ConnRecord:
        proto = conn.proto
        if proto == PROTO_TCP:
            summary = tcp_summary(conn)
        elif proto == PROTO_UDP:
            summary = udp_summary(conn)
        elif proto == PROTO_ICMP or proto == PROTO_ICMP6:
            summary = icmp_summary(conn)
        else:
            summary = unknown_summary(conn)
        return build_record(self.book, conn, *summary)

    # ------------------------------------------------------------------ internals
    def _dispatch(self, pkt: Packet, t: float, parent: tuple[str, ...] | None = None) -> None:
        if parent is None and pkt.tunnel is not None:
            parent = (tunnel_uid(pkt.tunnel),)
        self._parent = parent
        proto = pkt.proto
        if proto == PROTO_TCP:
            tcp_packet(self, pkt, t)
        elif proto == PROTO_UDP:
            outer = udp_packet(self, pkt, t)
            inner = pkt.inner
            if inner is not None:
                # a UDP tunnel (VXLAN, Geneve, Teredo, GTP-U): the carrier is a connection of
                # its own, and what it carries is tracked with the carrier as parent
                kind = UDP_TUNNEL_PORTS.get(outer.resp_p) or UDP_TUNNEL_PORTS.get(outer.orig_p)
                if kind and (self.protocols is None or "tunnels" in self.protocols):
                    add_service(outer, kind)
                self._dispatch(inner, t, (conn_uid(outer),))
        elif proto == PROTO_ICMP or proto == PROTO_ICMP6:
            icmp_packet(self, pkt, t)
        else:
            unknown_packet(self, pkt, t)
        self._parent = None

    def _evict_idlest(self) -> None:
        """End the connection idle longest (the table is full)."""
        idle = self._idle
        while idle:
            last, seq, conn = idle[0]
            if conn.removed:
                heapq.heappop(idle)
            elif conn.last_time != last:  # it had packets since: requeue at its real time
                heapq.heapreplace(idle, (conn.last_time, seq, conn))
            else:
                heapq.heappop(idle)
                self.skip("connection_table_full")
                self.remove(conn)
                return

    def _run_timers(self, t: float) -> None:
        q = self.timers
        while q.due(t):
            when, _, kind, conn = q.pop()
            if conn.removed:
                continue
            if kind == timers.INACTIVITY:
                due = conn.last_time + conn.inactivity_timeout
                if due <= when:
                    self.remove(conn)
                else:
                    q.push(due, timers.INACTIVITY, conn)
            elif kind == timers.DELETE:
                self.remove(conn)
            elif kind == timers.ATTEMPT:
                attempt_timer(self, conn)
            elif kind == timers.RESET:
                if conn.is_active:
                    self.remove(conn)
            elif kind == timers.EXPIRE:
                expire_timer(self, conn, when)
            elif kind == timers.DNS:
                # DNS_Analyzer::ExpireTimer: a UDP DNS session ends after dns_session_timeout
                # (less a second of slack) without packets
                if when - conn.last_time >= timers.DNS_SESSION_TIMEOUT - 1.0:
                    self.remove(conn)
                else:
                    q.push(when + timers.DNS_SESSION_TIMEOUT, timers.DNS, conn)
