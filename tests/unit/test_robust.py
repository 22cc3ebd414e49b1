"""Robust aggregation (issue 16.2): one vote per gateway per window, clipped sample
counts, norms bounded by the window's median, the combiners, the aggregate check and
the deployment gate's decision -- hand-computed values and hypothesis properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_aggregator import gate
from cloud_aggregator.pool import PooledUpdate, UpdatePool
from cloud_aggregator.safety import GateSettings, RobustSettings
from cloud_aggregator.strategies import GSFS, FedAvg, RobustAggregation, StrategyState, UpdateView, build_strategy
from cloud_aggregator.strategies import aggregate as agg


def t(*values) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


def upd(sender, values, *, n=10, base=0, s=1) -> UpdateView:
    return UpdateView(sender=sender, delta=t(*values), num_samples=n, base_version=base, submissions=s)


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


# ---------------------------------------------------------------- one vote per window


def spam_window(strategy, uploads=200):
    """The issue's drill: one sender uploads ``uploads`` times in a window, three others
    once; everything goes through the real pool."""
    pool = UpdatePool(clock=Clock())
    for i in range(uploads):
        pool.offer(PooledUpdate(sender="spam", message_id=f"m{i}", base_version=0, round=0, num_samples=10,
                                delta=t(-1.0), received_at=1000.0 + i))
    for g in ("a", "b", "c"):
        pool.offer(PooledUpdate(sender=g, message_id="m", base_version=0, round=0, num_samples=10,
                                delta=t(1.0), received_at=1000.0))
    view = pool.view()
    assert len(view.updates) == 4 and {u.sender: u.submissions for u in view.updates}["spam"] == uploads
    return dict(zip(strategy.aggregate(t(0.0), view.updates, version=0).senders,
                    strategy.aggregate(t(0.0), view.updates, version=0).client_weights))


def test_spam_buys_no_weight():
    """200 uploads in a window weigh what one does (the issue measured 0.995 before)."""
    assert spam_window(build_strategy("gsfs")) == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.25, "spam": 0.25})
    assert spam_window(build_strategy("gsfs", robust=RobustSettings.off()))["spam"] == pytest.approx(200 / 203)


# ---------------------------------------------------------------- sample counts


def test_inflated_sample_counts_are_clipped_to_a_multiple_of_the_median():
    # claims 10, 20, 30, 30000: median 25 -> cap 75
    assert agg.clip_samples([10, 20, 30, 30000], multiple=3.0) == [10, 20, 30, 75]
    assert agg.clip_samples([10, 30000], reference=[20, 30], multiple=3.0) == [10, 75]  # others' newest counts
    assert agg.clip_samples([10, 500], maximum=100) == [10, 100]
    assert agg.clip_samples([0, 5]) == [1, 5]  # at least 1 each
    res = build_strategy("fedavg").aggregate(t(0.0), [upd("a", [1.0], n=10), upd("b", [1.0], n=20),
                                                      upd("c", [1.0], n=30), upd("x", [1.0], n=30000)], version=0)
    assert res.client_weights == pytest.approx((10 / 135, 20 / 135, 30 / 135, 75 / 135))


def test_a_lone_inflated_claim_is_held_to_the_other_gateways_counts():
    """The median includes the newest (clipped) count of every gateway seen before, so
    a window of one cannot set its own cap."""
    strategy = build_strategy("fedavg")
    first = strategy.aggregate(t(0.0), [upd(g, [0.1], n=n) for g, n in (("a", 10), ("b", 20), ("c", 30))],
                               version=0)
    second = strategy.aggregate(t(0.0), [upd("a", [0.1], n=10), upd("x", [0.1], n=1_000_000)], version=1,
                                state=first.state)
    assert second.info["robust"]["samples_clipped"] == {"x": [1_000_000, 75]}  # 3 x median(10, 1e6 | 20, 30)


# ---------------------------------------------------------------- norms


def test_norms_are_bounded_by_the_window_median_and_history():
    deltas, scales, limit = agg.clip_norms([t(3, 4), t(0, 1), t(0, 2), t(300, 400)], multiple=3.0)
    assert limit == pytest.approx(3.0 * 3.5)  # median of 5, 1, 2, 500
    assert scales[:3] == [1.0, 1.0, 1.0] and agg.global_norm(deltas[3]) == pytest.approx(10.5, rel=1e-6)
    _, scales, limit = agg.clip_norms([t(300, 400)], reference=[1.0, 2.0, 2.0], multiple=3.0)
    assert limit == pytest.approx(6.0) and scales[0] == pytest.approx(6.0 / 500)  # a window of one


def test_a_scaled_delta_moves_the_model_no_further_than_the_bound():
    honest = [upd(g, [0.1, 0.1]) for g in "abcd"]
    evil = upd("x", [100.0, 100.0])  # x1000
    res = build_strategy("fedavg", robust={"combiner": "mean"}).aggregate(t(0.0, 0.0), honest + [evil], version=0)
    assert agg.global_norm(res.weights) <= (4 * math.hypot(0.1, 0.1) + 3 * math.hypot(0.1, 0.1)) / 5 + 1e-6
    assert set(res.info["robust"]["norm_clipped"]) == {"x"}
    assert len(res.state.norm_history) == 5 and max(res.state.norm_history) == pytest.approx(3 * math.hypot(0.1, 0.1))


def test_global_norm_does_not_overflow_on_large_float32():
    big = {"w": np.full(1000, 1e20, np.float32)}
    assert float(np.vdot(big["w"], big["w"])) == math.inf  # what float32 would give
    assert agg.global_norm(big) == pytest.approx(1e20 * math.sqrt(1000), rel=1e-6)


# ---------------------------------------------------------------- combiners


def test_weighted_trimmed_mean_hand_computed():
    # trim 0.1 at each end: 0.0 keeps 0.45 - 0.1, 100.0 (weight 0.1) is dropped whole
    out = agg.weighted_trimmed_mean([t(0.0), t(1.0), t(100.0)], [0.45, 0.45, 0.1], 0.1)
    assert out["w"][0] == pytest.approx(0.45 / 0.8)
    assert agg.weighted_trimmed_mean([t(1, 2), t(3, 4)], [0.25, 0.75], 0.0)["w"] == pytest.approx([2.5, 3.5])
    assert agg.trimmed_mean([t(float(i)) for i in range(10)], 0.1)["w"][0] == pytest.approx(4.5)


def test_weighted_median_hand_computed():
    assert agg.coordinate_median([t(0.8), t(1.0), t(1.2), t(1e6)])["w"][0] == pytest.approx(1.1)
    assert agg.weighted_median([t(1.0), t(2.0), t(3.0)], [0.2, 0.2, 0.6])["w"][0] == pytest.approx(3.0)
    assert agg.weighted_median([t(1.0), t(2.0), t(3.0)], [0.4, 0.4, 0.2])["w"][0] == pytest.approx(2.0)


def test_krum_keeps_the_updates_close_to_their_neighbours():
    deltas = [t(1.0, 1.0), t(1.1, 0.9), t(0.9, 1.1), t(1.05, 1.0), t(-50.0, 60.0)]
    kept = agg.krum_select(deltas, 1)
    assert sorted(kept) == [0, 1, 2, 3]
    assert agg.krum_select(deltas[:3], 1) == [0, 1, 2]  # n < 2f + 3: keeps all
    res = build_strategy("fedavg", robust={"combiner": "krum", "norm_multiple": None}).aggregate(
        t(0.0, 0.0), [upd(str(i), list(d["w"])) for i, d in enumerate(deltas)], version=0)
    assert res.info["excluded"] == ["4"] and res.client_weights[4] == 0.0
    assert res.weights["w"] == pytest.approx([1.0125, 1.0], rel=1e-5)


values = st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=2, max_size=9)


@settings(max_examples=150, deadline=None)
@given(values, st.data())
def test_trimmed_mean_and_median_stay_within_the_values(xs, data):
    ws = data.draw(st.lists(st.floats(0.01, 10), min_size=len(xs), max_size=len(xs)))
    trim = data.draw(st.floats(0.0, 0.49))
    deltas = [t(x) for x in xs]
    lo, hi = min(xs), max(xs)
    for out in (agg.weighted_trimmed_mean(deltas, ws, trim), agg.weighted_median(deltas, ws)):
        assert lo - 1e-3 * (1 + abs(lo)) <= float(out["w"][0]) <= hi + 1e-3 * (1 + abs(hi))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=3, max_size=9), st.floats(-1e30, 1e30))
def test_a_client_lighter_than_the_trim_cannot_leave_the_others_range(honest, evil):
    n = len(honest)
    weights = [1.0] * n + [0.05 * n]  # the outsider holds 0.05 / 1.05 < 0.1 of the mass
    out = agg.weighted_trimmed_mean([t(x) for x in honest] + [t(np.float32(evil))], weights, 0.1)
    assert min(honest) - 1e-4 <= float(out["w"][0]) <= max(honest) + 1e-4


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=8))
def test_equal_weights_match_the_classic_statistics(xs):
    deltas = [t(x) for x in xs]
    assert float(agg.coordinate_median(deltas)["w"][0]) == pytest.approx(float(np.median(np.float32(xs))),
                                                                           rel=1e-5, abs=1e-4)
    assert float(agg.weighted_trimmed_mean(deltas, [1.0] * len(xs), 0.0)["w"][0]) == pytest.approx(
        float(np.mean(np.float64(np.float32(xs)))), rel=1e-5, abs=1e-4)


# ---------------------------------------------------------------- wiring


def test_robust_is_on_for_every_strategy_and_survives_dp():
    for name in ("gsfs", "fedavg", "fedopt"):
        s = build_strategy(name)
        assert isinstance(s, RobustAggregation) and s.settings == RobustSettings()
    wrapped = build_strategy("fedavg", robust={"combiner": "mean"},
                             dp={"clip_norm": 100.0, "noise_multiplier": 0.0})
    res = wrapped.aggregate(t(0.0), [upd("a", [1.0]), upd("b", [1.0]), upd("x", [1000.0], n=10**6)], version=0)
    assert res.info["robust"]["samples_clipped"] == {"x": [10**6, 30]}  # DP(robust(...)): bounds still apply
    assert res.weights["w"][0] == pytest.approx((10 * 1.0 + 10 * 1.0 + 30 * 3.0) / 50)  # norm 3 x median 1


def test_robust_off_is_the_plain_strategy():
    ups = [upd("a", [1.0], n=1), upd("x", [1e6], n=1000)]
    assert build_strategy("fedavg", robust=RobustSettings.off()).aggregate(t(0.0), ups, version=0).weights[
        "w"][0] == pytest.approx(FedAvg().aggregate(t(0.0), ups, version=0).weights["w"][0])


def test_norm_history_survives_a_checkpoint():
    res = build_strategy("gsfs").aggregate(t(0.0), [upd("a", [3.0, 4.0])], version=0)
    arrays, meta = res.state.to_tensors()
    back = StrategyState.from_tensors(arrays, meta)
    assert back.norm_history == (5.0,) and back.client_samples == (("a", 10),)


@pytest.mark.parametrize("bad", [
    {"combiner": "mode"}, {"trim": 0.5}, {"trim": -0.1}, {"norm_multiple": 0.5}, {"sample_multiple": float("nan")},
    {"max_samples": 0}, {"max_samples": 2**31}, {"norm_bound": 0}, {"step_ratio": -1}, {"norm_history": 0},
    {"krum_byzantine": 0.5}, {"enabled": "yes"}, {"method": "median"},
])
def test_bad_robust_settings_are_refused(bad):
    with pytest.raises(ValueError):
        RobustSettings.from_mapping(bad)


# ---------------------------------------------------------------- the aggregate check


def test_the_check_refuses_a_non_finite_or_overlong_step():
    cfg = RobustSettings()
    w = {"w": np.ones(4, np.float32), "ids": np.arange(3)}
    ok = gate.check_candidate({"w": w["w"] + 0.1, "ids": w["ids"]}, w, settings=cfg, recent_steps=[0.2, 0.2, 0.2])
    assert ok.ok and ok.figures["step_norm"] == pytest.approx(0.2, rel=1e-5)
    nan = gate.check_candidate({"w": np.array([np.nan, 1, 1, 1], np.float32)}, w, settings=cfg, recent_steps=[])
    assert nan.reason == gate.NOT_FINITE
    far = gate.check_candidate({"w": w["w"] + 1e30}, w, settings=cfg, recent_steps=[])
    assert far.reason == gate.STEP_NORM and "weights' norm" in far.detail  # no history yet: the ratio
    jump = gate.check_candidate({"w": w["w"] + 0.6}, w, settings=cfg, recent_steps=[0.2, 0.2, 0.2])
    assert jump.reason == gate.STEP_NORM and "median" in jump.detail  # 1.2 > 5 x 0.2
    assert gate.check_candidate({"w": w["w"] + 0.6}, w, settings=cfg, recent_steps=[0.2, 0.2]).ok  # < 3 known
    assert gate.check_candidate({"w": w["w"] + 1e30}, w, settings=RobustSettings.off(), recent_steps=[]).ok
    assert not gate.check_candidate({"w": w["w"] * np.inf}, w, settings=RobustSettings.off(), recent_steps=[]).ok


def test_the_gate_refuses_a_candidate_worse_than_the_margin():
    cfg = GateSettings(margin=0.01)
    assert gate.gate_decision({"accuracy": 0.95}, {"accuracy": 0.955}, settings=cfg).ok
    worse = gate.gate_decision({"accuracy": 0.90}, {"accuracy": 0.95}, settings=cfg)
    assert not worse.ok and worse.reason == gate.GATE and worse.figures == {
        "gate_accuracy": 0.90, "gate_current_accuracy": 0.95}
    assert gate.gate_decision({"accuracy": 0.5}, None, settings=cfg).ok  # nothing to compare with
    assert gate.gate_decision({}, {"accuracy": 0.9}, settings=cfg).reason == gate.SCORER_FAILED
    f1 = GateSettings(metric="f1", margin=0.0)
    assert not gate.gate_decision({"accuracy": 1.0, "f1": 0.5}, {"accuracy": 0.0, "f1": 0.6}, settings=f1).ok
    assert gate.header_scores({"accuracy": 0.9, "bad": float("nan")}) == {"gate_accuracy": 0.9}
