"""The aggregator's update pool: pure logic with an injected clock.

Holds the newest update of each client (a re-upload replaces it) with its submission
count for the current window (GSFS s_i; with robust aggregation on, the default, it
adds no weight: one vote per gateway per window), the total per client, replay detection over (sender, message id),
client liveness from their retained status and last will, the global version, and for
synchronous strategies the open round and its selected clients.  No I/O: the service
persists every change through ``cloud_aggregator.store`` and rebuilds the pool from it
after a restart (:meth:`UpdatePool.restore`).
"""

from __future__ import annotations

import json
import math
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


MAX_STATUS_BYTES = 65536
MAX_STATUS_DEPTH = 4  # nesting kept (deeper values are dropped)
MAX_STATUS_ITEMS = 64  # keys of an object, items of a list (the rest are dropped)
MAX_STATUS_TEXT = 256  # characters of a string or key (longer ones are cut)
MAX_STATUS_NUMBER = 2**53  # larger magnitudes make the status unreadable


class _BadNumber(ValueError):
    pass


def _no_constant(name: str):
    raise _BadNumber(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v) or abs(v) > MAX_STATUS_NUMBER:
        raise _BadNumber(f"number {text[:20]} out of range")
    return v


def _bounded_int(text: str) -> int:
    if len(text) > 20 or abs(int(text)) > MAX_STATUS_NUMBER:
        raise _BadNumber(f"integer {text[:20]}... out of range")
    return int(text)


def _prune(value: Any, depth: int = 0) -> Any:
    """The status with its nesting, sizes and strings bounded (what is stored and shown)."""
    if isinstance(value, dict):
        if depth >= MAX_STATUS_DEPTH:
            return None
        return {str(k)[:MAX_STATUS_TEXT]: _prune(v, depth + 1) for k, v in list(value.items())[:MAX_STATUS_ITEMS]}
    if isinstance(value, list):
        if depth >= MAX_STATUS_DEPTH:
            return None
        return [_prune(v, depth + 1) for v in value[:MAX_STATUS_ITEMS]]
    if isinstance(value, str):
        return value[:MAX_STATUS_TEXT]
    return value  # bool, None, or a number already checked by the parser


def parse_status(payload: bytes) -> tuple[bool, dict[str, Any]] | Rejection:
    """A gateway's retained status JSON -> (online, fields), or a :class:`Rejection`
    when it is not readable: not UTF-8 JSON, not an object, too large, or holding NaN,
    Infinity or numbers beyond 2**53 (a JSON column on PostgreSQL refuses the first two;
    the page and /metrics could not show the last).  Nested junk is cut to bounds
    (depth, items, string length).  An empty payload (a cleared retained message) is
    offline."""
    if not payload:
        return False, {}
    if len(payload) > MAX_STATUS_BYTES:
        return Rejection(RejectReason.SCHEMA, f"status of {len(payload)} bytes (at most {MAX_STATUS_BYTES})")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float,
                         parse_int=_bounded_int)
    except _BadNumber as exc:
        return Rejection(RejectReason.SCHEMA, f"status: {exc}")
    except (UnicodeDecodeError, ValueError, RecursionError):
        return Rejection(RejectReason.SCHEMA, "status is not UTF-8 JSON")
    if not isinstance(obj, dict):
        return Rejection(RejectReason.SCHEMA, "status is not a JSON object")
    obj = _prune(obj)
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

    def refused(self, senders: Iterable[str]) -> None:
        """The updates of ``senders`` went into a candidate that was not published: drop
        them and reset their window counts; the version stays, an open round closes (a
        synchronous strategy opens the next one)."""
        for s in senders:
            self._updates.pop(s, None)
            if s in self.clients:
                self.clients[s].window_submissions = 0
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
