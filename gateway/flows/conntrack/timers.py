"""Zeek's connection timeouts and the timer queue that fires them in packet time.

Timeouts are those of ``scripts/base/init-bare.zeek`` (seconds).  Timers are kept in a
binary heap ordered by (due time, arming order); a connection's timer that fires after
the connection was removed is skipped.  What each kind does is in the tracker
(inactivity, delete, reset, DNS) and in :mod:`.tcp` (attempt, expire).
"""

from __future__ import annotations

import heapq

TCP_ATTEMPT_DELAY = 5.0
TCP_CLOSE_DELAY = 5.0
TCP_RESET_DELAY = 5.0
TCP_SYN_TIMEOUT = 5.0
TCP_SESSION_TIMER = 6.0
TCP_CONNECTION_LINGER = 5.0
TCP_INACTIVITY = 300.0
UDP_INACTIVITY = 60.0
ICMP_INACTIVITY = 60.0
UNKNOWN_INACTIVITY = 60.0
DNS_SESSION_TIMEOUT = 10.0  # dns_session_timeout: UDP DNS sessions end sooner

# timer kinds
INACTIVITY, ATTEMPT, DELETE, EXPIRE, RESET, DNS = 0, 1, 2, 3, 4, 5


class TimerQueue:
    """Timers as ``(when, arming order, kind, connection)`` in a heap."""

    __slots__ = ("heap", "armed")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int, object]] = []
        self.armed = 0

    def __len__(self) -> int:
        return len(self.heap)

    def push(self, when: float, kind: int, conn) -> None:
        self.armed += 1
        heapq.heappush(self.heap, (when, self.armed, kind, conn))

    def due(self, t: float) -> bool:
        return bool(self.heap) and self.heap[0][0] <= t

    def pop(self) -> tuple[float, int, int, object]:
        return heapq.heappop(self.heap)

    def clear(self) -> None:
        self.heap.clear()
