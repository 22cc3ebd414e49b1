"""IP fragment reassembly with bounded memory and O(log n) cost per fragment.

Incomplete datagrams are kept per (version, src, dst, id, protocol) key.  A heap ordered
by the time of each datagram's first fragment finds the oldest one in O(log n): it is
dropped when the table is full (``fragment_buffer_overflow``) and, while more than
:data:`EXPIRY_FLOOR` datagrams wait, every one older than the timeout is dropped
(``fragment_timeout``; Zeek's own ``frag_timeout`` is unset by default, so a handful of
stragglers may wait for their missing fragments indefinitely).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

MAX_DATAGRAM = 65535 + 40  # largest IPv4 total length / IPv6 payload + header
EXPIRY_FLOOR = 64  # below this many waiting datagrams nothing times out
HEAP_SLACK = 1024  # the heap is rebuilt when dead entries outnumber live ones by this


class _Datagram:
    __slots__ = ("blocks", "total", "first_ts", "header", "seq")

    def __init__(self, ts: float, seq: int):
        self.blocks: dict[int, bytes] = {}
        self.total: int | None = None
        self.first_ts = ts
        self.header = b""
        self.seq = seq


class FragmentTable:
    """Reassembles fragments into whole datagrams.

    :meth:`add` returns ``(header, payload)`` when a datagram is complete, ``None`` while
    it is not, or a reason string when the fragment is inconsistent (the datagram is
    dropped).  ``count(reason)`` is told of every dropped datagram."""

    def __init__(self, *, max_buffers: int, timeout: float, count: Callable[[str], object]):
        if max_buffers < 1:
            raise ValueError("max_fragment_buffers must be >= 1")
        if timeout <= 0:
            raise ValueError("fragment_timeout must be > 0")
        self.max_buffers = max_buffers
        self.timeout = timeout
        self._count = count
        self._table: dict[tuple, _Datagram] = {}
        self._oldest: list[tuple[float, int, tuple]] = []  # (first_ts, seq, key)
        self._seq = 0

    def __len__(self) -> int:
        return len(self._table)

    def add(self, key: tuple, frag_off: int, more: bool, data: bytes, header: bytes, ts: float):
        table = self._table
        if len(table) > EXPIRY_FLOOR:
            self._expire(ts - self.timeout)
        buf = table.get(key)
        if buf is None:
            if len(table) >= self.max_buffers:
                self._drop_oldest("fragment_buffer_overflow", None)
            self._seq += 1
            buf = table[key] = _Datagram(ts, self._seq)
            heapq.heappush(self._oldest, (ts, self._seq, key))
            if len(self._oldest) > 2 * len(table) + HEAP_SLACK:
                self._oldest = [(b.first_ts, b.seq, k) for k, b in table.items()]
                heapq.heapify(self._oldest)
        if frag_off + len(data) > MAX_DATAGRAM:
            del table[key]
            return "excessively_large_fragment"
        if frag_off == 0:
            buf.header = header
        if not more:
            if buf.total is not None and buf.total != frag_off + len(data):
                del table[key]
                return "fragment_inconsistency"
            buf.total = frag_off + len(data)
        elif len(data) % 8:
            del table[key]
            return "fragment_size_inconsistency"
        prev = buf.blocks.get(frag_off)
        if prev is not None and prev != data:
            self._count("fragment_overlap")
        buf.blocks[frag_off] = data
        if buf.total is None or not buf.header:
            return None
        # complete when blocks cover [0, total) contiguously
        pos = 0
        parts = []
        for start in sorted(buf.blocks):
            block = buf.blocks[start]
            if start > pos:
                return None
            if start + len(block) > pos:
                parts.append(block[pos - start:])
                pos = start + len(block)
        if pos < buf.total:
            return None
        del table[key]
        return buf.header, b"".join(parts)[:buf.total]

    def _live_top(self):
        """The heap's first entry whose datagram is still waiting (dead ones popped)."""
        heap, table = self._oldest, self._table
        while heap:
            first_ts, seq, key = heap[0]
            buf = table.get(key)
            if buf is not None and buf.seq == seq:
                return first_ts, key
            heapq.heappop(heap)
        return None

    def _drop_oldest(self, reason: str, before: float | None) -> bool:
        top = self._live_top()
        if top is None or (before is not None and not top[0] < before):
            return False
        heapq.heappop(self._oldest)
        del self._table[top[1]]
        self._count(reason)
        return True

    def _expire(self, before: float) -> None:
        while self._drop_oldest("fragment_timeout", before):
            pass
