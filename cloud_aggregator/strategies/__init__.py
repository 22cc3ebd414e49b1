"""Federated strategies: pure numpy maths (aggregate.py) + FedAvg, FedOpt, GSFS and the
DP and robust wrappers.  :func:`build_strategy` makes one from plain settings (TOML)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cloud_aggregator.safety import RobustSettings
from cloud_aggregator.strategies.base import (
    Aggregation,
    PoolView,
    Strategy,
    StrategyState,
    UpdateView,
)
from cloud_aggregator.strategies.dp import DifferentialPrivacy
from cloud_aggregator.strategies.fedavg import FedAvg
from cloud_aggregator.strategies.fedopt import FedOpt
from cloud_aggregator.strategies.gsfs import GSFS
from cloud_aggregator.strategies.robust import RobustAggregation

STRATEGIES: dict[str, type[Strategy]] = {"gsfs": GSFS, "fedavg": FedAvg, "fedopt": FedOpt}

__all__ = [
    "Aggregation", "PoolView", "Strategy", "StrategyState", "UpdateView", "DifferentialPrivacy",
    "FedAvg", "FedOpt", "GSFS", "RobustAggregation", "RobustSettings", "STRATEGIES", "build_strategy",
]


def build_strategy(name: str, *, params: Mapping[str, Any] | None = None,
                   robust: RobustSettings | Mapping[str, Any] | None = None, dp: Mapping[str, Any] | None = None,
                   seed: int = 0) -> Strategy:
    """``name`` in gsfs/fedavg/fedopt with its keyword settings, wrapped by robust
    aggregation (``robust``: :class:`RobustSettings` or its ``[strategy.robust]`` table;
    None: the defaults, on) and then, optionally, central DP (noise is added last, after
    robust combining)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    strategy: Strategy = STRATEGIES[name](**dict(params or {}))
    strategy = RobustAggregation(strategy, robust)
    if dp:
        strategy = DifferentialPrivacy(strategy, rng=np.random.default_rng(seed), **dict(dp))
    return strategy
