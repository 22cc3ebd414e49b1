# The compiled mirror of tcp.py (included by _compiled.pyx): the one copy of the TCP
# state logic on the compiled path.  An endpoint is conn.ends[ei]; it is the originator
# when ei == conn.orig_i (a flip swaps orig_i, as tcp.py swaps the endpoint objects).
# Record-time rules (conn_state) and out-of-order block bookkeeping (rare) call tcp.py.

cdef enum:
    INACTIVE = 0
    SYN_SENT = 1
    SYN_ACK_SENT = 2
    PARTIAL = 3
    ESTABLISHED = 4
    CLOSED = 5
    RESET = 6

cdef enum:
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    ACK = 0x10

cdef enum:
    HIST_SYN_PKT = 0x1
    HIST_FIN_PKT = 0x2
    HIST_RST_PKT = 0x4
    HIST_FIN_RST_PKT = 0x8
    HIST_DATA_PKT = 0x10
    HIST_ACK_PKT = 0x20
    HIST_MULTI_FLAG_PKT = 0x40

cdef int64_t TOO_LARGE_SEQ_DELTA = 1048576
cdef int MAX_REASSEMBLY_BLOCKS = 4096

# tcp.TCP_TRANSITIONS as a table: LEGAL[old][new]
cdef bint LEGAL[7][7]
memset(LEGAL, 0, sizeof(LEGAL))
for _old, _new in TCP_TRANSITIONS:
    LEGAL[<int>_old][<int>_new] = True


cdef inline int64_t seq_delta(uint32_t a, uint32_t b) noexcept nogil:
    """Signed 32-bit difference a - b."""
    return <int32_t>(a - b)


cdef inline bint in_handshake(int state) noexcept nogil:
    return state == INACTIVE or state == SYN_SENT or state == SYN_ACK_SENT


cdef inline bint is_orig_end(Conn conn, int ei) noexcept:
    return ei == conn.orig_i


cdef int set_state(Conn conn, int ei, int new) except -1:
    cdef TcpEnd* e = &conn.ends[ei]
    cdef int old = e.state
    if new == old:
        return 0
    if not LEGAL[old][new]:
        raise IllegalTransition(TcpState(old), TcpState(new))
    if not in_handshake(new) and in_handshake(old) and in_handshake(conn.ends[1 - ei].state):
        conn.inactivity_timeout = TCP_INACTIVITY
    e.prev_state = old
    e.state = new
    return 0


cdef inline void add_history(Conn conn, int ei, str code):
    conn.history = conn.history + (code if ei == conn.orig_i else code.lower())


cdef void scaled(Conn conn, int ei, str code, int64_t* counter, int64_t* thresh):
    """Zeek's ScaledHistoryEntry: add the letter on the 1st, 10th, 100th ... event."""
    counter[0] += 1
    if counter[0] == thresh[0]:
        add_history(conn, ei, code)
        thresh[0] = counter[0] * 10


cdef bint check_history(Conn conn, int ei, int64_t mask, str code):
    """Add ``code`` the first time ``mask`` is seen; True if it had been seen before."""
    if ei != conn.orig_i:
        mask <<= 16
    if conn.hist_mask & mask:
        return True
    conn.hist_mask |= mask
    conn.history = conn.history + (code if ei == conn.orig_i else code.lower())
    return False


cdef inline uint64_t end_size(TcpEnd* e, TcpEnd* peer) noexcept nogil:
    """Payload bytes sent, from the sequence numbers (TCP_Endpoint::Size)."""
    cdef uint64_t last64, ack64, size
    last64 = (<uint64_t>e.seq_wraps << 32) | e.last_seq
    ack64 = (<uint64_t>e.ack_wraps << 32) | e.ack_seq
    if (e.prev_state == SYN_SENT and e.state == RESET and peer.state == INACTIVE
            and not (ack64 == e.start_seq or ack64 == <uint64_t>e.start_seq + 1)):
        return 0
    size = (last64 if last64 > ack64 else ack64) - e.start_seq
    if size:
        size -= 1
    if e.fin_cnt > 0 and size:
        size -= 1
    return size


