"""TCP connections as Zeek tracks them (the general path; ``tcp.pxi`` beside it is the
compiled mirror, held equal by tests/unit/test_conntrack_compiled.py).

The rules follow Zeek's ``TCPSessionAdapter.cc`` and ``TCP_Endpoint.cc``: each endpoint
moves through :class:`TcpState` along :data:`TCP_TRANSITIONS` (any other move raises
:class:`IllegalTransition`); ``conn_state`` is derived from the two endpoint states; byte
counts come from sequence numbers (gaps count as sent); history letters follow Zeek's
once-per-direction and 1/10/100 scaling rules; a SYN/SYN-ACK reversal flips the roles; a
new SYN with a new ISN on a finished connection starts a new record (reuse).
"""

from __future__ import annotations

from enum import IntEnum

from gateway.flows.conntrack import timers
from gateway.flows.conntrack.conn import Conn, conn_key
from gateway.flows.conntrack.services import PORT_INACTIVITY, app_for, detect_tcp_service
from gateway.flows.packets import PROTO_TCP, Packet


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
        super().__init__(f"illegal TCP endpoint transition {TcpState(old).name} -> {TcpState(new).name}")
        self.old = old
        self.new = new


# TCP flag bits
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

# History masks (Zeek's TCP_Endpoint HIST_* values); the responder's are << 16.
HIST_SYN_PKT, HIST_FIN_PKT, HIST_RST_PKT, HIST_FIN_RST_PKT = 0x1, 0x2, 0x4, 0x8
HIST_DATA_PKT, HIST_ACK_PKT, HIST_MULTI_FLAG_PKT = 0x10, 0x20, 0x40

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
TOO_LARGE_SEQ_DELTA = 1048576
MAX_REASSEMBLY_BLOCKS = 4096  # out-of-order blocks kept per endpoint (gap accounting only)
_ORIG, _RESP = 1, 2  # first_packet_seen bits


def seq_delta(a: int, b: int) -> int:
    """Signed 32-bit difference a - b."""
    d = (a - b) & M32
    return d - 0x100000000 if d & 0x80000000 else d


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
            self.conn.inactivity_timeout = timers.TCP_INACTIVITY
        self.prev_state = old
        self.state = new

    def size(self) -> int:
        """Payload bytes sent, from the sequence numbers (TCP_Endpoint::Size)."""
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
            if self.blocks:
                self.reassem_seq = merge_blocks(self.blocks, self.reassem_seq)
            return
        if self.blocks is None:
            self.blocks = {}
        if len(self.blocks) < MAX_REASSEMBLY_BLOCKS:
            if end > self.blocks.get(seq, 0):
                self.blocks[seq] = end

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
            missing -= covered(self.blocks, self.reassem_seq, up_to)
        self.reassem_seq = up_to
        if self.blocks:
            self.reassem_seq = merge_blocks(self.blocks, up_to)
        if missing > 0 and _is_clean(self) and _is_clean(self.peer):
            conn.missed_bytes += missing
            self.scaled("G", "gap_cnt", "gap_thresh")


def merge_blocks(blocks: dict[int, int], reassem_seq: int) -> int:
    """Consume the out-of-order blocks that now join the in-order data; the new next
    expected sequence number.  (Shared with the compiled tracker: blocks are rare.)"""
    for start in sorted(blocks):
        if start > reassem_seq:
            break
        end = blocks.pop(start)
        if end > reassem_seq:
            reassem_seq = end
    return reassem_seq


def covered(blocks: dict[int, int], low: int, high: int) -> int:
    """Bytes of [low, high) the out-of-order blocks hold (overlaps counted as often as
    they occur, as Zeek's gap accounting does)."""
    total = 0
    for start in sorted(blocks):
        if start >= high:
            break
        lo = max(start, low)
        hi = min(blocks[start], high)
        if hi > lo:
            total += hi - lo
    return total


def _is_clean(e: TcpEndpoint) -> bool:
    return e.state == ESTABLISHED or (e.state == CLOSED and e.prev_state == ESTABLISHED)


def relative_seq(endpoint: TcpEndpoint, cur: int, last: int, wraps: int) -> tuple[int, bool]:
    """``cur`` relative to the endpoint's initial sequence number (64-bit, counting
    wrap-arounds against ``last``), and whether it lies before it (underflow)."""
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


def window_scale_option(opts: bytes) -> int:
    """The window scale of a SYN's options, or -1 without one."""
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


# ---------------------------------------------------------------------------- packets

