"""Packet decoding: link layer -> IP -> TCP/UDP/ICMP header fields, pure and allocation-light.

``PacketDecoder.decode(linktype, frame, ts, wire_len)`` takes the raw bytes of one captured
frame and returns a :class:`Packet` (the fields connection tracking needs), ``None`` when the
frame was consumed without producing a packet (a fragment kept for reassembly, a non-IP frame),
or a short reason string when the frame is malformed.  It never raises on hostile bytes: every
malformed case is a counted reason (see ``PacketDecoder.skipped``), the way Zeek files a
``weird`` and moves on.

Supported link types: Ethernet (1, also 802.3 + LLC/SNAP), raw IP (101, 12, 14, 228, 229), BSD
null/loopback (0, 108), Linux cooked SLL (113) and SLL2 (276), PPP (9, 50), IEEE 802.11 data
frames (105) and radiotap (127).  Inside: 802.1Q/802.1ad/QinQ VLAN tags, MPLS label
stacks, PPPoE sessions, IPv4 (with fragment reassembly), IPv6 (extension headers, fragments),
and tunnels as Zeek decapsulates them (up to ``Tunnel::max_depth`` = 2): IP-in-IP (4/41) and
GRE (incl. PPTP and ERSPAN) yield the inner packet; VXLAN, Geneve, Teredo, GTP-U and AYIYA are
UDP packets of their own that also carry an ``inner`` packet.  Checksums (IPv4 header, TCP, UDP, ICMP, ICMPv6) are verified
unless ``ignore_checksums`` (Zeek's ``-C``); a bad transport checksum is reported on the packet
(``checksum_ok=False``) because Zeek still creates the connection and notes ``C``/``c``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from gateway.flows.fragments import FragmentTable
from gateway.flows.settings import FlowSettings

# Link-layer types (pcap LINKTYPE_* values) we decode.
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_RAW_BSD_12 = 12
LINKTYPE_RAW_BSD_14 = 14
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

SUPPORTED_LINKTYPES: dict[int, str] = {
    LINKTYPE_NULL: "NULL (BSD loopback)",
    LINKTYPE_ETHERNET: "Ethernet",
    LINKTYPE_RAW: "raw IP",
    LINKTYPE_RAW_BSD_12: "raw IP",
    LINKTYPE_RAW_BSD_14: "raw IP",
    LINKTYPE_LOOP: "OpenBSD loopback",
    LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_IPV6: "raw IPv6",
    LINKTYPE_LINUX_SLL2: "Linux cooked v2 (SLL2)",
    9: "PPP",
    50: "PPP over HDLC",
    105: "IEEE 802.11",
    127: "802.11 radiotap",
}

# A few well-known names, so an unsupported-link-type error can say what the file holds.
LINKTYPE_NAMES: dict[int, str] = {
    **SUPPORTED_LINKTYPES,
    6: "IEEE 802.5 Token Ring",
    9: "PPP",
    50: "PPP over HDLC",
    104: "Cisco HDLC",
    105: "IEEE 802.11",
    119: "Prism 802.11",
    127: "802.11 radiotap",
    147: "user-defined (147)",
    187: "Bluetooth HCI H4",
    195: "IEEE 802.15.4",
    220: "USB Linux mmapped",
    249: "netlink",
}

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
ETH_VLAN = (0x8100, 0x88A8, 0x9100, 0x9200)
ETH_MPLS = (0x8847, 0x8848)
ETH_PPPOE_SESSION = 0x8864

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMP6 = 58
PROTO_IPIP = 4
PROTO_IPV6_IN_IP = 41
PROTO_GRE = 47
PROTO_ESP = 50
PROTO_MOBILITY = 135
# Zeek's Tunnel::max_depth, and the UDP ports its tunnel analyzers are registered for.
MAX_TUNNEL_DEPTH = 2
UDP_TUNNEL_PORTS = {4789: "vxlan", 6081: "geneve", 3544: "teredo", 2152: "gtpv1", 5072: "ayiya"}

# IPv6 extension headers that chain with a (next header, length) prefix.
_IPV6_EXT_GENERIC = frozenset({0, 43, 60, 139, 140})
_IPV6_FRAGMENT = 44
_IPV6_AH = 51
_IPV6_NO_NEXT = 59

_TCP_HDR = struct.Struct("!HHIIBBHHH")  # sport dport seq ack off flags win sum urg
_UDP_HDR = struct.Struct("!HHHH")


class Packet(NamedTuple):
    """One decoded IP packet, as connection tracking needs it.

    Addresses are raw bytes (4 or 16).  For ICMP, ``sport``/``dport`` carry the ICMP type and
    code.  ``ip_len`` is what Zeek counts in ``*_ip_bytes`` (IPv4 total length; IPv6 payload
    length + 40).  ``payload_len`` is the transport payload length (TCP segment data; for UDP
    the UDP length field minus 8; for ICMP the IP payload minus the 8-byte ICMP header).
    ``payload`` is the captured payload bytes (may be shorter than ``payload_len`` when the
    capture was cut by a snap length).  ``tcp_options`` holds the TCP option bytes.
    """

    ts: float
    src: bytes
    dst: bytes
    proto: int
    sport: int
    dport: int
    ip_len: int
    payload_len: int
    flags: int = 0
    seq: int = 0
    ack: int = 0
    window: int = 0
    checksum_ok: bool = True
    payload: bytes = b""
    tcp_options: bytes = b""
    tunnel: bytes | None = None  # for packets inside GRE/IP-in-IP: the outer (src, dst, proto)
    inner: Packet | None = None  # for a UDP tunnel packet (VXLAN, Geneve, Teredo, GTP): what it carries


def ones_complement_ok(total: int) -> bool:
    """True if a ones-complement sum (as a plain integer) folds to 0xffff (or 0)."""
    return total % 0xFFFF == 0


def _sum16(data: bytes) -> int:
    """Ones-complement sum of ``data`` as 16-bit words, modulo 0xffff (2**16 == 1 mod 0xffff)."""
    if len(data) & 1:
        data = data + b"\x00"
    return int.from_bytes(data, "big") % 0xFFFF


def transport_checksum_ok(src: bytes, dst: bytes, proto: int, segment: bytes) -> bool:
    """Verify a TCP/UDP/ICMPv6 checksum over the pseudo header + segment."""
    # addresses and segment as one big integer: its value mod 0xffff is the sum of its
    # 16-bit words mod 0xffff; an odd-length segment is padded by shifting one byte
    total = int.from_bytes(src + dst + segment, "big")
    if len(segment) & 1:
        total <<= 8
    return (total + proto + len(segment)) % 0xFFFF == 0


class PacketDecoder:
    """Decodes frames into :class:`Packet` tuples, reassembling IP fragments.

    Keyword-only configuration:

    * ``ignore_checksums`` (default ``False``): skip every checksum check, like ``zeek -C``.
    * ``max_fragment_buffers``, ``fragment_timeout`` (defaults: :class:`FlowSettings`):
      reassembly state is bounded, see :mod:`gateway.flows.fragments`.
    """

    def __init__(
        self,
        *,
        ignore_checksums: bool = False,
        max_fragment_buffers: int = FlowSettings.max_fragment_buffers,
        fragment_timeout: float = FlowSettings.fragment_timeout_s,
    ):
        self.ignore_checksums = ignore_checksums
        self.skipped: dict[str, int] = {}
        self.notes: dict[str, int] = {}  # weirds on packets that were still used
        self._fragments = FragmentTable(max_buffers=max_fragment_buffers, timeout=fragment_timeout,
                                        count=self._skip)

    # ------------------------------------------------------------------ bookkeeping
    def _skip_note(self, reason: str) -> None:
        """Count a weird that does not drop the packet."""
        self.notes[reason] = self.notes.get(reason, 0) + 1

    def _skip(self, reason: str) -> str:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        return reason

    # ------------------------------------------------------------------ link layer
    def decode(self, linktype: int, frame: bytes, ts: float, wire_len: int | None = None):
        """Decode one frame.  Returns a Packet, None (consumed, nothing to track) or a reason."""
        n = len(frame)
        snapped = wire_len is not None and wire_len > n
        if linktype == LINKTYPE_ETHERNET:
            if n < 14:
                return self._skip("truncated_link_header")
            return self._ethertype(frame, 14, frame[12] << 8 | frame[13], ts, snapped)
        if linktype in (LINKTYPE_RAW, LINKTYPE_RAW_BSD_12, LINKTYPE_RAW_BSD_14, LINKTYPE_IPV4, LINKTYPE_IPV6):
            return self._ip_by_version(frame, 0, ts, snapped)
        if linktype == LINKTYPE_LINUX_SLL:
            if n < 16:
                return self._skip("truncated_link_header")
            return self._ethertype(frame, 16, frame[14] << 8 | frame[15], ts, snapped)
        if linktype == LINKTYPE_LINUX_SLL2:
            if n < 20:
                return self._skip("truncated_link_header")
            return self._ethertype(frame, 20, frame[0] << 8 | frame[1], ts, snapped)
        if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
            if n < 4:
                return self._skip("truncated_link_header")
            family_le = int.from_bytes(frame[:4], "little")
            family_be = int.from_bytes(frame[:4], "big")
            if 2 in (family_le, family_be):
                return self._ipv4(frame, 4, ts, snapped)
            if family_le in (10, 24, 28, 30) or family_be in (10, 24, 28, 30):
                return self._ipv6(frame, 4, ts, snapped)
            self._skip("non_ip_packet")
            return None
        if linktype == 9 or linktype == 50:  # PPP: [ff 03] protocol
            off = 2 if frame[:2] == b"\xff\x03" else 0
            if n < off + 2:
                return self._skip("truncated_link_header")
            ppp = frame[off] << 8 | frame[off + 1]
            if ppp == 0x0021:
                return self._ipv4(frame, off + 2, ts, snapped)
            if ppp == 0x0057:
                return self._ipv6(frame, off + 2, ts, snapped)
            self._skip("non_ip_packet")
            return None
        if linktype == 127:  # radiotap header, then 802.11
            if n < 8:
                return self._skip("truncated_link_header")
            rt_len = frame[2] | frame[3] << 8
            if n < rt_len:
                return self._skip("truncated_link_header")
            return self._wlan(frame, rt_len, ts, snapped)
        if linktype == 105:
            return self._wlan(frame, 0, ts, snapped)
        return self._skip("unsupported_link_type")

    def _wlan(self, frame: bytes, off: int, ts: float, snapped: bool):
        """IEEE 802.11 data frames carrying LLC/SNAP (Zeek's IEEE802_11 analyzer)."""
        n = len(frame)
        if n < off + 24:
            return self._skip("truncated_802_11_header")
        fc0, fc1 = frame[off], frame[off + 1]
        if (fc0 >> 2) & 3 != 2:  # not a data frame (management/control)
            self._skip("non_ip_packet")
            return None
        subtype = fc0 >> 4
        if subtype & 0x4:  # null data: no payload
            self._skip("non_ip_packet")
            return None
        hdr = 24
        if fc1 & 3 == 3:  # to-DS and from-DS: a fourth address
            hdr += 6
        if subtype & 0x8:  # QoS control
            hdr += 2
            if fc1 & 0x80:  # +HTC
                hdr += 4
        if fc1 & 0x40:  # protected frame: encrypted payload
            self._skip("non_ip_packet")
            return None
        off += hdr
        if n < off + 8:
            return self._skip("truncated_802_11_header")
        if frame[off:off + 3] != b"\xaa\xaa\x03":
            self._skip("non_ip_packet")
            return None
        return self._ethertype(frame, off + 8, frame[off + 6] << 8 | frame[off + 7], ts, snapped)

    def _ethertype(self, frame: bytes, off: int, etype: int, ts: float, snapped: bool, depth: int = 0,
                   outer: bytes | None = None):
        n = len(frame)
        for _ in range(8):  # bounded: QinQ and MPLS stacks of sane depth
            if etype == ETH_IPV4:
                return self._ipv4(frame, off, ts, snapped, depth, outer)
            if etype == ETH_IPV6:
                return self._ipv6(frame, off, ts, snapped, depth, outer)
            if etype in ETH_VLAN:
                if n < off + 4:
                    return self._skip("truncated_VLAN_header")
                etype = frame[off + 2] << 8 | frame[off + 3]
                off += 4
                continue
            if etype in ETH_MPLS:
                while True:
                    if n < off + 4:
                        return self._skip("truncated_MPLS_header")
                    bottom = frame[off + 2] & 1
                    off += 4
                    if bottom:
                        break
                return self._ip_by_version(frame, off, ts, snapped, depth, outer)
            if etype == ETH_PPPOE_SESSION:
                if n < off + 8:
                    return self._skip("truncated_PPPoE_header")
                ppp = frame[off + 6] << 8 | frame[off + 7]
                off += 8
                if ppp == 0x0021:
                    return self._ipv4(frame, off, ts, snapped, depth, outer)
                if ppp == 0x0057:
                    return self._ipv6(frame, off, ts, snapped, depth, outer)
                self._skip("non_ip_packet")
                return None
            if etype <= 1500 and frame[off:off + 3] == b"\xaa\xaa\x03" and n >= off + 8:
                # 802.3 frame with an LLC/SNAP header: the ethertype follows the OUI
                etype = frame[off + 6] << 8 | frame[off + 7]
                off += 8
                continue
            self._skip("non_ip_packet")
            return None
        return self._skip("too_many_encapsulations")

    def _ip_by_version(self, frame: bytes, off: int, ts: float, snapped: bool, depth: int = 0,
                       outer: bytes | None = None):
        if len(frame) <= off:
            return self._skip("truncated_IP")
        version = frame[off] >> 4
        if version == 4:
            return self._ipv4(frame, off, ts, snapped, depth, outer)
        if version == 6:
            return self._ipv6(frame, off, ts, snapped, depth, outer)
        return self._skip("unknown_IP_version")

    # ------------------------------------------------------------------ IPv4
    def _ipv4(self, frame: bytes, off: int, ts: float, snapped: bool, depth: int = 0, outer: bytes | None = None):
        n = len(frame)
        if n < off + 20:
            return self._skip("truncated_IP")
        vhl = frame[off]
        if vhl >> 4 != 4:
            return self._skip("bad_IP_version")
        hlen = (vhl & 0xF) * 4
        if hlen < 20:
            return self._skip("bad_IP_header_len")
        total = frame[off + 2] << 8 | frame[off + 3]
        if total == 0:
            # TCP segmentation offload leaves the length zero: like Zeek, trust what was
            # captured when checksums are off (-C), drop the packet otherwise
            if not self.ignore_checksums:
                return self._skip("ip_hdr_len_zero")
            self._skip_note("ip_hdr_len_zero")
            total = n - off
        if total < hlen:
            return self._skip("IP_len_lt_hdr_len")
        if n < off + hlen:
            return self._skip("truncated_IP")
        end = off + total
        if end > n:
            if not snapped:
                return self._skip("truncated_IP")
            end = n
        if not self.ignore_checksums and not ones_complement_ok(
            int.from_bytes(frame[off:off + hlen], "big")
        ):
            return self._skip("bad_IP_checksum")
        proto = frame[off + 9]
        src = frame[off + 12:off + 16]
        dst = frame[off + 16:off + 20]
        frag = frame[off + 6] << 8 | frame[off + 7]
        if frag & 0x3FFF:  # MF set or offset != 0: a fragment
            if snapped:
                return self._skip("truncated_fragment")
            ident = frame[off + 4] << 8 | frame[off + 5]
            whole = self._fragments.add(
                (4, src, dst, ident, proto), (frag & 0x1FFF) * 8, bool(frag & 0x2000),
                frame[off + hlen:end], frame[off:off + hlen], ts,
            )
            if whole is None:
                return None
            if whole.__class__ is str:
                return self._skip(whole)
            header, payload = whole
            ip_len = len(header) + len(payload)
            return self._transport(proto, src, dst, payload, len(payload), ip_len, ts, False, depth, outer)
        return self._transport(
            proto, src, dst, frame[off + hlen:end], total - hlen, total, ts, snapped, depth, outer
        )

    # ------------------------------------------------------------------ IPv6
    def _ipv6(self, frame: bytes, off: int, ts: float, snapped: bool, depth: int = 0, outer: bytes | None = None):
        n = len(frame)
        if n < off + 40:
            return self._skip("truncated_IP")
        if frame[off] >> 4 != 6:
            return self._skip("bad_IP_version")
        plen = frame[off + 4] << 8 | frame[off + 5]
        nxt = frame[off + 6]
        src = frame[off + 8:off + 24]
        dst = frame[off + 24:off + 40]
        end = off + 40 + plen
        if end > n:
            if not snapped:
                return self._skip("truncated_IP")
            end = n
        ip_len = plen + 40
        pos = off + 40
        frag_info = None
        for _ in range(16):  # bounded extension header chain
            if nxt in _IPV6_EXT_GENERIC:
                if pos + 8 > end:
                    return self._skip("truncated_IPv6_ext_header")
                hdr_len = (frame[pos + 1] + 1) * 8
                nxt = frame[pos]
                pos += hdr_len
                if pos > end:
                    return self._skip("truncated_IPv6_ext_header")
            elif nxt == _IPV6_AH:
                if pos + 8 > end:
                    return self._skip("truncated_IPv6_ext_header")
                hdr_len = (frame[pos + 1] + 2) * 4
                nxt = frame[pos]
                pos += hdr_len
                if pos > end:
                    return self._skip("truncated_IPv6_ext_header")
            elif nxt == _IPV6_FRAGMENT:
                if pos + 8 > end:
                    return self._skip("truncated_IPv6_ext_header")
                fo = frame[pos + 2] << 8 | frame[pos + 3]
                ident = int.from_bytes(frame[pos + 4:pos + 8], "big")
                frag_info = (fo & 0xFFF8, bool(fo & 1), ident, frame[off:pos])
                nxt = frame[pos]
                pos += 8
            else:
                break
        else:
            return self._skip("too_many_IPv6_ext_headers")
        if nxt == _IPV6_NO_NEXT:
            return self._transport(nxt, src, dst, b"", 0, ip_len, ts, snapped, depth, outer)
        if frag_info is not None:
            frag_off, more, ident, unfrag_header = frag_info
            if frag_off == 0 and not more:  # atomic fragment: nothing to reassemble
                return self._transport(nxt, src, dst, frame[pos:end], end - pos, ip_len, ts, snapped, depth, outer)
            if snapped:
                return self._skip("truncated_fragment")
            whole = self._fragments.add((6, src, dst, ident, nxt), frag_off, more, frame[pos:end], unfrag_header, ts)
            if whole is None:
                return None
            if whole.__class__ is str:
                return self._skip(whole)
            header, payload = whole
            return self._transport(nxt, src, dst, payload, len(payload), len(header) + len(payload), ts, False, depth, outer)
        return self._transport(nxt, src, dst, frame[pos:end], end - pos, ip_len, ts, snapped, depth, outer)

    # ------------------------------------------------------------------ transport
    def _transport(self, proto, src, dst, seg, seg_len, ip_len, ts, snapped, depth, outer):
        """Decode the transport header from ``seg`` (the IP payload as captured)."""
        captured = len(seg)
        check = not self.ignore_checksums and not snapped and captured >= seg_len
        if proto == PROTO_TCP:
            if captured < 20:
                return self._skip("truncated_header")
            sport, dport, seq, ack, off_byte, flags, win, _csum, _urg = _TCP_HDR.unpack_from(seg)
            thl = (off_byte >> 4) * 4
            if thl < 20 or thl > seg_len or captured < thl:
                # Zeek has already made the connection when its TCP analyzer rejects the
                # header: the packet still opens a (packet-less) record; payload_len -1 says so
                self._skip_note("bad_TCP_header_len" if thl < 20 else "truncated_header")
                return Packet(ts, src, dst, PROTO_TCP, sport, dport, ip_len, -1, flags, seq, ack, win,
                              True, b"", b"", outer)
            ok = True
            if check:
                ok = transport_checksum_ok(src, dst, PROTO_TCP, seg[:seg_len])
            return Packet(
                ts, src, dst, PROTO_TCP, sport, dport, ip_len, seg_len - thl, flags, seq, ack, win,
                ok, seg[thl:seg_len], seg[20:thl] if thl > 20 else b"", outer,
            )
        if proto == PROTO_UDP:
            if captured < 8:
                return self._skip("truncated_header")
            sport, dport, ulen, csum = _UDP_HDR.unpack_from(seg)
            ok = True
            if check and (csum or len(src) == 16) and not (dport == 4789 and csum == 0):
                ok = transport_checksum_ok(src, dst, PROTO_UDP, seg[:seg_len])
            inner = None
            if depth < MAX_TUNNEL_DEPTH and ok and (dport in UDP_TUNNEL_PORTS or sport in UDP_TUNNEL_PORTS):
                kind = UDP_TUNNEL_PORTS.get(dport) or UDP_TUNNEL_PORTS[sport]
                inner = self._udp_tunnel(kind, seg[8:seg_len], ts, depth + 1)
            # flags=1 marks a datagram the capture cut short (snap length): Zeek's UDP
            # analyzer then keeps it out of the packet counts
            return Packet(
                ts, src, dst, PROTO_UDP, sport, dport, ip_len, ulen - 8, 1 if captured < seg_len else 0,
                0, 0, 0, ok, seg[8:seg_len], b"", outer, inner,
            )
        if proto == PROTO_ICMP or proto == PROTO_ICMP6:
            if captured < 8:
                return self._skip("truncated_header")
            ok = True
            if check:
                if proto == PROTO_ICMP:
                    ok = _sum16(seg[:seg_len]) == 0
                else:
                    ok = transport_checksum_ok(src, dst, PROTO_ICMP6, seg[:seg_len])
            return Packet(
                ts, src, dst, proto, seg[0], seg[1], ip_len, seg_len - 8, 0, 0, 0, 0, ok,
                seg[8:seg_len], b"", outer,
            )
        if proto in (PROTO_IPIP, PROTO_IPV6_IN_IP, PROTO_GRE) and depth < MAX_TUNNEL_DEPTH:
            parent = bytes([proto]) + src + dst
            if proto == PROTO_IPIP:
                return self._ipv4(seg, 0, ts, snapped, depth + 1, parent)
            if proto == PROTO_IPV6_IN_IP:
                return self._ipv6(seg, 0, ts, snapped, depth + 1, parent)
            return self._gre(seg, ts, snapped, depth + 1, parent)
        if proto == _IPV6_NO_NEXT or proto == PROTO_ESP or proto == PROTO_MOBILITY:
            # Zeek makes no connection of these (IP.cc: ipv6_no_next, esp_packet, mobility)
            self._skip_note({59: "ipv6_no_next", 50: "esp_packet", 135: "mobility_header"}[proto])
            return None
        return Packet(ts, src, dst, proto, 0, 0, ip_len, 0, 0, 0, 0, 0, True, b"", b"", outer)

    # ------------------------------------------------------------------ tunnels
    def _gre(self, seg: bytes, ts: float, snapped: bool, depth: int, parent: bytes):
        """GRE (RFC 2784/2890, PPTP's enhanced GRE, ERSPAN): the packet it carries."""
        if len(seg) < 4:
            return self._skip("truncated_GRE")
        flags = seg[0] << 8 | seg[1]
        version = flags & 7
        proto = seg[2] << 8 | seg[3]
        off = 4
        if version == 0:
            off += 4 * (bool(flags & 0x8000) or bool(flags & 0x4000)) + 4 * bool(flags & 0x2000) + 4 * bool(flags & 0x1000)
        elif version == 1:
            if proto != 0x880B:
                return self._skip("unsupported_GRE_protocol")
            off += 4 + 4 * bool(flags & 0x1000) + 4 * bool(flags & 0x0080)
        else:
            return self._skip("unknown_GRE_version")
        if len(seg) < off:
            return self._skip("truncated_GRE")
        if proto == 0x880B:  # PPP: optional address/control, then the protocol
            ppp = seg[off:off + 4]
            if ppp[:2] == b"\xff\x03":
                off += 2
            if len(seg) < off + 2:
                return self._skip("truncated_GRE")
            pproto = seg[off] << 8 | seg[off + 1]
            off += 2
            if pproto == 0x0021:
                return self._ipv4(seg, off, ts, snapped, depth, parent)
            if pproto == 0x0057:
                return self._ipv6(seg, off, ts, snapped, depth, parent)
            self._skip_note("non_ip_packet_in_GRE")
            return None
        if proto == 0x88BE:  # ERSPAN type II: 8-byte header, then Ethernet
            off += 8
            proto = 0x6558
        elif proto == 0x22EB:  # ERSPAN type III
            if len(seg) < off + 12:
                return self._skip("truncated_GRE")
            off += 12 + (8 if seg[off + 11] & 1 else 0)
            proto = 0x6558
        if proto == 0x6558:  # transparent Ethernet bridging
            if len(seg) < off + 14:
                return self._skip("truncated_GRE")
            return self._ethertype(seg, off + 14, seg[off + 12] << 8 | seg[off + 13], ts, snapped, depth, parent)
        return self._ethertype(seg, off, proto, ts, snapped, depth, parent)

    def _udp_tunnel(self, kind: str, data: bytes, ts: float, depth: int):
        """The packet inside a VXLAN/Geneve/Teredo/GTP-U payload, or None if it is not one."""
        inner = None
        n = len(data)
        if kind == "vxlan":
            if n >= 8 + 14 and data[0] & 0x08:
                inner = self._ethertype(data, 22, data[20] << 8 | data[21], ts, False, depth)
        elif kind == "geneve":
            if n >= 8:
                off = 8 + (data[0] & 0x3F) * 4
                proto = data[2] << 8 | data[3]
                if proto == 0x6558 and n >= off + 14:
                    inner = self._ethertype(data, off + 14, data[off + 12] << 8 | data[off + 13], ts, False, depth)
                elif proto in (0x0800, 0x86DD):
                    inner = self._ethertype(data, off, proto, ts, False, depth)
        elif kind == "teredo":
            off = 0
            if data[:2] == b"\x00\x01" and n >= 13:  # authentication indicator
                off = 4 + data[2] + data[3] + 9
            if data[off:off + 2] == b"\x00\x00" and n >= off + 8:  # origin indication
                off += 8
            if n >= off + 40 and data[off] >> 4 == 6 and (data[off + 4] << 8 | data[off + 5]) + 40 == n - off:
                inner = self._ipv6(data, off, ts, False, depth)
        elif kind == "gtpv1":
            if n >= 8 and data[0] >> 5 == 1 and data[0] & 0x10 and data[1] == 0xFF:
                off = 8
                if data[0] & 0x07:
                    off = 12
                    ext = data[11] if n >= 12 else 0
                    while ext and n > off:
                        length = data[off] * 4
                        if not length or n < off + length:
                            ext = 0
                            off = n
                            break
                        ext = data[off + length - 1]
                        off += length
                if n > off and data[off] >> 4 in (4, 6):
                    inner = self._ip_by_version(data, off, ts, False, depth)
        elif kind == "ayiya":
            # identity of 2**n bytes, signature of 4*m bytes, next header 4/41, opcode 1 = forward
            if n >= 8:
                hdr = 8 + (1 << (data[0] >> 4)) + (data[1] >> 4) * 4
                if data[2] & 0x0F == 1 and data[3] in (PROTO_IPIP, PROTO_IPV6_IN_IP) and n > hdr:
                    inner = self._ip_by_version(data, hdr, ts, False, depth)
        if isinstance(inner, str):  # the outer packet is fine; note why its payload is not
            self.skipped[inner] -= 1
            if not self.skipped[inner]:
                del self.skipped[inner]
            self._skip_note(f"{kind}_{inner}")
            return None
        return inner