cdef inline void update_last_seq(TcpEnd* e, uint32_t s) noexcept nogil:
    if s < e.last_seq:
        e.seq_wraps += 1
    e.last_seq = s


cdef inline int64_t relative_seq(TcpEnd* e, uint32_t cur, uint32_t last, int64_t wraps, bint* underflow) noexcept nogil:
    """tcp.relative_seq."""
    cdef int64_t delta = seq_delta(cur, last), d
    if delta < 0:
        if wraps and cur > last:
            wraps -= 1
    elif delta > 0:
        if cur < last:
            wraps += 1
    if wraps == 0:
        d = seq_delta(cur, e.start_seq)
        underflow[0] = d < 0
        return d
    underflow[0] = False
    return ((wraps << 32) | cur) - <int64_t>e.start_seq


cdef int window_scale_option(const uint8_t* opts, Py_ssize_t n) noexcept nogil:
    """tcp.window_scale_option: the window scale of a SYN's options, or -1."""
    cdef Py_ssize_t i = 0
    cdef int kind, olen
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


cdef bint ftp_hint(const uint8_t* b, Py_ssize_t n, bint is_orig) noexcept nogil:
    """Could this FTP control payload announce a data channel?  From the client: "port" or
    "eprt" in any case; from the server: "227" or "229" (ExpectedChannels.announce)."""
    cdef Py_ssize_t i
    cdef uint8_t c0, c1, c2, c3
    if not is_orig:
        for i in range(n - 2):
            if b[i] == 0x32 and b[i + 1] == 0x32 and (b[i + 2] == 0x37 or b[i + 2] == 0x39):
                return True
        return False
    for i in range(n - 3):
        c0, c1, c2, c3 = b[i] | 0x20, b[i + 1] | 0x20, b[i + 2] | 0x20, b[i + 3] | 0x20
        if (c0 == 0x70 and c1 == 0x6F and c2 == 0x72 and c3 == 0x74) or (
                c0 == 0x65 and c1 == 0x70 and c2 == 0x72 and c3 == 0x74):
            return True
    return False


cdef int data_sent(Conn conn, int ei, int64_t seq, int64_t length) except -1:
    cdef TcpEnd* e = &conn.ends[ei]
    cdef int64_t end = seq + length
    blocks = conn.blocks0 if ei == 0 else conn.blocks1
    if end <= e.reassem_seq:
        return 0
    if seq <= e.reassem_seq:
        e.reassem_seq = end
        if blocks:
            e.reassem_seq = merge_blocks(blocks, e.reassem_seq)
        return 0
    if blocks is None:
        blocks = {}
        if ei == 0:
            conn.blocks0 = blocks
        else:
            conn.blocks1 = blocks
    if len(blocks) < MAX_REASSEMBLY_BLOCKS:
        if end > blocks.get(seq, 0):
            blocks[seq] = end
    return 0


cdef inline bint is_clean(TcpEnd* e) noexcept nogil:
    return e.state == ESTABLISHED or (e.state == CLOSED and e.prev_state == ESTABLISHED)


cdef int ack_received(Conn conn, int ei, int64_t up_to) except -1:
    """The peer acknowledged our data up to ``up_to``: unseen bytes below it are a gap."""
    cdef TcpEnd* e = &conn.ends[ei]
    cdef int64_t missing
    if e.fin_cnt > 0 and up_to >= e.fin_seq:
        up_to = e.fin_seq - 1
    if up_to <= e.reassem_seq:
        return 0
    if up_to <= 2 and conn.is_partial:
        return 0
    missing = up_to - e.reassem_seq
    blocks = conn.blocks0 if ei == 0 else conn.blocks1
    if blocks:
        missing -= <int64_t>covered(blocks, e.reassem_seq, up_to)
    e.reassem_seq = up_to
    if blocks:
        e.reassem_seq = merge_blocks(blocks, up_to)
    if missing > 0 and is_clean(e) and is_clean(&conn.ends[1 - ei]):
        conn.missed_bytes += missing
        scaled(conn, ei, "G", &e.gap_cnt, &e.gap_thresh)
    return 0


