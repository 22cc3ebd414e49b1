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
    """L2 norm over all tensors together, summed in float64: finite float32 values
    never overflow it (a float32 dot product of values near 1e20 would be inf)."""
    total = 0.0
    for v in delta.values():
        a = np.asarray(v).ravel()
        total += float(np.einsum("i,i->", a, a, dtype=np.float64))  # cast in buffers, no copy
    return math.sqrt(total)


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
#
# Bounds first (what one gateway can claim and how far its delta reaches), then a
# combiner.  Every combiner takes the strategy's client weights (FedAvg's sample shares,
# GSFS's pi_i), already bounded by the bounds, so a robust combiner does not throw away
# the weighting that non-IID gateways of very different sizes need.


def median_or_none(values: Sequence[float]) -> float | None:
    """Median of the finite values (None when there is none)."""
    v = np.asarray([x for x in values if math.isfinite(float(x))], dtype=np.float64)
    return float(np.median(v)) if v.size else None


def clip_samples(num_samples: Sequence[int], *, reference: Sequence[int] = (), multiple: float | None = None,
                 maximum: int | None = None) -> list[int]:
    """Self-reported sample counts clipped to ``multiple`` x the median of ``reference``
    plus ``num_samples`` (a gateway cannot buy weight by claiming more than the others),
    and to ``maximum``; at least 1 each."""
    n = [max(1, int(x)) for x in num_samples]
    cap = math.inf
    if multiple is not None:
        med = median_or_none([*n, *[int(x) for x in reference]])
        if med is not None:
            cap = max(1.0, multiple * med)
    if maximum is not None:
        cap = min(cap, maximum)
    return [int(min(x, cap)) for x in n]


def clip_norms(deltas: Sequence[Mapping[str, np.ndarray]], *, reference: Sequence[float] = (),
               multiple: float | None = None, bound: float | None = None) -> tuple[list[Tensors], list[float], float]:
    """Each delta scaled down to at most ``multiple`` x the median L2 norm of the deltas
    and the ``reference`` norms (recent accepted updates: a window of one cannot set its
    own bound), and to ``bound``.  Returns (deltas, scale applied to each, the limit)."""
    norms = [global_norm(d) for d in deltas]
    limit = math.inf
    if multiple is not None:
        med = median_or_none([*norms, *reference])
        if med is not None and med > 0:
            limit = multiple * med
    if bound is not None:
        limit = min(limit, bound)
    out, scales = [], []
    for d, n in zip(deltas, norms):
        scale = 1.0 if n <= limit else limit / n
        out.append(dict(d) if scale == 1.0 else {k: (np.asarray(v, np.float32) * np.float32(scale)) for k, v in d.items()})
        scales.append(scale)
    return out, scales, limit


def _stack_rows(deltas: Sequence[Mapping[str, np.ndarray]], names: list[str]) -> np.ndarray:
    """(P, n) float32: row j holds coordinate j of every delta (all tensors, flattened,
    in ``names`` order), so per-coordinate statistics sort contiguous rows."""
    flat = np.stack([np.concatenate([np.asarray(d[k], np.float32).ravel() for k in names]) if names
                     else np.zeros(0, np.float32) for d in deltas])
    return np.ascontiguousarray(flat.T)


def _unstack(values: np.ndarray, like: Mapping[str, np.ndarray], names: list[str]) -> Tensors:
    out: Tensors = {}
    pos = 0
    for k in names:
        size = int(np.size(like[k]))
        out[k] = values[pos:pos + size].reshape(np.shape(like[k])).astype(np.float32)
        pos += size
    return out


_ROWS = 1 << 14  # coordinates per step: bounds the (rows, n) temporaries


def _sorted_rows(x: np.ndarray, w: np.ndarray):
    """Each row of ``x`` sorted, with the weight of each value and the cumulative weight
    up to and including it."""
    order = np.argsort(x, axis=1)
    xs = np.take_along_axis(x, order, axis=1)
    ws = w[order]
    return xs, ws, np.cumsum(ws, axis=1)


