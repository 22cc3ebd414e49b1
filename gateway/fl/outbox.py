"""The durable outbox: updates wait in the ``outbox`` table until the broker acknowledged them.

Edge module: SQL through the store's repository functions, publishing through a
callable (the MQTT link's ``publish``), bookkeeping in :class:`gateway.fl.drain.OutboxDrain`.
Every method runs on the FL worker thread; paho's callbacks only enqueue the events
(connected, disconnected, acknowledged) that the worker then hands to this class.

A restart loses nothing: rows without ``acked_at`` are simply published again on the next
connection (the receiver de-duplicates by message id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from gateway.fl.drain import OutboxDrain
from gateway.store import repository as repo

log = logging.getLogger(__name__)

# publish(topic, payload, qos, retain) -> paho message id, or None if it was not handed over
Publisher = Callable[[str, bytes, int, bool], "int | None"]


class Outbox:
    def __init__(self, *, sessions: sessionmaker[Session], publish: Publisher, max_inflight: int = 16):
        self._sessions = sessions
        self._publish = publish
        self.drain_state = OutboxDrain(max_inflight=max_inflight)
        self.acked = 0
        self.refused = 0

    def put(self, topic: str, payload: bytes, *, qos: int = 1) -> int:
        """Store a message durably (committed before this returns); returns its row id."""
        with self._sessions.begin() as session:
            return repo.outbox_add(session, topic, payload, qos=qos)

    def on_connected(self) -> None:
        self.drain_state.on_connected()

    def on_disconnected(self) -> None:
        self.drain_state.on_disconnected()

    def pending(self) -> int:
        with self._sessions() as session:
            return len(repo.outbox_pending(session, limit=1_000_000))

    def drain(self) -> int:
        """Publish what may go now; returns how many messages were handed to MQTT."""
        if not self.drain_state.connected:
            return 0
        handed = 0
        with self._sessions.begin() as session:
            rows = repo.outbox_pending(session, limit=self.drain_state.max_inflight * 4)
            by_id = {r.id: r for r in rows}
            for row_id in self.drain_state.to_send(list(by_id)):
                row = by_id[row_id]
                try:
                    mid = self._publish(row.topic, row.payload, row.qos, row.retain)
                except Exception as exc:  # noqa: BLE001 - the row stays pending; logged
                    log.warning("outbox: publishing row %d failed: %s", row_id, exc)
                    repo.outbox_mark_attempt(session, row_id, error=str(exc)[:500])
                    continue
                repo.outbox_mark_attempt(session, row_id)
                if mid is None:
                    continue
                self.drain_state.sent(row_id, mid)
                handed += 1
        return handed

    def on_ack(self, mid: int, reason_code: int = 0, reason: str = "") -> int | None:
        """A PUBACK arrived: mark its row acknowledged (committed). Returns the row id."""
        result = self.drain_state.acked(mid, reason_code=reason_code, reason=reason)
        if result.error is not None:
            self.refused += 1
            log.warning("outbox: row %d: %s", result.outbox_id, result.error)
            with self._sessions.begin() as session:
                repo.outbox_mark_attempt(session, result.outbox_id, error=result.error)
            return None
        if result.outbox_id is None:
            return None
        with self._sessions.begin() as session:
            repo.outbox_mark_acked(session, result.outbox_id)
        self.acked += 1
        return result.outbox_id