cdef void init_ends(Conn conn) except *:
    cdef int i
    conn.ends = <TcpEnd*>calloc(2, sizeof(TcpEnd))
    if conn.ends == NULL:
        raise MemoryError()
    for i in range(2):
        conn.ends[i].chk_thresh = conn.ends[i].rxmt_thresh = 1
        conn.ends[i].win0_thresh = conn.ends[i].gap_thresh = 1
        conn.ends[i].reassem_seq = 1
    conn.orig_i = 0


# ---------------------------------------------------------------------------- packets

cdef int tcp_packet(Tracker tr, Pkt* p, double t) except -1:
    """tcp.tcp_packet."""
    cdef uint8_t key[KEYLEN]
    cdef uint64_t h
    cdef Conn conn
    cdef int flags = p.flags, ei
    cdef bint new, flip, is_orig
    pair_key(key, 6, p, p.sport, p.dport)
    h = siphash13(tr.k0, tr.k1, key)
    conn = tr._lookup(key, h)
    if conn is not None and flags & SYN and p.payload_len >= 0 and is_reuse(conn, p):
        tr.remove(conn)
        conn = None
    new = conn is None
    if new:
        flip = False
        if not flags & SYN or flags & ACK:
            lsp = tr.likely_server_ports
            if (6, p.sport) in lsp:
                if (6, p.dport) in lsp:
                    flip = not flags & SYN and p.sport < p.dport
                else:
                    flip = True
        conn = tr._new_conn(key, h, 6, p.src, p.sport, p.dst, p.dport, p.alen, t)
        init_ends(conn)
        if flip:
            conn.flip_roles()
        conn.app = app_for(6, conn.resp_p, tr.protocols)
        if tr.expected:
            tr.expected.apply(conn, t)
        tr._push_timer(t + TCP_SYN_TIMEOUT, T_EXPIRE, conn)
        tr._push_timer(t + conn.inactivity_timeout, T_INACTIVITY, conn)
    is_orig = memcmp(p.src, conn.orig_a, p.alen) == 0 and p.sport == conn.orig_p
    ei = conn.orig_i if is_orig else 1 - conn.orig_i
    if p.payload_len < 0:
        pass  # unusable TCP header: the connection exists, the packet counts nowhere
    elif not p.checksum_ok:
        scaled(conn, ei, "C", &conn.ends[ei].chk_cnt, &conn.ends[ei].chk_thresh)
    else:
        tcp_process(tr, conn, ei, p, t)
        count_packet(conn, is_orig, p.ip_len)
    if new:
        port_timeout = PORT_INACTIVITY.get(conn.resp_p)
        if port_timeout is not None:
            conn.inactivity_timeout = port_timeout
    return 0


cdef bint is_reuse(Conn conn, Pkt* p) noexcept:
    """Zeek's TCPSessionAdapter::IsReuse for a SYN on an existing connection."""
    cdef TcpEnd* o = &conn.ends[conn.orig_i]
    cdef TcpEnd* r = &conn.ends[1 - conn.orig_i]
    cdef TcpEnd* conn_orig = o
    if p.flags & ACK:
        if o.state != INACTIVE:
            return False
        conn_orig = r
    if not (o.did_close or r.did_close):
        if p.seq == conn_orig.start_seq:
            return False
        if (not p.flags & ACK and conn_orig.state == SYN_ACK_SENT and r.state == INACTIVE
                and p.seq == r.start_seq):
            return False
    return True


