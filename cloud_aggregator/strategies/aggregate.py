"""Aggregation maths as pure numpy functions (in the spirit of Flower's aggregate.py).

Models and deltas are ``dict[str, np.ndarray]`` (name -> tensor).  Nothing here keeps
state: optimiser state (FedAdam's m, v, t) goes in and comes out as a value; noise
takes an injected ``np.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

Tensors = dict[str, np.ndarray]


# ---------------------------------------------------------------- client weights


def normalise(weights: Sequence[float]) -> np.ndarray:
    """Weights scaled to sum to 1 (uniform when they are all zero)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError("need a non-empty 1-d sequence of weights")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and non-negative")
    total = w.sum()
    return w / total if total > 0 else np.full(w.size, 1.0 / w.size)


def sample_count_weights(num_samples: Sequence[int]) -> np.ndarray:
    """FedAvg weights n_i / sum_j n_j."""
    return normalise(num_samples)


def staleness_discount(staleness: Sequence[int], exponent: float) -> np.ndarray:
    """(1 + staleness)^-exponent, staleness = global versions since the update's base."""
    s = np.asarray(staleness, dtype=np.float64)
    if (s < 0).any():
        raise ValueError("staleness cannot be negative")
    return (1.0 + s) ** (-float(exponent))


def gsfs_weights(submission_counts: Sequence[int], staleness: Sequence[int], *,
                 staleness_exponent: float = 0.0) -> np.ndarray:
    """GSFS pi_i = s_i / sum_j s_j, times the staleness discount, renormalised."""
    s = np.asarray(submission_counts, dtype=np.float64)
    if len(s) != len(staleness):
        raise ValueError("one staleness per submission count")
    return normalise(s * staleness_discount(staleness, staleness_exponent))


def sample_coverage(window: Mapping[str, int], known: Mapping[str, int], *, unheard: int = 0) -> float:
    """Share of all clients' samples held by this window's senders:
    sum_{i in window} n_i / (sum_{j in known | window} n_j + unheard * mean n).

    ``known`` holds the newest count of every client heard from (the window's counts
    replace theirs); ``unheard`` live clients never heard from count with the mean of
    the known ones. Scaling a sample-weighted window average by it treats every client
    that did not report as a zero delta: the full-participation average
    sum_j (n_j / N) delta_j with delta_j = 0 for the quiet ones.
    """
    counts = {**dict(known), **dict(window)}
    if any(int(n) < 0 for n in counts.values()) or unheard < 0:
        raise ValueError("sample counts and unheard clients cannot be negative")
    if not counts:
        raise ValueError("need at least one client")
    total = float(sum(int(n) for n in counts.values()))
    total += unheard * total / len(counts)
    mine = float(sum(int(n) for n in window.values()))
    return 1.0 if total <= 0 else mine / total


# ---------------------------------------------------------------- tensor algebra


