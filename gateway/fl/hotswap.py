"""Put a newly received global model into the running detector without stopping it --
if it is not worse than the one running, and take it back if the live alerts jump.

The FL client calls an :class:`EngineHotSwap` as its ``on_global`` hook after it loaded
the verified weights into the torch student.  The hook

1. scores the new weights and the deployed ones on this gateway's own labelled
   validation flows (labelled logs, analyst feedback: the FL client's validation
   split); a new model worse than the deployed one by more than ``margin`` is kept
   out of detection (:func:`deploy_verdict`), and the gateway says so on its status
   topic (federated learning goes on from the new version all the same);
2. otherwise writes a complete model directory (weights, tokenizer, labels, metadata,
   ONNX export) for that version and hands it to
   :meth:`gateway.inference.InferenceEngine.swap`, which validates and loads it aside
   and then switches atomically: flows being classified finish on the old session, the
   next batch uses the new one, none is dropped or classified twice;
3. watches the live alert rate (:class:`AlertCanary`): when the share of flows alerted
   on after the swap differs from the share before it by more than ``canary_max_jump``
   (a false-alarm storm, or alerts silenced by a backdoored model), the previous model
   is swapped back in.

If the export or the swap fails, the engine keeps serving the model it had.  Settings:
:class:`gateway.config.DeploySection` (``[deploy]``).
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the gate (pure)


@dataclass(frozen=True)
class DeployVerdict:
    deploy: bool
    reason: str  # "better", "within_margin", "worse", "unscored"
    detail: str = ""
    candidate: float | None = None
    current: float | None = None


def deploy_verdict(candidate: Mapping[str, float], current: Mapping[str, float], *, metric: str, margin: float,
                   flows: float, min_flows: float) -> DeployVerdict:
    """Deploy unless the candidate scores more than ``margin`` below the deployed model on
    ``metric``; with fewer than ``min_flows`` labelled validation flows there is nothing
    to judge on and the candidate is deployed ("unscored")."""
    new, old = candidate.get(metric), current.get(metric)
    if flows < min_flows or new is None or old is None or not (math.isfinite(new) and math.isfinite(old)):
        return DeployVerdict(True, "unscored", f"{flows:.0f} labelled validation flows (< {min_flows:g}) "
                                               "or no score", new, old)
    if old - new > margin:
        return DeployVerdict(False, "worse", f"{metric} {new:.4f} < deployed {old:.4f} - margin {margin:g} "
                                             f"on {flows:.0f} flows", new, old)
    return DeployVerdict(True, "better" if new >= old else "within_margin", f"{metric} {new:.4f} vs {old:.4f}",
                         new, old)


# ---------------------------------------------------------------- the canary (pure)


class CanaryState(str, enum.Enum):
    IDLE = "idle"  # no swap being watched
    WATCHING = "watching"  # counting flows after a swap
    PASSED = "passed"
    ROLLED_BACK = "rolled_back"


class CanaryEvent(str, enum.Enum):
    SWAPPED = "swapped"
    CALM = "calm"
    JUMP = "jump"


# the canary's transitions (a swap may follow whatever came before)
CANARY_TRANSITIONS: dict[tuple[CanaryState, CanaryEvent], CanaryState] = {
    **{(s, CanaryEvent.SWAPPED): CanaryState.WATCHING for s in CanaryState},
    (CanaryState.WATCHING, CanaryEvent.CALM): CanaryState.PASSED,
    (CanaryState.WATCHING, CanaryEvent.JUMP): CanaryState.ROLLED_BACK,
}


class AlertCanary:
    """The live alert rate before and after a swap (pure: counts in, a decision out).

    ``observe(flows, alerts)`` is fed every committed batch.  The last ``flows`` flows
    before a swap are the baseline; once ``flows`` flows came after it the canary
    compares the alerted shares: a change beyond ``max_jump`` is a JUMP (roll back), else
    CALM.  A baseline of fewer than ``flows / 5`` flows judges nothing (CALM).
    """

    def __init__(self, *, flows: int, max_jump: float):
        if flows < 1 or not 0 < max_jump <= 1:
            raise ValueError("flows >= 1 and 0 < max_jump <= 1 required")
        self.flows = int(flows)
        self.max_jump = float(max_jump)
        self.state = CanaryState.IDLE
        self._recent: collections.deque[tuple[int, int]] = collections.deque()
        self._recent_flows = 0
        self._baseline: tuple[int, int] = (0, 0)
        self._after = [0, 0]
        self.last: dict = {}

    def _fire(self, event: CanaryEvent) -> CanaryState:
        self.state = CANARY_TRANSITIONS[(self.state, event)]
        return self.state

    def swapped(self) -> None:
        """A new model went live: what was seen until now is the baseline."""
        self._baseline = (sum(f for f, _ in self._recent), sum(a for _, a in self._recent))
        self._after = [0, 0]
        self._fire(CanaryEvent.SWAPPED)

    def observe(self, flows: int, alerts: int) -> CanaryState | None:
        """Count a committed batch; returns PASSED or ROLLED_BACK when this batch decided."""
        if flows <= 0:
            return None
        decided = None
        if self.state is CanaryState.WATCHING:
            self._after[0] += flows
            self._after[1] += alerts
            if self._after[0] >= self.flows:
                decided = self._decide()
        self._recent.append((flows, alerts))
        self._recent_flows += flows
        while self._recent and self._recent_flows - self._recent[0][0] >= self.flows:
            self._recent_flows -= self._recent.popleft()[0]
        return decided

    def _decide(self) -> CanaryState:
        base_flows, base_alerts = self._baseline
        after = self._after[1] / self._after[0]
        before = base_alerts / base_flows if base_flows else None
        self.last = {"before": before, "after": after, "flows_before": base_flows, "flows_after": self._after[0]}
        if before is None or base_flows < self.flows / 5 or abs(after - before) <= self.max_jump:
            return self._fire(CanaryEvent.CALM)
        return self._fire(CanaryEvent.JUMP)


# ---------------------------------------------------------------- the hook


@dataclass
class DeployCounters:
    swapped: int = 0
    refused: int = 0  # globals the gate kept out of detection
    rolled_back: int = 0  # swaps the canary took back
    last: dict = field(default_factory=dict)  # the newest decision, for the status topic


class EngineHotSwap:
    """``on_global`` hook: gate, export version ``v`` to ``models_dir/global-v``, swap it
    in, and watch the alert rate after it.

    settings: the ``[deploy]`` section (:class:`gateway.config.DeploySection`); None
      swaps every verified global in (no gate, no canary).
    validation: callable returning the labelled validation flows (a FlowDataset) the
      gate scores on (the FL client's validation split), or None.
    initial_dir: the model directory the engine started with (a rollback target).
    keep: model directories kept on disk (the newest ones; those in use are never removed).
    """

    def __init__(self, *, engine, learner, models_dir: str | Path, keep: int = 3, settings=None,
                 validation: Callable[[], object] | None = None, initial_dir: str | Path | None = None,
                 on_change: Callable[[str], None] | None = None):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.engine = engine
        self.learner = learner
        self.models_dir = Path(models_dir)
        self.keep = keep
        self.settings = settings
        self.validation = validation
        self.on_change = on_change
        self.swapped: list[int] = []
        self.counters = DeployCounters()
        # what detection runs: (version name, directory, weights); the one before it
        self._live = (engine.model_version, None if initial_dir is None else Path(initial_dir), learner.weights())
        self._previous: tuple | None = None
        self._lock = threading.Lock()
        self.canary = (AlertCanary(flows=settings.canary_flows, max_jump=settings.canary_max_jump)
                       if settings is not None and settings.canary else None)

    # -- the gate --------------------------------------------------------------------
    def _scores(self, weights) -> tuple[dict[str, float], dict[str, float], float]:
        """(candidate's, deployed model's, validation flows); the learner ends holding
        ``weights`` again (the FL client trains from them)."""
        data = self.validation() if self.validation is not None else None
        if data is None or len(data) == 0:
            return {}, {}, 0.0
        new = self.learner.evaluate(data)
        self.learner.load(self._live[2])
        try:
            old = self.learner.evaluate(data)
        finally:
            self.learner.load(weights)
        return new, old, float(getattr(data, "flows", len(data)))

    def __call__(self, version: int, weights, metrics: dict) -> Path | None:
        """Returns the exported directory now in use, or None when the gate kept it out."""
        cfg = self.settings
        if cfg is not None and cfg.gate:
            new, old, flows = self._scores(weights)
            verdict = deploy_verdict(new, old, metric=cfg.metric, margin=cfg.margin, flows=flows,
                                     min_flows=cfg.min_flows)
            decision = {"version": version, "decision": "swapped" if verdict.deploy else "kept",
                        "reason": verdict.reason, "detail": verdict.detail, "candidate": verdict.candidate,
                        "deployed": verdict.current, "metric": cfg.metric}
            if not verdict.deploy:
                with self._lock:
                    self.counters.refused += 1
                    self.counters.last = decision
                log.warning("global model %d NOT deployed: %s; detection keeps %s", version, verdict.detail,
                            self._live[0])
                return None
        else:
            decision = {"version": version, "decision": "swapped", "reason": "no gate"}
        out = self._export_and_swap(version, weights, metrics)
        with self._lock:
            self.counters.swapped += 1
            self.counters.last = decision
            if self.canary is not None:
                self.canary.swapped()
        return out

    def _export_and_swap(self, version: int, weights, metrics: dict) -> Path:
        from gateway.model.modeldir import save_model_dir

        out = self.models_dir / f"global-{version}"
        parent = self._live[0]
        # the alert threshold chosen on validation data stays with the detector
        save_model_dir(self.learner.model, self.learner.tokenizer, self.learner.labels, out,
                       version=f"global-{version}", parent=parent, threshold=self.engine.threshold,
                       metrics={k: float(v) for k, v in metrics.items()}, extra={"source": "federated"}, onnx=True)
        self.engine.swap(out)
        with self._lock:
            self._previous = self._live
            self._live = (f"global-{version}", out, {k: np.array(v, copy=True) for k, v in weights.items()})
        self.swapped.append(version)
        self._prune()
        log.info("detector now runs global model %d (%s)", version, out)
        return out

    # -- the canary ---------------------------------------------------------------------
    def observe(self, flows: int, alerts: int) -> None:
        """A committed batch of ``flows`` with ``alerts`` at or above the threshold (any
        source thread); rolls the last swap back when the canary says so."""
        if self.canary is None:
            return
        with self._lock:
            decided = self.canary.observe(flows, alerts)
            previous = self._previous if decided is CanaryState.ROLLED_BACK else None
            if decided is not None:
                self.counters.last = {**self.counters.last, "canary": decided.value, **self.canary.last}
        if previous is None:
            return
        if previous[1] is None:
            log.error("canary: alert rate %s -> %s after %s, but no directory to roll back to",
                      self.canary.last.get("before"), self.canary.last.get("after"), self._live[0])
            return
        try:
            self.engine.swap(previous[1])
        except Exception:  # noqa: BLE001 - the new model keeps serving; said in the log
            log.exception("canary: rolling back to %s failed", previous[0])
            return
        with self._lock:
            rolled = self._live[0]
            self._live, self._previous = previous, None
            self.counters.rolled_back += 1
            self.counters.last = {**self.counters.last, "rolled_back": rolled, "now": previous[0]}
        log.warning("canary: alerted share %.3f -> %.3f after %s went live; rolled back to %s",
                    self.canary.last["before"], self.canary.last["after"], rolled, previous[0])
        if self.on_change is not None:
            self.on_change(previous[0])

    # -- reporting --------------------------------------------------------------------------
    def status(self) -> dict:
        """What the status topic and page show."""
        with self._lock:
            c = self.counters
            return {"deployed": self._live[0], "swapped": c.swapped, "refused": c.refused,
                    "rolled_back": c.rolled_back, "canary": None if self.canary is None else self.canary.state.value,
                    "last": dict(c.last)}

    def _prune(self) -> None:
        in_use = {p for p in (self._live[1], (self._previous or (None, None))[1]) if p is not None}
        dirs = sorted((p for p in self.models_dir.glob("global-*") if p.is_dir()),
                      key=lambda p: int(p.name.split("-", 1)[1]) if p.name.split("-", 1)[1].isdigit() else -1)
        for old in dirs[: max(0, len(dirs) - self.keep)]:
            if old not in in_use:
                shutil.rmtree(old, ignore_errors=True)