def weighted_trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
                          trim: float) -> Tensors:
    """Per coordinate: sort the values, drop ``trim`` of the weight mass at each end
    (whole updates or parts of one), average what is left by weight.

    With equal weights and ``trim`` = k/n this is the classic trimmed mean dropping k
    values at each end; with ``trim`` 0 it is the weighted average.  A client whose
    weight is at most ``trim`` cannot move a coordinate beyond the range of the others.
    """
    if not 0 <= trim < 0.5:
        raise ValueError("trim must be in [0, 0.5)")
    names = _check_same_names(deltas)
    w = normalise(weights)
    if w.size != len(deltas):
        raise ValueError("one weight per delta")
    if trim == 0:
        return weighted_average(deltas, w)
    x = _stack_rows(deltas, names)
    res = np.empty(x.shape[0], np.float64)
    for i in range(0, x.shape[0], _ROWS):
        xs, ws, upper = _sorted_rows(x[i:i + _ROWS], w)
        kept = np.clip(np.minimum(upper, 1.0 - trim) - np.maximum(upper - ws, trim), 0.0, None)
        res[i:i + _ROWS] = np.einsum("ij,ij->i", kept, xs) / (1.0 - 2.0 * trim)
    return _unstack(res, deltas[0], names)


def weighted_median(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Tensors:
    """Per coordinate: the value where the cumulative weight reaches one half (the mean
    of the two neighbours when it lands exactly between them; numpy's median for equal
    weights).  Robust to any set of clients holding less than half the weight."""
    names = _check_same_names(deltas)
    w = normalise(weights)
    if w.size != len(deltas):
        raise ValueError("one weight per delta")
    x = _stack_rows(deltas, names)
    res = np.empty(x.shape[0], np.float64)
    tol = 1e-12
    for i in range(0, x.shape[0], _ROWS):
        xs, _, upper = _sorted_rows(x[i:i + _ROWS], w)
        rows = np.arange(xs.shape[0])
        lo = np.argmax(upper >= 0.5 - tol, axis=1)  # first value reaching half the mass
        hi = np.argmax(upper > 0.5 + tol, axis=1)  # first value passing it
        res[i:i + _ROWS] = 0.5 * (xs[rows, lo].astype(np.float64) + xs[rows, hi])
    return _unstack(res, deltas[0], names)


def coordinate_median(deltas: Sequence[Mapping[str, np.ndarray]]) -> Tensors:
    """Per-coordinate median (unweighted; robust to < half arbitrary updates)."""
    return weighted_median(deltas, [1.0] * len(deltas))


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> Tensors:
    """Per-coordinate mean after dropping floor(trim_fraction * n) smallest and largest."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    n = len(deltas)
    k = int(math.floor(trim_fraction * n))
    return weighted_trimmed_mean(deltas, [1.0] * n, k / n)


def krum_select(deltas: Sequence[Mapping[str, np.ndarray]], byzantine: int) -> list[int]:
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): score each delta by the
    sum of squared distances to its n - f - 2 nearest others and keep the n - f best
    (indices, best first).  Needs n >= 2f + 3; fewer deltas keep them all."""
    n = len(deltas)
    if byzantine < 0:
        raise ValueError("byzantine must be >= 0")
    if n < 2 * byzantine + 3 or byzantine == 0:
        return list(range(n))
    names = _check_same_names(deltas)
    x = _stack_rows(deltas, names)  # (P, n)
    gram = (x.T @ x).astype(np.float64)  # float32 products: enough to rank distances
    sq = np.diag(gram)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(dist, np.inf)
    near = n - byzantine - 2
    scores = np.sort(dist, axis=1)[:, :near].sum(axis=1)
    return [int(i) for i in np.argsort(scores, kind="stable")[: n - byzantine]]


def norm_bound(deltas: Sequence[Mapping[str, np.ndarray]], bound: float) -> list[Tensors]:
    """Clip every delta to L2 norm ``bound`` (limits what one client can move the model)."""
    return [clip_by_norm(d, bound)[0] for d in deltas]


def all_finite(tensors: Mapping[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in tensors.values() if np.issubdtype(np.asarray(v).dtype, np.floating))


def step_norm(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> float:
    """L2 norm of new - old over the floating tensors (float64: never overflows)."""
    return global_norm(subtract(new, old))


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
