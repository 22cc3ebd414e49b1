"""What a candidate global model must pass before the aggregator signs and publishes it.

Two stages, both pure functions of values (the service wires them):

1. :func:`check_candidate` -- always: the weights are finite; with robust aggregation on,
   the step (new - current weights) is not far longer than the recent published steps
   nor than the weights themselves.
2. :func:`gate_decision` -- the deployment gate: the candidate's score on a labelled
   validation log the aggregator holds is not worse than the current global's by more
   than a margin (:class:`cloud_aggregator.safety.GateSettings`).

A refused candidate is not signed, not published and not counted as a version; the
service records the refusal (reason, scores) and drops the window's updates.

:class:`ValidationScorer` scores weights on a labelled conn log with the gateways' own
model code (what ``[gate] validation_log`` builds; the experiment passes its own).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cloud_aggregator.safety import GateSettings, RobustSettings
from cloud_aggregator.strategies import aggregate as agg

Scorer = Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]

# why a candidate was not published (also the ``reason`` of a refusal row)
NOT_FINITE = "not_finite"
STEP_NORM = "step_norm"
GATE = "gate"
SCORER_FAILED = "scorer_failed"
REASONS = (NOT_FINITE, STEP_NORM, GATE, SCORER_FAILED)

MIN_STEP_HISTORY = 3  # published steps needed before step_multiple applies


@dataclass(frozen=True)
class Verdict:
    """``ok`` or why not; ``figures`` go into the round's info or the refusal row."""

    ok: bool
    reason: str = ""
    detail: str = ""
    figures: dict[str, float] = field(default_factory=dict)


def check_candidate(new: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], *,
                    settings: RobustSettings, recent_steps: Sequence[float]) -> Verdict:
    """Stage 1: finite weights, and (robust on) a step of sane length."""
    if not agg.all_finite(new):
        return Verdict(False, NOT_FINITE, "the candidate holds NaN or Inf")
    step = agg.step_norm(new, current)
    size = agg.global_norm({k: v for k, v in current.items() if np.issubdtype(np.asarray(v).dtype, np.floating)})
    figures = {"step_norm": step, "weights_norm": size}
    if not math.isfinite(step):
        return Verdict(False, NOT_FINITE, "the step's norm is not finite", figures)
    if not settings.enabled:
        return Verdict(True, figures=figures)
    if settings.step_ratio is not None and size > 0 and step > settings.step_ratio * size:
        return Verdict(False, STEP_NORM, f"step {step:.4g} > {settings.step_ratio:g} x the weights' norm "
                                         f"{size:.4g}", figures)
    recent = [s for s in recent_steps if math.isfinite(s) and s > 0][-settings.step_history:]
    if settings.step_multiple is not None and len(recent) >= MIN_STEP_HISTORY:
        med = statistics.median(recent)
        figures["recent_step_median"] = med
        if step > settings.step_multiple * med:
            return Verdict(False, STEP_NORM, f"step {step:.4g} > {settings.step_multiple:g} x the median "
                                             f"{med:.4g} of the last {len(recent)} versions", figures)
    return Verdict(True, figures=figures)


def gate_decision(candidate: Mapping[str, float], current: Mapping[str, float] | None, *,
                  settings: GateSettings) -> Verdict:
    """Stage 2: refuse a candidate more than ``margin`` below the current global on
    ``metric`` (no current score: nothing to compare with, it passes)."""
    metric = settings.metric
    score = candidate.get(metric)
    if score is None or not math.isfinite(float(score)):
        return Verdict(False, SCORER_FAILED, f"the scorer gave no {metric}")
    figures = {f"gate_{metric}": float(score)}
    ref = None if current is None else current.get(metric)
    if ref is None or not math.isfinite(float(ref)):
        return Verdict(True, figures=figures)
    figures[f"gate_current_{metric}"] = float(ref)
    if float(ref) - float(score) > settings.margin:
        return Verdict(False, GATE, f"{metric} {float(score):.4f} on the validation log, "
                                    f"{float(ref) - float(score):.4f} below the current global's {float(ref):.4f} "
                                    f"(margin {settings.margin:g})", figures)
    return Verdict(True, figures=figures)


def header_scores(scores: Mapping[str, float]) -> dict[str, float]:
    """The gate's scores as they travel in the global model's header (``gate_*``)."""
    return {f"gate_{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class ValidationScorer:
    """Scores weights on a labelled conn log with the model code of ``model_dir``
    (accuracy, f1 with malicious = positive, macro_f1)."""

    def __init__(self, model_dir: str | Path, validation_log: str | Path):
        from gateway.fl.learner import TorchLearner
        from gateway.fl.run import load_eval_data

        self.learner = TorchLearner(model_dir, device="cpu")
        self.data = load_eval_data(self.learner, Path(validation_log))
        if len(self.data) == 0:
            raise ValueError(f"gate.validation_log {validation_log}: no labelled flows")
        self.flows = float(self.data.flows)

    def __call__(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        self.learner.load({k: weights[k] for k in self.learner.weights()})
        m = self.learner.evaluate(self.data)
        return {k: float(m[k]) for k in ("accuracy", "f1", "macro_f1") if k in m}


def build_scorer(settings: GateSettings) -> Scorer | None:
    if not settings.enabled or settings.validation_log is None or settings.model_dir is None:
        return None
    return ValidationScorer(settings.model_dir, settings.validation_log)
