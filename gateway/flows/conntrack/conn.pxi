# The compiled mirror of conn.py's Conn and conn_key (included by _compiled.pyx).
#
# A connection is a Conn object whose per-packet fields are C fields; what the shared
# Python code reads and sets (services.py, build_record) are public attributes, so the
# cold, per-connection logic runs on it unchanged.  Keys are Zeek's ConnKey as 40 bytes:
# proto, kind (0 = a 5-tuple, smaller end first; 1 = a one-way ICMP message, directional;
# 2 = another IP protocol, no ports), address length, 0, address a, address b, port a,
# port b.  The table hashes them with SipHash-1-3 under a random key, so crafted traffic
# cannot pile connections into one probe chain.

cdef int KIND_PAIR = 0, KIND_ONEWAY = 1, KIND_NOPORTS = 2


@cython.final
@cython.no_gc
cdef class Conn:
    def __cinit__(self):
        self.ends = NULL
        self.blocks0 = None
        self.blocks1 = None

    def __dealloc__(self):
        if self.ends != NULL:
            free(self.ends)

    cpdef flip_roles(self):
        """Swap originator and responder (Zeek's Connection::FlipRoles); appends ``^``."""
        cdef int64_t n
        self.orig_h, self.resp_h = self.resp_h, self.orig_h
        memcpy(self.orig_a, <const uint8_t*>PyBytes_AS_STRING(self.orig_h), self.alen)
        self.orig_p, self.resp_p = self.resp_p, self.orig_p
        n = self.orig_pkts
        self.orig_pkts = self.resp_pkts
        self.resp_pkts = n
        n = self.orig_ip_bytes
        self.orig_ip_bytes = self.resp_ip_bytes
        self.resp_ip_bytes = n
        if self.ends != NULL:
            self.orig_i = 1 - self.orig_i
            fps = self.first_packet_seen
            self.first_packet_seen = (2 if fps & 1 else 0) | (1 if fps & 2 else 0)
            self.is_partial = False
        self.history = self.history + "^"


cdef inline void count_packet(Conn conn, bint is_orig, int64_t ip_len) noexcept:
    """Zeek's ConnSize analyzer: packets and IP bytes per direction."""
    if is_orig:
        conn.orig_pkts += 1
        conn.orig_ip_bytes += ip_len
    else:
        conn.resp_pkts += 1
        conn.resp_ip_bytes += ip_len


cdef inline void conn_check_history(Conn conn, int64_t mask, str code):
    if not conn.hist_mask & mask:
        conn.hist_mask |= mask
        conn.history = conn.history + code


cdef inline bint precedes(const uint8_t* a, int pa, const uint8_t* b, int pb, int alen) noexcept nogil:
    """(a, pa) < (b, pb) as conn.conn_key orders the ends."""
    cdef int c = memcmp(a, b, alen)
    return c < 0 or (c == 0 and pa < pb)


cdef inline void make_key(uint8_t* key, int proto, int kind, int alen, const uint8_t* a, int pa,
                          const uint8_t* b, int pb) noexcept nogil:
    memset(key, 0, KEYLEN)
    key[0] = proto
    key[1] = kind
    key[2] = alen
    memcpy(key + 4, a, alen)
    memcpy(key + 20, b, alen)
    key[36] = (pa >> 8) & 0xFF
    key[37] = pa & 0xFF
    key[38] = (pb >> 8) & 0xFF
    key[39] = pb & 0xFF


cdef inline void pair_key(uint8_t* key, int proto, Pkt* p, int sport, int dport) noexcept nogil:
    """conn.conn_key: the 5-tuple with the smaller (address, port) end first."""
    if precedes(p.src, sport, p.dst, dport, p.alen):
        make_key(key, proto, KIND_PAIR, p.alen, p.src, sport, p.dst, dport)
    else:
        make_key(key, proto, KIND_PAIR, p.alen, p.dst, dport, p.src, sport)


cdef inline uint64_t rotl(uint64_t x, int b) noexcept nogil:
    return (x << b) | (x >> (64 - b))


cdef uint64_t siphash13(uint64_t k0, uint64_t k1, const uint8_t* m) noexcept nogil:
    """SipHash-1-3 of a KEYLEN-byte key."""
    cdef uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL
    cdef uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL
    cdef uint64_t w
    cdef int i
    for i in range(KEYLEN // 8 + 1):
        if i < KEYLEN // 8:
            memcpy(&w, m + 8 * i, 8)
        else:
            w = (<uint64_t>KEYLEN) << 56
        v3 ^= w
        v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32)
        v2 += v3; v3 = rotl(v3, 16); v3 ^= v2
        v0 += v3; v3 = rotl(v3, 21); v3 ^= v0
        v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32)
        v0 ^= w
    v2 ^= 0xFF
    for i in range(3):
        v0 += v1; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32)
        v2 += v3; v3 = rotl(v3, 16); v3 ^= v2
        v0 += v3; v3 = rotl(v3, 21); v3 ^= v0
        v2 += v1; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32)
    return v0 ^ v1 ^ v2 ^ v3