def _check_same_names(deltas: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    if not deltas:
        raise ValueError("nothing to aggregate")
    names = list(deltas[0])
    for d in deltas[1:]:
        if d.keys() != deltas[0].keys():
            raise ValueError("deltas have different tensor names")
    return names


def weighted_average(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Tensors:
    """sum_i w_i * delta_i with w normalised to 1 (float32 result, float64 weights)."""
    names = _check_same_names(deltas)
    w = normalise(weights)
    if w.size != len(deltas):
        raise ValueError("one weight per delta")
    out: Tensors = {}
    for name in names:
        acc = np.zeros(np.shape(deltas[0][name]), dtype=np.float32)
        for wi, d in zip(w, deltas):
            if wi:
                acc += np.float32(wi) * d[name]
        out[name] = acc
    return out


def add_scaled(weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], eta: float = 1.0) -> Tensors:
    """w + eta * delta for the tensors in delta; other tensors (e.g. int buffers) unchanged."""
    out = {k: np.array(v, copy=True) for k, v in weights.items()}
    for k, d in delta.items():
        out[k] = (np.asarray(weights[k], dtype=np.float32) + np.float32(eta) * d).astype(weights[k].dtype)
    return out


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Tensors:
    """a - b over a's floating tensors (how a client turns a model into a delta)."""
    return {k: (np.asarray(a[k], np.float32) - np.asarray(b[k], np.float32))
            for k in a if np.issubdtype(np.asarray(a[k]).dtype, np.floating)}


def scale(delta: Mapping[str, np.ndarray], factor: float) -> Tensors:
    """factor * delta (float32)."""
    return {k: (np.asarray(v, np.float32) * np.float32(factor)).astype(np.float32) for k, v in delta.items()}


def global_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all tensors together."""
    return math.sqrt(sum(float(np.vdot(v, v)) for v in delta.values()))


def clip_by_norm(delta: Mapping[str, np.ndarray], max_norm: float) -> tuple[Tensors, float]:
    """delta * min(1, C / ||delta||); returns (clipped, scale applied)."""
    if max_norm <= 0:
        raise ValueError("max_norm must be positive")
    n = global_norm(delta)
    scale = 1.0 if n <= max_norm else max_norm / n
    return {k: (v * np.float32(scale)).astype(np.float32) for k, v in delta.items()}, scale


def gaussian_noise_like(template: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Tensors:
    """Independent N(0, std^2) per coordinate, float32, from the injected generator."""
    if std < 0:
        raise ValueError("std must be >= 0")
    return {k: rng.normal(0.0, std, size=np.shape(v)).astype(np.float32) for k, v in template.items()}


def add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Tensors:
    return {k: a[k] + b[k] for k in a}


# ---------------------------------------------------------------- robust statistics


def coordinate_median(deltas: Sequence[Mapping[str, np.ndarray]]) -> Tensors:
    """Per-coordinate median (unweighted; robust to < half arbitrary updates)."""
    names = _check_same_names(deltas)
    return {n: np.median(np.stack([d[n] for d in deltas]), axis=0).astype(np.float32) for n in names}


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> Tensors:
    """Per-coordinate mean after dropping floor(trim_fraction * n) smallest and largest."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    names = _check_same_names(deltas)
    n = len(deltas)
    k = int(math.floor(trim_fraction * n))
    out: Tensors = {}
    for name in names:
        stacked = np.sort(np.stack([d[name] for d in deltas]), axis=0)
        out[name] = stacked[k:n - k].mean(axis=0).astype(np.float32)
    return out


def norm_bound(deltas: Sequence[Mapping[str, np.ndarray]], bound: float) -> list[Tensors]:
    """Clip every delta to L2 norm ``bound`` (limits what one client can move the model)."""
    return [clip_by_norm(d, bound)[0] for d in deltas]


# ---------------------------------------------------------------- FedAdam


class AdamState(NamedTuple):
    m: Tensors
    v: Tensors
    t: int


def adam_init(template: Mapping[str, np.ndarray]) -> AdamState:
    zeros = {k: np.zeros(np.shape(v), np.float32) for k, v in template.items()}
    return AdamState(zeros, {k: z.copy() for k, z in zeros.items()}, 0)


def fedadam_step(
    weights: Mapping[str, np.ndarray],
    avg_delta: Mapping[str, np.ndarray],
    state: AdamState | None,
    *,
    eta: float = 0.01,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    bias_correction: bool = True,
) -> tuple[Tensors, AdamState]:
    """Server Adam on the averaged delta (Reddi et al. 2021, "Adaptive Federated Optimization").

    m <- b1 m + (1-b1) d;  v <- b2 v + (1-b2) d^2;  t <- t+1
    w <- w + eta_t * m / (sqrt(v) + tau),  eta_t = eta*sqrt(1-b2^t)/(1-b1^t) with bias
    correction (as Flower's FedAdam), else eta.  Returns (new weights, new state).
    """
    if state is None:
        state = adam_init(avg_delta)
    t = state.t + 1
    eta_t = eta * math.sqrt(1 - beta2**t) / (1 - beta1**t) if bias_correction else eta
    m, v, step = {}, {}, {}
    for k, d in avg_delta.items():
        d = np.asarray(d, np.float32)
        m[k] = (beta1 * state.m[k] + (1 - beta1) * d).astype(np.float32)
        v[k] = (beta2 * state.v[k] + (1 - beta2) * d * d).astype(np.float32)
        step[k] = (m[k] / (np.sqrt(v[k]) + tau)).astype(np.float32)
    return add_scaled(weights, step, eta_t), AdamState(m, v, t)
