"""Central differential privacy around any strategy (DP-FedAvg style).

Each update is clipped to L2 norm ``clip_norm``; the strategy combines the clipped
deltas; Gaussian noise with std = noise_multiplier * clip_norm * max_i pi_i is added to
the combined delta (max_i pi_i * C bounds how far one client moves the weighted sum).
The noise comes from an injected ``np.random.Generator``.  Epsilon for a target delta is
reported by the RDP accountant of ``dp-accounting``, composing one (sub-sampled)
Gaussian event per noised aggregation.  ``sampling_rate`` is the probability that a
given client takes part in an aggregation; leave it at 1.0 (no amplification claimed)
unless clients really are sampled at random (FedAvg with ``fraction`` < 1).
"""

from __future__ import annotations

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from cloud_aggregator.strategies import aggregate as agg
from cloud_aggregator.strategies.base import Strategy, StrategyState, StrategyWrapper
from dataclasses import replace

_ORDERS = tuple(range(2, 257))


def rdp_epsilon(*, noise_multiplier: float, sampling_rates: tuple[float, ...] | list[float],
                target_delta: float) -> float:
    """Epsilon after the given noised aggregations (inf when noise_multiplier is 0)."""
    if not sampling_rates:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    acc = rdp_privacy_accountant.RdpAccountant(list(_ORDERS))
    counts: dict[float, int] = {}
    for q in sampling_rates:
        counts[round(float(q), 6)] = counts.get(round(float(q), 6), 0) + 1
    for q, n in counts.items():
        event = dp_event.GaussianDpEvent(noise_multiplier)
        if q < 1.0:
            event = dp_event.PoissonSampledDpEvent(q, event)
        acc.compose(event, n)
    return float(acc.get_epsilon(target_delta))


class DifferentialPrivacy(StrategyWrapper):
    """Keyword-only settings (defaults in brackets):

    clip_norm (required): per-update L2 bound C.
    noise_multiplier [1.0]: z; noise std = z * C * max_i pi_i.
    target_delta [1e-5]: the delta epsilon is reported for.
    sampling_rate [1.0]: per-aggregation participation probability for the accountant.
    rng (required): numpy Generator the noise is drawn from.
    """

    def __init__(self, inner: Strategy, *, clip_norm: float, rng: np.random.Generator,
                 noise_multiplier: float = 1.0, target_delta: float = 1e-5, sampling_rate: float = 1.0):
        super().__init__(inner)
        if not clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        if noise_multiplier < 0:
            raise ValueError("noise_multiplier must be >= 0")
        if not 0 < target_delta < 1:
            raise ValueError("target_delta must be in (0, 1)")
        if not 0 < sampling_rate <= 1:
            raise ValueError("sampling_rate must be in (0, 1]")
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy Generator")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.target_delta = float(target_delta)
        self.sampling_rate = float(sampling_rate)
        self.rng = rng

    def combine(self, deltas, weights, state: StrategyState, view_size):
        clipped = agg.norm_bound(deltas, self.clip_norm)
        combined, state, info = self.inner.combine(clipped, weights, state, view_size)
        std = self.noise_multiplier * self.clip_norm * float(np.max(weights))
        noised = agg.add(combined, agg.gaussian_noise_like(combined, std, self.rng))
        state = replace(state, dp_steps=state.dp_steps + 1,
                        dp_sampling_rates=state.dp_sampling_rates + (self.sampling_rate,))
        return noised, state, {**info, "dp_noise_std": std, "dp_epsilon": self.epsilon(state)}

    def epsilon(self, state: StrategyState) -> float:
        return rdp_epsilon(noise_multiplier=self.noise_multiplier,
                           sampling_rates=state.dp_sampling_rates, target_delta=self.target_delta)
