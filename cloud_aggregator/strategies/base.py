"""What every strategy shares: the view of the pool it decides on, its state value,
and the aggregate pipeline  weights -> combine -> server step.

A strategy object holds configuration only (keyword-only, validated in ``__init__``);
its state (FedAdam moments, DP step count) is a :class:`StrategyState` value passed
in and returned, so the service can checkpoint it and a restart resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cloud_aggregator.strategies import aggregate as agg
from cloud_aggregator.strategies.aggregate import AdamState, Tensors


@dataclass(frozen=True)
class UpdateView:
    """One pooled update as a strategy sees it (the newest of its sender)."""

    sender: str
    delta: Tensors
    num_samples: int
    base_version: int
    submissions: int  # uploads by this sender since the last aggregation (GSFS s_i)
    round: int = 0
    received_at: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)  # the gateway's own, from the header


@dataclass(frozen=True)
class PoolView:
    """Everything a strategy needs to decide whether to aggregate now."""

    updates: Sequence[UpdateView]
    live_clients: frozenset[str]
    version: int  # current global version
    now: float
    opened_at: float | None = None  # first update since the last aggregation / round start
    round: int = 0  # synchronous strategies: the open round (0: none)
    selected: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StrategyState:
    adam: AdamState | None = None
    dp_steps: int = 0
    dp_sampling_rates: tuple[float, ...] = ()  # q of every noised aggregation (accountant input)
    # newest sample count of every client that ever uploaded (GSFS coverage scaling)
    client_samples: tuple[tuple[str, int], ...] = ()
    # GSFS remember_quiet: each client's newest local model (global + its delta) and
    # (sender, sample count, version it was stored at)
    remembered: Mapping[str, Tensors] = field(default_factory=dict)
    remembered_meta: tuple[tuple[str, int, int], ...] = ()
    # robust aggregation: L2 norms of the last accepted (bounded) updates, oldest first
    norm_history: tuple[float, ...] = ()

    def to_tensors(self) -> tuple[Tensors, dict[str, Any]]:
        """Arrays and JSON-able scalars for a checkpoint."""
        arrays: Tensors = {}
        meta: dict[str, Any] = {"dp_steps": self.dp_steps, "dp_sampling_rates": list(self.dp_sampling_rates)}
        if self.client_samples:
            meta["client_samples"] = dict(self.client_samples)
        if self.norm_history:
            meta["norm_history"] = list(self.norm_history)
        if self.remembered_meta:
            meta["remembered"] = {s: [n, v] for s, n, v in self.remembered_meta}
            for sender, model in self.remembered.items():
                arrays.update({f"remembered/{sender}/{k}": v for k, v in model.items()})
        if self.adam is not None:
            meta["adam_t"] = self.adam.t
            arrays.update({f"adam.m/{k}": v for k, v in self.adam.m.items()})
            arrays.update({f"adam.v/{k}": v for k, v in self.adam.v.items()})
        return arrays, meta

    @classmethod
    def from_tensors(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> "StrategyState":
        adam = None
        if "adam_t" in meta:
            m = {k[len("adam.m/"):]: v for k, v in arrays.items() if k.startswith("adam.m/")}
            v = {k[len("adam.v/"):]: x for k, x in arrays.items() if k.startswith("adam.v/")}
            adam = AdamState(m, v, int(meta["adam_t"]))
        remembered: dict[str, Tensors] = {}
        for key, value in arrays.items():
            if key.startswith("remembered/"):
                sender, name = key[len("remembered/"):].split("/", 1)
                remembered.setdefault(sender, {})[name] = value
        remembered_meta = tuple(sorted((str(s), int(nv[0]), int(nv[1]))
                                       for s, nv in dict(meta.get("remembered", {})).items()))
        return cls(adam=adam, dp_steps=int(meta.get("dp_steps", 0)),
                   remembered=remembered, remembered_meta=remembered_meta,
                   dp_sampling_rates=tuple(float(q) for q in meta.get("dp_sampling_rates", ())),
                   norm_history=tuple(float(x) for x in meta.get("norm_history", ())),
                   client_samples=tuple(sorted((str(k), int(n))
                                               for k, n in dict(meta.get("client_samples", {})).items())))


@dataclass(frozen=True)
class Aggregation:
    weights: Tensors
    state: StrategyState
    senders: tuple[str, ...]
    client_weights: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Base: weighted average of deltas applied with server learning rate ``eta``."""

    name = "base"
    synchronous = False

    def __init__(self, *, eta: float = 1.0, min_updates: int = 1):
        if not (eta > 0 and math.isfinite(eta)):
            raise ValueError("eta must be a positive finite number")
        if min_updates < 1:
            raise ValueError("min_updates must be >= 1")
        self.eta = float(eta)
        self.min_updates = int(min_updates)

    # -- decisions ------------------------------------------------------------------
    def eligible(self, view: PoolView) -> list[UpdateView]:
        return list(view.updates)

    def should_aggregate(self, view: PoolView) -> bool:
        raise NotImplementedError

    def control(self) -> dict[str, Any]:
        """Settings for the retained control message (merged by the service)."""
        return {"strategy": self.name}

    # -- the pipeline (wrappers override prepare and combine) ---------------------------
    def prepare(self, updates: Sequence[UpdateView], state: StrategyState
                ) -> tuple[list[UpdateView], StrategyState, dict[str, Any]]:
        """The updates as this aggregation uses them (the robust wrapper bounds them here)."""
        return list(updates), state, {}

    def client_weights(self, updates: Sequence[UpdateView], version: int) -> np.ndarray:
        return agg.sample_count_weights([u.num_samples for u in updates])

    def combine(self, deltas: Sequence[Tensors], weights: np.ndarray, state: StrategyState,
                view_size: int) -> tuple[Tensors, StrategyState, dict[str, Any]]:
        return agg.weighted_average(deltas, weights), state, {}

    def step_scale(self, updates: Sequence[UpdateView], state: StrategyState,
                   live_clients: int = 0) -> tuple[float, StrategyState]:
        """Factor applied to the combined delta before the server step (1: none)."""
        return 1.0, state

    def server_step(self, global_weights: Mapping[str, np.ndarray], delta: Tensors,
                    state: StrategyState) -> tuple[Tensors, StrategyState]:
        return agg.add_scaled(global_weights, delta, self.eta), state

    def quiet_updates(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[UpdateView],
                      version: int, state: StrategyState) -> list[UpdateView]:
        """Extra members of this aggregation for clients that did not report (none)."""
        return []

    def remember(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[UpdateView],
                 version: int, state: StrategyState) -> StrategyState:
        """State after ``updates`` were applied to ``global_weights`` (unchanged)."""
        return state

    def aggregate(self, global_weights: Mapping[str, np.ndarray], updates: Sequence[UpdateView], *,
                  version: int, state: StrategyState | None = None, live_clients: int = 0) -> Aggregation:
        """New global weights from ``updates`` (as chosen by :meth:`eligible`)."""
        if not updates:
            raise ValueError("nothing to aggregate")
        state = state or StrategyState()
        fresh, state, prepared = self.prepare(updates, state)
        quiet = self.quiet_updates(global_weights, fresh, version, state)
        members = fresh + quiet
        weights = self.client_weights(members, version)
        delta, state, info = self.combine([u.delta for u in members], weights, state,
                                          max(live_clients, len(members)))
        scale, state = self.step_scale(members, state, live_clients)
        if scale != 1.0:
            delta = agg.scale(delta, scale)
            info = {**info, "step_scale": scale}
        new_weights, state = self.server_step(global_weights, delta, state)
        state = self.remember(global_weights, fresh, version, state)
        k = len(fresh)
        if quiet:
            info = {**info, "remembered": {u.sender: round(float(w), 6) for u, w in zip(quiet, weights[k:])}}
        excluded = [i for i in info.pop("excluded", ()) if i < k]  # members the combiner left out
        if excluded:
            weights = np.array(weights, dtype=np.float64)
            weights[excluded] = 0.0
            weights = agg.normalise(weights)
            info = {**info, "excluded": [fresh[i].sender for i in excluded]}
        # per-sender L2 norms of what arrived: a gateway pushing the model off course
        # stands out in the round history (and the robust wrapper bounds it)
        info = {"delta_norm": agg.global_norm(delta),
                "update_norms": {u.sender: round(agg.global_norm(u.delta), 6) for u in fresh},
                "client_metrics": client_metric_means(fresh, weights[:k]), **prepared, **info}
        return Aggregation(new_weights, state, tuple(u.sender for u in fresh),
                           tuple(float(w) for w in weights[:k]), info)


