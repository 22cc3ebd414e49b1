"""The aggregator's update pool: pure logic with an injected clock.

Holds the newest update of each client with its submission count for the current
window (GSFS s_i), the total per client, replay detection over (sender, message id),
client liveness from their retained status and last will, the global version, and for
synchronous strategies the open round and its selected clients.  No I/O: the service
persists every change through ``cloud_aggregator.store`` and rebuilds the pool from it
after a restart (:meth:`UpdatePool.restore`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cloud_aggregator.strategies.base import PoolView, UpdateView
from gateway.protocol.errors import RejectReason, Rejection

Tensors = dict[str, np.ndarray]

@dataclass(frozen=True)
class PooledUpdate:
    sender: str
    message_id: str
    base_version: int
    round: int
    num_samples: int
    delta: Tensors
    received_at: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    submissions: int = 1  # uploads by sender in the current window, this one included
    wire_bytes: int = 0


@dataclass
class ClientInfo:
    online: bool = False
    status: dict[str, Any] = field(default_factory=dict)
    status_at: float | None = None  # when the last status arrived
    last_update_at: float | None = None
    total_submissions: int = 0
    window_submissions: int = 0


def parse_status(payload: bytes) -> tuple[bool, dict[str, Any]]:
    """A gateway's retained status JSON -> (online, fields).  Empty payload (a cleared
    retained message) or anything unreadable counts as offline."""
    if not payload:
        return False, {}
    try:
        obj = json.loads(bytes(payload[:65536]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False, {"error": "unreadable status"}
    if not isinstance(obj, dict):
        return False, {"error": "status is not an object"}
    state = obj.get("state")
    return isinstance(state, str) and state != "offline", obj


class UpdatePool:
    """Keyword-only settings (defaults in brackets):

    clock: callable returning seconds (injected; ``time.time`` in the service).
    version [0]: the current global version.
    replay_window [100000]: (sender, message id) pairs remembered for replay detection.
    silent_client_timeout_s [600]: a client that never published a status counts as
      alive for this long after its last update (status, when present, decides).
    """

    def __init__(self, *, clock: Callable[[], float], version: int = 0, replay_window: int = 100_000,
                 silent_client_timeout_s: float = 600.0):
        if version < 0 or replay_window < 1 or silent_client_timeout_s <= 0:
            raise ValueError("version >= 0, replay_window >= 1 and silent_client_timeout_s > 0 required")
        self._clock = clock
        self.version = int(version)
        self.replay_window = int(replay_window)
        self.silent_client_timeout_s = float(silent_client_timeout_s)
        self._updates: dict[str, PooledUpdate] = {}
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.clients: dict[str, ClientInfo] = {}
        self.window_opened_at: float | None = None
        self.round = 0
        self.selected: frozenset[str] = frozenset()
        self.round_opened_at: float | None = None

    # -- intake -------------------------------------------------------------------
    def is_replay(self, sender: str, message_id: str) -> bool:
        return (sender, message_id) in self._seen

    def _remember(self, sender: str, message_id: str) -> None:
        self._seen[(sender, message_id)] = None
        while len(self._seen) > self.replay_window:
            self._seen.popitem(last=False)

    def offer(self, update: PooledUpdate) -> PooledUpdate | Rejection:
        """Accept ``update`` as its sender's newest; returns it with its submission count,
        or a replay rejection.  (Staleness is checked earlier, by validation.)"""
        if self.is_replay(update.sender, update.message_id):
            return Rejection(RejectReason.REPLAY, f"{update.sender}/{update.message_id} already pooled")
        info = self.clients.setdefault(update.sender, ClientInfo())
        info.total_submissions += 1
        info.window_submissions += 1
        info.last_update_at = update.received_at
        stored = replace(update, submissions=info.window_submissions)
        self._updates[update.sender] = stored
        self._remember(update.sender, update.message_id)
        if self.window_opened_at is None:
            self.window_opened_at = update.received_at
        return stored

    def set_status(self, sender: str, online: bool, status: Mapping[str, Any] | None = None) -> None:
        info = self.clients.setdefault(sender, ClientInfo())
        info.online = bool(online)
        info.status = dict(status or {})
        info.status_at = self._clock()

    # -- views ----------------------------------------------------------------------
    def updates(self) -> list[PooledUpdate]:
        return sorted(self._updates.values(), key=lambda u: u.sender)

    def __len__(self) -> int:
        return len(self._updates)

    def live_clients(self) -> frozenset[str]:
        now = self._clock()
        live = set()
        for sender, info in self.clients.items():
            if info.status_at is not None:
                if info.online:
                    live.add(sender)
            elif info.last_update_at is not None and now - info.last_update_at <= self.silent_client_timeout_s:
                live.add(sender)
        return frozenset(live)

    def view(self) -> PoolView:
        synchronous_open = self.round > 0 and self.round_opened_at is not None
        return PoolView(
            updates=[
                UpdateView(sender=u.sender, delta=u.delta, num_samples=u.num_samples, base_version=u.base_version,
                           submissions=u.submissions, round=u.round, received_at=u.received_at,
                           metrics=dict(u.metrics))
                for u in self.updates()
            ],
            live_clients=self.live_clients(),
            version=self.version,
            now=self._clock(),
            opened_at=self.round_opened_at if synchronous_open else self.window_opened_at,
            round=self.round,
            selected=self.selected,
        )

    # -- transitions -------------------------------------------------------------------
    def start_round(self, round_number: int, selected: Iterable[str]) -> None:
        if round_number <= self.round:
            raise ValueError(f"round {round_number} does not follow round {self.round}")
        self.round = int(round_number)
        self.selected = frozenset(selected)
        self.round_opened_at = self._clock()

    def aggregated(self, senders: Iterable[str], new_version: int) -> None:
        """The updates of ``senders`` went into global version ``new_version``: drop them,
        reset their window counts; updates from others stay (GSFS keeps late ones)."""
        if new_version <= self.version:
            raise ValueError(f"version {new_version} does not follow {self.version}")
        for s in senders:
            self._updates.pop(s, None)
            if s in self.clients:
                self.clients[s].window_submissions = 0
        self.version = int(new_version)
        self.window_opened_at = min((u.received_at for u in self._updates.values()), default=None)
        self.round_opened_at = None
        self.selected = frozenset()

    def drop_updates(self, senders: Iterable[str]) -> None:
        """Discard pooled updates that can no longer be used (e.g. a closed round's)."""
        for s in senders:
            self._updates.pop(s, None)

    # -- persistence ---------------------------------------------------------------------
    def restore(self, *, version: int, updates: Iterable[PooledUpdate], clients: Mapping[str, ClientInfo],
                seen: Iterable[tuple[str, str]], round_number: int = 0, selected: Iterable[str] = (),
                round_opened_at: float | None = None, window_opened_at: float | None = None) -> None:
        self.version = int(version)
        self._updates = {u.sender: u for u in updates}
        self.clients = {k: replace(v) for k, v in clients.items()}  # copies: the caller keeps its own
        self._seen = OrderedDict((k, None) for k in seen)
        self.round = int(round_number)
        self.selected = frozenset(selected)
        self.round_opened_at = round_opened_at
        self.window_opened_at = window_opened_at if window_opened_at is not None else min(
            (u.received_at for u in self._updates.values()), default=None)
