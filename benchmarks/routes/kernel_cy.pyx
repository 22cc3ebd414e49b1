# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Bake-off kernel, Cython: pcap records -> Ethernet/VLAN/IPv4/IPv6 -> 5-tuple table."""
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef struct Flow:
    uint8_t key[38]
    uint8_t used
    uint64_t pkts[2]
    uint64_t nbytes[2]
    double last
    uint32_t flags

cdef inline uint32_t be16(const uint8_t* p) nogil:
    return (p[0] << 8) | p[1]

cdef inline uint32_t le32(const uint8_t* p) nogil:
    return p[0] | (p[1] << 8) | (p[2] << 16) | (<uint32_t>p[3] << 24)

cdef inline uint64_t fnv(const uint8_t* k, int n) nogil:
    cdef uint64_t h = 1469598103934665603ULL
    cdef int i
    for i in range(n):
        h = (h ^ k[i]) * 1099511628211ULL
    return h

def scan(const uint8_t[::1] data):
    cdef const uint8_t* b = &data[0]
    cdef Py_ssize_t n = data.shape[0], pos = 24, f, end, ip, l4
    cdef uint32_t incl, et, proto, tot, sport, dport, alen, flags
    cdef uint8_t key[38]
    cdef const uint8_t* src
    cdef const uint8_t* dst
    cdef size_t cap = 1 << 16, used = 0, i, mask, j
    cdef Flow* table = <Flow*>calloc(cap, sizeof(Flow))
    cdef Flow* old
    cdef Flow* fl
    cdef int d, c
    cdef double ts
    cdef uint64_t h, total = 0, check = 0
    while pos + 16 <= n:
        incl = le32(b + pos + 8)
        ts = le32(b + pos) + le32(b + pos + 4) / 1e6
        f = pos + 16
        end = f + incl
        if end > n:
            break
        pos = end
        if incl < 34:
            continue
        et = be16(b + f + 12)
        ip = f + 14
        if et == 0x8100:
            et = be16(b + f + 16)
            ip = f + 18
        if et == 0x0800:
            proto = b[ip + 9]; tot = be16(b + ip + 2); alen = 4
            src = b + ip + 12; dst = b + ip + 16; l4 = ip + (b[ip] & 15) * 4
        elif et == 0x86DD:
            proto = b[ip + 6]; tot = be16(b + ip + 4) + 40; alen = 16
            src = b + ip + 8; dst = b + ip + 24; l4 = ip + 40
        else:
            continue
        if l4 + 14 > end:
            continue
        flags = 0
        if proto == 6 or proto == 17:
            sport = be16(b + l4); dport = be16(b + l4 + 2)
            if proto == 6:
                flags = b[l4 + 13]
        else:
            sport = dport = 0
        memset(key, 0, 38)
        key[0] = proto; key[1] = alen
        c = memcmp(src, dst, alen)
        d = 0
        if c > 0 or (c == 0 and sport > dport):
            d = 1
            src, dst = dst, src
            sport, dport = dport, sport
        memcpy(key + 2, src, alen); memcpy(key + 18, dst, alen)
        key[34] = sport >> 8; key[35] = sport & 255; key[36] = dport >> 8; key[37] = dport & 255
        h = fnv(key, 38)
        mask = cap - 1
        i = h & mask
        while table[i].used and memcmp(table[i].key, key, 38) != 0:
            i = (i + 1) & mask
        fl = &table[i]
        if not fl.used:
            fl.used = 1
            memcpy(fl.key, key, 38)
            used += 1
            if used * 2 > cap:
                old = table
                table = <Flow*>calloc(cap * 2, sizeof(Flow))
                for j in range(cap):
                    if old[j].used:
                        h = fnv(old[j].key, 38)
                        i = h & (cap * 2 - 1)
                        while table[i].used:
                            i = (i + 1) & (cap * 2 - 1)
                        table[i] = old[j]
                free(old)
                cap *= 2
                mask = cap - 1
                i = fnv(key, 38) & mask
                while memcmp(table[i].key, key, 38) != 0:
                    i = (i + 1) & mask
                fl = &table[i]
        fl.pkts[d] += 1
        fl.nbytes[d] += tot
        fl.last = ts
        fl.flags |= flags
        total += 1
    for j in range(cap):
        if table[j].used:
            check += table[j].pkts[0] * 3 + table[j].pkts[1] * 5 + table[j].nbytes[0] + table[j].nbytes[1] * 7 + table[j].flags
    free(table)
    return used, total, check