def client_metric_means(updates: Sequence[UpdateView], weights: np.ndarray) -> dict[str, float]:
    """Mean of each metric the gateways reported (weighted like their deltas, over the
    updates that carry it): the "client-average" figures of a round."""
    out = {}
    for name in sorted({k for u in updates for k in u.metrics}):
        pairs = [(float(w), float(u.metrics[name])) for u, w in zip(updates, weights) if name in u.metrics]
        total = sum(w for w, _ in pairs)
        out[name] = (sum(w * v for w, v in pairs) / total) if total > 0 else float(np.mean([v for _, v in pairs]))
    return out


class StrategyWrapper(Strategy):
    """Delegates everything to ``inner``; subclasses change :meth:`combine`."""

    def __init__(self, inner: Strategy):
        self.inner = inner
        self.name = inner.name
        self.synchronous = inner.synchronous
        self.eta = inner.eta
        self.min_updates = inner.min_updates

    def eligible(self, view):
        return self.inner.eligible(view)

    def should_aggregate(self, view):
        return self.inner.should_aggregate(view)

    def __getattr__(self, name):  # round settings/selection of synchronous inner strategies
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def control(self):
        return self.inner.control()

    def prepare(self, updates, state):
        return self.inner.prepare(updates, state)

    def client_weights(self, updates, version):
        return self.inner.client_weights(updates, version)

    def combine(self, deltas, weights, state, view_size):
        return self.inner.combine(deltas, weights, state, view_size)

    def step_scale(self, updates, state, live_clients=0):
        return self.inner.step_scale(updates, state, live_clients)

    def quiet_updates(self, global_weights, updates, version, state):
        return self.inner.quiet_updates(global_weights, updates, version, state)

    def remember(self, global_weights, updates, version, state):
        return self.inner.remember(global_weights, updates, version, state)

    def server_step(self, global_weights, delta, state):
        return self.inner.server_step(global_weights, delta, state)


def with_adam(state: StrategyState, adam: AdamState) -> StrategyState:
    return replace(state, adam=adam)
