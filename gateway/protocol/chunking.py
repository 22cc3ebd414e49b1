"""Chunking of large payloads (brokers cap packet sizes; EMQX at 1 MB by default).

A message above ``max_chunk_bytes`` travels as numbered chunks::

    b"FGC1" | u16 big-endian header length | JSON {"id", "i", "n", "size", "digest"} | data

``id`` names the message, ``i``/``n`` are index and count, ``size`` and ``digest``
(sha256) describe the whole message, which the :class:`Reassembler` verifies before
handing it on.  Incomplete messages expire after ``timeout_s`` on the injected clock
(counted as ``incomplete_chunk`` by the receiver).  Pure: no I/O, no threads.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.protocol.errors import EnvelopeError, RejectReason

CHUNK_MAGIC = b"FGC1"
_LEN = struct.Struct(">H")
MAX_CHUNKS = 4096


@dataclass(frozen=True)
class Chunk:
    message_id: str
    index: int
    count: int
    size: int
    digest: str
    data: bytes


def is_chunk(data: bytes) -> bool:
    return bytes(data[:4]) == CHUNK_MAGIC


def split_message(data: bytes, *, max_chunk_bytes: int, message_id: str | None = None) -> list[bytes]:
    """``[data]`` when it fits, else the chunk frames (each at most ``max_chunk_bytes``)."""
    if max_chunk_bytes < 1024:
        raise ValueError("max_chunk_bytes must be at least 1024")
    if len(data) <= max_chunk_bytes:
        return [bytes(data)]
    message_id = message_id or uuid.uuid4().hex
    digest = hashlib.sha256(data).hexdigest()
    overhead = len(_chunk_header(message_id, MAX_CHUNKS, MAX_CHUNKS, len(data), digest)) + 6
    step = max_chunk_bytes - overhead
    count = math.ceil(len(data) / step)
    if count > MAX_CHUNKS:
        raise ValueError(f"message needs {count} chunks (> {MAX_CHUNKS}); raise max_chunk_bytes")
    frames = []
    for i in range(count):
        head = _chunk_header(message_id, i, count, len(data), digest)
        frames.append(CHUNK_MAGIC + _LEN.pack(len(head)) + head + data[i * step:(i + 1) * step])
    return frames


def _chunk_header(message_id: str, index: int, count: int, size: int, digest: str) -> bytes:
    return json.dumps(
        {"id": message_id, "i": index, "n": count, "size": size, "digest": digest},
        separators=(",", ":"), sort_keys=True,
    ).encode()


def parse_chunk(data: bytes) -> Chunk:
    """Parse one chunk frame; :class:`EnvelopeError` (schema) when malformed."""
    def bad(detail: str) -> EnvelopeError:
        return EnvelopeError(RejectReason.SCHEMA, f"bad chunk: {detail}")

    data = bytes(data)
    if not is_chunk(data) or len(data) < 6:
        raise bad("no chunk magic")
    (hlen,) = _LEN.unpack_from(data, 4)
    if 6 + hlen > len(data):
        raise bad("header length out of range")
    try:
        h = json.loads(data[6:6 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("header is not JSON") from None
    if not isinstance(h, dict) or set(h) != {"id", "i", "n", "size", "digest"}:
        raise bad("header fields")
    mid, i, n, size, digest = h["id"], h["i"], h["n"], h["size"], h["digest"]
    if not isinstance(mid, str) or not 1 <= len(mid) <= 64 or not mid.isascii():
        raise bad("message id")
    if any(type(x) is not int for x in (i, n, size)) or not (0 <= i < n <= MAX_CHUNKS) or size < 0:
        raise bad("index/count/size")
    if not isinstance(digest, str) or len(digest) != 64:
        raise bad("digest")
    return Chunk(mid, i, n, size, digest, data[6 + hlen:])


@dataclass
class _Pending:
    count: int
    size: int
    digest: str
    first_seen: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0


@dataclass(frozen=True)
class Expired:
    source: str
    message_id: str
    have: int
    count: int


class Reassembler:
    """Collects chunks per (source, message id); returns the verified whole message.

    clock: callable returning seconds (monotonic in production, fake in tests).
    timeout_s: an incomplete message older than this is dropped by :meth:`expire`.
    max_messages: incomplete messages held at once (oldest dropped beyond it).
    max_per_source: incomplete messages one source may hold (its own oldest is dropped
      beyond it, so one sender cannot push out the others' messages).
    max_message_bytes: a message announcing more than this is refused (oversize); the
      receiver sets it from the model it expects.  Memory held is at most
      max_messages x max_message_bytes.

    A chunk that disagrees with its message, or a message whose chunks overflow its
    announced size or fail its digest, drops the whole message (the caller deletes
    whatever it stored of it).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        timeout_s: float = 120.0,
        max_messages: int = 64,
        max_per_source: int | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ):
        if timeout_s <= 0 or max_messages < 1 or max_message_bytes < 1:
            raise ValueError("timeout_s, max_messages and max_message_bytes must be positive")
        if max_per_source is not None and max_per_source < 1:
            raise ValueError("max_per_source must be >= 1")
        self._clock = clock
        self.timeout_s = timeout_s
        self.max_messages = max_messages
        self.max_per_source = max_per_source or max_messages
        self.max_message_bytes = max_message_bytes
        self._pending: dict[tuple[str, str], _Pending] = {}
        # recently completed messages: a late duplicate chunk must not open a new one
        self._done: dict[tuple[str, str], None] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def pending_keys(self) -> list[tuple[str, str]]:
        return list(self._pending)

    def add(self, chunk: Chunk, *, source: str = "") -> tuple[bytes | None, list[Expired]]:
        """Add a chunk; returns (whole message or None, messages evicted to make room).

        Raises :class:`EnvelopeError` for a chunk inconsistent with earlier ones of the
        same message, an oversize announcement, or a whole message with a bad digest.
        """
        key = (source, chunk.message_id)
        if chunk.size > self.max_message_bytes:
            self._pending.pop(key, None)
            raise EnvelopeError(RejectReason.OVERSIZE, f"chunked message of {chunk.size} bytes announced "
                                                       f"(at most {self.max_message_bytes})")
        evicted: list[Expired] = []
        if key in self._done:
            return None, evicted
        pend = self._pending.get(key)
        if pend is None:
            evicted = self._make_room(source)
            pend = _Pending(chunk.count, chunk.size, chunk.digest, self._clock())
            self._pending[key] = pend
        elif (pend.count, pend.size, pend.digest) != (chunk.count, chunk.size, chunk.digest):
            del self._pending[key]
            raise EnvelopeError(RejectReason.SCHEMA, f"chunk {chunk.index} disagrees with message {chunk.message_id}")
        if chunk.index in pend.parts:
            return None, evicted  # redelivery of a chunk we hold: at-least-once, idempotent
        pend.received += len(chunk.data)
        if pend.received > pend.size:
            del self._pending[key]
            raise EnvelopeError(RejectReason.OVERSIZE, f"chunks of {chunk.message_id} exceed announced size")
        pend.parts[chunk.index] = chunk.data
        if len(pend.parts) < pend.count:
            return None, evicted
        del self._pending[key]
        self._done[key] = None
        if len(self._done) > 1024:
            self._done.pop(next(iter(self._done)))
        whole = b"".join(pend.parts[i] for i in range(pend.count))
        if len(whole) != pend.size or hashlib.sha256(whole).hexdigest() != pend.digest:
            raise EnvelopeError(RejectReason.DIGEST, f"reassembled {chunk.message_id} fails its digest")
        return whole, evicted

    def _make_room(self, source: str) -> list[Expired]:
        """Drop the source's own oldest messages beyond ``max_per_source``, then the
        oldest of all beyond ``max_messages``: room for one more."""
        evicted = []
        while True:
            mine = [k for k in self._pending if k[0] == source]
            if len(mine) >= self.max_per_source:
                pool = mine
            elif len(self._pending) >= self.max_messages:
                pool = list(self._pending)
            else:
                return evicted
            old_key = min(pool, key=lambda k: self._pending[k].first_seen)
            old = self._pending.pop(old_key)
            evicted.append(Expired(old_key[0], old_key[1], len(old.parts), old.count))

    def expire(self) -> list[Expired]:
        """Drop incomplete messages older than ``timeout_s``; return what was dropped."""
        now = self._clock()
        gone = [k for k, p in self._pending.items() if now - p.first_seen > self.timeout_s]
        out = []
        for k in gone:
            p = self._pending.pop(k)
            out.append(Expired(k[0], k[1], len(p.parts), p.count))
        return out

    def restore(self, chunks: Iterable[tuple[str, Chunk, float]]) -> set[tuple[str, str]]:
        """Reload held chunks (source, chunk, first_seen), oldest first, after a restart,
        within the same bounds as :meth:`add`: a message beyond the caps, announcing more
        than ``max_message_bytes``, inconsistent or expired is not held.  Returns the
        (source, message id) of what was not held (the caller deletes its rows)."""
        dropped: set[tuple[str, str]] = set()
        now = self._clock()
        for source, chunk, first_seen in chunks:
            key = (source, chunk.message_id)
            if key in dropped:
                continue
            pend = self._pending.get(key)
            if pend is None:
                mine = sum(1 for k in self._pending if k[0] == source)
                if (chunk.size > self.max_message_bytes or now - first_seen > self.timeout_s
                        or mine >= self.max_per_source or len(self._pending) >= self.max_messages):
                    dropped.add(key)
                    continue
                pend = self._pending[key] = _Pending(chunk.count, chunk.size, chunk.digest, first_seen)
            if (pend.count, pend.size, pend.digest) != (chunk.count, chunk.size, chunk.digest) or (
                    chunk.index not in pend.parts and pend.received + len(chunk.data) > pend.size):
                del self._pending[key]
                dropped.add(key)
                continue
            if chunk.index not in pend.parts:
                pend.parts[chunk.index] = chunk.data
                pend.received += len(chunk.data)
        return dropped
