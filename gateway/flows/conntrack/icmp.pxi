# The compiled mirror of icmp.py (included by _compiled.pyx).

cdef dict _ICMP4_COUNTERPART = ICMP4_COUNTERPART
cdef dict _ICMP6_COUNTERPART = ICMP6_COUNTERPART


cdef int icmp_packet(Tracker tr, Pkt* p, double t) except -1:
    """icmp.icmp_packet."""
    cdef uint8_t key[KEYLEN]
    cdef uint64_t h
    cdef Conn conn
    cdef int itype = p.sport, other
    cdef bint is_orig
    counterpart = (_ICMP4_COUNTERPART if p.proto == 1 else _ICMP6_COUNTERPART).get(itype)
    if counterpart is None:
        # one-way message: Zeek's ConnKey keeps it directional
        other = p.dport
        make_key(key, p.proto, KIND_ONEWAY, p.alen, p.src, itype, p.dst, other)
    else:
        other = counterpart
        pair_key(key, p.proto, p, itype, other)
    h = siphash13(tr.k0, tr.k1, key)
    conn = tr._lookup(key, h)
    if conn is None:
        conn = tr._new_conn(key, h, p.proto, p.src, itype, p.dst, other, p.alen, t)
        conn.inactivity_timeout = ICMP_INACTIVITY
        tr._push_timer(t + ICMP_INACTIVITY, T_INACTIVITY, conn)
    if not p.checksum_ok:
        tr.skip("bad_ICMP_checksum")
        return 0
    conn.last_time = t
    is_orig = memcmp(p.src, conn.orig_a, p.alen) == 0 and itype == conn.orig_p
    if is_orig:
        conn.orig_size = p.payload_len if conn.orig_size < 0 else conn.orig_size + p.payload_len
    else:
        conn.resp_size = p.payload_len if conn.resp_size < 0 else conn.resp_size + p.payload_len
    count_packet(conn, is_orig, p.ip_len)
    return 0


cdef int unknown_packet(Tracker tr, Pkt* p, double t) except -1:
    """icmp.unknown_packet: another IP protocol, one connection per address pair."""
    cdef uint8_t key[KEYLEN]
    cdef uint64_t h
    cdef Conn conn
    cdef bint is_orig
    if memcmp(p.src, p.dst, p.alen) < 0:
        make_key(key, p.proto, KIND_NOPORTS, p.alen, p.src, 0, p.dst, 0)
    else:
        make_key(key, p.proto, KIND_NOPORTS, p.alen, p.dst, 0, p.src, 0)
    h = siphash13(tr.k0, tr.k1, key)
    conn = tr._lookup(key, h)
    if conn is None:
        conn = tr._new_conn(key, h, p.proto, p.src, 0, p.dst, 0, p.alen, t)
        conn.inactivity_timeout = UNKNOWN_INACTIVITY
        tr._push_timer(t + UNKNOWN_INACTIVITY, T_INACTIVITY, conn)
    conn.last_time = t
    is_orig = memcmp(p.src, conn.orig_a, p.alen) == 0
    if is_orig:
        conn.orig_size = 0
    else:
        conn.resp_size = 0
    count_packet(conn, is_orig, p.ip_len)
    return 0
