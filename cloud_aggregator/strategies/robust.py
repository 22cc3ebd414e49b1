"""Robust aggregation around any strategy (on by default: :class:`RobustSettings`).

Before the inner strategy weighs anything (:meth:`RobustAggregation.prepare`):

1. one vote per gateway per window: the pool already keeps only a gateway's newest
   update; its submission count (GSFS's s_i) is taken as 1, so re-uploads add no weight;
2. self-reported sample counts are clipped to ``sample_multiple`` x the median count of
   the known gateways (and to ``max_samples``);
3. each delta is clipped to ``norm_multiple`` x the median norm of the window and of
   the recently accepted updates (and to ``norm_bound``).

Then the inner strategy's client weights (of the bounded updates) go to the combiner:
the weighted mean (default), weighted trimmed mean, weighted coordinate median or Multi-Krum
(:mod:`cloud_aggregator.strategies.aggregate` holds the maths).  The service checks the
resulting candidate (finite, step norm against recent versions) before it signs it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from cloud_aggregator.safety import RobustSettings
from cloud_aggregator.strategies import aggregate as agg
from cloud_aggregator.strategies.base import Strategy, StrategyState, StrategyWrapper


class RobustAggregation(StrategyWrapper):
    """``inner`` with the bounds and combiner of ``settings`` (see :class:`RobustSettings`)."""

    def __init__(self, inner: Strategy, settings: RobustSettings | Mapping[str, Any] | None = None):
        super().__init__(inner)
        if settings is None:
            settings = RobustSettings()
        elif not isinstance(settings, RobustSettings):
            settings = RobustSettings.from_mapping(settings)
        self.settings = settings

    def prepare(self, updates, state: StrategyState):
        updates, state, info = self.inner.prepare(updates, state)
        cfg = self.settings
        if not cfg.enabled or not updates:
            return updates, state, info
        received = {u.sender: round(agg.global_norm(u.delta), 6) for u in updates}
        if cfg.one_vote:
            updates = [replace(u, submissions=1) for u in updates]
        # 2. sample counts, against everyone's newest (clipped) count
        window = {u.sender for u in updates}
        others = [n for s, n in state.client_samples if s not in window]
        clipped = agg.clip_samples([u.num_samples for u in updates], reference=others,
                                   multiple=cfg.sample_multiple, maximum=cfg.max_samples)
        samples_clipped = {u.sender: [u.num_samples, n] for u, n in zip(updates, clipped) if n != u.num_samples}
        updates = [replace(u, num_samples=n) for u, n in zip(updates, clipped)]
        known = {**dict(state.client_samples), **{u.sender: int(u.num_samples) for u in updates}}
        # 3. norms, against the window and the recently accepted updates
        deltas, scales, limit = agg.clip_norms([u.delta for u in updates], reference=state.norm_history,
                                               multiple=cfg.norm_multiple, bound=cfg.norm_bound)
        updates = [replace(u, delta=d) for u, d in zip(updates, deltas)]
        accepted = [min(received[u.sender], limit) for u in updates]
        history = (state.norm_history + tuple(accepted))[-cfg.norm_history:]
        state = replace(state, client_samples=tuple(sorted(known.items())), norm_history=history)
        info = {**info, "update_norms_received": received,
                "robust": {"combiner": cfg.combiner, "norm_limit": None if math.isinf(limit) else limit,
                           "norm_clipped": {u.sender: float(f"{sc:.6g}") for u, sc in zip(updates, scales) if sc < 1.0},
                           "samples_clipped": samples_clipped}}
        return updates, state, info

    def combine(self, deltas, weights, state, view_size):
        cfg = self.settings
        if not cfg.enabled or cfg.combiner == "mean":
            return self.inner.combine(deltas, weights, state, view_size)
        if cfg.combiner == "trimmed_mean":
            return agg.weighted_trimmed_mean(deltas, weights, cfg.trim), state, {}
        if cfg.combiner == "median":
            return agg.weighted_median(deltas, weights), state, {}
        n = len(deltas)
        f = min(int(math.floor(cfg.krum_byzantine * n)), max(0, (n - 3) // 2))
        kept = agg.krum_select(deltas, f)
        out = agg.weighted_average([deltas[i] for i in kept], [weights[i] for i in kept]) if any(
            weights[i] > 0 for i in kept) else agg.weighted_average([deltas[i] for i in kept], [1.0] * len(kept))
        return out, state, {"excluded": sorted(set(range(n)) - set(kept))}
