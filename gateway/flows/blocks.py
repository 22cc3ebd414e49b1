"""Block-wise pcap decoding: many frames per Python call, header fields gathered with numpy.

A classic pcap file is read in large chunks (:data:`BLOCK_SIZE`).  :func:`scan_records`
finds the record offsets of a chunk in one tight loop; :func:`decode_block` then gathers the
header fields of every frame at once (numpy fancy indexing over the offsets): link and IP
layer, TCP/UDP ports, sequence numbers, flags, window, and the IPv4 header checksum.  Frames
of the common shape - Ethernet (plain, one 802.1Q tag or a PPPoE session), option-less
unfragmented IPv4 or IPv6 without extension headers, TCP or UDP (not a tunnel port), not cut
by the snap length - become :class:`~gateway.flows.packets.Packet` tuples straight from those
columns; every other frame goes through :class:`~gateway.flows.packets.PacketDecoder` as
before.  The common shape is exactly ``PacketDecoder._fast_ip``'s, so both routes give equal
packets (``tests/unit/test_pcap_blocks.py`` checks it, hypothesis included).  Frames the
decoder would only count - no IP possible (ARP, PPPoE discovery/LCP, cut before the
ethertype) or an IPv4 header of the common shape with a bad checksum - are counted here
under the decoder's reasons and never decoded.

Sharding (``--workers``): :func:`shard_keys` hashes the address pair of every frame whose IP
addresses sit at a fixed offset, vectorised, so a worker drops foreign frames at almost no
cost (one or two VLAN tags, one MPLS label and PPPoE sessions are keyed too); frames
without such a pair are decoded by every worker and sharded on the decoded addresses with
:func:`packet_shard`, the same hash.  Both directions of a connection hash alike (a sum of
per-address hashes).  Tunnels are keyed by their outer pair when it sits at a fixed offset
(as before: an inner connection seen through two different outer pairs may be split).

Everything here is pure: bytes in, columns/packets out; files are read in :mod:`pcap`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from gateway.flows.packets import (
    ETH_IPV4,
    ETH_IPV6,
    ETH_MPLS,
    ETH_PPPOE_SESSION,
    ETH_VLAN,
    UDP_TUNNEL_PORTS,
    Packet,
    PacketDecoder,
)

# 4 MiB: ~20k frames of an average trace per numpy pass (the fixed cost of a pass is
# ~50 gathers), small enough that a worker's memory stays flat
BLOCK_SIZE = 4 << 20
# zero bytes appended before gathering, so fixed-offset reads past a short last frame stay
# inside the array (the deepest read is 22 + 40 + 20 bytes into a frame)
_PAD = 128

KIND_TCP = 0  # common TCP frame: the packet is built from the columns
KIND_UDP = 1  # common UDP frame
KIND_OWN = 2  # this shard's frame of another shape: PacketDecoder decides
KIND_ANY = 3  # no address pair at a fixed offset: decoded by every shard, sharded afterwards
KIND_SKIP = 4  # malformed in a way the decoder would only count (counted in Block.skips)

_TUNNEL_PORTS = np.array(sorted(UDP_TUNNEL_PORTS), dtype=np.int64)
_VLAN_TYPES = np.array(ETH_VLAN, dtype=np.int64)
_MPLS_TYPES = np.array(ETH_MPLS, dtype=np.int64)
# ethertypes the decoder follows towards IP (others are non-IP; <= 1500 is 802.3 + LLC)
_IP_CARRIERS = np.array((ETH_IPV4, ETH_IPV6, ETH_PPPOE_SESSION) + ETH_VLAN + ETH_MPLS, dtype=np.int64)
_tuple_new = tuple.__new__


def scan_records(buf: bytes, pos: int, little: bool, max_len: int) -> tuple[list[int], int, int | None]:
    """Offsets of the complete pcap records in ``buf`` from ``pos`` on.

    Returns ``(offsets, stop, bad_len)``: ``stop`` is where the first incomplete record (or
    the end) starts; ``bad_len`` is the implausible length (> ``max_len``) of the record at
    ``stop``, or None."""
    incl_at = struct.Struct("<I" if little else ">I").unpack_from
    n = len(buf)
    offs: list[int] = []
    add = offs.append
    while pos + 16 <= n:
        incl = incl_at(buf, pos + 8)[0]
        if incl > max_len:
            return offs, pos, incl
        end = pos + 16 + incl
        if end > n:
            break
        add(pos)
        pos = end
    return offs, pos, None


def _mix(x):
    """Multiplicative hash of a 32-bit value (works on ints and uint64 arrays alike)."""
    return ((x * 0x9E3779B1) & 0xFFFFFFFF) >> 16


def address_hash(addr: bytes) -> int:
    """Hash of one IPv4/IPv6 address: its 32-bit words XOR-folded, then mixed."""
    v = int.from_bytes(addr, "big")
    x = 0
    while v:
        x ^= v & 0xFFFFFFFF
        v >>= 32
    return _mix(x)


def packet_shard(src: bytes, dst: bytes, count: int) -> int:
    """Shard of an address pair (symmetric: both directions of a connection agree)."""
    return (address_hash(src) + address_hash(dst)) % count


class Block:
    """Columns of one chunk of pcap records (numpy arrays of equal length, one per frame)."""

    __slots__ = ("buf", "data", "incl", "wire", "ts", "kind", "cols", "frames", "wire_bytes", "first_ts",
                 "last_ts", "skips")

    def __init__(self, buf, data, incl, wire, ts, kind, cols, frames, wire_bytes, first_ts, last_ts, skips=None):
        self.buf = buf  # the chunk (bytes); frames are buf[data:data + incl]
        self.data = data
        self.incl = incl
        self.wire = wire
        self.ts = ts
        self.kind = kind
        self.cols = cols  # per-frame packet fields, meaningful where kind is TCP/UDP
        # every record of the chunk, this shard's or not: for the capture's counters
        self.frames = frames
        self.wire_bytes = wire_bytes
        self.first_ts = first_ts
        self.last_ts = last_ts
        # frames left out or marked KIND_SKIP, per PacketDecoder skip reason
        self.skips = skips or {}


class _Bytes:
    """``u[index_array]`` -> the bytes there as int64 (so shifts and sums never overflow);
    the chunk is padded with zeros so reads past a short last frame stay inside."""

    __slots__ = ("u8",)

    def __init__(self, buf: bytes):
        self.u8 = np.concatenate((np.frombuffer(buf, dtype=np.uint8), np.zeros(_PAD, dtype=np.uint8)))

    def __getitem__(self, at):
        return self.u8[at].astype(np.int64)


def _be16(u, at):
    return (u[at] << 8) | u[at + 1]


def _be32(u, at):
    return (u[at] << 24) | (u[at + 1] << 16) | (u[at + 2] << 8) | u[at + 3]


def _le32(u, at):
    return u[at] | (u[at + 1] << 8) | (u[at + 2] << 16) | (u[at + 3] << 24)


def _ts(u32, u, rec, nano: bool):
    """Timestamps (float seconds) of the records at ``rec``, as the per-frame reader makes
    them: float(sec) + frac / 1e6, nanoseconds cut to microseconds as libpcap does."""
    frac = u32(u, rec + 4)
    if nano:
        frac //= 1000
    return u32(u, rec).astype(np.float64) + frac.astype(np.float64) / 1e6


def decode_block(buf: bytes, offsets: list[int], *, little: bool, nano: bool, linktype: int,
                 ignore_checksums: bool, shard: tuple[int, int] | None = None) -> Block:
    """Gather the header fields of the records at ``offsets`` of ``buf`` (a pcap chunk).

    ``shard`` = ``(index, count)`` keeps only that shard's frames (plus those without a
    fixed-offset address pair, marked :data:`KIND_ANY`); frames of other shards are left out
    of the block entirely."""
    u = _Bytes(buf)
    rec = np.asarray(offsets, dtype=np.int64)
    u32 = _le32 if little else _be32
    incl, wire = u32(u, rec + 8), u32(u, rec + 12)
    n = len(rec)
    totals = (n, int(wire.sum()), float(_ts(u32, u, rec[:1], nano)[0]), float(_ts(u32, u, rec[-1:], nano)[0])
              ) if n else (0, 0, None, None)
    d = rec + 16
    if linktype != 1:
        kind = np.full(n, KIND_ANY if shard is not None else KIND_OWN, dtype=np.int64)
        return Block(buf, d, incl, wire, _ts(u32, u, rec, nano), kind, None, *totals)
    # link layer: the decoder's fast path looks at plain, 802.1Q and PPPoE session frames
    et = _be16(u, d + 12)
    vlan = et == 0x8100
    pppoe = et == 0x8864
    ppp = _be16(u, d + 20)
    ip = np.where(vlan, d + 18, np.where(pppoe, d + 22, d + 14))
    et = np.where(vlan, _be16(u, d + 16),
                  np.where(pppoe, np.where(ppp == 0x21, 0x0800, np.where(ppp == 0x57, 0x86DD, 0)), et))
    end_of_frame = d + incl
    # frames that cannot carry IP (ARP, PPPoE discovery, LCP, ...; <= 1500 is 802.3 + LLC,
    # which may): the decoder would only count them, so they are counted here, by the
    # first shard, and never decoded
    outer = _be16(u, d + 12)
    short = incl < 14
    dead = short | ((outer > 1500) & ~np.isin(outer, _IP_CARRIERS)) | (
        pppoe & (incl >= 22) & (ppp != 0x21) & (ppp != 0x57))
    skips = {}
    if shard is None or shard[0] == 0:
        n_short = int(np.count_nonzero(short))
        skips = {"truncated_link_header": n_short, "non_ip_packet": int(np.count_nonzero(dead)) - n_short}
    if shard is not None:
        index, count = shard
        # the address pair at a fixed offset, for more shapes than the fast path takes:
        # one or two VLAN tags of any tag type, one MPLS label, a PPPoE session
        inner = _be16(u, d + 16)
        tag1 = np.isin(outer, _VLAN_TYPES)
        tag2 = tag1 & np.isin(inner, _VLAN_TYPES)
        mpls = np.isin(outer, _MPLS_TYPES) & ((u[d + 16] & 1) == 1)
        ver = u[d + 18] >> 4
        kip = np.where(tag2, d + 22, np.where(tag1 | mpls, d + 18, ip))
        ket = np.where(tag2, _be16(u, d + 20), np.where(tag1, inner, np.where(
            mpls, np.where(ver == 4, 0x0800, np.where(ver == 6, 0x86DD, 0)), et)))
        is4 = (ket == 0x0800) & (kip + 20 <= end_of_frame)
        is6 = (ket == 0x86DD) & (kip + 40 <= end_of_frame)
        # uint64: the 32x32-bit products of _mix fit
        h = _mix(_be32(u, kip + 12).astype(np.uint64)) + _mix(_be32(u, kip + 16).astype(np.uint64))
        at6 = np.flatnonzero(is6)
        if len(at6):  # IPv6 pairs: 8 words each, gathered for those frames only
            k6 = kip[at6]
            a6 = _be32(u, k6 + 8) ^ _be32(u, k6 + 12) ^ _be32(u, k6 + 16) ^ _be32(u, k6 + 20)
            b6 = _be32(u, k6 + 24) ^ _be32(u, k6 + 28) ^ _be32(u, k6 + 32) ^ _be32(u, k6 + 36)
            h[at6] = _mix(a6.astype(np.uint64)) + _mix(b6.astype(np.uint64))
        h %= count
        keyed = is4 | is6
        # every shard must decode the unkeyed frames (KIND_ANY)
        keep = ~dead & (~keyed | (h == index))
    else:
        keyed = None
        keep = ~dead
    sel = np.flatnonzero(keep)
    if len(sel) < n:
        d, incl, wire, ip, et = d[sel], incl[sel], wire[sel], ip[sel], et[sel]
        keyed = keyed[sel] if keyed is not None else None
        end_of_frame = d + incl
    ts = _ts(u32, u, d - 16, nano)  # for the frames kept only
    kind = np.full(len(d), KIND_OWN, dtype=np.int64) if keyed is None else np.where(keyed, KIND_OWN, KIND_ANY)
    cand = (incl >= 54) & (wire <= incl)  # snapped frames take the general path
    # IPv4: 0x45, no fragment bits, total length inside the frame, TCP/UDP
    total = _be16(u, ip + 2)
    v4 = cand & (et == 0x0800) & (u[ip] == 0x45)
    proto4 = u[ip + 9]
    v4 &= ((ip + total) <= end_of_frame) & (total >= 28) & ((u[ip + 6] & 0x3F) == 0) & (u[ip + 7] == 0)
    v4 &= (proto4 == 6) | (proto4 == 17)
    if not ignore_checksums:
        hsum = _be16(u, ip)
        for k in range(2, 20, 2):
            hsum = hsum + _be16(u, ip + k)
        bad = hsum % 0xFFFF != 0
        # shaped like the fast path up to the checksum: the general path would only count
        # it (its checks before the checksum pass for these), so it is counted here
        bad_sum = bad & cand & (et == 0x0800) & (u[ip] == 0x45) & ((ip + total) <= end_of_frame) & (total >= 20)
        kind = np.where(bad_sum, KIND_SKIP, kind)
        skips["bad_IP_checksum"] = int(np.count_nonzero(bad_sum))
        v4 &= ~bad
    # IPv6 without extension headers
    plen6 = _be16(u, ip + 4)
    proto6 = u[ip + 6]
    v6 = cand & (et == 0x86DD) & ((u[ip] >> 4) == 6) & (ip + 40 + plen6 <= end_of_frame)
    v6 &= (proto6 == 6) | (proto6 == 17)
    proto = np.where(v4, proto4, proto6)
    a = np.where(v4, ip + 12, ip + 8)
    alen = np.where(v4, 4, 16)
    seg = np.where(v4, total - 20, plen6)
    ip_len = np.where(v4, total, plen6 + 40)
    l4 = a + 2 * alen
    tcp = (v4 | v6) & (proto == 6)
    udp = (v4 | v6) & (proto == 17)
    thl = (u[l4 + 12] >> 4) * 4
    tcp &= (seg >= 20) & (thl >= 20) & (thl <= seg)
    sport = _be16(u, l4)
    dport = _be16(u, l4 + 2)
    udp &= (seg >= 8) & ~np.isin(sport, _TUNNEL_PORTS) & ~np.isin(dport, _TUNNEL_PORTS)
    kind = np.where(tcp, KIND_TCP, np.where(udp, KIND_UDP, kind))
    pstart = np.where(tcp, l4 + thl, l4 + 8)
    plen = np.where(tcp, seg - thl, _be16(u, l4 + 4) - 8)
    # ones-complement sum of the pseudo header's protocol + length, added to the sum of the
    # addresses and segment (one integer, computed per packet); -1 = no check (IPv4 UDP
    # checksum 0 means "none")
    extra = proto + seg
    if ignore_checksums:
        extra = np.full(len(d), -1, dtype=np.int64)
    else:
        no_sum = udp & (alen == 4) & (u[l4 + 6] == 0) & (u[l4 + 7] == 0)
        extra = np.where(no_sum, -1, extra)
    cols = (a, a + alen, l4, l4 + seg, seg & 1, extra, sport, dport, ip_len, plen,
            u[l4 + 13], _be32(u, l4 + 4), _be32(u, l4 + 8), _be16(u, l4 + 14), pstart)
    return Block(buf, d, incl, wire, ts, kind, cols, *totals, skips)


def block_packets(block: Block, decoder: PacketDecoder, linktype: int, *,
                  probe: PacketDecoder | None = None, shard: tuple[int, int] | None = None) -> Iterator:
    """The packets of a block in file order: built from the columns for common frames,
    decoded by ``decoder`` otherwise.  Frames of :data:`KIND_ANY` (sharded runs only) are
    decoded by ``probe`` (so that only one shard counts their weirds) and kept when their
    decoded address pair falls in ``shard``.  Yields what the decoder yields, Packets only
    (``None``/reason strings are dropped; the decoder counted them)."""
    buf = block.buf
    skipped = decoder.skipped
    for reason, count_ in block.skips.items():
        if count_:
            skipped[reason] = skipped.get(reason, 0) + count_
    decode = decoder.decode
    probe_decode = (probe or decoder).decode
    index, count = shard if shard is not None else (0, 1)
    new = _tuple_new
    P = Packet
    if block.cols is None:  # not Ethernet: every frame through the decoder
        for kind, ts, d, incl, wire in zip(block.kind.tolist(), block.ts.tolist(), block.data.tolist(),
                                           block.incl.tolist(), block.wire.tolist()):
            pkt = (decode if kind == KIND_OWN else probe_decode)(linktype, buf[d:d + incl], ts, wire)
            if pkt is not None and pkt.__class__ is not str and (
                    kind == KIND_OWN or count == 1 or packet_shard(pkt.src, pkt.dst, count) == index):
                yield pkt
        return
    cols = [c.tolist() for c in block.cols]
    for (kind, ts, d, incl, wire, a, b, l4, end, odd, extra, sport, dport, ip_len, plen, flags, seq, ack,
         win, pstart) in zip(block.kind.tolist(), block.ts.tolist(), block.data.tolist(), block.incl.tolist(),
                             block.wire.tolist(), *cols):
        if kind <= KIND_UDP:
            if extra < 0:
                ok = True
            else:
                cs = int.from_bytes(buf[a:end], "big")
                if odd:
                    cs <<= 8
                ok = (cs + extra) % 0xFFFF == 0
            if kind == KIND_TCP:
                yield new(P, (ts, buf[a:b], buf[b:l4], 6, sport, dport, ip_len, plen, flags, seq, ack, win, ok,
                              buf[pstart:end], buf[l4 + 20:pstart] if pstart > l4 + 20 else b"", None, None))
            else:
                yield new(P, (ts, buf[a:b], buf[b:l4], 17, sport, dport, ip_len, plen, 0, 0, 0, 0, ok,
                              buf[pstart:end], b"", None, None))
        elif kind == KIND_OWN:
            pkt = decode(linktype, buf[d:d + incl], ts, wire)
            if pkt is not None and pkt.__class__ is not str:
                yield pkt
        elif kind == KIND_ANY:
            pkt = probe_decode(linktype, buf[d:d + incl], ts, wire)
            if pkt is not None and pkt.__class__ is not str and (
                    count == 1 or packet_shard(pkt.src, pkt.dst, count) == index):
                yield pkt