cdef int tcp_process(Tracker tr, Conn conn, int ei, Pkt* p, double t) except -1:
    """tcp._process: TCPSessionAdapter::Process for a packet with a usable header and checksum."""
    cdef int flags = p.flags, pi = 1 - ei, st, scale
    cdef bint syn = flags & SYN, fin = flags & FIN, rst = flags & RST, ack = flags & ACK
    cdef bint orig = ei == conn.orig_i, seq_underflow, ack_underflow, do_close, gen_event
    cdef TcpEnd* e = &conn.ends[ei]
    cdef TcpEnd* peer = &conn.ends[pi]
    cdef uint32_t base_seq = p.seq, ack_seq = p.ack, seq_one_past
    cdef int64_t length = p.payload_len, seg_len, rel_seq, rel_ack, delta_ack, delta_last, window
    cdef int bits

    # SetPartialStatus
    if orig:
        if not conn.first_packet_seen & 1:
            conn.is_partial = not syn or ack
    elif not conn.first_packet_seen & 2 and not conn.is_partial:
        conn.is_partial = not syn

    seg_len = length + (1 if syn else 0) + (1 if fin else 0)
    if rst:
        seg_len -= length
    seq_one_past = <uint32_t>(<uint64_t>base_seq + <uint64_t>seg_len)

    # init_endpoint
    st = e.state
    if st == INACTIVE:
        if syn:
            e.ack_seq = e.start_seq = base_seq
            e.last_seq = seq_one_past
        else:
            e.ack_seq = e.start_seq = base_seq - 1
            e.last_seq = base_seq
    elif syn:
        if st == SYN_SENT or st == SYN_ACK_SENT:
            if base_seq != e.start_seq:
                e.start_seq = e.ack_seq = base_seq
                e.last_seq = seq_one_past
        elif st == ESTABLISHED or st == PARTIAL or (st == RESET and e.prev_state == INACTIVE):
            e.start_seq = e.ack_seq = base_seq
            e.last_seq = seq_one_past

    rel_seq = relative_seq(e, base_seq, e.last_seq, e.seq_wraps, &seq_underflow)

    # update_history
    bits = (1 if syn else 0) + (1 if fin else 0) + (1 if rst else 0)
    if bits > 1:
        if fin and rst:
            check_history(conn, ei, HIST_FIN_RST_PKT, "I")
        else:
            check_history(conn, ei, HIST_MULTI_FLAG_PKT, "Q")
    elif bits == 1:
        if syn:
            code = "H" if ack else "S"
            if check_history(conn, ei, HIST_SYN_PKT, code) and rel_seq != e.hist_last_syn:
                add_history(conn, ei, code)
            e.hist_last_syn = rel_seq
        if fin:
            if check_history(conn, ei, HIST_FIN_PKT, "F") and rel_seq + length != e.hist_last_fin:
                add_history(conn, ei, "F")
            e.hist_last_fin = rel_seq + length
        if rst:
            if check_history(conn, ei, HIST_RST_PKT, "R") and rel_seq != e.hist_last_rst:
                add_history(conn, ei, "R")
            e.hist_last_rst = rel_seq
    elif length:
        check_history(conn, ei, HIST_DATA_PKT, "D")
    elif ack:
        check_history(conn, ei, HIST_ACK_PKT, "A")

    # update_window
    window = p.window << e.window_scale
    if window == 0 and not flags & RST and peer.state != CLOSED and e.state != RESET:
        scaled(conn, ei, "W", &e.win0_cnt, &e.win0_thresh)
    if (not flags & (SYN | FIN | RST) and e.state != CLOSED and e.state != RESET
            and seq_delta(base_seq, e.window_seq) >= 0 and seq_delta(ack_seq, e.window_ack_seq) >= 0):
        e.window = window
        e.window_ack_seq = ack_seq
        e.window_seq = base_seq

    if not (conn.ends[0].did_close and conn.ends[1].did_close):
        conn.last_time = t

    if syn:
        scale = window_scale_option(p.opts, p.opts_len)
        if scale < 0:
            e.window_scale = 0
            if ack:
                peer.window_scale = 0
        else:
            e.window_scale = scale if scale < 14 else 14
            e.window_seq = base_seq
            e.window_ack_seq = ack_seq
            peer.window_seq = ack_seq
            peer.window_ack_seq = base_seq
    if fin:
        e.fin_cnt += 1
        e.fin_seq = rel_seq + seg_len
    if rst:
        e.rst_cnt += 1

    rel_ack = 0
    if ack:
        if peer.state == INACTIVE:
            rel_ack = 1
            peer.start_seq = peer.ack_seq = peer.last_seq = ack_seq - 1
        else:
            delta_ack = seq_delta(ack_seq, peer.ack_seq)
            rel_ack = relative_seq(peer, ack_seq, peer.ack_seq, peer.ack_wraps, &ack_underflow)
            if ack_underflow:
                rel_ack = 0
            elif not rst and delta_ack > 0 and not (ack_seq == 0 and delta_ack > TOO_LARGE_SEQ_DELTA):
                if ack_seq < peer.ack_seq:
                    peer.ack_wraps += 1
                peer.ack_seq = ack_seq

    # update_last_seq
    delta_last = seq_delta(seq_one_past, e.last_seq)
    if (syn or rst) and (delta_last > TOO_LARGE_SEQ_DELTA or delta_last < -TOO_LARGE_SEQ_DELTA):
        pass
    elif fin and e.last_seq == <uint32_t>(e.start_seq + 1):
        update_last_seq(e, seq_one_past)
    elif e.state == RESET:
        pass
    elif delta_last > 0:
        update_last_seq(e, seq_one_past)
    elif length > 0:
        scaled(conn, ei, "T", &e.rxmt_cnt, &e.rxmt_thresh)

    do_close = update_state_machine(tr, conn, ei, base_seq, length, flags, t, &gen_event)
    if ack:
        ack_received(conn, pi, rel_ack)

    conn.first_packet_seen |= 1 if ei == conn.orig_i else 2

    if length > 0 and not rst and not seq_underflow:
        # payload cut by the snap length never reaches the reassembler (Zeek's
        # truncated_tcp_payload): once acknowledged it shows up as a content gap
        if p.captured >= length:
            data_sent(conn, ei, rel_seq + 1 if syn else rel_seq, length)
        if not conn.app_done and not (tr.ftp_loaded and conn.service and conn.app == "ftp"
                                      and not ftp_hint(p.payload, p.captured, ei == conn.orig_i)):
            # (an FTP control connection, once confirmed, only matters for the data
            # channels its commands announce: services.ExpectedChannels.announce's test)
            detect_tcp_service(tr, conn, payload_bytes(p), ei == conn.orig_i, p.ts)

    if do_close:
        connection_closed(tr, conn, ei, gen_event)
    return 0


