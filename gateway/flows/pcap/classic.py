"""Classic pcap files (libpcap's format): a global header, then records of
(seconds, fraction, captured length, wire length) + frame bytes, in either byte order,
with micro- or nanosecond fractions.

The file is read in large chunks (:data:`CHUNK`); a *walker* finds the complete records
of a chunk and hands back where the first incomplete one starts, which is carried over to
the next chunk.  :func:`frames_in_chunk` is the plain-Python walker (frames out); the
frame trackers of :mod:`.pipeline` walk, decode and track a whole chunk in one call
(``feed_pcap``; the compiled one without a Python object per frame).  A record longer than
:data:`~.common.MAX_SNAPLEN` ends the file as corrupt at once, whatever the header's
snap length says, so memory stays bounded.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

from gateway.flows.packets import SUPPORTED_LINKTYPES
from gateway.flows.pcap.common import (
    MAX_SNAPLEN,
    PCAP_MAGICS,
    CaptureStats,
    NotACaptureError,
    UnsupportedLinkTypeError,
    truncated,
)

# 4 MiB: ~20k frames of an average trace per call, small enough that memory stays flat
CHUNK = 4 << 20


class PcapHeader(NamedTuple):
    linktype: int
    little: bool  # byte order of the record headers
    nano: bool  # nanosecond fractions (libpcap hands Zeek microseconds: cut to them)
    snaplen: int


class Walked(NamedTuple):
    """What a walker made of one chunk."""

    out: list  # frames, or records of connections that ended
    stop: int  # offset of the first record not complete in the chunk
    bad_len: int | None  # a record length over MAX_SNAPLEN at ``stop`` (corrupt file)
    frames: int  # complete records walked
    wire_bytes: int
    first_ts: float | None
    last_ts: float | None


Walker = Callable[[bytes, int, PcapHeader], Walked]


def read_header(f, name: str) -> PcapHeader:
    head = _read_exactly(f, 24)
    if len(head) < 24:
        raise NotACaptureError(f"{name}: pcap global header is cut short")
    endian, ticks = PCAP_MAGICS[head[:4]]
    snaplen, network = struct.unpack_from(endian + "II", head, 16)
    linktype = network & 0x0FFFFFFF
    if linktype not in SUPPORTED_LINKTYPES:
        raise UnsupportedLinkTypeError(linktype, name)
    return PcapHeader(linktype, endian == "<", ticks == 1_000_000_000, snaplen)


def read_pcap(f, name: str, stats: CaptureStats, walk: Walker, *, count: bool = True) -> Iterator[list]:
    """``walk``'s output per chunk of a classic pcap; counts frames in ``stats`` (unless
    ``count`` is False) and notes a cut or corrupt end as truncation."""
    header = read_header(f, name)
    rest = b""
    while True:
        chunk = f.read(CHUNK)
        buf = rest + chunk if rest else chunk
        walked = walk(buf, 0, header)
        if count:
            stats.frames(walked.frames, walked.wire_bytes, walked.first_ts, walked.last_ts)
        if walked.out or walked.frames:
            yield walked.out
        if walked.bad_len is not None:
            truncated(stats, name, f"record length {walked.bad_len} is implausible (corrupt file)")
            return
        rest = buf[walked.stop:]
        if not chunk:
            if rest:
                truncated(stats, name, "last record header is incomplete" if len(rest) < 16
                          else "last record is incomplete")
            return


def walk_records(buf: bytes, pos: int, header: PcapHeader, frame: Callable[[float, int, int, int], object]) -> Walked:
    """Call ``frame(ts, offset, captured length, wire length)`` for every complete record of
    ``buf`` from ``pos`` on; collects what it returns (unless None)."""
    unpack = struct.Struct("<IIII" if header.little else ">IIII").unpack_from
    nano = header.nano
    n = len(buf)
    out: list = []
    count = wire_bytes = 0
    first_ts = ts = None
    bad_len = None
    while pos + 16 <= n:
        sec, frac, incl, wire = unpack(buf, pos)
        if incl > MAX_SNAPLEN:
            bad_len = incl
            break
        end = pos + 16 + incl
        if end > n:
            break
        if nano:
            frac //= 1000
        ts = sec + frac / 1e6
        if first_ts is None:
            first_ts = ts
        count += 1
        wire_bytes += wire
        got = frame(ts, pos + 16, incl, wire)
        if got is not None:
            out.append(got)
        pos = end
    return Walked(out, pos, bad_len, count, wire_bytes, first_ts, ts)


def frames_in_chunk(buf: bytes, pos: int, header: PcapHeader) -> Walked:
    """The plain walker: every complete record of ``buf`` as a Frame."""
    linktype = header.linktype
    return walk_records(buf, pos, header, lambda ts, at, incl, wire: (ts, linktype, buf[at:at + incl], wire))


def _read_exactly(f, n: int) -> bytes:
    out = b""
    while len(out) < n:
        part = f.read(n - len(out))
        if not part:
            break
        out += part
    return out