def tcp_packet(tr, pkt: Packet, t: float) -> None:
    """One TCP packet: find or open its connection and run it through the state machine."""
    src, dst, sport, dport = pkt.src, pkt.dst, pkt.sport, pkt.dport
    key = conn_key(PROTO_TCP, src, sport, dst, dport)
    flags = pkt.flags
    conn = tr.conns.get(key)
    if conn is not None and flags & SYN and pkt.payload_len >= 0 and is_reuse(conn, pkt):
        tr.remove(conn)
        conn = None
    new = conn is None
    if new:
        flip = False
        if not flags & SYN or flags & ACK:
            lsp = tr.likely_server_ports
            if (PROTO_TCP, sport) in lsp:
                if (PROTO_TCP, dport) in lsp:
                    flip = not flags & SYN and sport < dport
                else:
                    flip = True
        conn = tr.new_conn(key, PROTO_TCP, src, sport, dst, dport, t)
        conn.orig = TcpEndpoint(conn, True)
        conn.resp = TcpEndpoint(conn, False)
        conn.orig.peer = conn.resp
        conn.resp.peer = conn.orig
        if flip:
            conn.flip_roles()
        conn.app = app_for(PROTO_TCP, conn.resp_p, tr.protocols)
        if tr.expected:
            tr.expected.apply(conn, t)
        tr.timers.push(t + timers.TCP_SYN_TIMEOUT, timers.EXPIRE, conn)
        tr.timers.push(t + conn.inactivity_timeout, timers.INACTIVITY, conn)
    is_orig = src == conn.orig_h and sport == conn.orig_p
    endpoint = conn.orig if is_orig else conn.resp
    if pkt.payload_len < 0:
        pass  # unusable TCP header: the connection exists, the packet counts nowhere
    elif not pkt.checksum_ok:
        endpoint.scaled("C", "chk_cnt", "chk_thresh")
    else:
        _process(tr, conn, endpoint, pkt, t)
        # ConnSize counts every packet the TCP analyzer accepted, under the direction it
        # had when it arrived (a SYN/SYN-ACK reversal flips the counters first)
        conn.count(is_orig, pkt.ip_len)
    if new:
        # new_connection handlers run after the first packet (inactivity.zeek)
        port_timeout = PORT_INACTIVITY.get(conn.resp_p)
        if port_timeout is not None:
            conn.inactivity_timeout = port_timeout


def is_reuse(conn: Conn, pkt: Packet) -> bool:
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


def _process(tr, conn: Conn, endpoint: TcpEndpoint, pkt: Packet, t: float) -> None:
    """TCPSessionAdapter::Process for a packet with a usable header and checksum."""
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
            endpoint.last_seq = seq_one_past
        else:
            endpoint.ack_seq = endpoint.start_seq = (base_seq - 1) & M32
            endpoint.last_seq = base_seq
    elif syn:
        if st in (SYN_SENT, SYN_ACK_SENT):
            if base_seq != endpoint.start_seq:
                endpoint.start_seq = endpoint.ack_seq = base_seq
                endpoint.last_seq = seq_one_past
        elif st in (ESTABLISHED, PARTIAL) or (st == RESET and endpoint.prev_state == INACTIVE):
            endpoint.start_seq = endpoint.ack_seq = base_seq
            endpoint.last_seq = seq_one_past

    rel_seq, seq_underflow = relative_seq(endpoint, base_seq, endpoint.last_seq, endpoint.seq_wraps)

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

    _update_window(endpoint, pkt.window, base_seq, ack_seq, flags)

    if not (conn.orig.did_close and conn.resp.did_close):
        conn.last_time = t

    if syn:
        scale = window_scale_option(pkt.tcp_options)
        if scale < 0:
            endpoint.window_scale = 0
            if ack:
                peer.window_scale = 0
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
            delta_ack = seq_delta(ack_seq, peer.ack_seq)
            rel_ack, ack_underflow = relative_seq(peer, ack_seq, peer.ack_seq, peer.ack_wraps)
            if ack_underflow:
                rel_ack = 0
            elif not rst and delta_ack > 0 and not (ack_seq == 0 and delta_ack > TOO_LARGE_SEQ_DELTA):
                peer.update_ack_seq(ack_seq)

    # update_last_seq
    delta_last = seq_delta(seq_one_past, endpoint.last_seq)
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

    do_close, gen_event = _update_state_machine(tr, conn, endpoint, peer, base_seq, length, flags, t)
    if ack:
        peer.ack_received(rel_ack)

    conn.first_packet_seen |= _ORIG if endpoint.is_orig else _RESP

    if length > 0 and not rst and not seq_underflow:
        # payload cut by the snap length never reaches the reassembler (Zeek's
        # truncated_tcp_payload): once acknowledged it shows up as a content gap
        if len(pkt.payload) >= length:
            endpoint.data_sent(rel_seq + 1 if syn else rel_seq, length)
        if not conn.app_done:
            detect_tcp_service(tr, conn, pkt.payload, endpoint.is_orig, pkt.ts)

    if do_close:
        _connection_closed(tr, conn, endpoint, peer, gen_event)


