"""The pure update pool: newest per client, submission counts, replay, liveness, rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cloud_aggregator.pool import PooledUpdate, UpdatePool, parse_status
from gateway.protocol.errors import RejectReason, Rejection


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def pu(sender: str, mid: str, *, base: int = 0, at: float = 1000.0, value: float = 1.0, rnd: int = 0) -> PooledUpdate:
    return PooledUpdate(sender=sender, message_id=mid, base_version=base, round=rnd, num_samples=5,
                        delta={"w": np.full(2, value, np.float32)}, received_at=at)


def test_newest_update_per_client_with_submission_counts():
    clock = Clock()
    pool = UpdatePool(clock=clock)
    assert pool.offer(pu("a", "1", value=1)).submissions == 1
    second = pool.offer(pu("a", "2", value=2))
    assert second.submissions == 2
    pool.offer(pu("b", "1"))
    assert [u.sender for u in pool.updates()] == ["a", "b"]
    assert pool.updates()[0].delta["w"][0] == 2  # the newest replaces the older
    assert pool.clients["a"].total_submissions == 2


def test_replay_is_rejected_and_not_counted():
    pool = UpdatePool(clock=Clock())
    pool.offer(pu("a", "x"))
    again = pool.offer(pu("a", "x"))
    assert isinstance(again, Rejection) and again.reason is RejectReason.REPLAY
    assert pool.clients["a"].total_submissions == 1
    assert not pool.is_replay("b", "x")  # keyed by (sender, id)


def test_replay_window_is_bounded():
    pool = UpdatePool(clock=Clock(), replay_window=2)
    for i in range(3):
        pool.offer(pu("a", str(i)))
    assert not pool.is_replay("a", "0") and pool.is_replay("a", "2")


def test_liveness_from_status_and_silent_clients():
    clock = Clock(1000)
    pool = UpdatePool(clock=clock, silent_client_timeout_s=60)
    pool.set_status("a", True)
    pool.set_status("b", True)
    pool.offer(pu("c", "1", at=1000))  # never sent a status: alive while recent
    assert pool.live_clients() == {"a", "b", "c"}
    pool.set_status("b", False)  # last will
    clock.t = 1100
    assert pool.live_clients() == {"a"}


def test_parse_status_payloads():
    assert parse_status(json.dumps({"state": "online"}).encode())[0] is True
    assert parse_status(json.dumps({"state": "offline"}).encode())[0] is False
    assert parse_status(b"")[0] is False  # cleared retained status
    for junk in (b"\xff\xfe", b"[1,2]", b'{"state": "online", "flows": NaN}', b'{"state": "online", "x": Infinity}',
                 b'{"state": "online", "flows": 1e400}', b'{"flows": ' + b"9" * 400 + b"}", b"{" * 100000):
        assert isinstance(parse_status(junk), Rejection), junk[:40]
    deep = json.dumps({"state": "online", "a": [[[[[["deep"]]]]]], "s": "x" * 10000,
                       "m": {str(i): i for i in range(500)}}).encode()
    online, st = parse_status(deep)
    assert online and st["a"] == [[[None]]] and len(st["s"]) == 256 and len(st["m"]) == 64


def test_aggregated_clears_used_updates_and_resets_windows():
    clock = Clock(1000)
    pool = UpdatePool(clock=clock)
    pool.offer(pu("a", "1", at=1000))
    pool.offer(pu("a", "2", at=1001))
    pool.offer(pu("b", "1", at=1002))
    assert pool.view().opened_at == 1000
    pool.aggregated(["a"], 1)
    assert pool.version == 1 and [u.sender for u in pool.updates()] == ["b"]
    assert pool.clients["a"].window_submissions == 0 and pool.clients["a"].total_submissions == 2
    assert pool.view().opened_at == 1002  # window now starts at the oldest remaining update
    assert pool.offer(pu("a", "3")).submissions == 1
    with pytest.raises(ValueError):
        pool.aggregated(["b"], 1)  # versions only move forward


def test_rounds_and_view():
    clock = Clock(50)
    pool = UpdatePool(clock=clock, version=3)
    pool.start_round(1, ["a", "b"])
    view = pool.view()
    assert (view.round, view.selected, view.opened_at, view.version) == (1, {"a", "b"}, 50, 3)
    with pytest.raises(ValueError):
        pool.start_round(1, ["a"])


def test_restore_rebuilds_the_same_pool():
    clock = Clock()
    pool = UpdatePool(clock=clock)
    pool.set_status("a", True)
    pool.offer(pu("a", "1"))
    again = UpdatePool(clock=clock)
    again.restore(version=pool.version, updates=pool.updates(), clients=pool.clients, seen=[("a", "1")])
    assert again.is_replay("a", "1") and again.live_clients() == {"a"} and len(again) == 1


def test_invalid_settings():
    with pytest.raises(ValueError):
        UpdatePool(clock=Clock(), replay_window=0)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ops = st.lists(st.one_of(
    st.tuples(st.just("offer"), st.sampled_from("abcd"), st.integers(0, 5)),
    st.tuples(st.just("status"), st.sampled_from("abcd"), st.booleans()),
    st.tuples(st.just("aggregate"), st.sets(st.sampled_from("abcd")), st.just(0)),
), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_pool_invariants_under_any_sequence(sequence):
    clock = Clock()
    pool = UpdatePool(clock=clock)
    accepted: dict[str, int] = {}
    window: dict[str, int] = {}
    for op, who, arg in sequence:
        clock.t += 1
        if op == "offer":
            result = pool.offer(pu(who, f"m{arg}", at=clock.t))
            if isinstance(result, Rejection):
                assert result.reason is RejectReason.REPLAY
            else:
                accepted[who] = accepted.get(who, 0) + 1
                window[who] = window.get(who, 0) + 1
                assert result.submissions == window[who]
        elif op == "status":
            pool.set_status(who, arg)
        else:
            pool.aggregated(sorted(who), pool.version + 1)
            for s in who:
                window[s] = 0
        # invariants
        senders = [u.sender for u in pool.updates()]
        assert len(senders) == len(set(senders))  # one (the newest) update per client
        assert {k: c.total_submissions for k, c in pool.clients.items() if c.total_submissions} == {
            k: v for k, v in accepted.items() if v}
        for u in pool.updates():
            assert u.submissions == window[u.sender] > 0
        assert pool.live_clients() <= set(pool.clients)
