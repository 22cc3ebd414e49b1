"""pcapng files: sections (either byte order), any number of interfaces, each with its
own link type, timestamp resolution and offset; enhanced, simple and obsolete packet
blocks.  Frames come out one by one, in file order.  A block longer than
:data:`MAX_BLOCK` ends the file as corrupt at once (bounded memory); a packet block whose
captured length is over :data:`~.common.MAX_SNAPLEN` or points past its block is counted
(``bad_pcapng_packet_block``) and skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from gateway.flows.packets import SUPPORTED_LINKTYPES
from gateway.flows.pcap.common import (
    MAX_SNAPLEN,
    PCAPNG_SHB,
    CaptureStats,
    Frame,
    NotACaptureError,
    UnsupportedLinkTypeError,
    truncated,
)

MAX_BLOCK = 16 << 20  # Wireshark's bound on a pcapng block
_READ = 1 << 20


class _Buffer:
    """A growable read buffer over a file object (large reads, cheap slicing)."""

    __slots__ = ("f", "buf", "pos", "eof")

    def __init__(self, f):
        self.f = f
        self.buf = b""
        self.pos = 0
        self.eof = False

    def ensure(self, n: int) -> bool:
        """Make ``n`` bytes available from pos; False at end of file."""
        while len(self.buf) - self.pos < n:
            if self.eof:
                return False
            chunk = self.f.read(max(_READ, n))
            if not chunk:
                self.eof = True
                return False
            self.buf = self.buf[self.pos:] + chunk
            self.pos = 0
        return True


def _bad_packet(stats: CaptureStats) -> None:
    stats.skipped["bad_pcapng_packet_block"] = stats.skipped.get("bad_pcapng_packet_block", 0) + 1


def iter_pcapng(f, name: str, stats: CaptureStats) -> Iterator[Frame]:
    """Every packet of a pcapng file as a Frame (``stats`` gets truncation notes and bad
    packet blocks)."""
    b = _Buffer(f)
    endian = "<"
    interfaces: list[tuple[int, int, int]] = []  # (linktype, units per second, offset seconds)
    first = True
    prev_ts = 0.0  # simple packet blocks carry no time: they take the previous packet's
    while True:
        if not b.ensure(12):
            if len(b.buf) - b.pos:
                truncated(stats, name, "last block header is incomplete")
            return
        buf, pos = b.buf, b.pos
        block_type_raw = buf[pos:pos + 4]
        if block_type_raw == PCAPNG_SHB:
            bom = buf[pos + 8:pos + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise NotACaptureError(f"{name}: pcapng section header has a bad byte-order mark")
            interfaces = []
        elif first:
            raise NotACaptureError(f"{name}: pcapng file does not start with a section header")
        first = False
        block_type, block_len = struct.unpack_from(endian + "II", buf, pos)
        if block_len < 12 or block_len % 4 or block_len > MAX_BLOCK:
            truncated(stats, name, f"block length {block_len} is invalid (corrupt file)")
            return
        if not b.ensure(block_len):
            truncated(stats, name, "last block is incomplete")
            return
        buf, pos = b.buf, b.pos
        body = buf[pos + 8:pos + block_len - 4]
        b.pos = pos + block_len
        if block_type == 1:  # interface description
            if len(body) < 8:
                truncated(stats, name, "interface block is too short")
                return
            linktype = struct.unpack_from(endian + "H", body, 0)[0]
            if linktype not in SUPPORTED_LINKTYPES:
                raise UnsupportedLinkTypeError(linktype, name)
            units, offset = _if_options(body[8:], endian)
            interfaces.append((linktype, units, offset))
        elif block_type == 6 or block_type == 2:  # enhanced packet, obsolete packet
            if len(body) < 20:
                continue
            if block_type == 6:
                if_id, ts_hi, ts_lo, cap_len, orig_len = struct.unpack_from(endian + "IIIII", body, 0)
            else:
                if_id, _drops, ts_hi, ts_lo, cap_len, orig_len = struct.unpack_from(endian + "HHIIII", body, 0)
            if if_id >= len(interfaces) or 20 + cap_len > len(body) or cap_len > MAX_SNAPLEN:
                _bad_packet(stats)
                continue
            linktype, units, offset = interfaces[if_id]
            prev_ts = _timestamp(ts_hi, ts_lo, units, offset)
            yield prev_ts, linktype, body[20:20 + cap_len], orig_len
        elif block_type == 3:  # simple packet: interface 0, no timestamp of its own
            if not interfaces or len(body) < 4:
                continue
            orig_len = struct.unpack_from(endian + "I", body, 0)[0]
            if orig_len > MAX_SNAPLEN:
                _bad_packet(stats)
                continue
            linktype = interfaces[0][0]
            yield prev_ts, linktype, body[4:4 + orig_len], orig_len
        # other blocks (name resolution, statistics, custom) carry nothing we need


def _if_options(opts: bytes, endian: str) -> tuple[int, int]:
    units = 1_000_000
    offset = 0
    pos = 0
    while pos + 4 <= len(opts):
        code, length = struct.unpack_from(endian + "HH", opts, pos)
        pos += 4
        if code == 0:
            break
        value = opts[pos:pos + length]
        pos += (length + 3) & ~3
        if code == 9 and length >= 1:  # if_tsresol
            r = value[0]
            units = 2 ** (r & 0x7F) if r & 0x80 else 10 ** r
        elif code == 14 and length >= 8:  # if_tsoffset
            offset = struct.unpack_from(endian + "q", value, 0)[0]
    return units, offset



def _timestamp(hi: int, lo: int, units: int, offset: int) -> float:
    ticks = (hi << 32) | lo
    sec, rem = divmod(ticks, units)
    usec = rem * 1_000_000 // units  # libpcap converts to microseconds
    return (sec + offset) + usec / 1e6
