"""Capture files and live capture -> Zeek conn records.

File formats are parsed here from a file object (pcap in both byte orders, micro- and
nanosecond; pcapng with any number of interfaces and per-interface link type and timestamp
resolution; either one gzip-compressed).  Frames are yielded as ``(ts, linktype, frame,
wire_len)``; :class:`gateway.flows.packets.PacketDecoder` turns them into packets and
:class:`gateway.flows.conntrack.ConnTracker` into records.

Public API used by the replay and the gateway service:

* :func:`is_capture_file` - sniff the first bytes.
* :func:`pcap_records` - a file object -> iterator of :class:`ConnRecord` (open connections are
  flushed at the end of the file, as Zeek does).
* :func:`live_records` - sniff an interface with scapy, yield records as connections end.
* :class:`CaptureStats` - packets, bytes, flows, skipped packets per reason.
"""

from __future__ import annotations

import gc
import json
import logging
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import BinaryIO

from gateway.flows.conntrack import DEFAULT_LOCAL_NETS, ConnTracker
from gateway.flows.packets import LINKTYPE_NAMES, SUPPORTED_LINKTYPES, PacketDecoder
from gateway.flows.record import ConnRecord

log = logging.getLogger(__name__)

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
GZIP_MAGIC = b"\x1f\x8b"

_READ_CHUNK = 1 << 20


class CaptureError(Exception):
    """A capture file cannot be read at all (not a capture, unsupported link type)."""


class NotACaptureError(CaptureError):
    pass


class UnsupportedLinkTypeError(CaptureError):
    def __init__(self, linktype: int, source: str = ""):
        self.source = source
        name = LINKTYPE_NAMES.get(linktype, "unknown")
        where = f"{source}: " if source else ""
        supported = ", ".join(sorted(set(SUPPORTED_LINKTYPES.values())))
        super().__init__(
            f"{where}unsupported link type {linktype} ({name}); supported: {supported}"
        )
        self.linktype = linktype

    def __reduce__(self):  # raised in a worker process, re-raised in the parent
        return self.__class__, (self.linktype, self.source)


@dataclass
class CaptureStats:
    """Counters of one capture run (a file, several files, or a live interface)."""

    packets: int = 0
    bytes: int = 0
    flows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    weird: dict[str, int] = field(default_factory=dict)  # oddities in packets that were still used
    filtered: int = 0  # packets a capture filter left out
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)
    first_ts: float | None = None
    last_ts: float | None = None
    elapsed: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def merge_skipped(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def merge_weird(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self.weird[reason] = self.weird.get(reason, 0) + n

    def as_dict(self) -> dict:
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "flows": self.flows,
            "skipped": self.skipped_total,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "filtered": self.filtered,
            "weird": sum(self.weird.values()),
            "weird_by_reason": dict(sorted(self.weird.items())),
            "truncated": self.truncated,
            "seconds": round(self.elapsed, 3),
            "packets_per_second": round(self.packets / self.elapsed) if self.elapsed > 0 else None,
            "warnings": list(self.warnings),
        }


def is_capture_file(head: bytes) -> bool:
    """True if ``head`` (the first bytes of a file) starts a pcap, pcapng or gzip'd capture."""
    if head[:4] in PCAP_MAGICS or head[:4] == PCAPNG_SHB:
        return True
    if head[:2] == GZIP_MAGIC:
        try:
            inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 64)
        except zlib.error:
            return False
        return len(inner) >= 4 and (inner[:4] in PCAP_MAGICS or inner[:4] == PCAPNG_SHB)
    return False


def _source_name(fileobj) -> str:
    return str(getattr(fileobj, "name", "") or "<stream>")


class _Gunzip:
    """Incremental gunzip over a file object that keeps what it could decompress when the
    stream is cut short (``GzipFile.read`` would raise and lose the last chunk)."""

    def __init__(self, raw):
        self._raw = raw
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._buf = b""
        self._done = False
        self.truncated = False
        self.error: str | None = None
        self.name = getattr(raw, "name", None)

    def _fill(self, n: int) -> None:
        while len(self._buf) < n and not self._done:
            chunk = self._raw.read(_READ_CHUNK)
            if not chunk:
                self._done = True
                if not self._z.eof:
                    self.truncated = True
                    self.error = "compressed stream cut short"
                break
            try:
                self._buf += self._z.decompress(chunk)
                while self._z.eof and self._z.unused_data:  # concatenated gzip members
                    rest = self._z.unused_data
                    self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self._buf += self._z.decompress(rest)
            except zlib.error as exc:
                self._done = True
                self.truncated = True
                self.error = f"corrupt compressed data ({exc})"

    def read(self, n: int = -1) -> bytes:
        self._fill(n if n >= 0 else 1 << 62)
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def peek(self, n: int = 1) -> bytes:
        self._fill(n)
        return self._buf[:n]


