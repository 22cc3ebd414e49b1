"""gzip, found by its magic bytes and undone as a stream: the one home for it.

Zeek archives rotated logs as ``.gz`` and captures are often shipped gzip'd, so every
reader of the project (Zeek logs, captures, the tail, ingest) sniffs and opens through
here.  Decompression is incremental and bounded: no step yields more than
:data:`STEP` bytes, so a small file that inflates to gigabytes (a gzip bomb) is read as a
stream like any other.  Concatenated members (``cat a.gz b.gz``) and zero padding after
the last member are accepted, as gzip(1) does.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
STEP = 1 << 20  # most bytes one decompression step yields


class GzipError(ValueError):
    """A gzip stream is corrupt or cut short (what it held up to there was delivered)."""


def is_gzip(head: bytes) -> bool:
    """True if ``head`` (a file's first bytes) starts a gzip stream."""
    return head[:2] == GZIP_MAGIC


def content_head(head: bytes, n: int = 64) -> bytes:
    """The first ``n`` bytes of what ``head`` holds: decompressed when it is gzip (as far
    as ``head`` goes; ``b""`` if that is not valid gzip), else ``head`` itself."""
    if not is_gzip(head):
        return head[:n]
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, n)
    except zlib.error:
        return b""


class _Inflater:
    """Compressed bytes in, decompressed pieces (each at most :data:`STEP`) out."""

    __slots__ = ("member",)

    def __init__(self) -> None:
        self.member = None  # the decompressor of the gzip member in progress

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """Decompress ``data`` (after what is pending); raises :class:`GzipError`."""
        while True:
            if self.member is None:
                if not data.strip(b"\x00"):  # nothing left, or zero padding after the last member
                    return
                self.member = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                out = self.member.decompress(data, STEP)
            except zlib.error as exc:
                raise GzipError(f"corrupt gzip: {exc}") from None
            if out:
                yield out
            if self.member.eof:
                data, self.member = self.member.unused_data, None
                continue
            data = self.member.unconsumed_tail
            if not data and len(out) < STEP:  # (a full step may leave output pending)
                return

    def finish(self) -> Iterator[bytes]:
        """End of input: the last bytes, then :class:`GzipError` if a member is unfinished."""
        if self.member is None:
            return
        tail = self.member.flush()
        self.member = None
        if tail:
            yield tail
        raise GzipError("truncated gzip: ended before its end-of-stream marker")


def gunzip_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """A stream of chunks, decompressed if it is gzip (several members allowed), else
    passed through.  A corrupt or cut gzip raises :class:`GzipError` after yielding what
    came before the fault."""
    first = next(chunks, b"")
    while len(first) < 2:
        more = next(chunks, None)
        if more is None:
            break
        first += more
    if not is_gzip(first):
        if first:
            yield first
        yield from chunks
        return
    inflater = _Inflater()
    yield from inflater.pieces(first)
    for data in chunks:
        yield from inflater.pieces(data)
    yield from inflater.finish()


class GunzipReader:
    """A read-only binary stream over a gzip'd one that keeps what it could decompress
    when the input is cut short or corrupt: reads then end early, and ``truncated`` and
    ``error`` say why (``GzipFile.read`` would raise and lose the last chunk).  ``tell``
    and forward ``seek`` count decompressed bytes."""

    def __init__(self, raw: BinaryIO, *, chunk: int = STEP):
        self.fileobj = raw  # as GzipFile names it: the compressed file (for its position)
        self.name = getattr(raw, "name", None)
        self._chunk = chunk
        self._inflater = _Inflater()
        self._buf = b""
        self._pos = 0  # decompressed bytes handed out
        self._done = False
        self.truncated = False
        self.error: str | None = None

    def _fill(self, n: int) -> None:
        while len(self._buf) < n and not self._done:
            data = self._raw_read()
            try:
                if not data:
                    self._done = True
                    for piece in self._inflater.finish():
                        self._buf += piece
                    break
                for piece in self._inflater.pieces(data):
                    self._buf += piece
            except GzipError as exc:
                self._done = True
                self.truncated = True
                self.error = str(exc)

    def _raw_read(self) -> bytes:
        try:
            return self.fileobj.read(self._chunk)
        except OSError as exc:
            self.error = f"read failed: {exc}"
            return b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while not self._done:
                self._fill(len(self._buf) + STEP)
            out, self._buf = self._buf, b""
        else:
            self._fill(n)
            out, self._buf = self._buf[:n], self._buf[n:]
        self._pos += len(out)
        return out

    def read1(self, n: int = -1) -> bytes:
        """What is buffered, or one decompression step's worth."""
        if not self._buf:
            self._fill(1)
        n = len(self._buf) if n is None or n < 0 else n
        out, self._buf = self._buf[:n], self._buf[n:]
        self._pos += len(out)
        return out

    def peek(self, n: int = 1) -> bytes:
        self._fill(n)
        return self._buf[:max(n, 1)]

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        if whence not in (0, 1) or pos < self._pos:
            raise OSError("a gzip stream seeks forward only")
        while self._pos < pos:
            if not self.read(min(pos - self._pos, STEP)):
                break
        return self._pos

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.fileobj.close()

    def __enter__(self) -> GunzipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peek(fileobj, n: int) -> bytes:
    """The next ``n`` bytes of ``fileobj`` without consuming them (peek, or tell/seek)."""
    if hasattr(fileobj, "peek"):
        try:
            return fileobj.peek(n)[:n]
        except (OSError, ValueError):
            pass
    pos = fileobj.tell()
    head = fileobj.read(n)
    fileobj.seek(pos)
    return head


def open_stream(fileobj: BinaryIO) -> BinaryIO:
    """``fileobj`` itself, or a :class:`GunzipReader` over it when it starts with gzip."""
    if is_gzip(peek(fileobj, 2)):
        return GunzipReader(fileobj)  # type: ignore[return-value]
    return fileobj


def open_path(path: str | os.PathLike) -> BinaryIO:
    """Open a file for binary reading, gzip (by its magic bytes) undone transparently.

    A gzip'd file comes back as a :class:`gzip.GzipFile` (it seeks both ways, which a
    resumed read needs); reading it past a cut raises ``EOFError`` there."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if is_gzip(magic):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115 - returned to the caller
