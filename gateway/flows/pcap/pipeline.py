"""Frames -> packets -> connections -> records: one pipeline for files and live capture.

A *frame tracker* takes captured frames and returns the records of the connections that
ended: it decodes each frame (:class:`~gateway.flows.packets.PacketDecoder`), keeps only
its shard's address pairs (``--workers``), applies the capture filter and tracks the
packet (:class:`~gateway.flows.conntrack.ConnTracker`).  :class:`FrameTracker` is the
plain-Python one, the reference; the compiled one (``gateway.flows._compiled.Tracker``)
does the same for the common frames without a Python object per frame and falls back to
the same decoder for the rest.  :func:`new_frame_tracker` picks the compiled one when it
is built (``FEDGATE_PURE_PYTHON=1`` forces the reference).

Both offer ``feed_frame(linktype, frame, ts, wire_len)``, ``feed_pcap(buf, pos,
header)`` (a chunk of a classic pcap: see :mod:`.classic`), ``advance(now)``, ``flush()``,
``skipped`` and ``filtered``; the compiled one also ``feed(packet)`` like a ConnTracker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import BinaryIO

from gateway.flows.conntrack import DEFAULT_LIKELY_SERVER_PORTS, DEFAULT_LOCAL_NETS, ConnTracker
from gateway.flows.packets import PacketDecoder
from gateway.flows.pcap import classic
from gateway.flows.pcap.common import CaptureStats, Frame, by_format
from gateway.flows.pcap.pcapng import iter_pcapng
from gateway.flows.record import ConnRecord
from gateway.flows.settings import FlowSettings
from gateway.flows.shard import packet_shard

PCAPNG_BATCH = 16_384  # pcapng frames per batch (every worker makes the same batches)
_EMPTY: tuple[()] = ()

try:  # the compiled hot path (gateway/flows/_compiled.pyx), when it was built
    from gateway.flows import _compiled
except ImportError:  # pragma: no cover - exercised where no compiler was at hand
    _compiled = None  # type: ignore[assignment]


def compiled_available() -> bool:
    """True when the compiled tracker is built (and not switched off by the environment)."""
    return _compiled is not None and os.environ.get("FEDGATE_PURE_PYTHON", "") in ("", "0")


class FrameTracker:
    """Frames in, conn records out, in plain Python (the reference pipeline)."""

    def __init__(self, tracker: ConnTracker, decoder: PacketDecoder, *,
                 packet_filter: Callable[[object], bool] | None = None,
                 shard: tuple[int, int] | None = None, probe: PacketDecoder | None = None):
        self.tracker = tracker
        self.decoder = decoder
        index, count = shard if shard is not None else (0, 1)
        # every shard decodes every frame; only the first one counts what the decoder saw
        self._decode = (decoder if index == 0 or probe is None else probe).decode
        self.shard = (index, count)
        self.packet_filter = packet_filter
        self.filtered = 0

    @property
    def skipped(self) -> dict[str, int]:
        return self.tracker.skipped

    @property
    def open_connections(self) -> int:
        return self.tracker.open_connections

    def feed_frame(self, linktype: int, frame: bytes, ts: float, wire_len: int):
        pkt = self._decode(linktype, frame, ts, wire_len)
        if pkt is None or pkt.__class__ is str:
            return _EMPTY
        index, count = self.shard
        if count > 1 and packet_shard(pkt.src, pkt.dst, count) != index:
            return _EMPTY
        if self.packet_filter is not None and not self.packet_filter(pkt):
            self.filtered += 1
            return _EMPTY
        return self.tracker.feed(pkt)

    def feed_pcap(self, buf: bytes, pos: int, header: classic.PcapHeader) -> classic.Walked:
        """The complete records of a classic pcap chunk, tracked; ``out`` holds the
        records of the connections that ended."""
        out: list[ConnRecord] = []
        feed, linktype = self.feed_frame, header.linktype

        def frame(ts: float, at: int, incl: int, wire: int) -> None:
            done = feed(linktype, buf[at:at + incl], ts, wire)
            if done:
                out.extend(done)

        walked = classic.walk_records(buf, pos, header, frame)
        return walked._replace(out=out)

    def advance(self, now: float) -> list[ConnRecord]:
        return self.tracker.advance(now)

    def flush(self) -> list[ConnRecord]:
        return self.tracker.flush()


def new_frame_tracker(
    *,
    ignore_checksums: bool = False,
    local_nets: Iterable[str] | None = None,
    likely_server_ports: frozenset[tuple[int, int]] | None = None,
    protocols: Iterable[str] | None = None,
    settings: FlowSettings | None = None,
    packet_filter: Callable[[object], bool] | None = None,
    shard: tuple[int, int] | None = None,
    compiled: bool | None = None,
):
    """A frame tracker: the compiled one when it is built (``compiled=None``), else (or
    with ``compiled=False``) :class:`FrameTracker`.  ``None`` options take Zeek's defaults
    and :class:`FlowSettings`'."""
    settings = settings or FlowSettings()
    nets = DEFAULT_LOCAL_NETS if local_nets is None else tuple(local_nets)
    lsp = DEFAULT_LIKELY_SERVER_PORTS if likely_server_ports is None else likely_server_ports
    decoder = PacketDecoder(ignore_checksums=ignore_checksums, max_fragment_buffers=settings.max_fragment_buffers,
                            fragment_timeout=settings.fragment_timeout_s)
    probe = None
    if shard is not None and shard[0] != 0:
        probe = PacketDecoder(ignore_checksums=ignore_checksums, max_fragment_buffers=settings.max_fragment_buffers,
                              fragment_timeout=settings.fragment_timeout_s)
    if compiled is None:
        compiled = compiled_available()
    if compiled:
        if _compiled is None:
            raise RuntimeError("the compiled tracker is not built (pip install -e . builds it)")
        return _compiled.Tracker(local_nets=nets, likely_server_ports=lsp, protocols=protocols,
                                 max_connections=settings.max_connections, decoder=decoder, probe=probe,
                                 shard=shard, packet_filter=packet_filter)
    tracker = ConnTracker(local_nets=nets, likely_server_ports=lsp, protocols=protocols,
                          max_connections=settings.max_connections)
    return FrameTracker(tracker, decoder, packet_filter=packet_filter, shard=shard, probe=probe)


