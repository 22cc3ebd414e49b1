"""Reading Zeek logs from paths, file objects, bytes or chunk streams (gzip undone)."""


from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, BinaryIO

from gateway.flows import gz
from gateway.flows.record import ConnRecord
from gateway.flows.zeek.header import (
    Rejection,
)
from gateway.flows.zeek.parser import ZeekLogParser

# --------------------------------------------------------------------------- readers


def open_log(path: str | os.PathLike) -> BinaryIO:
    """Open a log for binary reading; gzip (by its magic bytes) is undone transparently.

    Reading a truncated gzip this way raises ``EOFError`` at the cut; read it through
    :func:`iter_records` to get what it held and one rejection instead."""
    return gz.open_path(path)


Source = str | os.PathLike | IO[bytes] | bytes | Iterable[bytes]


def _source_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return name
    return "<stream>"


class _ReadFailed(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _raw_chunks(source: Any, chunk_size: int) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source)
        return
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield from _raw_chunks(f, chunk_size)
        return
    if hasattr(source, "read"):
        read = getattr(source, "read1", None) or source.read
        while True:
            try:
                chunk = read(chunk_size)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # an already-gunzipping file object
                raise _ReadFailed(f"truncated or corrupt gzip: {exc}") from None
            if not chunk:
                return
            yield chunk
        return
    for chunk in source:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"chunks must be bytes, not {type(chunk).__name__}")
        if chunk:
            yield bytes(chunk)


def iter_record_batches(
    source: Source,
    *,
    strict: bool = False,
    chunk_size: int = 1 << 20,
    parser: ZeekLogParser | None = None,
    on_rejection: Callable[[Rejection], None] | None = None,
) -> Iterator[list[ConnRecord]]:
    """Records of a log, a list per chunk read (empty lists are not yielded).

    ``source``: a path (gzip undone), a binary file object, ``bytes``, or an iterable of
    bytes chunks.  Bad lines are rejected and counted (``parser.rejected``; pass your
    own ``parser`` to read the counts afterwards, or ``on_rejection`` to see each one);
    ``strict=True`` raises :class:`ZeekParseError` at the first instead.  An empty
    source and a truncated gzip each give one rejection.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if parser is None:
        parser = ZeekLogParser(source_name=_source_name(source), strict=strict)
    elif strict:
        parser.strict = True

    def drain() -> None:
        if on_rejection is not None and parser.rejections:
            for rej in parser.drain_rejections():
                on_rejection(rej)

    total = 0
    try:
        for data in gz.gunzip_chunks(_raw_chunks(source, chunk_size)):
            total += len(data)
            # Feed in chunk_size slices so memory stays bounded for a huge decompressed chunk.
            for start in range(0, len(data), chunk_size):
                batch = parser.feed(data[start : start + chunk_size])
                drain()
                if batch:
                    yield batch
    except (_ReadFailed, gz.GzipError) as exc:
        parser.abort(exc.reason if isinstance(exc, _ReadFailed) else str(exc))
        drain()
        return
    batch = parser.finish()
    if total == 0:
        parser._reject(0, "empty input", b"")
    drain()
    if batch:
        yield batch


def iter_records(
    source: Source,
    *,
    strict: bool = False,
    chunk_size: int = 1 << 20,
    parser: ZeekLogParser | None = None,
    on_rejection: Callable[[Rejection], None] | None = None,
) -> Iterator[ConnRecord]:
    """Records of a log one by one; see :func:`iter_record_batches`."""
    for batch in iter_record_batches(
        source, strict=strict, chunk_size=chunk_size, parser=parser, on_rejection=on_rejection
    ):
        yield from batch


def read_log(source: Source, **kwargs: Any) -> tuple[list[ConnRecord], ZeekLogParser]:
    """All records of a (small) log and the parser, whose counts and rejections say
    what was dropped."""
    parser = kwargs.pop("parser", None) or ZeekLogParser(source_name=_source_name(source))
    records = list(iter_records(source, parser=parser, **kwargs))
    return records, parser

