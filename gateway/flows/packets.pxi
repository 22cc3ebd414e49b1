# The compiled mirror of packets.py's common case (included by _compiled.pyx).
#
# decode_fast() takes a frame that is one of the common shapes and fills a Pkt exactly as
# PacketDecoder.decode would build the Packet; for anything else it returns 0 and the frame
# goes to PacketDecoder, which decides (and counts what it skips).  Common shapes:
# Ethernet (up to two 802.1Q/802.1ad tags, then a PPPoE session or an MPLS label stack),
# Linux cooked SLL/SLL2 and raw IP link types; IPv4 without fragmentation, IPv6 without
# fragment or AH headers; TCP with
# a usable header, UDP on no tunnel port, ICMP over IPv4, ICMPv6 over IPv6; not cut by the
# snap length; IPv4 header checksum right (a bad transport checksum is a field, as in the
# Packet).  Frames the decoder would only count (not IP; a bad IPv4 header checksum) are
# told apart so they are counted without it.  tests/unit/test_pcap_pipeline.py holds both
# equal on hostile frames.

cdef inline uint32_t be16(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint32_t le32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[3] << 24) | (<uint32_t>p[2] << 16) | (<uint32_t>p[1] << 8) | p[0]


cdef inline uint64_t sum16(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Sum of the big-endian 16-bit words of p[0:n] (an odd last byte padded with zero);
    the ones-complement sum is this modulo 0xffff."""
    cdef uint64_t s = 0
    cdef Py_ssize_t i = 0
    while i + 1 < n:
        s += (<uint64_t>p[i] << 8) | p[i + 1]
        i += 2
    if n & 1:
        s += <uint64_t>p[n - 1] << 8
    return s


cdef inline bint transport_sum_ok(const uint8_t* src, const uint8_t* dst, int alen, int proto,
                                  const uint8_t* seg, Py_ssize_t n) noexcept nogil:
    """packets.transport_checksum_ok: pseudo header + segment."""
    return (sum16(src, alen) + sum16(dst, alen) + sum16(seg, n) + <uint64_t>proto + <uint64_t>n) % 0xFFFF == 0


cdef inline bint tunnel_port(uint32_t port) noexcept nogil:
    # packets.UDP_TUNNEL_PORTS
    return port == 4789 or port == 6081 or port == 3544 or port == 2152 or port == 5072


cdef enum:
    FAST_PACKET = 1  # p is filled
    FAST_NO = 0  # PacketDecoder decides
    FAST_NON_IP = -1  # PacketDecoder would count non_ip_packet and make nothing
    FAST_BAD_IP_SUM = -2  # PacketDecoder would count bad_IP_checksum and make nothing


cdef int decode_fast(const uint8_t* f, Py_ssize_t n, Py_ssize_t wire, int linktype, double ts,
                     bint ignore_checksums, Pkt* p) noexcept nogil:
    """FAST_PACKET with ``p`` filled for a frame of a common shape, a FAST_ skip for one the
    decoder would only count, else FAST_NO."""
    cdef Py_ssize_t off, hlen, total, end, seg_at, seg_len, thl
    cdef uint32_t etype, ppp, ulen, csum
    cdef int tags = 0, labels = 0, hops = 0, proto, alen
    if wire > n:  # cut by the snap length: the general path knows the rules
        return FAST_NO
    if linktype == 1:  # Ethernet
        if n < 14:
            return FAST_NO
        etype = be16(f + 12)
        off = 14
        while etype == 0x8100 or etype == 0x88A8 or etype == 0x9100 or etype == 0x9200:
            tags += 1
            if tags > 2 or n < off + 4:
                return FAST_NO
            etype = be16(f + off + 2)
            off += 4
        if etype == 0x8864:  # PPPoE session
            if n < off + 8:
                return FAST_NO
            ppp = be16(f + off + 6)
            off += 8
            if ppp == 0x21:
                etype = 0x0800
            elif ppp == 0x57:
                etype = 0x86DD
            else:
                return FAST_NON_IP
        elif etype == 0x8847 or etype == 0x8848:  # MPLS: labels to the bottom of the stack
            while True:
                labels += 1
                if labels > 8 or n < off + 4:
                    return FAST_NO
                off += 4
                if f[off - 2] & 1:
                    break
            if n <= off:
                return FAST_NO
            etype = 0x0800 if f[off] >> 4 == 4 else (0x86DD if f[off] >> 4 == 6 else 0)
            if etype == 0:
                return FAST_NO
        elif etype != 0x0800 and etype != 0x86DD:
            return FAST_NON_IP if etype > 1500 else FAST_NO  # (<= 1500: 802.3 + LLC)
    elif linktype == 113:  # Linux cooked (SLL)
        if n < 16:
            return FAST_NO
        etype = be16(f + 14)
        off = 16
    elif linktype == 276:  # SLL2
        if n < 20:
            return FAST_NO
        etype = be16(f)
        off = 20
    elif linktype == 101 or linktype == 12 or linktype == 14 or linktype == 228 or linktype == 229:
        if n < 1:
            return FAST_NO
        off = 0
        etype = 0x0800 if f[0] >> 4 == 4 else (0x86DD if f[0] >> 4 == 6 else 0)
    else:
        return FAST_NO
    if etype == 0x0800:
        if n < off + 20 or f[off] >> 4 != 4:
            return FAST_NO
        hlen = (f[off] & 0xF) * 4
        total = be16(f + off + 2)
        if hlen < 20 or total < hlen or total == 0 or n < off + hlen:
            return FAST_NO
        end = off + total
        if end > n:
            return FAST_NO
        if not ignore_checksums and sum16(f + off, hlen) % 0xFFFF != 0:
            return FAST_BAD_IP_SUM
        if be16(f + off + 6) & 0x3FFF:  # a fragment
            return FAST_NO
        proto = f[off + 9]
        alen = 4
        p.src = f + off + 12
        p.dst = f + off + 16
        seg_at = off + hlen
        seg_len = total - hlen
        p.ip_len = total
        if proto == 58:
            return 0  # ICMPv6 over IPv4: odd, the general path
    elif etype == 0x86DD:
        if n < off + 40 or f[off] >> 4 != 6:
            return FAST_NO
        p.ip_len = be16(f + off + 4) + 40
        proto = f[off + 6]
        end = off + p.ip_len
        if end > n:
            return FAST_NO
        seg_at = off + 40
        # hop-by-hop, routing, destination options, HIP, shim6 (MLD reports carry a
        # hop-by-hop router alert); fragments, AH and the rest: the general path
        while proto == 0 or proto == 43 or proto == 60 or proto == 139 or proto == 140:
            hops += 1
            if hops > 8 or seg_at + 8 > end:
                return FAST_NO
            proto = f[seg_at]
            seg_at += (f[seg_at + 1] + 1) * 8
            if seg_at > end:
                return FAST_NO
        if proto != 6 and proto != 17 and proto != 58:
            return FAST_NO
        seg_len = end - seg_at
        alen = 16
        p.src = f + off + 8
        p.dst = f + off + 24
    else:
        return FAST_NO
    cdef const uint8_t* seg = f + seg_at
    p.ts = ts
    p.alen = alen
    p.proto = proto
    p.payload_obj = NULL
    p.opts = seg
    p.opts_len = 0
    if proto == 6:
        if seg_len < 20:
            return FAST_NO
        thl = (seg[12] >> 4) * 4
        if thl < 20 or thl > seg_len:
            return FAST_NO
        p.sport = be16(seg)
        p.dport = be16(seg + 2)
        p.seq = be32(seg + 4)
        p.ack = be32(seg + 8)
        p.flags = seg[13]
        p.window = be16(seg + 14)
        p.checksum_ok = ignore_checksums or transport_sum_ok(p.src, p.dst, alen, 6, seg, seg_len)
        p.payload = seg + thl
        p.captured = seg_len - thl
        p.payload_len = seg_len - thl
        p.opts = seg + 20
        p.opts_len = thl - 20
        return FAST_PACKET
    if proto == 17:
        if seg_len < 8:
            return FAST_NO
        p.sport = be16(seg)
        p.dport = be16(seg + 2)
        if tunnel_port(p.sport) or tunnel_port(p.dport):
            return FAST_NO
        ulen = be16(seg + 4)
        csum = be16(seg + 6)
        p.checksum_ok = True
        if not ignore_checksums and (csum or alen == 16) and not (p.dport == 4789 and csum == 0):
            p.checksum_ok = transport_sum_ok(p.src, p.dst, alen, 17, seg, seg_len)
        p.payload_len = <int64_t>ulen - 8
        p.flags = 0
        p.seq = p.ack = 0
        p.window = 0
        p.payload = seg + 8
        p.captured = seg_len - 8
        return FAST_PACKET
    if (proto == 1 and alen == 4) or (proto == 58 and alen == 16):
        if seg_len < 8:
            return FAST_NO
        if ignore_checksums:
            p.checksum_ok = True
        elif proto == 1:
            p.checksum_ok = sum16(seg, seg_len) % 0xFFFF == 0
        else:
            p.checksum_ok = transport_sum_ok(p.src, p.dst, alen, 58, seg, seg_len)
        p.sport = seg[0]
        p.dport = seg[1]
        p.payload_len = seg_len - 8
        p.flags = 0
        p.seq = p.ack = 0
        p.window = 0
        p.payload = seg + 8
        p.captured = seg_len - 8
        return FAST_PACKET
    return FAST_NO


cdef inline uint32_t _mix(uint32_t x) noexcept nogil:
    return <uint32_t>((<uint64_t>x * 0x9E3779B1ULL) & 0xFFFFFFFFULL) >> 16


cdef inline uint32_t address_hash(const uint8_t* a, int alen) noexcept nogil:
    """shard.address_hash: the address's 32-bit words XOR-folded, then mixed."""
    cdef uint32_t x = 0
    cdef int i
    for i in range(0, alen, 4):
        x ^= be32(a + i)
    return _mix(x)
