"""What the capture readers share: errors, run counters, format sniffing and opening."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from gateway.flows import gz
from gateway.flows.packets import LINKTYPE_NAMES, SUPPORTED_LINKTYPES

log = logging.getLogger("gateway.flows.pcap")

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
# libpcap's MAXIMUM_SNAPLEN: no record is longer, whatever a file's header claims, so a
# corrupt length is caught at once instead of being read into memory
MAX_SNAPLEN = 262_144

Frame = tuple[float, int, bytes, int]  # (ts, linktype, frame bytes, wire length)


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
    dropped: int | None = None  # live capture: packets the kernel dropped (None: unknown)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def merge_skipped(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def merge_weird(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self.weird[reason] = self.weird.get(reason, 0) + n

    def merge(self, part: CaptureStats) -> None:
        """Add the counters of another run (a worker's share of the same file)."""
        self.packets += part.packets
        self.bytes += part.bytes
        self.flows += part.flows
        self.filtered += part.filtered
        self.truncated = self.truncated or part.truncated
        self.warnings.extend(part.warnings)
        self.merge_skipped(part.skipped)
        self.merge_weird(part.weird)
        if part.first_ts is not None and self.first_ts is None:
            self.first_ts = part.first_ts
        if part.last_ts is not None:
            self.last_ts = part.last_ts

    def frames(self, count: int, wire_bytes: int, first_ts: float | None, last_ts: float | None) -> None:
        """Count ``count`` frames read (of ``wire_bytes`` on the wire) between two times."""
        self.packets += count
        self.bytes += wire_bytes
        if count:
            if self.first_ts is None:
                self.first_ts = first_ts
            self.last_ts = last_ts

    def as_dict(self) -> dict:
        out = {
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
        if self.dropped is not None:
            out["dropped"] = self.dropped
        return out


def is_capture_file(head: bytes) -> bool:
    """True if ``head`` (the first bytes of a file) starts a pcap, pcapng or gzip'd capture."""
    inner = gz.content_head(head, 4)
    return inner in PCAP_MAGICS or inner == PCAPNG_SHB


def source_name(fileobj) -> str:
    return str(getattr(fileobj, "name", "") or "<stream>")


def truncated(stats: CaptureStats, name: str, what: str) -> None:
    """Note a capture cut short: the flows read up to there are kept."""
    stats.truncated = True
    msg = f"{name}: truncated capture: {what}; flows up to this point are kept"
    stats.warnings.append(msg)
    log.warning(msg)


def by_format(fileobj: BinaryIO, stats: CaptureStats, *, pcap, pcapng) -> Iterator:
    """Open ``fileobj`` (gunzipped when it is gzip), hand it to ``pcap(f, name)`` or
    ``pcapng(f, name)`` by its magic, and record a gzip stream cut short as truncation."""
    name = source_name(fileobj)
    try:
        f = gz.open_stream(fileobj)
        head = gz.peek(f, 4)
    except (OSError, EOFError) as exc:
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
        if isinstance(f, gz.GunzipReader) and f.truncated and not stats.truncated:
            truncated(stats, name, f.error or "compressed stream cut short")
