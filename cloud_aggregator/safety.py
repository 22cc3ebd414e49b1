"""Settings of the federation's defences, one frozen dataclass per family.

* :class:`RobustSettings` (TOML ``[strategy.robust]``): what one gateway can weigh and
  move in an aggregation, the combiner, and the check of every candidate global model
  before it is signed.  Used by :class:`cloud_aggregator.strategies.robust.RobustAggregation`
  and :class:`cloud_aggregator.service.AggregatorService`.
* :class:`GateSettings` (TOML ``[gate]``): the aggregator's deployment gate, which scores
  each candidate on a labelled validation log before it is published.

Defaults are the shipped settings: robust aggregation and the aggregate check are on for
every strategy; the gate is on as soon as it has validation flows to score on
(``validation_log`` in the aggregator's TOML, or a scorer handed to the service, as the
experiment does).  ``docs/federation-safety.md`` explains each default and lists the
tests that hold them.  Each ``from_mapping`` names an unknown key instead of ignoring it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

COMBINERS = ("mean", "trimmed_mean", "median", "krum")
GATE_METRICS = ("accuracy", "f1", "macro_f1")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _from_mapping(cls, values: Mapping[str, Any] | None, section: str):
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"[{section}]: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return cls(**values)


@dataclass(frozen=True, kw_only=True)
class RobustSettings:
    """Robust aggregation, on by default for every strategy (defaults in brackets).

    enabled [true]: false turns every bound and the combiner off (the strategy's own
      weighted mean of whatever arrived) and the norm checks of the aggregate; a
      candidate that is not finite is never signed either way.  For contrast runs only.
    one_vote [true]: a gateway weighs the same however often it uploaded in a window:
      its re-upload replaces its pooled update (always) and adds no weight (GSFS's
      submission count s_i is taken as 1), so spam buys nothing.
    sample_multiple [3.0]: self-reported ``num_samples`` are clipped to this multiple
      of the median sample count of all known gateways (the window's claims and the
      newest clipped count of everyone else); None: no relative cap.
    max_samples [None]: a hard cap on any gateway's ``num_samples``.
    norm_multiple [3.0]: each update's L2 norm is clipped to this multiple of the median
      norm of the window's updates and the last ``norm_history`` accepted ones (a
      window of one cannot set its own bound); None: no relative bound.
    norm_bound [None]: an absolute L2 bound on each update.
    norm_history [32]: accepted update norms remembered for ``norm_multiple``.
    combiner ["mean"]: how the bounded updates are combined, each with the strategy's
      (bounded) client weight: "mean" (the strategy's weighted average), "trimmed_mean"
      (per coordinate, ``trim`` of the weight mass dropped at each end), "median"
      (weighted coordinate median), "krum" (Multi-Krum keeps the n - f updates closest
      to their neighbours, then their weighted mean).  Why "mean": once a gateway has
      one vote, a clipped sample count and a clipped norm, the weighted mean bounds what
      any one gateway moves (its weight x the norm bound) and keeps what non-IID
      gateways need: on IoT-23 every scenario holds an attack family nobody else has,
      and a per-coordinate robust statistic trims exactly those coordinates (measured:
      the trimmed mean ended FedAvg at 0.950 / 0.974 on seeds 0 / 1, the mean at
      0.9965 / 0.9943, no defences at 0.9976 / 0.9947; docs/federation-safety.md).  The
      deployment gate and the aggregate check catch what the bounds let through.
    trim [0.1]: weight mass trimmed at each end by "trimmed_mean", in [0, 0.5).
    krum_byzantine [0.2]: share of a window Multi-Krum assumes hostile: f = floor(share * n),
      at most (n - 3) / 2.
    step_multiple [5.0]: a candidate global whose step (new - current weights, L2) is
      more than this multiple of the median step of the last ``step_history`` published
      versions is not published (needs 3 of them); None: no such check.
    step_ratio [1.0]: a candidate whose step is longer than this multiple of the
      current weights' own norm is not published; None: no such check.
    step_history [8]: published steps remembered for ``step_multiple``.
    """

    enabled: bool = True
    one_vote: bool = True
    sample_multiple: float | None = 3.0
    max_samples: int | None = None
    norm_multiple: float | None = 3.0
    norm_bound: float | None = None
    norm_history: int = 32
    combiner: str = "mean"
    trim: float = 0.1
    krum_byzantine: float = 0.2
    step_multiple: float | None = 5.0
    step_ratio: float | None = 1.0
    step_history: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool) or not isinstance(self.one_vote, bool):
            raise ValueError("enabled and one_vote must be true or false")
        if self.combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {', '.join(COMBINERS)}, got {self.combiner!r}")
        for name in ("sample_multiple", "norm_multiple", "step_multiple"):
            v = getattr(self, name)
            if v is not None and not (_number(v) and v >= 1):
                raise ValueError(f"{name} must be a number >= 1 or None, got {v!r}")
        for name in ("norm_bound", "step_ratio"):
            v = getattr(self, name)
            if v is not None and not (_number(v) and v > 0):
                raise ValueError(f"{name} must be a positive number or None, got {v!r}")
        if self.max_samples is not None and not (isinstance(self.max_samples, int)
                                                 and not isinstance(self.max_samples, bool)
                                                 and 1 <= self.max_samples < 2**31):
            raise ValueError(f"max_samples must be an integer in [1, 2**31) or None, got {self.max_samples!r}")
        for name in ("norm_history", "step_history"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 10_000):
                raise ValueError(f"{name} must be an integer in [1, 10000], got {v!r}")
        if not (_number(self.trim) and 0 <= self.trim < 0.5):
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim!r}")
        if not (_number(self.krum_byzantine) and 0 <= self.krum_byzantine < 0.5):
            raise ValueError(f"krum_byzantine must be in [0, 0.5), got {self.krum_byzantine!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "RobustSettings":
        """From the ``[strategy.robust]`` table (missing keys keep their defaults)."""
        return _from_mapping(cls, values, "strategy.robust")

    @classmethod
    def off(cls) -> "RobustSettings":
        """Every defence off (contrast runs): the strategy's plain weighted mean."""
        return cls(enabled=False)


@dataclass(frozen=True, kw_only=True)
class GateSettings:
    """The aggregator's deployment gate (TOML ``[gate]``; defaults in brackets).

    enabled [true]: score candidates when there is something to score them on.
    validation_log [None]: a labelled Zeek conn log (IoT-23 ``conn.log.labeled`` style)
      the aggregator holds, never trained on; with ``model_dir`` it builds the scorer.
      The experiment hands the service a scorer of its own instead (flows disjoint
      from the test parts that score the report).
    model_dir [None]: the model directory whose architecture, tokenizer and labels the
      global weights belong to (the gateways' ``gateway.model``).
    metric ["accuracy"]: the score compared: accuracy, f1 (malicious = positive) or
      macro_f1.
    margin [0.01]: a candidate scoring more than this below the current global on the
      validation log is not published.  Small sets are noisy: keep the margin above a
      few flows' worth (1/flows per flow).
    """

    enabled: bool = True
    validation_log: str | None = None
    model_dir: str | None = None
    metric: str = "accuracy"
    margin: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError("gate.enabled must be true or false")
        if self.metric not in GATE_METRICS:
            raise ValueError(f"gate.metric must be one of {', '.join(GATE_METRICS)}, got {self.metric!r}")
        if not (_number(self.margin) and 0 <= self.margin < 1):
            raise ValueError(f"gate.margin must be in [0, 1), got {self.margin!r}")
        if (self.validation_log is None) != (self.model_dir is None):
            raise ValueError("gate: give validation_log and model_dir together")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "GateSettings":
        return _from_mapping(cls, values, "gate")
