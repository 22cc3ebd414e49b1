"""Client lifecycle state machine: legal paths and typed errors for illegal moves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.fl.state import TRANSITIONS, ClientEvent, ClientLifecycle, ClientState, IllegalTransition

S, E = ClientState, ClientEvent


def test_normal_life():
    lc = ClientLifecycle()
    assert lc.state is S.INIT
    for ev, want in [
        (E.START, S.WAITING_GLOBAL),
        (E.GLOBAL_RECEIVED, S.LOADING),
        (E.GLOBAL_LOADED, S.IDLE),
        (E.TRAIN_START, S.TRAINING),
        (E.TRAIN_DONE, S.IDLE),
        (E.TRAIN_START, S.TRAINING),
        (E.GLOBAL_RECEIVED, S.LOADING),  # preempts training
        (E.GLOBAL_LOADED, S.IDLE),
        (E.STOP, S.STOPPED),
    ]:
        assert lc.fire(ev) is want


def test_rejected_global_returns_to_waiting_or_idle():
    lc = ClientLifecycle()
    lc.fire(E.START)
    lc.fire(E.GLOBAL_RECEIVED)
    assert lc.fire(E.GLOBAL_REJECTED) is S.WAITING_GLOBAL  # never had a model
    lc.fire(E.GLOBAL_RECEIVED)
    lc.fire(E.GLOBAL_LOADED)
    lc.fire(E.TRAIN_START)
    lc.fire(E.GLOBAL_RECEIVED)
    assert lc.fire(E.GLOBAL_REJECTED) is S.IDLE  # keeps the model it had


@pytest.mark.parametrize(
    "state,event",
    [
        (S.INIT, E.TRAIN_START),
        (S.WAITING_GLOBAL, E.TRAIN_START),
        (S.IDLE, E.TRAIN_DONE),
        (S.IDLE, E.GLOBAL_REJECTED),
        (S.TRAINING, E.TRAIN_START),
        (S.STOPPED, E.START),
        (S.STOPPED, E.STOP),
        (S.INIT, E.GLOBAL_LOADED),
    ],
)
def test_illegal_moves_raise_typed_error_and_keep_state(state, event):
    lc = ClientLifecycle(state)
    assert not lc.can(event)
    with pytest.raises(IllegalTransition) as err:
        lc.fire(event)
    assert err.value.state is state and err.value.event is event
    assert lc.state is state


def test_every_non_stopped_state_can_stop():
    for state in S:
        if state is not S.STOPPED:
            assert TRANSITIONS[(state, E.STOP)] is S.STOPPED


@given(st.lists(st.sampled_from(list(E)), max_size=40))
def test_random_event_sequences_never_reach_an_unlisted_state(events):
    lc = ClientLifecycle()
    for ev in events:
        before = lc.state
        if lc.can(ev):
            after = lc.fire(ev)
            if ev is not E.GLOBAL_REJECTED:
                assert TRANSITIONS[(before, ev)] is after
        else:
            with pytest.raises(IllegalTransition):
                lc.fire(ev)
            assert lc.state is before
