"""Lifecycle of a gateway's federated-learning client: an Enum and a transition table.

PURE. The client's worker thread is the only caller; every move goes through
:meth:`ClientLifecycle.fire`, which raises :class:`IllegalTransition` for a move the
table does not list, so a bug shows up as a typed error instead of a silent odd state.

::

    INIT --start--> WAITING_GLOBAL --global_received--> LOADING --global_loaded--> IDLE
    IDLE --train_start--> TRAINING --train_done--> IDLE
    TRAINING --global_received--> LOADING        (a newer global model preempts training)
    IDLE --global_received--> LOADING
    LOADING --global_rejected--> IDLE if a model was loaded before, else WAITING_GLOBAL
    any --stop--> STOPPED
"""

from __future__ import annotations

from enum import Enum


class ClientState(str, Enum):
    INIT = "init"
    WAITING_GLOBAL = "waiting_global"  # connected or not; no usable global model yet
    LOADING = "loading"  # verifying and loading a received global model
    IDLE = "idle"  # has a model; waits for a round (FedAvg/FedOpt) or budget (GSFS)
    TRAINING = "training"
    STOPPED = "stopped"


class ClientEvent(str, Enum):
    START = "start"
    GLOBAL_RECEIVED = "global_received"
    GLOBAL_LOADED = "global_loaded"
    GLOBAL_REJECTED = "global_rejected"
    TRAIN_START = "train_start"
    TRAIN_DONE = "train_done"
    STOP = "stop"


class IllegalTransition(RuntimeError):
    """A lifecycle move that the transition table does not allow."""

    def __init__(self, state: ClientState, event: ClientEvent):
        super().__init__(f"illegal client transition: {event.value!r} in state {state.value!r}")
        self.state = state
        self.event = event


S, E = ClientState, ClientEvent

TRANSITIONS: dict[tuple[ClientState, ClientEvent], ClientState] = {
    (S.INIT, E.START): S.WAITING_GLOBAL,
    (S.WAITING_GLOBAL, E.GLOBAL_RECEIVED): S.LOADING,
    (S.IDLE, E.GLOBAL_RECEIVED): S.LOADING,
    (S.TRAINING, E.GLOBAL_RECEIVED): S.LOADING,
    (S.LOADING, E.GLOBAL_LOADED): S.IDLE,
    # GLOBAL_REJECTED: IDLE or WAITING_GLOBAL, depending on history (see fire()).
    (S.IDLE, E.TRAIN_START): S.TRAINING,
    (S.TRAINING, E.TRAIN_DONE): S.IDLE,
    **{(state, E.STOP): S.STOPPED for state in ClientState if state is not S.STOPPED},
}


class ClientLifecycle:
    """The current state, and whether a global model was ever loaded (where a rejected
    model sends the client back to)."""

    def __init__(self, state: ClientState = ClientState.INIT):
        self.state = ClientState(state)
        self._has_model = False

    def can(self, event: ClientEvent) -> bool:
        if event is E.GLOBAL_REJECTED:
            return self.state is S.LOADING
        return (self.state, event) in TRANSITIONS

    def fire(self, event: ClientEvent) -> ClientState:
        event = ClientEvent(event)
        if event is E.GLOBAL_REJECTED:
            if self.state is not S.LOADING:
                raise IllegalTransition(self.state, event)
            # A rejected model changes nothing: back to waiting, or to IDLE if a model
            # was loaded before (training that was preempted is not resumed).
            new = S.IDLE if self._has_model else S.WAITING_GLOBAL
        else:
            try:
                new = TRANSITIONS[(self.state, event)]
            except KeyError:
                raise IllegalTransition(self.state, event) from None
        if event is E.GLOBAL_LOADED:
            self._has_model = True
        self.state = new
        return new
