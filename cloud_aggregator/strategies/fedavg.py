"""FedAvg: synchronous rounds, sample-count weighted average of the selected clients' deltas."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from cloud_aggregator.strategies.base import PoolView, Strategy, UpdateView


class FedAvg(Strategy):
    """Keyword-only settings (defaults in brackets):

    eta [1.0]: server learning rate on the averaged delta (1.0 = plain FedAvg).
    fraction [1.0]: share of live clients selected each round (at least ``min_updates``).
    min_updates [1]: fewest updates a round aggregates when its timeout passes.
    round_timeout_s [300]: a round closes with what arrived after this long.
    min_available [1]: a round opens only when at least this many clients are alive.
    """

    name = "fedavg"
    synchronous = True

    def __init__(self, *, eta: float = 1.0, fraction: float = 1.0, min_updates: int = 1,
                 round_timeout_s: float = 300.0, min_available: int = 1):
        super().__init__(eta=eta, min_updates=min_updates)
        if min_available < 1:
            raise ValueError("min_available must be >= 1")
        self.min_available = int(min_available)
        if not 0 < fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        if round_timeout_s <= 0:
            raise ValueError("round_timeout_s must be positive")
        self.fraction = float(fraction)
        self.round_timeout_s = float(round_timeout_s)

    def can_open_round(self, live_clients: frozenset[str]) -> bool:
        return len(live_clients) >= self.min_available

    def select(self, live_clients: Iterable[str], rng: np.random.Generator) -> frozenset[str]:
        """Clients asked to train this round (all of them when fraction = 1)."""
        live = sorted(live_clients)
        if not live:
            return frozenset()
        k = min(len(live), max(self.min_updates, math.ceil(self.fraction * len(live))))
        if k == len(live):
            return frozenset(live)
        return frozenset(rng.choice(live, size=k, replace=False).tolist())

    def eligible(self, view: PoolView) -> list[UpdateView]:
        return [u for u in view.updates if u.round == view.round and u.sender in view.selected]

    def should_aggregate(self, view: PoolView) -> bool:
        if view.round <= 0 or not view.selected:
            return False
        got = {u.sender for u in self.eligible(view)}
        waiting_for = (view.selected & view.live_clients) - got
        if got and not waiting_for:
            return True  # every selected client still alive has answered
        timed_out = view.opened_at is not None and view.now - view.opened_at >= self.round_timeout_s
        return timed_out and len(got) >= self.min_updates

    def control(self):
        return {"strategy": self.name}