cdef int update_state_machine(Tracker tr, Conn conn, int ei, uint32_t base_seq, int64_t length, int flags,
                              double t, bint* gen_event) except -1:
    """tcp._update_state_machine; returns do_close."""
    cdef bint syn = flags & SYN, fin = flags & FIN, rst = flags & RST, ack = flags & ACK
    cdef bint do_close = False, is_reject
    cdef int pi = 1 - ei
    cdef int st = conn.ends[ei].state
    gen_event[0] = False
    if st == INACTIVE:
        if syn:
            if ei == conn.orig_i:
                set_state(conn, ei, SYN_ACK_SENT if ack else SYN_SENT)
                tr._push_timer(t + TCP_ATTEMPT_DELAY, T_ATTEMPT, conn)
            else:
                if ack:
                    pass
                elif conn.ends[pi].state == SYN_ACK_SENT and base_seq == conn.ends[ei].start_seq:
                    # SYN/SYN-ACK reversal: flip the endpoints and establish
                    conn.is_partial = False
                    conn.flip_roles()
                    set_state(conn, pi, ESTABLISHED)
                    conn.first_packet_seen |= 1
                if conn.ends[pi].state == SYN_SENT:
                    set_state(conn, pi, ESTABLISHED)
                set_state(conn, ei, ESTABLISHED)
        if fin:
            set_state(conn, ei, CLOSED)
            do_close = gen_event[0] = True
        if rst:
            set_state(conn, ei, RESET)
            if ei == conn.orig_i:
                is_reject = conn.ends[pi].state == ESTABLISHED
            else:
                is_reject = conn.ends[pi].state == SYN_SENT or conn.ends[pi].state == SYN_ACK_SENT
            do_close = True
            gen_event[0] = not is_reject
        if conn.ends[ei].state == INACTIVE:
            if ei != conn.orig_i and length == 0 and conn.ends[conn.orig_i].state == SYN_SENT:
                pass  # an ACK of the SYN before the SYN-ACK: not a partial connection
            elif ack and conn.ends[pi].state == ESTABLISHED:
                # SYN-ACK seen but not the SYN, now the ACK: establish
                set_state(conn, ei, ESTABLISHED)
                conn.is_partial = False
                conn.first_packet_seen |= 1 if ei == conn.orig_i else 2
            else:
                set_state(conn, ei, PARTIAL)
    elif st == SYN_SENT or st == SYN_ACK_SENT:
        if fin:
            set_state(conn, ei, CLOSED)
            do_close = gen_event[0] = True
        if rst:
            set_state(conn, ei, RESET)
            conn.is_active = False
            do_close = True
    elif st == ESTABLISHED or st == PARTIAL:
        if syn and st == PARTIAL and conn.ends[pi].state == INACTIVE and not ack:
            set_state(conn, ei, SYN_SENT)
        if fin and not rst:
            set_state(conn, ei, CLOSED)
            if conn.ends[pi].state == RESET and conn.ends[pi].prev_state == CLOSED:
                set_state(conn, pi, CLOSED)
            do_close = gen_event[0] = True
        if rst:
            set_state(conn, ei, RESET)
            do_close = True
            if conn.ends[pi].state != RESET or conn.ends[pi].prev_state != ESTABLISHED:
                conn.is_active = False
    elif st == CLOSED:
        if rst and conn.ends[pi].state != CLOSED:
            set_state(conn, ei, RESET)
            if not conn.ends[ei].did_close:
                do_close = True
            tr._push_timer(t + TCP_RESET_DELAY, T_RESET, conn)
    return do_close


