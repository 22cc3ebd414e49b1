"""Which outbox rows to hand to MQTT now, and which row a broker acknowledgement clears.

PURE bookkeeping for the durable outbox (DESIGN.md, "Reliability"): an update stays in
the outbox table until the broker acknowledged it (QoS 1 PUBACK, paho's ``on_publish``
with the message id). This class maps paho message ids to outbox row ids per
connection; the edge code (:mod:`gateway.fl.outbox`) does the SQL and the publishing.

Rules:

* nothing is published while disconnected (paho would queue it in memory, where a
  restart loses it, and the reconnect resend would duplicate ours);
* after every (re)connect each unacknowledged row is published again, once per
  connection, because a PUBACK lost with the old connection never arrives;
* at most ``max_inflight`` rows are outstanding at a time (memory and broker quota);
* an acknowledgement for any copy of a row clears the row (the first one wins); later
  acknowledgements of other copies are ignored;
* a negative acknowledgement (reason code >= 0x80) leaves the row pending with the
  error recorded; it is retried on the next connection, not in a tight loop.

The receiver de-duplicates (at-least-once delivery, idempotent receiver).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class AckResult:
    """Outcome of a broker acknowledgement for one message id."""

    outbox_id: int | None  # the row it cleared (or that was refused), None if unknown
    error: str | None = None  # set on a negative acknowledgement: the row stays pending


class OutboxDrain:
    def __init__(self, *, max_inflight: int = 16):
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
            raise ValueError(f"max_inflight must be an integer >= 1, got {max_inflight!r}")
        self.max_inflight = max_inflight
        self.connected = False
        self._mid_to_row: dict[int, int] = {}
        self._sent_this_connection: set[int] = set()
        self._failed_this_connection: set[int] = set()
        self._done: set[int] = set()

    # -- connection ---------------------------------------------------------------
    def on_connected(self) -> None:
        self.connected = True
        self._sent_this_connection.clear()
        self._failed_this_connection.clear()

    def on_disconnected(self) -> None:
        self.connected = False

    # -- sending ------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        """Rows published on this connection and not yet acknowledged."""
        return len(self._sent_this_connection - self._done - self._failed_this_connection)

    def to_send(self, pending_ids: Iterable[int]) -> list[int]:
        """Of the rows still pending in the table (oldest first), those to publish now."""
        if not self.connected:
            return []
        room = self.max_inflight - self.inflight
        out: list[int] = []
        for row in pending_ids:
            if room <= 0:
                break
            if row in self._done or row in self._sent_this_connection:
                continue
            out.append(row)
            room -= 1
        return out

    def sent(self, outbox_id: int, mid: int) -> None:
        """Record that row ``outbox_id`` went to paho as message ``mid``."""
        self._mid_to_row[mid] = outbox_id
        self._sent_this_connection.add(outbox_id)

    # -- acknowledgements ---------------------------------------------------------------
    def acked(self, mid: int, *, reason_code: int = 0, reason: str = "") -> AckResult:
        row = self._mid_to_row.pop(mid, None)
        if row is None or row in self._done:
            return AckResult(None)
        if reason_code >= 0x80:
            self._failed_this_connection.add(row)
            return AckResult(row, error=f"broker refused (reason {reason_code:#x} {reason})".strip())
        self._done.add(row)
        # forget other in-flight copies of the same row
        for other in [m for m, r in self._mid_to_row.items() if r == row]:
            del self._mid_to_row[other]
        return AckResult(row)

    def forget(self, outbox_ids: Iterable[int]) -> None:
        """Rows deleted or pruned from the table: drop them from the done-set."""
        for row in outbox_ids:
            self._done.discard(row)
