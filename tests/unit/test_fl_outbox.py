"""Outbox service over a real SQLite store: rows survive until acknowledged, restart resends."""

from __future__ import annotations

import pytest

from gateway.fl.outbox import Outbox
from gateway.store.db import open_store
from gateway.store import repository as repo


@pytest.fixture()
def sessions(tmp_path):
    engine, factory = open_store(f"sqlite:///{tmp_path / 'gw.db'}")
    yield factory
    engine.dispose()


class Recorder:
    """The publishing side as seen by the outbox: hands out message ids."""

    def __init__(self):
        self.sent: list[tuple[str, bytes, int]] = []
        self.fail_next = False

    def __call__(self, topic, payload, qos, retain):
        if self.fail_next:
            self.fail_next = False
            raise OSError("socket closed")
        self.sent.append((topic, payload, qos))
        return len(self.sent)


def test_put_drain_ack_cycle(sessions):
    pub = Recorder()
    ob = Outbox(sessions=sessions, publish=pub)
    a = ob.put("t/u", b"one")
    b = ob.put("t/u", b"two")
    assert ob.drain() == 0  # not connected
    ob.on_connected()
    assert ob.drain() == 2 and [p for _, p, _ in pub.sent] == [b"one", b"two"]
    assert ob.on_ack(1) == a
    assert ob.pending() == 1
    ob.on_disconnected()
    ob.on_connected()
    assert ob.drain() == 1 and pub.sent[-1][1] == b"two"  # resent after reconnect
    assert ob.on_ack(3) == b
    assert ob.on_ack(2) is None  # late ack of the first copy: nothing more to do
    assert ob.pending() == 0 and ob.acked == 2


def test_restart_resends_everything_unacked(sessions):
    first = Outbox(sessions=sessions, publish=Recorder())
    first.put("t/u", b"kept")
    first.on_connected()
    first.drain()  # handed over, never acknowledged: then the process dies
    pub = Recorder()
    second = Outbox(sessions=sessions, publish=pub)
    second.on_connected()
    assert second.drain() == 1 and pub.sent[0][1] == b"kept"
    second.on_ack(1)
    with sessions() as s:
        assert repo.outbox_pending(s) == []


def test_publish_error_and_broker_refusal_keep_the_row(sessions):
    pub = Recorder()
    ob = Outbox(sessions=sessions, publish=pub)
    row = ob.put("t/u", b"x")
    ob.on_connected()
    pub.fail_next = True
    assert ob.drain() == 0
    assert ob.drain() == 1  # retried on the next drain
    assert ob.on_ack(1, reason_code=0x97, reason="QuotaExceeded") is None
    with sessions() as s:
        (msg,) = repo.outbox_pending(s)
        assert msg.id == row and msg.attempts >= 2 and "0x97" in msg.last_error