def _open_maybe_gzip(fileobj: BinaryIO) -> BinaryIO:
    head = _peek(fileobj, 4)
    if head[:2] == GZIP_MAGIC:
        return _Gunzip(fileobj)  # type: ignore[return-value]
    return fileobj


def _peek(fileobj, n: int) -> bytes:
    if hasattr(fileobj, "peek"):
        try:
            return fileobj.peek(n)[:n]
        except (OSError, ValueError):
            pass
    pos = fileobj.tell()
    head = fileobj.read(n)
    fileobj.seek(pos)
    return head


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
            chunk = self.f.read(max(_READ_CHUNK, n))
            if not chunk:
                self.eof = True
                return False
            self.buf = self.buf[self.pos:] + chunk
            self.pos = 0
        return True


Frame = tuple[float, int, bytes, int]


def iter_frames(fileobj: BinaryIO, stats: CaptureStats | None = None) -> Iterator[Frame]:
    """Yield ``(ts, linktype, frame_bytes, wire_len)`` for every record of a pcap/pcapng file.

    A truncated last record ends the iteration with a warning in ``stats``.  Raises
    :class:`NotACaptureError` for anything else than a capture, and
    :class:`UnsupportedLinkTypeError` for link types we cannot decode.
    """
    stats = stats if stats is not None else CaptureStats()
    yield from _by_format(fileobj, stats,
                          pcap=lambda f, name: _iter_pcap(f, name, stats),
                          pcapng=lambda f, name: _iter_pcapng(f, name, stats))


def _by_format(fileobj: BinaryIO, stats: CaptureStats, *, pcap, pcapng) -> Iterator:
    """Open ``fileobj`` (gunzipped when it is gzip), hand it to ``pcap(f, name)`` or
    ``pcapng(f, name)`` by its magic, and record a gzip stream cut short as truncation."""
    name = _source_name(fileobj)
    try:
        f = _open_maybe_gzip(fileobj)
        head = _peek(f, 4)
    except (OSError, EOFError, zlib.error) as exc:
        raise NotACaptureError(f"{name}: not a pcap/pcapng file ({exc})") from exc
    try:
        if head in PCAP_MAGICS:
            yield from pcap(f, name)
        elif head == PCAPNG_SHB:
            yield from pcapng(f, name)
        else:
            raise NotACaptureError(
                f"{name}: not a pcap/pcapng file (starts with {head[:4].hex() or 'nothing'})"
            )
    finally:
        if isinstance(f, _Gunzip) and f.truncated and not stats.truncated:
            _truncated(stats, name, f.error or "compressed stream cut short")


def _truncated(stats: CaptureStats, name: str, what: str) -> None:
    stats.truncated = True
    msg = f"{name}: truncated capture: {what}; flows up to this point are kept"
    stats.warnings.append(msg)
    log.warning(msg)


def _iter_pcap(f, name: str, stats: CaptureStats) -> Iterator[Frame]:
    b = _Buffer(f)
    if not b.ensure(24):
        raise NotACaptureError(f"{name}: pcap global header is cut short")
    endian, ticks = PCAP_MAGICS[b.buf[:4]]
    (snaplen, network) = struct.unpack_from(endian + "II", b.buf, 16)
    linktype = network & 0x0FFFFFFF
    if linktype not in SUPPORTED_LINKTYPES:
        raise UnsupportedLinkTypeError(linktype, name)
    b.pos = 24
    rec = struct.Struct(endian + "IIII")
    unpack = rec.unpack_from
    nano = ticks == 1_000_000_000
    max_len = max(snaplen, 262144) if snaplen else 262144
    while True:
        buf = b.buf
        pos = b.pos
        if len(buf) - pos < 16:
            if not b.ensure(16):
                if len(b.buf) - b.pos:
                    _truncated(stats, name, "last record header is incomplete")
                return
            buf, pos = b.buf, b.pos
        sec, frac, incl, orig = unpack(buf, pos)
        if incl > max_len:
            _truncated(stats, name, f"record length {incl} is implausible (corrupt file)")
            return
        end = pos + 16 + incl
        if end > len(buf):
            if not b.ensure(16 + incl):
                _truncated(stats, name, "last record is incomplete")
                return
            buf, pos = b.buf, b.pos
            end = pos + 16 + incl
        b.pos = end
        if nano:
            frac //= 1000  # libpcap hands Zeek microseconds
        yield sec + frac / 1e6, linktype, buf[pos + 16:end], orig


