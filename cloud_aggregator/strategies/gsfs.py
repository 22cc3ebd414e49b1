"""GSFS, server side (DESIGN.md, "The strategies").

Keep the newest update of each client with its submission count s_i; when ceil(rho*N)
distinct live clients have reported (N = clients alive), or the deadline passed since
the first update of this window, aggregate w <- w + eta * sum_i pi_i delta_i with
pi_i = s_i / sum_j s_j times the staleness discount (1 + staleness)^-a, renormalised.

The defaults are DESIGN.md's literal GSFS. Which options fit non-IID gateways: with
``sample_weighted`` and ``coverage_scaled`` the step is FedAvg's full-participation
step with every quiet gateway's delta taken as zero, GSFS's own premise (a quiet
gateway is one the global model fits). That premise holds only when the gateways
speak once the global stops fitting them: the trigger's ``reference="upload"``
(gateway/fl/trigger.py) does that, ``stay`` keeps both sides of a conflict in the
same windows. ``remember_quiet`` replaces the zero by a remembered model or delta;
on IoT-23 neither helped (cloud_aggregator/experiment.py and README, GSFS options).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from cloud_aggregator.strategies import aggregate as agg
from cloud_aggregator.strategies.base import PoolView, Strategy, UpdateView


class GSFS(Strategy):
    """Keyword-only settings (defaults in brackets):

    rho [0.6]: share of live clients that must have reported: K = ceil(rho * N).
    eta [1.0]: server learning rate.
    staleness_exponent [0.5]: a in (1 + staleness)^-a (0 disables the discount).
    deadline_s [60]: aggregate whatever arrived (>= min_updates) this long after the
      first update of the window.
    min_updates [1]: fewest updates the deadline path aggregates.
    trigger [{}]: gateway trigger overrides published on the control topic
      (tau, ema, k, warmup, eval_every).
    sample_weighted [False]: also weight each update by its sample count n_i
      (pi_i ~ s_i * n_i * discount); for gateways of very different sizes (non-IID).
    coverage_scaled [False]: scale the step by the window's share of the samples of all
      clients (:func:`aggregate.sample_coverage`). A client that did not upload is, by
      GSFS's own premise, one whose model did not change significantly: it counts as a
      zero delta instead of dropping out of the average. A window that only small
      gateways reached then moves the global model by their share of the data, not as
      if they were everyone (without it, a window of benign-only gateways pulls every
      prompt towards benign; the next window pulls back: the curve swings). Sample
      counts are the newest each client sent (kept in the strategy state); a live
      client not heard from yet counts with the mean of the known ones.
    remember_quiet [False]: keep every client's newest local model (the global model
      its update was applied to, plus its delta) and let the clients that did not
      report in a window take part with their remembered model, as the delta
      (remembered - current global), weighted like a fresh update (sample count when
      sample_weighted) times the staleness discount of the versions since it was
      remembered. With eta = 1 the new global is then the weighted mean of every
      client's newest model (MIFA-style, Gu et al. 2021, in model form): a client
      whose data the current global already fits stays quiet and still holds the
      model where it wanted it, so the other gateways' windows cannot erode what only
      it knows (the swing in the IoT-23 runs: one scenario holds all the DDoS flows).
      The pull of a remembered model vanishes when the global reaches it, so stale
      entries cannot push the model without end. Costs one model per client in the
      strategy state (checkpointed).
    remember_as ["model"]: what remember_quiet keeps: "model" (above) or "delta": the
      client's newest delta itself, re-applied while it stays quiet (MIFA's original
      form: the stale delta stands in for the one it would send now). "delta" keeps a
      quiet client's pull in every window, even when its remembered model came from a
      far-away global; its staleness discount bounds how long it keeps pulling.
    """

    name = "gsfs"
    synchronous = False

    def __init__(self, *, rho: float = 0.6, eta: float = 1.0, staleness_exponent: float = 0.5,
                 deadline_s: float = 60.0, min_updates: int = 1, trigger: dict | None = None,
                 sample_weighted: bool = False, coverage_scaled: bool = False, remember_quiet: bool = False,
                 remember_as: str = "model"):
        super().__init__(eta=eta, min_updates=min_updates)
        if not 0 < rho <= 1:
            raise ValueError("rho must be in (0, 1]")
        if staleness_exponent < 0:
            raise ValueError("staleness_exponent must be >= 0")
        if deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        self.rho = float(rho)
        self.staleness_exponent = float(staleness_exponent)
        self.deadline_s = float(deadline_s)
        self.trigger = dict(trigger or {})
        self.sample_weighted = bool(sample_weighted)
        self.coverage_scaled = bool(coverage_scaled)
        self.remember_quiet = bool(remember_quiet)
        if remember_as not in ("model", "delta"):
            raise ValueError("remember_as must be 'model' or 'delta'")
        self.remember_as = remember_as

    def quorum(self, live: int) -> int:
        """K = ceil(rho * N), at least 1."""
        return max(1, math.ceil(self.rho * live - 1e-9))

    def should_aggregate(self, view: PoolView) -> bool:
        if not view.updates:
            return False
        reporters = {u.sender for u in view.updates} & view.live_clients
        if len(reporters) >= self.quorum(len(view.live_clients)):
            return True
        waited = view.opened_at is not None and view.now - view.opened_at >= self.deadline_s
        return waited and len(view.updates) >= self.min_updates

    def client_weights(self, updates: Sequence[UpdateView], version: int) -> np.ndarray:
        pi = agg.gsfs_weights([u.submissions for u in updates],
                              [max(0, version - u.base_version) for u in updates],
                              staleness_exponent=self.staleness_exponent)
        if self.sample_weighted:
            pi = agg.normalise(pi * np.asarray([u.num_samples for u in updates], dtype=np.float64))
        return pi

    def step_scale(self, updates, state, live_clients=0):
        if not self.coverage_scaled:
            return 1.0, state
        window = {u.sender: int(u.num_samples) for u in updates}
        known = {**dict(state.client_samples), **window}
        coverage = agg.sample_coverage(window, known, unheard=max(0, int(live_clients) - len(known)))
        return coverage, replace(state, client_samples=tuple(sorted(known.items())))

    def quiet_updates(self, global_weights, updates, version, state):
        if not self.remember_quiet:
            return []
        fresh = {u.sender for u in updates}
        def delta_of(kept):
            return dict(kept) if self.remember_as == "delta" else agg.subtract(kept, global_weights)

        return [UpdateView(sender=sender, delta=delta_of(state.remembered[sender]),
                           num_samples=n, base_version=stored_at, submissions=1)
                for sender, n, stored_at in state.remembered_meta
                if sender not in fresh and sender in state.remembered]

    def remember(self, global_weights, updates, version, state):
        if not self.remember_quiet:
            return state
        remembered = dict(state.remembered)
        meta = {s: (n, v) for s, n, v in state.remembered_meta}
        for u in updates:  # the newest local model of each reporter (this global + its delta), or the delta
            remembered[u.sender] = ({k: np.asarray(v, np.float32).copy() for k, v in u.delta.items()}
                                    if self.remember_as == "delta" else
                                    agg.add_scaled({k: global_weights[k] for k in u.delta}, u.delta, 1.0))
            meta[u.sender] = (int(u.num_samples), int(version))
        return replace(state, remembered=remembered,
                       remembered_meta=tuple(sorted((s, n, v) for s, (n, v) in meta.items())))

    def control(self):
        out = {"strategy": self.name}
        if self.trigger:
            out["trigger"] = dict(self.trigger)
        return out
