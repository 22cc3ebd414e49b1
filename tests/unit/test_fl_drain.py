"""Outbox drain bookkeeping: publish only when connected, resend after reconnect, clear on ack."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.fl.drain import OutboxDrain


def test_nothing_sent_while_disconnected():
    d = OutboxDrain()
    assert d.to_send([1, 2, 3]) == []


def test_send_ack_clears_row_once():
    d = OutboxDrain()
    d.on_connected()
    assert d.to_send([1, 2]) == [1, 2]
    d.sent(1, mid=10)
    d.sent(2, mid=11)
    assert d.to_send([1, 2]) == []  # already out on this connection
    assert d.acked(10).outbox_id == 1
    assert d.acked(10).outbox_id is None  # duplicate ack
    assert d.acked(99).outbox_id is None  # unknown mid
    assert d.inflight == 1


def test_reconnect_resends_unacked_and_first_ack_of_any_copy_wins():
    d = OutboxDrain()
    d.on_connected()
    d.sent(1, mid=1)
    d.sent(2, mid=2)
    d.acked(1)
    d.on_disconnected()
    assert d.to_send([2]) == []
    d.on_connected()
    assert d.to_send([2, 3]) == [2, 3]  # 2 again (its ack was lost), 3 new
    d.sent(2, mid=5)
    d.sent(3, mid=6)
    assert d.acked(2).outbox_id == 2  # late ack of the old copy clears the row
    assert d.acked(5).outbox_id is None  # the second copy's ack changes nothing
    assert d.acked(6).outbox_id == 3


def test_max_inflight_limits_each_batch():
    d = OutboxDrain(max_inflight=2)
    d.on_connected()
    assert d.to_send([1, 2, 3, 4]) == [1, 2]
    d.sent(1, 1)
    d.sent(2, 2)
    assert d.to_send([1, 2, 3, 4]) == []
    d.acked(1)
    assert d.to_send([2, 3, 4]) == [3]


def test_negative_ack_keeps_row_pending_until_next_connection():
    d = OutboxDrain()
    d.on_connected()
    d.sent(7, mid=1)
    res = d.acked(1, reason_code=0x97, reason="QuotaExceeded")
    assert res.outbox_id == 7 and "0x97" in res.error
    assert d.to_send([7]) == []  # not retried in a tight loop
    assert d.inflight == 0
    d.on_disconnected()
    d.on_connected()
    assert d.to_send([7]) == [7]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_max_inflight_validated(bad):
    with pytest.raises(ValueError):
        OutboxDrain(max_inflight=bad)


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add")),
            st.tuples(st.just("drain")),
            st.tuples(st.just("ack"), st.integers(0, 30)),
            st.tuples(st.just("disconnect")),
            st.tuples(st.just("connect")),
        ),
        max_size=60,
    )
)
def test_every_row_eventually_acked_exactly_once(ops):
    """Random interleavings; at the end a clean connection drains everything and no row
    is ever reported acknowledged twice."""
    d = OutboxDrain(max_inflight=3)
    pending: list[int] = []
    acked: list[int] = []
    next_row, next_mid = 1, 1
    outstanding: list[int] = []
    for op in ops:
        if op[0] == "add":
            pending.append(next_row)
            next_row += 1
        elif op[0] == "drain":
            for row in d.to_send(list(pending)):
                d.sent(row, next_mid)
                outstanding.append(next_mid)
                next_mid += 1
        elif op[0] == "ack" and outstanding:
            mid = outstanding.pop(op[1] % len(outstanding))
            res = d.acked(mid)
            if res.outbox_id is not None:
                acked.append(res.outbox_id)
                pending.remove(res.outbox_id)
        elif op[0] == "disconnect":
            d.on_disconnected()
            outstanding.clear()  # acks of the old connection are lost
        elif op[0] == "connect":
            d.on_connected()
    d.on_disconnected()
    d.on_connected()
    outstanding.clear()
    while pending:
        batch = d.to_send(list(pending))
        assert batch
        for row in batch:
            d.sent(row, next_mid)
            res = d.acked(next_mid)
            next_mid += 1
            acked.append(res.outbox_id)
            pending.remove(row)
    assert len(acked) == len(set(acked)) == next_row - 1
