"""The GSFS upload trigger (DESIGN.md, "The strategies"). PURE: numbers in, decisions out.

A gateway in GSFS mode uploads only when its local model changed significantly. Two
independent triggers decide that:

* performance trigger: every ``eval_every`` local steps the caller evaluates the metric
  P (F1 on the local validation split by default) and hands it to
  :meth:`GSFSTrigger.observe_metric`; if ``|P_now - P_ref| > tau`` the trigger fires.
* gradient trigger: per layer l, an exponential moving mean and variance of the
  layer's gradient norm g_l::

      mu_l  <- a * mu_l  + (1 - a) * g_l
      s_l^2 <- a * s_l^2 + (1 - a) * (g_l - mu_l)^2

  After ``warmup`` observations, the trigger fires if any ``g_l > mu_l + k * s_l``.
  The test uses the statistics *before* g_l is folded in (a new value is compared with
  what was expected of it), and ``(g_l - mu_l)`` in the variance update uses that same
  previous mean, so an outlier raises the variance by its full surprise.

:meth:`GSFSTrigger.reset` is called after an upload: the reference metric becomes the
given value, the step counter and the warm-up restart (so two uploads are at least
``warmup`` steps apart), the layer statistics are kept (they describe the gradient
scale, which a new reference does not change).

When a global model arrives the client calls :meth:`GSFSTrigger.on_global` with the new
model's P. DESIGN.md allows two reference points, "the last upload or the last global
model received"; ``reference`` chooses:

* ``"upload"`` (default): P_ref stays the metric of the client's own model at its last
  upload, raised to the global's P when the global does better (P_ref is the best this
  client knows the federation can do on its data). A global whose P is more than
  ``tau`` below P_ref has *forgotten* this client's data (other gateways' windows
  pulled it away): the trigger answers ``fire`` with reason ``"forgotten"`` and the
  client owes an upload, paid at its next evaluation (after E local steps from that
  global, so the upload is its fix). Why: with a reset on every broadcast a global that
  degraded the client never fires anything (P_now is compared with the degraded P), the
  client stays quiet, and windows without it keep eroding what only it knows (on IoT-23
  one scenario holds every DDoS flow: the central accuracy swung 0.67..0.996).
  With ``stay`` = n > 0 a gateway that was forgotten also uploads from the next n
  versions (reason "forgotten" too; on IoT-23 each costs one update). Why: a
  forgotten gateway is in conflict with the gateways whose window moved the model
  away (IoT-23: one scenario's benign flows look like another's DDoS flows). If each
  side only speaks after the other's window hurt it, the windows alternate and the
  model swings between the two; staying in the next windows puts both sides in the
  same aggregation, where their sample-weighted average finds the compromise, as
  FedAvg's full rounds do, until no one is forgotten any more.
* ``"global"``: P_ref becomes the global's P (the literal reset after a broadcast; the
  behaviour before this option existed).

``metric`` names what P is (the client computes it; the trigger only compares):

* ``"f1"`` (DESIGN's default): binary F1, accuracy when the split holds one class.
  F1 is a step function of the few rare-class flows: on a 640-flow split with 3
  malicious flows one flow moves it by ~0.2, so ``tau`` = 0.01 fires on noise.
* ``"accuracy"``: the flow-weighted binary accuracy: ``tau`` is the share of this
  gateway's flows the global model may lose before the gateway speaks, the quantity
  the federation is judged on; one flow of 640 moves it by 0.0016.
* ``"likelihood"``: the flow-weighted geometric mean of the probability given to each
  flow's true side, exp(mean log p), in (0, 1]; smooth in the decision margin, so a
  gateway would speak before its flows flip. Measured on IoT-23 it is too eager: a
  global that classifies a honeypot's benign flows right with p ~ 0.7 sits 0.3 below
  the honeypot's own p ~ 0.999, every version, and every gateway uploads every version.

Cooldown (``cooldown`` > 0, off by default): after an upload from global version v the
client stays quiet for the next ``cooldown`` global versions (:meth:`GSFSTrigger.admit`
says so when a version arrives), unless the new global model's metric differs by more
than ``tau`` from the metric of v, the global its upload started from: the global model
changed for this client, so it speaks again at once. Why: a gateway whose data the
global model cannot fit (a few malicious flows that look like everyone else's benign
ones) improves its local P by more than ``tau`` after every local session and would
upload the same message every version; the server already has it. A collapse of the
global model on the client's data still makes it upload at once. A quiet client does
not wait for a version that may never come: ``cooldown_s`` seconds after it went quiet
on a version (:meth:`GSFSTrigger.retry_due`), it trains and may upload on that version.

DESIGN.md's threshold is per client (tau_i): with ``min_flows`` > 0 a client whose
validation split holds n_i flows uses tau_i = max(tau, min_flows / n_i), so a change
of P must be worth at least ``min_flows`` flows. Why: accuracy on a 21-flow split
(IoT-23's smallest honeypot) moves by 0.048 per flow; with tau = 0.01 one flow decides,
and such a gateway spoke on most versions although its share of the data (0.3 %) can
barely move the model.

The whole state is a frozen :class:`TriggerState` value (``trigger.state`` out,
``GSFSTrigger(config=..., state=...)`` in), so a client can persist or inspect it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any


class TriggerConfigError(ValueError):
    """A trigger setting that is unknown, of the wrong type or out of range."""


# the settings that are names, not numbers, and the names they accept
CHOICES = {"reference": ("upload", "global"), "metric": ("f1", "accuracy", "likelihood")}


@dataclass(frozen=True, kw_only=True)
class TriggerConfig:
    """GSFS trigger settings (all keyword-only; defaults documented here).

    tau         performance threshold: fire when |P_now - P_ref| > tau (default 0.01)
    ema         EMA factor a of the gradient statistics, 0 <= a < 1 (default 0.9)
    k           z-score multiplier of the gradient trigger, > 0 (default 3.0)
    warmup      gradient observations before the gradient trigger may fire, >= 1
                (default 20); also the minimum distance in steps between two uploads
                through the gradient trigger
    eval_every  E: evaluate P every E local steps, >= 1 (default 25)
    cooldown    global versions to stay quiet after an upload unless the global model's
                metric moved by more than tau since (see the module doc), >= 0
                (default 0: off)
    cooldown_s  seconds after which a client quiet on a version trains on it anyway
                (no newer version came), > 0 (default 30)
    min_flows   the performance trigger's tau_i = max(tau, min_flows / n_i), n_i the
                flows of the client's validation split (:meth:`GSFSTrigger.set_support`):
                a change of P must also be worth ``min_flows`` flows, >= 0 (default 0)
    stay        after a "forgotten" upload, also upload from the next ``stay`` global
                versions (module doc), >= 0 (default 0: off)
    reference   "upload" (P_ref from the client's last upload, raised by better
                globals; a global more than tau below it makes the client upload) or
                "global" (P_ref reset to each global's P) (default "upload"; module doc)
    metric      what P is: "f1", "accuracy" or "likelihood" (default "f1", DESIGN's;
                module doc)
    """

    tau: float = 0.01
    ema: float = 0.9
    k: float = 3.0
    warmup: int = 20
    eval_every: int = 25
    cooldown: int = 0
    cooldown_s: float = 30.0
    stay: int = 0
    min_flows: float = 0.0
    reference: str = "upload"
    metric: str = "f1"

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise TriggerConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for f in fields(self):
            if f.name in CHOICES:
                continue
            value = getattr(self, f.name)
            want = int if f.type in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TriggerConfigError(f"{f.name} must be a number, got {value!r}")
            if want is int and not float(value).is_integer():
                raise TriggerConfigError(f"{f.name} must be an integer, got {value!r}")
            if not math.isfinite(value):
                raise TriggerConfigError(f"{f.name} must be finite, got {value!r}")
            object.__setattr__(self, f.name, want(value))
        if self.tau < 0:
            raise TriggerConfigError(f"tau must be >= 0, got {self.tau}")
        if not 0.0 <= self.ema < 1.0:
            raise TriggerConfigError(f"ema must be in [0, 1), got {self.ema}")
        if self.k <= 0:
            raise TriggerConfigError(f"k must be > 0, got {self.k}")
        if self.warmup < 1:
            raise TriggerConfigError(f"warmup must be >= 1, got {self.warmup}")
        if self.eval_every < 1:
            raise TriggerConfigError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.cooldown < 0:
            raise TriggerConfigError(f"cooldown must be >= 0, got {self.cooldown}")
        if self.cooldown_s <= 0:
            raise TriggerConfigError(f"cooldown_s must be > 0, got {self.cooldown_s}")
        if self.min_flows < 0:
            raise TriggerConfigError(f"min_flows must be >= 0, got {self.min_flows}")
        if self.stay < 0:
            raise TriggerConfigError(f"stay must be >= 0, got {self.stay}")

    def with_overrides(self, overrides: Mapping[str, Any]) -> "TriggerConfig":
        """A copy with the given settings replaced (e.g. from the retained control topic).

        Unknown keys and invalid values raise :class:`TriggerConfigError`; the original
        is unchanged either way.
        """
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TriggerConfigError(f"unknown trigger setting(s): {', '.join(unknown)}")
        return replace(self, **dict(overrides))


@dataclass(frozen=True)
class LayerStats:
    """EMA mean and variance of one layer's gradient norm."""

    mean: float
    var: float

    @property
    def std(self) -> float:
        return math.sqrt(self.var)


@dataclass(frozen=True)
class TriggerState:
    """Everything the trigger remembers, as a value."""

    steps: int = 0  # local steps since the last reset
    observed: int = 0  # gradient observations since the last reset (warm-up counter)
    reference: float | None = None  # P_ref
    layers: Mapping[str, LayerStats] = field(default_factory=dict)
    quiet_left: int = 0  # global versions still to skip (cooldown)
    upload_base_metric: float | None = None  # P of the global model the last upload started from
    quiet_since: float | None = None  # clock when the client went quiet on the current version
    owed: bool = False  # a global forgot this client's data: upload at the next evaluation
    stay_left: int = 0  # versions still to upload from after a "forgotten" one (stay)
    support: float = 0.0  # flows behind P (the validation split), for min_flows


@dataclass(frozen=True)
class Decision:
    """What the caller should do after a step or a metric.

    fire      upload now
    reason    "performance", "gradient" or "forgotten" when fired, else None
    evaluate  (after a step) P is due: evaluate and call observe_metric
    layers    names of the layers whose gradient was above mu + k*s
    """

    fire: bool = False
    reason: str | None = None
    evaluate: bool = False
    layers: tuple[str, ...] = ()
    metric: float | None = None


class GSFSTrigger:
    """The pure GSFS trigger; feed it gradient norms each step and metrics when asked."""

    def __init__(self, *, config: TriggerConfig | None = None, state: TriggerState | None = None):
        if config is not None and not isinstance(config, TriggerConfig):
            raise TriggerConfigError(f"config must be a TriggerConfig, got {type(config).__name__}")
        if state is not None and not isinstance(state, TriggerState):
            raise TriggerConfigError(f"state must be a TriggerState, got {type(state).__name__}")
        self.config = config or TriggerConfig()
        self.state = state or TriggerState()

    def reconfigure(self, overrides: Mapping[str, Any]) -> TriggerConfig:
        """Apply control-topic overrides; keeps the state, except that a new ``metric``
        forgets the reference (a number of another kind). Raises TriggerConfigError."""
        new = self.config.with_overrides(overrides)
        if new.metric != self.config.metric:
            self.state = replace(self.state, reference=None, owed=False)
        self.config = new
        return self.config

    @property
    def tau(self) -> float:
        """tau_i: ``tau``, raised to ``min_flows / n_i`` when the validation split is small."""
        cfg, n = self.config, self.state.support
        return max(cfg.tau, cfg.min_flows / n) if cfg.min_flows > 0 and n > 0 else cfg.tau

    def set_support(self, flows: float) -> None:
        """How many flows P is measured on (the client's validation split)."""
        flows = float(flows)
        if not (math.isfinite(flows) and flows >= 0):
            raise TriggerConfigError(f"support must be a finite count >= 0, got {flows!r}")
        self.state = replace(self.state, support=flows)

    def step(self, grad_norms: Mapping[str, float]) -> Decision:
        """One local training step with its per-layer gradient norms.

        Non-finite norms are ignored for the statistics (a NaN would poison the EMA
        forever) but a non-finite norm after warm-up is itself a reason to fire: the
        model changed in a way the caller must not hide.
        """
        cfg, st = self.config, self.state
        a = cfg.ema
        after_warmup = st.observed >= cfg.warmup
        fired: list[str] = []
        layers = dict(st.layers)
        for name, g in grad_norms.items():
            g = float(g)
            prev = layers.get(name)
            if not math.isfinite(g):
                if after_warmup:
                    fired.append(name)
                continue
            if prev is None:
                layers[name] = LayerStats(mean=g, var=0.0)
                continue
            if after_warmup and g > prev.mean + cfg.k * prev.std:
                fired.append(name)
            diff = g - prev.mean
            layers[name] = LayerStats(mean=a * prev.mean + (1 - a) * g, var=a * prev.var + (1 - a) * diff * diff)
        steps = st.steps + 1
        self.state = replace(st, steps=steps, observed=st.observed + 1, layers=layers)
        evaluate = steps % cfg.eval_every == 0
        if fired:
            return Decision(fire=True, reason="gradient", evaluate=evaluate, layers=tuple(sorted(fired)))
        return Decision(evaluate=evaluate)

    def observe_metric(self, metric: float) -> Decision:
        """P_now, evaluated when a step said ``evaluate``. With no reference yet, it
        becomes the reference (nothing to compare with)."""
        metric = float(metric)
        if self.state.owed:
            return Decision(fire=True, reason="forgotten", metric=metric)
        ref = self.state.reference
        if ref is None or not math.isfinite(ref):
            self.state = replace(self.state, reference=metric)
            return Decision(metric=metric)
        if not math.isfinite(metric) or abs(metric - ref) > self.tau:
            return Decision(fire=True, reason="performance", metric=metric)
        return Decision(metric=metric)

    def uploaded(self, base_metric: float | None) -> None:
        """An upload left, computed from the global model whose metric was ``base_metric``:
        start the cooldown."""
        self.state = replace(self.state, quiet_left=self.config.cooldown,
                             upload_base_metric=None if base_metric is None else float(base_metric))

    def admit(self, global_metric: float | None, now: float = 0.0) -> bool:
        """A new global version arrived with metric ``global_metric``: may the client
        train and upload on it? False while the cooldown runs and the global model looks
        to this client as it did when it last uploaded (within ``tau``); ``now`` (a
        clock reading) starts the ``cooldown_s`` wait of :meth:`retry_due`."""
        st = self.state
        if st.quiet_left <= 0:
            self.state = replace(st, quiet_since=None)
            return True
        same = (global_metric is not None and st.upload_base_metric is not None
                and math.isfinite(float(global_metric))
                and abs(float(global_metric) - st.upload_base_metric) <= self.config.tau)
        self.state = replace(st, quiet_left=st.quiet_left - 1 if same else 0,
                             quiet_since=float(now) if same else None)
        return not same

    def retry_due(self, now: float) -> bool:
        """True once, ``cooldown_s`` after the client went quiet on its current version:
        it should train on that version after all (nothing newer came)."""
        since = self.state.quiet_since
        if since is None or now - since < self.config.cooldown_s:
            return False
        self.state = replace(self.state, quiet_since=None)
        return True

    def on_global(self, metric: float | None) -> Decision:
        """A new global model arrived whose P on the local validation split is
        ``metric`` (None: no validation data). Restarts the step counter and the
        warm-up; sets P_ref as ``reference`` says (module doc). Returns ``fire`` with
        reason "forgotten" when the global is more than ``tau`` below P_ref (or its P
        is not finite): the client owes an upload, which :meth:`observe_metric` asks
        for at the next evaluation."""
        st = replace(self.state, steps=0, observed=0, owed=False)
        ref = st.reference
        m = None if metric is None else float(metric)
        if (m is None or self.config.reference == "global" or ref is None or not math.isfinite(ref)):
            self.state = replace(st, reference=m)
            return Decision(metric=m)
        if not math.isfinite(m) or ref - m > self.tau:
            # the global changed for this client: a running cooldown ends (see admit)
            self.state = replace(st, owed=True, quiet_left=0, quiet_since=None, stay_left=self.config.stay)
            return Decision(fire=True, reason="forgotten", metric=m)
        if st.stay_left > 0:  # still taking part after a "forgotten" version
            self.state = replace(st, reference=max(ref, m), owed=True, stay_left=st.stay_left - 1)
            return Decision(fire=True, reason="forgotten", metric=m)
        self.state = replace(st, reference=max(ref, m))
        return Decision(metric=m)

    def reset(self, reference: float | None) -> None:
        """After an upload: P_ref = the uploaded model's P, restart counters, nothing owed."""
        self.state = replace(self.state, steps=0, observed=0, reference=reference, owed=False)