cdef int connection_closed(Tracker tr, Conn conn, int ei, bint gen_event) except -1:
    cdef TcpEnd* e = &conn.ends[ei]
    cdef TcpEnd* peer = &conn.ends[1 - ei]
    if e.did_close:
        return 0
    e.did_close = True
    if e.state == RESET or peer.did_close or peer.state == INACTIVE:
        if e.prev_state != INACTIVE or peer.state != INACTIVE:
            if gen_event:
                conn.is_active = False
        tr._push_timer(conn.last_time + TCP_CLOSE_DELAY, T_DELETE, conn)
    elif e.prev_state != INACTIVE:
        tr._push_timer(conn.last_time + TCP_SESSION_TIMER, T_EXPIRE, conn)
    return 0


# ---------------------------------------------------------------------------- timers

cdef int attempt_timer(Tracker tr, Conn conn) except -1:
    cdef TcpEnd* o = &conn.ends[conn.orig_i]
    cdef TcpEnd* r = &conn.ends[1 - conn.orig_i]
    if conn.is_active and (o.state == SYN_SENT or o.state == SYN_ACK_SENT) and r.state == INACTIVE:
        conn.is_active = False
        tr.remove(conn)
    return 0


cdef int expire_timer(Tracker tr, Conn conn, double t) except -1:
    cdef TcpEnd* o = &conn.ends[conn.orig_i]
    cdef TcpEnd* r = &conn.ends[1 - conn.orig_i]
    if not conn.is_active:
        return 0
    if conn.last_time + TCP_CONNECTION_LINGER < t:
        if o.did_close or r.did_close:
            if ((o.did_close and r.did_close) or o.state == RESET or r.state == RESET
                    or o.state == INACTIVE or r.state == INACTIVE):
                conn.is_active = False
                tr.remove(conn)
                return 0
        if r.state == INACTIVE and o.state == INACTIVE:
            tr.remove(conn)
            return 0
    tr._push_timer(t + TCP_SESSION_TIMER, T_EXPIRE, conn)
    return 0


# ---------------------------------------------------------------------------- records

cdef tuple tcp_summary_c(Conn conn):
    """tcp.tcp_summary (conn_state by tcp.tcp_conn_state itself)."""
    cdef TcpEnd* o = &conn.ends[conn.orig_i]
    cdef TcpEnd* r = &conn.ends[1 - conn.orig_i]
    o_size = end_size(o, r)
    r_size = end_size(r, o)
    return ("tcp", tcp_conn_state(o.state, o_size, r.state, r_size, conn.history), o_size, r_size,
            conn.history or None)
