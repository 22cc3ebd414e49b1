# The compiled mirror of udp.py (included by _compiled.pyx); the port's analyzer
# (services.udp_app) and the record summary (udp.udp_summary) are udp.py's own.

cdef enum:
    HIST_ORIG_DATA_PKT = 0x1
    HIST_RESP_DATA_PKT = 0x2


cdef Conn udp_packet(Tracker tr, Pkt* p, double t):
    """udp.udp_packet: one UDP datagram; returns its connection."""
    cdef uint8_t key[KEYLEN]
    cdef uint64_t h
    cdef Conn conn
    cdef bint flip, is_orig
    cdef int i
    pair_key(key, 17, p, p.sport, p.dport)
    h = siphash13(tr.k0, tr.k1, key)
    conn = tr._lookup(key, h)
    if conn is None:
        lsp = tr.likely_server_ports
        flip = ((17, p.sport) in lsp and (17, p.dport) not in lsp
                and not (p.alen == 4 and p.dst[0] == 0xFF and p.dst[1] == 0xFF and p.dst[2] == 0xFF
                         and p.dst[3] == 0xFF))
        conn = tr._new_conn(key, h, 17, p.src, p.sport, p.dst, p.dport, p.alen, t)
        if flip:
            conn.flip_roles()
        conn.app = app_for(17, conn.resp_p, tr.protocols)
        tr._push_timer(t + UDP_INACTIVITY, T_INACTIVITY, conn)
        if conn.app == "dns":
            tr._push_timer(t + DNS_SESSION_TIMEOUT, T_DNS, conn)
    is_orig = memcmp(p.src, conn.orig_a, p.alen) == 0 and p.sport == conn.orig_p
    if not p.checksum_ok:
        # UDPSessionAdapter::HandleBadChecksum: C/c on the 1st, 10th, 100th ...
        i = 0 if is_orig else 2
        conn.chk[i] += 1
        if conn.chk[i] == conn.chk[i + 1]:
            conn.history = conn.history + ("C" if is_orig else "c")
            conn.chk[i + 1] *= 10
        return conn
    conn.last_time = t
    if is_orig:
        conn_check_history(conn, HIST_ORIG_DATA_PKT, "D")
        conn.orig_size = p.payload_len if conn.orig_size < 0 else conn.orig_size + p.payload_len
    else:
        conn_check_history(conn, HIST_RESP_DATA_PKT, "d")
        conn.resp_size = p.payload_len if conn.resp_size < 0 else conn.resp_size + p.payload_len
    if not conn.app_done and conn.app is not None:
        udp_app(conn, payload_bytes(p), is_orig)
    if not p.flags & 1:  # a datagram cut by the snap length is not counted
        count_packet(conn, is_orig, p.ip_len)
    return conn