def _iter_pcapng(f, name: str, stats: CaptureStats) -> Iterator[Frame]:
    b = _Buffer(f)
    endian = "<"
    interfaces: list[tuple[int, int, int]] = []  # (linktype, units per second, offset seconds)
    first = True
    prev_ts = 0.0  # simple packet blocks carry no time: they take the previous packet's
    while True:
        if not b.ensure(12):
            if len(b.buf) - b.pos:
                _truncated(stats, name, "last block header is incomplete")
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
        if block_len < 12 or block_len % 4 or block_len > (64 << 20):
            _truncated(stats, name, f"block length {block_len} is invalid (corrupt file)")
            return
        if not b.ensure(block_len):
            _truncated(stats, name, "last block is incomplete")
            return
        buf, pos = b.buf, b.pos
        body = buf[pos + 8:pos + block_len - 4]
        b.pos = pos + block_len
        if block_type == 1:  # interface description
            if len(body) < 8:
                _truncated(stats, name, "interface block is too short")
                return
            linktype = struct.unpack_from(endian + "H", body, 0)[0]
            if linktype not in SUPPORTED_LINKTYPES:
                raise UnsupportedLinkTypeError(linktype, name)
            units, offset = _pcapng_if_options(body[8:], endian)
            interfaces.append((linktype, units, offset))
        elif block_type == 6:  # enhanced packet
            if len(body) < 20:
                continue
            if_id, ts_hi, ts_lo, cap_len, orig_len = struct.unpack_from(endian + "IIIII", body, 0)
            if if_id >= len(interfaces) or 20 + cap_len > len(body):
                stats.skipped["bad_pcapng_packet_block"] = stats.skipped.get("bad_pcapng_packet_block", 0) + 1
                continue
            linktype, units, offset = interfaces[if_id]
            prev_ts = _pcapng_ts(ts_hi, ts_lo, units, offset)
            yield prev_ts, linktype, body[20:20 + cap_len], orig_len
        elif block_type == 3:  # simple packet: interface 0, no timestamp of its own
            if not interfaces or len(body) < 4:
                continue
            orig_len = struct.unpack_from(endian + "I", body, 0)[0]
            linktype = interfaces[0][0]
            yield prev_ts, linktype, body[4:4 + orig_len], orig_len
        elif block_type == 2:  # obsolete packet block
            if len(body) < 20:
                continue
            if_id, _drops, ts_hi, ts_lo, cap_len, orig_len = struct.unpack_from(endian + "HHIIII", body, 0)
            if if_id >= len(interfaces) or 20 + cap_len > len(body):
                continue
            linktype, units, offset = interfaces[if_id]
            prev_ts = _pcapng_ts(ts_hi, ts_lo, units, offset)
            yield prev_ts, linktype, body[20:20 + cap_len], orig_len
        # other blocks (name resolution, statistics, custom) carry nothing we need


def _pcapng_if_options(opts: bytes, endian: str) -> tuple[int, int]:
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


def _pcapng_ts(hi: int, lo: int, units: int, offset: int) -> float:
    ticks = (hi << 32) | lo
    sec, rem = divmod(ticks, units)
    usec = rem * 1_000_000 // units  # libpcap converts to microseconds
    return (sec + offset) + usec / 1e6


# ---------------------------------------------------------------------- packets by the block