def record_batches(fileobj: BinaryIO, stats: CaptureStats, frames_tracker, *, flush: bool = True
                   ) -> Iterator[list[ConnRecord]]:
    """The records of a capture file (pcap or pcapng, gzip'd or not), one list per chunk
    of the file (a classic pcap) or per :data:`PCAPNG_BATCH` frames (pcapng); then, with
    ``flush``, those of the connections still open.  ``stats`` counts frames, flows,
    skipped packets and truncation.  Raises :class:`~.common.NotACaptureError` or
    :class:`~.common.UnsupportedLinkTypeError` before anything is read otherwise."""
    ft = frames_tracker
    decoder = getattr(ft, "decoder", None)
    flows = 0
    try:
        batches = by_format(
            fileobj, stats,
            pcap=lambda f, name: classic.read_pcap(f, name, stats, ft.feed_pcap),
            pcapng=lambda f, name: _pcapng_batches(iter_pcapng(f, name, stats), stats, ft))
        for batch in batches:
            flows += len(batch)
            yield batch
        if flush:
            rest = ft.flush()
            flows += len(rest)
            yield rest
    finally:
        stats.flows += flows
        stats.filtered += ft.filtered
        ft.filtered = 0
        stats.merge_skipped(ft.skipped)
        ft.skipped.clear()
        if decoder is not None:
            stats.merge_skipped(decoder.skipped)
            stats.merge_weird(decoder.notes)
            decoder.skipped.clear()
            decoder.notes.clear()