def _update_window(endpoint: TcpEndpoint, window: int, base_seq: int, ack_seq: int, flags: int) -> None:
    window <<= endpoint.window_scale
    if window == 0 and not flags & RST and endpoint.peer.state != CLOSED and endpoint.state != RESET:
        endpoint.scaled("W", "win0_cnt", "win0_thresh")
    if (not flags & (SYN | FIN | RST) and endpoint.state != CLOSED and endpoint.state != RESET
            and seq_delta(base_seq, endpoint.window_seq) >= 0
            and seq_delta(ack_seq, endpoint.window_ack_seq) >= 0):
        endpoint.window = window
        endpoint.window_ack_seq = ack_seq
        endpoint.window_seq = base_seq


def _update_state_machine(tr, conn: Conn, endpoint: TcpEndpoint, peer: TcpEndpoint, base_seq: int,
                          length: int, flags: int, t: float) -> tuple[bool, bool]:
    syn, fin, rst, ack = flags & SYN, flags & FIN, flags & RST, flags & ACK
    do_close = gen_event = False
    st = endpoint.state
    if st == INACTIVE:
        is_orig = endpoint.is_orig
        if syn:
            if is_orig:
                endpoint.set_state(SYN_ACK_SENT if ack else SYN_SENT)
                tr.timers.push(t + timers.TCP_ATTEMPT_DELAY, timers.ATTEMPT, conn)
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
            tr.timers.push(t + timers.TCP_RESET_DELAY, timers.RESET, conn)
    return do_close, gen_event


def _connection_closed(tr, conn: Conn, endpoint: TcpEndpoint, peer: TcpEndpoint, gen_event: bool) -> None:
    if endpoint.did_close:
        return
    endpoint.did_close = True
    close_complete = endpoint.state == RESET or peer.did_close or peer.state == INACTIVE
    if close_complete:
        if endpoint.prev_state != INACTIVE or peer.state != INACTIVE:
            if gen_event:
                conn.is_active = False
        tr.timers.push(conn.last_time + timers.TCP_CLOSE_DELAY, timers.DELETE, conn)
    elif endpoint.prev_state != INACTIVE:
        tr.timers.push(conn.last_time + timers.TCP_SESSION_TIMER, timers.EXPIRE, conn)


# ---------------------------------------------------------------------------- timers

def attempt_timer(tr, conn: Conn) -> None:
    """tcp_attempt_delay after a SYN: end the connection if nobody answered."""
    o, r = conn.orig, conn.resp
    if conn.is_active and o.state in (SYN_SENT, SYN_ACK_SENT) and r.state == INACTIVE:
        conn.is_active = False
        tr.remove(conn)


def expire_timer(tr, conn: Conn, t: float) -> None:
    """TCPSessionAdapter's expire timer: end a closed or silent connection after the linger."""
    if not conn.is_active:
        return
    o, r = conn.orig, conn.resp
    if conn.last_time + timers.TCP_CONNECTION_LINGER < t:
        if o.did_close or r.did_close:
            if ((o.did_close and r.did_close) or o.state == RESET or r.state == RESET
                    or o.state == INACTIVE or r.state == INACTIVE):
                conn.is_active = False
                tr.remove(conn)
                return
        if r.state == INACTIVE and o.state == INACTIVE:
            tr.remove(conn)
            return
    tr.timers.push(t + timers.TCP_SESSION_TIMER, timers.EXPIRE, conn)


# ---------------------------------------------------------------------------- records

def tcp_conn_state(o_state: int, o_size: int, r_state: int, r_size: int, history: str) -> str:
    """Zeek's conn_state() from the two endpoint states (scripts/base/protocols/conn/main.zeek)."""
    o_inactive = o_state == INACTIVE or o_state == PARTIAL
    r_inactive = r_state == INACTIVE or r_state == PARTIAL
    if r_state == RESET:
        if o_state in (SYN_SENT, SYN_ACK_SENT) or (o_state == RESET and o_size == 0 and r_size == 0):
            return "REJ"
        if o_inactive:
            return "RSTRH"
        return "RSTR"
    if o_state == RESET:
        if r_inactive:
            return "RSTOS0" if _rstos0(history) else "OTH"
        return "RSTO"
    if r_state == CLOSED and o_state == CLOSED:
        return "SF"
    if o_state == CLOSED:
        return "SH" if r_inactive else "S2"
    if r_state == CLOSED:
        return "SHR" if o_inactive else "S3"
    if o_state == SYN_SENT and r_state == INACTIVE:
        return "S0"
    if o_state == ESTABLISHED and r_state == ESTABLISHED:
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


def tcp_summary(conn: Conn) -> tuple[str, str, int, int, str | None]:
    """(proto name, conn_state, orig_bytes, resp_bytes, history) of an ended TCP connection."""
    o, r = conn.orig, conn.resp
    o_size, r_size = o.size(), r.size()
    return "tcp", tcp_conn_state(o.state, o_size, r.state, r_size, conn.history), o_size, r_size, \
        conn.history or None