def iter_packet_batches(
    fileobj: BinaryIO,
    stats: CaptureStats,
    decoder: PacketDecoder,
    *,
    probe: PacketDecoder | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[Iterable]:
    """Batches of decoded packets of a capture file, in file order: one iterator of Packets
    per chunk (a few MiB) of the file.

    Classic pcap goes through :mod:`gateway.flows.blocks` (record offsets found per chunk,
    header fields gathered with numpy, common frames built without the per-frame decoder);
    pcapng takes the per-frame path.  ``shard=(index, count)`` keeps only the packets of
    that share of the address pairs (``probe`` decodes the frames every share must look
    at, see :func:`gateway.flows.blocks.block_packets`).  ``stats`` counts every frame of
    the file (packets, bytes, first/last time) and truncation warnings; the decoder counts
    skipped packets.  Errors as :func:`iter_frames`."""
    yield from _by_format(
        fileobj, stats,
        pcap=lambda f, name: _pcap_batches(f, name, stats, decoder, probe, shard),
        pcapng=lambda f, name: _frame_batches(_iter_pcapng(f, name, stats), stats, decoder, probe, shard))


def _read_exactly(f, n: int) -> bytes:
    out = b""
    while len(out) < n:
        part = f.read(n - len(out))
        if not part:
            break
        out += part
    return out


def _pcap_batches(f, name: str, stats: CaptureStats, decoder: PacketDecoder, probe, shard):
    from gateway.flows.blocks import BLOCK_SIZE, block_packets, decode_block, scan_records

    head = _read_exactly(f, 24)
    if len(head) < 24:
        raise NotACaptureError(f"{name}: pcap global header is cut short")
    endian, ticks = PCAP_MAGICS[head[:4]]
    (snaplen, network) = struct.unpack_from(endian + "II", head, 16)
    linktype = network & 0x0FFFFFFF
    if linktype not in SUPPORTED_LINKTYPES:
        raise UnsupportedLinkTypeError(linktype, name)
    little = endian == "<"
    nano = ticks == 1_000_000_000
    max_len = max(snaplen, 262144) if snaplen else 262144
    ignore = decoder.ignore_checksums
    rest = b""
    while True:
        chunk = f.read(BLOCK_SIZE)
        buf = rest + chunk if rest else chunk
        offsets, stop, bad_len = scan_records(buf, 0, little, max_len)
        if offsets:
            block = decode_block(buf, offsets, little=little, nano=nano, linktype=linktype,
                                 ignore_checksums=ignore, shard=shard)
            stats.packets += block.frames
            stats.bytes += block.wire_bytes
            if stats.first_ts is None:
                stats.first_ts = block.first_ts
            stats.last_ts = block.last_ts
            yield block_packets(block, decoder, linktype, probe=probe, shard=shard)
            block = None  # not alive while the next chunk is read and gathered
        if bad_len is not None:
            _truncated(stats, name, f"record length {bad_len} is implausible (corrupt file)")
            return
        rest = buf[stop:]
        if not chunk:
            if rest:
                _truncated(stats, name, "last record header is incomplete" if len(rest) < 16
                           else "last record is incomplete")
            return


def _frame_batches(frames: Iterable[Frame], stats: CaptureStats, decoder: PacketDecoder, probe, shard,
                   size: int = 16384):
    """The per-frame path in batches (pcapng): every frame decoded, by ``probe`` in the
    shards that do not keep the counts, then sharded on the decoded addresses."""
    from gateway.flows.blocks import packet_shard

    decode = (decoder if probe is None else probe).decode
    index, count = shard if shard is not None else (0, 1)
    batch: list = []
    seen = 0
    for ts, linktype, frame, wire_len in frames:
        # batches of ``size`` frames, kept or not: every shard makes the same number of them
        # (the parent merges them round-robin)
        seen += 1
        if seen > size:
            yield batch
            batch = []
            seen = 1
        stats.packets += 1
        stats.bytes += wire_len
        if stats.first_ts is None:
            stats.first_ts = ts
        stats.last_ts = ts
        pkt = decode(linktype, frame, ts, wire_len)
        if pkt is None or pkt.__class__ is str:
            continue
        if count > 1 and packet_shard(pkt.src, pkt.dst, count) != index:
            continue
        batch.append(pkt)
    yield batch


def track_batches(
    batches: Iterable[Iterable],
    tracker: ConnTracker,
    stats: CaptureStats,
    *,
    flush: bool = True,
    packet_filter: Callable[[object], bool] | None = None,
) -> Iterator[list[ConnRecord]]:
    """Feed batches of packets to ``tracker``; yield, per batch, the records of the
    connections that ended meanwhile; then, with ``flush``, the records of those still open."""
    feed_many = tracker.feed_many
    flows = 0
    try:
        for batch in batches:
            if packet_filter is not None:
                batch = list(batch)
                kept = [pkt for pkt in batch if packet_filter(pkt)]
                stats.filtered += len(batch) - len(kept)
                batch = kept
            out = feed_many(batch)
            flows += len(out)
            yield out
        if flush:
            rest = tracker.flush()
            flows += len(rest)
            yield rest
    finally:
        stats.flows += flows
        stats.merge_skipped(tracker.skipped)


# ---------------------------------------------------------------------- records from frames

def records_from_frames(
    frames: Iterable[Frame],
    *,
    ignore_checksums: bool = False,
    local_nets: Iterable[str] | None = None,
    stats: CaptureStats | None = None,
    tracker: ConnTracker | None = None,
    flush: bool = True,
    progress: Callable[[int], None] | None = None,
    packet_filter: Callable[[object], bool] | None = None,
) -> Iterator[ConnRecord]:
    """Decode frames and track connections; yield records as connections end.

    ``packet_filter`` (see :func:`gateway.flows.bpf.compile_filter`) drops packets before
    tracking, as a capture filter would."""
    stats = stats if stats is not None else CaptureStats()
    decoder = PacketDecoder(ignore_checksums=ignore_checksums)
    if tracker is None:
        tracker = ConnTracker(local_nets=DEFAULT_LOCAL_NETS if local_nets is None else tuple(local_nets))
    decode = decoder.decode
    feed = tracker.feed
    n = 0
    nbytes = 0
    last_ts = None
    try:
        for ts, linktype, frame, wire_len in frames:
            n += 1
            nbytes += wire_len
            if last_ts is None:
                stats.first_ts = ts
            last_ts = ts
            pkt = decode(linktype, frame, ts, wire_len)
            if pkt is None or pkt.__class__ is str:
                continue
            if packet_filter is not None and not packet_filter(pkt):
                stats.filtered += 1
                continue
            done = feed(pkt)
            if done:
                stats.flows += len(done)
                yield from done
            if progress is not None and not n & 0xFFFF:
                progress(n)
        if flush:
            rest = tracker.flush()
            stats.flows += len(rest)
            yield from rest
    finally:
        stats.packets += n
        stats.bytes += nbytes
        if last_ts is not None:
            stats.last_ts = last_ts
        stats.merge_skipped(decoder.skipped)
        stats.merge_weird(decoder.notes)
        stats.merge_skipped(tracker.skipped)


def pcap_records(
    fileobj: BinaryIO,
    *,
    ignore_checksums: bool = False,
    local_nets: Iterable[str] | None = None,
    stats: CaptureStats | None = None,
    likely_server_ports: frozenset[tuple[int, int]] | None = None,
    progress: Callable[[int], None] | None = None,
    bpf: str | None = None,
) -> Iterator[ConnRecord]:
    """Conn records of one pcap/pcapng (optionally gzip'd) file object.

    ``local_nets`` (CIDR strings) sets ``local_orig``/``local_resp``; ``None`` means Zeek's
    default (the private address space), ``()`` leaves both unset.  Records of connections
    still open at the end of the file are flushed, as Zeek does.
    """
    stats = stats if stats is not None else CaptureStats()
    tracker = ConnTracker(
        local_nets=DEFAULT_LOCAL_NETS if local_nets is None else tuple(local_nets),
        **({} if likely_server_ports is None else {"likely_server_ports": likely_server_ports}),
    )
    packet_filter = None
    if bpf:
        from gateway.flows.bpf import compile_filter

        packet_filter = compile_filter(bpf)
    decoder = PacketDecoder(ignore_checksums=ignore_checksums)
    try:
        batches = iter_packet_batches(fileobj, stats, decoder)
        for records in track_batches(batches, tracker, stats, packet_filter=packet_filter):
            yield from records
            if progress is not None:
                progress(stats.packets)
    finally:
        stats.merge_skipped(decoder.skipped)
        stats.merge_weird(decoder.notes)


def live_records(
    iface: str,
    *,
    bpf: str | None = None,
    ignore_checksums: bool = True,
    local_nets: Iterable[str] | None = None,
    stats: CaptureStats | None = None,
    stop: Callable[[], bool] | None = None,
    poll_interval: float = 1.0,
    socket_factory: Callable[..., object] | None = None,
) -> Iterator[ConnRecord]:
    """Sniff ``iface`` with scapy and yield conn records as connections end.

    ``bpf`` is a capture filter (tcpdump syntax).  Checksums are ignored by default because
    NIC checksum offloading makes locally sent packets look corrupt (Zeek recommends ``-C``
    on such hosts).  ``stop()`` is polled every ``poll_interval`` seconds; when it returns
    True the remaining connections are flushed and the iterator ends.  Timers advance with
    wall-clock time even when no packet arrives, so idle connections still end.
    """
    from scapy.config import conf  # heavy import, only for live capture

    if socket_factory is None:
        import scapy.arch  # noqa: F401 - sets conf.L2listen (None until the arch layer is loaded)
    stats = stats if stats is not None else CaptureStats()
    factory = socket_factory or conf.L2listen
    sock = factory(iface=iface, filter=bpf)
    # the socket's link-layer class (Ether, CookedLinux, ...) -> its pcap link type
    dlt = conf.l2types.layer2num.get(getattr(sock, "LL", None), 1)
    tracker = ConnTracker(local_nets=DEFAULT_LOCAL_NETS if local_nets is None else tuple(local_nets))
    decoder = PacketDecoder(ignore_checksums=ignore_checksums)
    try:
        while not (stop and stop()):
            ready = sock.select([sock], poll_interval) if hasattr(sock, "select") else [sock]
            now = time.time()
            if not ready:
                done = tracker.advance(now)
                stats.flows += len(done)
                yield from done
                continue
            raw = sock.recv_raw()
            if not raw or raw[1] is None:
                continue
            _cls, data, ts = raw[0], raw[1], raw[2] if len(raw) > 2 and raw[2] else now
            stats.packets += 1
            stats.bytes += len(data)
            pkt = decoder.decode(dlt, bytes(data), float(ts), len(data))
            if pkt is None or pkt.__class__ is str:
                continue
            done = tracker.feed(pkt)
            if done:
                stats.flows += len(done)
                yield from done
        rest = tracker.flush()
        stats.flows += len(rest)
        yield from rest
    finally:
        stats.merge_skipped(decoder.skipped)
        stats.merge_weird(decoder.notes)
        stats.merge_skipped(tracker.skipped)
        sock.close()


# ---------------------------------------------------------------------- file conversion service

class _CountingReader:
    """Wraps a binary file and reports the bytes read so far (for a progress bar)."""

    def __init__(self, f: BinaryIO, report: Callable[[int], None]):
        self._f = f
        self._report = report
        self.done = 0
        self.name = getattr(f, "name", None)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.done += len(data)
        self._report(self.done)
        return data

    def peek(self, n: int = 1) -> bytes:
        return self._f.peek(n) if hasattr(self._f, "peek") else b""

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def readable(self) -> bool:
        return True


def zeek_json_line(rec: ConnRecord) -> str:
    """One record as a line of Zeek's JSON log format (``LogAscii::use_json=T``)."""
    from gateway.flows.record import COLUMN_BY_FIELD

    out = {}
    for name, value in zip(rec._fields, rec):
        if name == "extra":
            continue
        if value is None or value == ():
            continue
        if isinstance(value, tuple):
            value = list(value)
        out[COLUMN_BY_FIELD.get(name, name)] = value
    return json.dumps(out, separators=(",", ":"))


AUTO_WORKERS_MIN_BYTES = 32 << 20  # below this a single process is done before workers pay off
AUTO_WORKERS_MAX = 8  # every worker reads the whole file: past a few, reading dominates


def auto_workers(total_bytes: int, cpus: int) -> int:
    """Worker processes for ``--workers auto``: one per core (at most
    :data:`AUTO_WORKERS_MAX`), and one for inputs under :data:`AUTO_WORKERS_MIN_BYTES`."""
    if total_bytes < AUTO_WORKERS_MIN_BYTES:
        return 1
    return max(1, min(cpus, AUTO_WORKERS_MAX))


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask where the system has one)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def convert_captures(
    paths: Iterable[str],
    out: BinaryIO,
    *,
    fmt: str = "zeek",
    ignore_checksums: bool = False,
    local_nets: Iterable[str] | None = None,
    likely_server_ports: frozenset[tuple[int, int]] | None = None,
    protocols: Iterable[str] | None = None,
    bpf: str | None = None,
    workers: int | str = 1,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> CaptureStats:
    """Turn capture files into one conn log on ``out`` (Zeek TSV or Zeek JSON lines).

    Each file is tracked on its own (connections do not span files).  ``on_progress(path,
    bytes_done, bytes_total)`` is called as the files are read.  Raises :class:`CaptureError`
    for a file that is not a capture or has an unsupported link type (records of earlier
    files are already written).

    ``workers`` > 1 splits each file by address pair over that many processes (each reads
    the whole file, decodes and tracks only its share, see :func:`_sharded_output`); the
    records are the same, in a different (still deterministic) order.  ``"auto"``: see
    :func:`auto_workers`.
    """
    import os

    paths = list(paths)
    if workers == "auto":
        workers = auto_workers(sum(os.path.getsize(p) for p in paths), usable_cpus())
    if not isinstance(workers, int) or workers < 1:
        raise ValueError("workers must be >= 1 or 'auto'")

    from gateway.flows.conntrack import DEFAULT_LIKELY_SERVER_PORTS
    from gateway.flows.zeek import LogHeader, ZeekTsvWriter

    if fmt not in ("zeek", "json"):
        raise ValueError(f"unknown format {fmt!r}; choose zeek or json")
    packet_filter = None
    if bpf:
        from gateway.flows.bpf import compile_filter

        packet_filter = compile_filter(bpf)  # a bad filter fails before anything is written
    paths = list(paths)
    for path in paths:  # fail before writing anything if an input is not a capture
        with open(path, "rb") as f:
            head = f.read(1 << 16)  # enough compressed input for gzip to yield the magic
        if not is_capture_file(head):
            raise NotACaptureError(f"{path}: not a pcap/pcapng file (starts with {head[:4].hex() or 'nothing'})")
    stats = CaptureStats()
    started = time.perf_counter()
    writer = ZeekTsvWriter(out, header=LogHeader.zeek_conn()) if fmt == "zeek" else None
    nets = DEFAULT_LOCAL_NETS if local_nets is None else tuple(local_nets)
    gc_saved = _fewer_gc_passes()
    try:
        for path in paths:
            total = os.path.getsize(path)
            with open(path, "rb") as raw:
                f: BinaryIO = raw
                if on_progress is not None:
                    f = _CountingReader(raw, lambda done, p=path: on_progress(p, done, total))  # type: ignore[assignment]
                lsp = DEFAULT_LIKELY_SERVER_PORTS if likely_server_ports is None else likely_server_ports
                if workers > 1:
                    # the workers format their records: only bytes cross the pipes
                    if writer is not None:
                        writer.write(())  # the header, before the first worker's lines
                    report = None if on_progress is None else (lambda done, p=path: on_progress(p, done, total))
                    for chunk in _sharded_output(path, workers, fmt, ignore_checksums, nets, lsp, protocols, bpf,
                                                 stats, report):
                        out.write(chunk)
                else:
                    decoder = PacketDecoder(ignore_checksums=ignore_checksums)
                    tracker = ConnTracker(local_nets=nets, likely_server_ports=lsp, protocols=protocols)
                    batches = iter_packet_batches(f, stats, decoder)
                    records = chain.from_iterable(
                        track_batches(batches, tracker, stats, packet_filter=packet_filter))
                    try:
                        if writer is not None:
                            writer.write(records)
                        else:
                            for rec in records:
                                out.write(zeek_json_line(rec).encode() + b"\n")
                    finally:
                        stats.merge_skipped(decoder.skipped)
                        stats.merge_weird(decoder.notes)
            if on_progress is not None:
                on_progress(path, total, total)
    finally:
        gc.set_threshold(*gc_saved)
        if writer is not None:
            writer.close()
        stats.elapsed = time.perf_counter() - started
    return stats


def _fewer_gc_passes() -> tuple[int, ...]:
    """Raise the cyclic collector's thresholds for a bulk run; returns the old ones.

    Tracking allocates a few objects per packet and frees them by reference counting
    (connections break their cycles when they end), yet at the default threshold (700)
    the collector would scan the young objects every ~100 packets: 10-20% of the run."""
    saved = gc.get_threshold()
    gc.set_threshold(max(saved[0], 50_000), max(saved[1], 20), max(saved[2], 100))
    return saved


# ---------------------------------------------------------------------- sharding over processes

# batches a worker may run ahead of the one the parent writes (memory bound of the merge)
_AHEAD = 32


def _batch_formatter(fmt: str) -> Callable[[list[ConnRecord]], bytes]:
    """Records -> the bytes of their log lines (Zeek TSV without the header, or JSON lines)."""
    if fmt == "json":
        return lambda records: b"".join(zeek_json_line(rec).encode() + b"\n" for rec in records)
    import io

    from gateway.flows.zeek import LogHeader, ZeekTsvWriter

    buf = io.BytesIO()
    writer = ZeekTsvWriter(buf, header=LogHeader.zeek_conn(), close_line=False)
    writer.write(())  # the header goes first: dropped with the first reset below

    def lines(records: list[ConnRecord]) -> bytes:
        buf.seek(0)
        buf.truncate()
        writer.write(records)
        return buf.getvalue()

    return lines


def _shard_worker(conn, path: str, index: int, count: int, fmt: str, ignore_checksums: bool, nets, lsp,
                  protocols, bpf: str | None) -> None:
    """Track the connections of one shard of a file (runs in a worker process); sends
    ``("lines", bytes)`` per batch of the file (its records formatted as ``fmt``), then
    ``("done", CaptureStats)``, or ``("error", exception)``."""
    try:
        _fewer_gc_passes()
        gc.freeze()  # what the parent had: never garbage, never scanned again
        if index:
            log.disabled = True  # every worker reads the file: one truncation warning is enough
        stats = CaptureStats()
        decoder = PacketDecoder(ignore_checksums=ignore_checksums)
        # frames without a fixed-offset address pair are decoded by every worker; only
        # worker 0 keeps the counts of what they contain, the others decode them with a probe
        probe = decoder if index == 0 else PacketDecoder(ignore_checksums=ignore_checksums)
        tracker = ConnTracker(local_nets=nets, likely_server_ports=lsp, protocols=protocols)
        packet_filter = None
        if bpf:
            from gateway.flows.bpf import compile_filter

            packet_filter = compile_filter(bpf)
        with open(path, "rb") as f:
            batches = iter_packet_batches(f, stats, decoder, probe=probe, shard=(index, count))
            lines = _batch_formatter(fmt)
            for records in track_batches(batches, tracker, stats, packet_filter=packet_filter):
                # with the bytes of the file read so far, for the parent's progress bar
                conn.send(("lines", lines(records), f.tell()))
        if index != 0:  # worker 0 reports the file-wide counters
            stats.packets = stats.bytes = 0
            stats.first_ts = stats.last_ts = None
            stats.warnings.clear()
            stats.truncated = False
        stats.merge_skipped(decoder.skipped)  # (probe counts are dropped on purpose)
        stats.merge_weird(decoder.notes)
        conn.send(("done", stats))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        if not isinstance(exc, CaptureError):
            import traceback

            exc = RuntimeError(f"flows worker {index} failed: {traceback.format_exc()}")
        conn.send(("error", exc))
    finally:
        conn.close()


def _sharded_output(path, workers, fmt, ignore_checksums, nets, lsp, protocols, bpf, stats: CaptureStats,
                    progress: Callable[[int], None] | None = None):
    """Log lines (bytes, formatted as ``fmt``) of one file tracked by ``workers`` processes,
    streamed as connections end.

    Every worker sends one message per batch of the file (the same batches in all
    workers for a pcap); the parent writes them round-robin - batch 1 of worker 0, of
    worker 1, ..., then batch 2 - so the output is deterministic for a given number of
    workers, and memory follows the open connections: a worker runs at most ``_AHEAD``
    batches ahead of the writer before its pipe blocks it."""
    import multiprocessing
    from collections import deque
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    conns, procs = [], []
    finished_cleanly = False
    try:
        for i in range(workers):
            recv, send = ctx.Pipe(duplex=False)
            _widen_pipe(send)
            proc = ctx.Process(target=_shard_worker, daemon=True,
                               args=(send, path, i, workers, fmt, ignore_checksums, nets, lsp, protocols, bpf))
            proc.start()
            send.close()
            conns.append(recv)
            procs.append(proc)
        pending = [deque() for _ in range(workers)]
        finished = [False] * workers  # "done" received (nothing more to read)
        order = list(range(workers))  # workers whose messages are still to be written
        turn = 0
        while order:
            i = order[turn % len(order)]
            if not pending[i]:
                readable = [conns[j] for j in range(workers) if not finished[j] and len(pending[j]) < _AHEAD]
                for c in wait(readable):
                    j = conns.index(c)
                    try:
                        msg = c.recv()
                    except EOFError:
                        msg = ("error", CaptureError(f"{path}: flows worker {j} ended without a result"))
                    pending[j].append(msg)
                    if msg[0] != "lines":
                        finished[j] = True
                continue
            tag, value, *done = pending[i].popleft()
            if tag == "lines":
                yield value
                turn += 1
                if progress is not None and i == 0:
                    progress(done[0])
            elif tag == "done":
                order.remove(i)
                _merge_stats(stats, value)
            else:
                raise value
        finished_cleanly = True
    finally:
        for proc in procs:
            if not finished_cleanly and proc.is_alive():
                proc.terminate()  # an error or an abandoned output: stop the others
            proc.join()
        for c in conns:
            c.close()


def _widen_pipe(conn) -> None:
    """Let a pipe hold a whole batch (Linux: up to 1 MiB instead of 64 KiB), so a worker
    hands its lines over and goes on instead of waiting for the parent to be scheduled a
    few times per batch (costly on busy cores)."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):
        pass  # other systems: the default pipe size, only slower


def _merge_stats(stats: CaptureStats, part: CaptureStats) -> None:
    stats.packets += part.packets
    stats.bytes += part.bytes
    stats.flows += part.flows
    stats.filtered += part.filtered
    stats.truncated = stats.truncated or part.truncated
    stats.warnings.extend(part.warnings)
    stats.merge_skipped(part.skipped)
    stats.merge_weird(part.weird)
    if part.first_ts is not None and stats.first_ts is None:
        stats.first_ts = part.first_ts
    if part.last_ts is not None:
        stats.last_ts = part.last_ts
