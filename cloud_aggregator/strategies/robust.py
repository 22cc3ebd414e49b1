"""Robust aggregation around any strategy: norm bound, coordinate median, trimmed mean.

``norm_bound`` clips every delta to that L2 norm before combining (limits how far one
gateway can move the model); ``method`` replaces the weighted average by the
coordinate-wise median or the trimmed mean (unweighted: a weight is something an
attacker could inflate), or keeps the inner strategy's combination ("mean").
"""

from __future__ import annotations

from cloud_aggregator.strategies import aggregate as agg
from cloud_aggregator.strategies.base import Strategy, StrategyWrapper

METHODS = ("mean", "median", "trimmed_mean")


class RobustAggregation(StrategyWrapper):
    """Keyword-only settings (defaults in brackets):

    method ["mean"]: "mean" (inner strategy's weights), "median" or "trimmed_mean".
    norm_bound [None]: clip each delta to this L2 norm first (None: no clipping).
    trim_fraction [0.1]: share dropped at each end by the trimmed mean.
    """

    def __init__(self, inner: Strategy, *, method: str = "mean", norm_bound: float | None = None,
                 trim_fraction: float = 0.1):
        super().__init__(inner)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")
        if norm_bound is not None and not norm_bound > 0:
            raise ValueError("norm_bound must be positive")
        if not 0 <= trim_fraction < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        self.method = method
        self.norm_bound = None if norm_bound is None else float(norm_bound)
        self.trim_fraction = float(trim_fraction)

    def combine(self, deltas, weights, state, view_size):
        if self.norm_bound is not None:
            deltas = agg.norm_bound(deltas, self.norm_bound)
        if self.method == "median":
            return agg.coordinate_median(deltas), state, {"robust": "median"}
        if self.method == "trimmed_mean":
            return agg.trimmed_mean(deltas, self.trim_fraction), state, {"robust": "trimmed_mean"}
        return self.inner.combine(deltas, weights, state, view_size)