def _pcapng_batches(frames: Iterable[Frame], stats: CaptureStats, ft) -> Iterator[list[ConnRecord]]:
    feed = ft.feed_frame
    batch: list[ConnRecord] = []
    seen = 0
    for ts, linktype, frame, wire_len in frames:
        seen += 1
        if seen > PCAPNG_BATCH:  # by frames read, kept or not: the same batches in every shard
            yield batch
            batch = []
            seen = 1
        stats.frames(1, wire_len, ts, ts)
        done = feed(linktype, frame, ts, wire_len)
        if done:
            batch.extend(done)
    yield batch


def iter_frames(fileobj: BinaryIO, stats: CaptureStats | None = None) -> Iterator[Frame]:
    """Yield ``(ts, linktype, frame_bytes, wire_len)`` for every record of a pcap/pcapng file.

    A truncated last record ends the iteration with a warning in ``stats`` (frames are
    not counted there: the pipeline that takes them does).  Raises
    :class:`NotACaptureError` for anything else than a capture, and
    :class:`UnsupportedLinkTypeError` for link types we cannot decode."""
    stats = stats if stats is not None else CaptureStats()
    yield from by_format(
        fileobj, stats,
        pcap=lambda f, name: chain.from_iterable(
            classic.read_pcap(f, name, stats, classic.frames_in_chunk, count=False)),
        pcapng=lambda f, name: iter_pcapng(f, name, stats))


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
    """Decode frames and track connections with the plain-Python reference (``tracker``
    or a new :class:`ConnTracker`); yield records as connections end."""
    stats = stats if stats is not None else CaptureStats()
    if tracker is None:
        tracker = ConnTracker(local_nets=DEFAULT_LOCAL_NETS if local_nets is None else tuple(local_nets))
    ft = FrameTracker(tracker, PacketDecoder(ignore_checksums=ignore_checksums), packet_filter=packet_filter)
    yield from _frames_records(frames, ft, stats, flush=flush, progress=progress)


def _frames_records(frames: Iterable[Frame], ft, stats: CaptureStats, *, flush: bool = True,
                    progress: Callable[[int], None] | None = None) -> Iterator[ConnRecord]:
    feed = ft.feed_frame
    n = 0
    try:
        for ts, linktype, frame, wire_len in frames:
            n += 1
            stats.frames(1, wire_len, ts, ts)
            done = feed(linktype, frame, ts, wire_len)
            if done:
                stats.flows += len(done)
                yield from done
            if progress is not None and not n & 0xFFFF:
                progress(n)
        if flush:
            rest = ft.flush()
            stats.flows += len(rest)
            yield from rest
    finally:
        stats.filtered += ft.filtered
        ft.filtered = 0
        stats.merge_skipped(ft.skipped)
        ft.skipped.clear()
        stats.merge_skipped(ft.decoder.skipped)
        stats.merge_weird(ft.decoder.notes)
        ft.decoder.skipped.clear()
        ft.decoder.notes.clear()


def pcap_records(
    fileobj: BinaryIO,
    *,
    ignore_checksums: bool = False,
    local_nets: Iterable[str] | None = None,
    stats: CaptureStats | None = None,
    likely_server_ports: frozenset[tuple[int, int]] | None = None,
    progress: Callable[[int], None] | None = None,
    bpf: str | None = None,
    settings: FlowSettings | None = None,
) -> Iterator[ConnRecord]:
    """Conn records of one pcap/pcapng (optionally gzip'd) file object.

    ``local_nets`` (CIDR strings) sets ``local_orig``/``local_resp``; ``None`` means Zeek's
    default (the private address space), ``()`` leaves both unset.  Records of connections
    still open at the end of the file are flushed, as Zeek does.
    """
    stats = stats if stats is not None else CaptureStats()
    packet_filter = None
    if bpf:
        from gateway.flows.bpf import compile_filter

        packet_filter = compile_filter(bpf)
    ft = new_frame_tracker(ignore_checksums=ignore_checksums, local_nets=local_nets,
                           likely_server_ports=likely_server_ports, settings=settings, packet_filter=packet_filter)
    for records in record_batches(fileobj, stats, ft):
        yield from records
        if progress is not None:
            progress(stats.packets)
