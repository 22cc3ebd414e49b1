"""Strategy maths against hand-computed values (FedAvg weights, FedAdam, GSFS, DP, robust)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cloud_aggregator.strategies import (
    GSFS,
    DifferentialPrivacy,
    FedAvg,
    FedOpt,
    PoolView,
    RobustAggregation,
    StrategyState,
    UpdateView,
    build_strategy,
)
from cloud_aggregator.strategies import aggregate as agg
from cloud_aggregator.strategies.dp import rdp_epsilon


def t(*values) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


def upd(sender, values, *, n=1, base=0, s=1, rnd=0) -> UpdateView:
    return UpdateView(sender=sender, delta=t(*values), num_samples=n, base_version=base, submissions=s, round=rnd)


# ---------------------------------------------------------------- pure maths


def test_weighted_average_by_sample_counts():
    out = agg.weighted_average([t(1, 2), t(3, 4)], agg.sample_count_weights([1, 3]))
    np.testing.assert_allclose(out["w"], [2.5, 3.5])  # 0.25*[1,2] + 0.75*[3,4]


def test_normalise_all_zero_is_uniform_and_rejects_negative():
    np.testing.assert_allclose(agg.normalise([0, 0]), [0.5, 0.5])
    with pytest.raises(ValueError):
        agg.normalise([1, -1])


def test_gsfs_weights_frequency_and_staleness():
    # s = [1, 3]; staleness [0, 3]; a = 0.5  ->  [1*1, 3*4^-0.5] = [1, 1.5] -> [0.4, 0.6]
    np.testing.assert_allclose(agg.gsfs_weights([1, 3], [0, 3], staleness_exponent=0.5), [0.4, 0.6])
    # no discount: pure submission frequency 1/4, 3/4
    np.testing.assert_allclose(agg.gsfs_weights([1, 3], [0, 3]), [0.25, 0.75])


def test_fedadam_two_steps_by_hand():
    w = t(0.0)
    w1, s1 = agg.fedadam_step(w, t(0.1), None, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # m=0.01, v=1e-4, eta_1 = 0.1*sqrt(0.01)/0.1 = 0.1, step = 0.01/(0.01+0.001)
    assert s1.t == 1 and s1.m["w"][0] == pytest.approx(0.01) and s1.v["w"][0] == pytest.approx(1e-4)
    assert w1["w"][0] == pytest.approx(0.1 * 0.01 / 0.011, rel=1e-5)
    w2, s2 = agg.fedadam_step(w1, t(0.1), s1, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # m = 0.9*0.01 + 0.1*0.1 = 0.019; v = 0.99*1e-4 + 0.01*0.01 = 1.99e-4
    # eta_2 = 0.1*sqrt(1-0.99^2)/(1-0.9^2) = 0.1*sqrt(0.0199)/0.19
    eta2 = 0.1 * math.sqrt(0.0199) / 0.19
    assert s2.t == 2 and s2.m["w"][0] == pytest.approx(0.019) and s2.v["w"][0] == pytest.approx(1.99e-4)
    expected = 0.1 * 0.01 / 0.011 + eta2 * 0.019 / (math.sqrt(1.99e-4) + 1e-3)
    assert w2["w"][0] == pytest.approx(expected, rel=1e-5)  # = 0.18429
    assert w["w"][0] == 0.0  # inputs untouched


def test_clip_noise_median_trimmed_mean():
    clipped, scale = agg.clip_by_norm(t(3, 4), 1.0)
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8], rtol=1e-6)
    assert scale == pytest.approx(0.2)
    assert agg.clip_by_norm(t(0.3, 0.4), 1.0)[1] == 1.0
    np.testing.assert_allclose(agg.coordinate_median([t(1), t(5), t(2)])["w"], [2])
    np.testing.assert_allclose(agg.trimmed_mean([t(1), t(2), t(3), t(4), t(100)], 0.2)["w"], [3])
    n1 = agg.gaussian_noise_like(t(0, 0, 0), 2.0, np.random.default_rng(7))
    n2 = agg.gaussian_noise_like(t(0, 0, 0), 2.0, np.random.default_rng(7))
    np.testing.assert_array_equal(n1["w"], n2["w"])  # injected generator: reproducible
    big = agg.gaussian_noise_like({"w": np.zeros(20000)}, 2.0, np.random.default_rng(1))["w"]
    assert big.std() == pytest.approx(2.0, rel=0.03)


def test_add_scaled_keeps_integer_buffers():
    w = {"w": np.array([1.0], np.float32), "pos": np.array([0, 1, 2], np.int64)}
    out = agg.add_scaled(w, {"w": np.array([2.0], np.float32)}, 0.5)
    assert out["w"][0] == 2.0 and out["pos"].dtype == np.int64


# ---------------------------------------------------------------- strategies


def test_fedavg_aggregate_applies_sample_weighted_mean():
    s = FedAvg()
    res = s.aggregate(t(1, 1), [upd("a", [1, 2], n=1), upd("b", [3, 4], n=3)], version=0)
    np.testing.assert_allclose(res.weights["w"], [3.5, 4.5])
    assert res.client_weights == (0.25, 0.75) and res.senders == ("a", "b")
    assert res.info["update_norms"] == {"a": pytest.approx(math.sqrt(5)), "b": pytest.approx(5.0)}


def test_fedopt_uses_adam_and_carries_state():
    s = FedOpt(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    res = s.aggregate(t(0.0), [upd("a", [0.1])], version=0)
    assert res.weights["w"][0] == pytest.approx(0.1 * 0.01 / 0.011, rel=1e-5)
    assert res.state.adam.t == 1
    res2 = s.aggregate(res.weights, [upd("a", [0.1])], version=1, state=res.state)
    assert res2.state.adam.t == 2


def test_gsfs_aggregate_uses_submission_and_staleness_weights():
    s = GSFS(staleness_exponent=0.5, eta=1.0)
    res = s.aggregate(t(0.0), [upd("a", [1.0], s=1, base=3), upd("b", [2.0], s=3, base=0)], version=3)
    np.testing.assert_allclose(res.client_weights, [0.4, 0.6])
    assert res.weights["w"][0] == pytest.approx(0.4 * 1 + 0.6 * 2)


def test_gsfs_quorum_and_deadline():
    s = GSFS(rho=0.6, deadline_s=30)
    assert [s.quorum(n) for n in (0, 1, 5, 7, 10)] == [1, 1, 3, 5, 6]
    live = frozenset("abcde")
    two = [upd("a", [1]), upd("b", [1])]
    assert not s.should_aggregate(PoolView(two, live, version=0, now=10, opened_at=0))
    assert s.should_aggregate(PoolView(two + [upd("c", [1])], live, version=0, now=10, opened_at=0))
    # a reporter that went offline does not count towards K
    assert not s.should_aggregate(PoolView(two + [upd("z", [1])], live, version=0, now=10, opened_at=0))
    assert s.should_aggregate(PoolView(two, live, version=0, now=31, opened_at=0))  # deadline
    assert not s.should_aggregate(PoolView([], live, version=0, now=99, opened_at=0))


def test_fedavg_round_completion_timeout_and_liveness():
    s = FedAvg(round_timeout_s=100, min_updates=1)
    sel = frozenset({"a", "b"})
    got_a = [upd("a", [1], rnd=2)]
    view = dict(version=0, opened_at=0, round=2, selected=sel)
    assert not s.should_aggregate(PoolView(got_a, frozenset({"a", "b"}), now=10, **view))
    assert s.should_aggregate(PoolView(got_a, frozenset({"a"}), now=10, **view))  # b died
    assert s.should_aggregate(PoolView(got_a, frozenset({"a", "b"}), now=100, **view))  # timeout
    # an update for an old round is not eligible
    assert s.eligible(PoolView([upd("a", [1], rnd=1)], sel, now=0, **view)) == []


def test_fedavg_selection_fraction_is_seeded():
    s = FedAvg(fraction=0.5)
    live = [f"gw{i}" for i in range(10)]
    a = s.select(live, np.random.default_rng(3))
    assert len(a) == 5 and a == s.select(live, np.random.default_rng(3))
    assert FedAvg().select(live, np.random.default_rng(0)) == frozenset(live)


def test_robust_bounds_a_malicious_update():
    inner = FedAvg()
    honest = [upd("a", [1.0]), upd("b", [1.2]), upd("c", [0.8])]
    evil = upd("x", [1e6], n=1000)
    plain = inner.aggregate(t(0.0), honest + [evil], version=0)
    assert plain.weights["w"][0] > 1e5
    # samples clipped to 3 x median(1, 1, 1, 1000) = 3 -> weights 1, 1, 1, 3 (/6); norms to
    # 3 x median(1, 1.2, 0.8, 1e6) = 3.3; weighted median of 0.8, 1.0, 1.2 | 3.3: the half
    # mass ends exactly at 1.2 -> (1.2 + 3.3) / 2
    median = RobustAggregation(inner, {"combiner": "median"}).aggregate(t(0.0), honest + [evil], version=0)
    assert median.weights["w"][0] == pytest.approx(2.25)
    assert median.client_weights == pytest.approx((1 / 6, 1 / 6, 1 / 6, 0.5))
    assert median.info["robust"]["samples_clipped"] == {"x": [1000, 3]}
    assert median.info["robust"]["norm_clipped"] == {"x": pytest.approx(3.3e-6)}
    bounded = RobustAggregation(inner, {"combiner": "mean", "norm_bound": 2.0}).aggregate(
        t(0.0), honest + [evil], version=0)
    assert bounded.weights["w"][0] == pytest.approx((1.0 + 1.2 + 0.8 + 3 * 2.0) / 6)


def test_dp_clips_adds_noise_and_reports_epsilon():
    inner = FedAvg()
    quiet = DifferentialPrivacy(inner, clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    res = quiet.aggregate(t(0.0, 0.0), [upd("a", [3, 4]), upd("b", [0.3, 0.4])], version=0)
    np.testing.assert_allclose(res.weights["w"], [0.45, 0.6], rtol=1e-6)  # mean of [0.6,0.8],[0.3,0.4]
    noisy = DifferentialPrivacy(inner, clip_norm=1.0, noise_multiplier=1.1, rng=np.random.default_rng(0))
    state = StrategyState()
    eps = []
    for _ in range(3):
        r = noisy.aggregate(t(0.0, 0.0), [upd("a", [3, 4]), upd("b", [0.3, 0.4])], version=0, state=state)
        state = r.state
        eps.append(r.info["dp_epsilon"])
        assert r.info["dp_noise_std"] == pytest.approx(1.1 * 1.0 * 0.5)
    assert state.dp_steps == 3 and eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(rdp_epsilon(noise_multiplier=1.1, sampling_rates=[1, 1, 1], target_delta=1e-5))
    # sub-sampling amplifies privacy: smaller epsilon for the same steps
    assert rdp_epsilon(noise_multiplier=1.1, sampling_rates=[0.1] * 3, target_delta=1e-5) < eps[2]


def test_state_round_trips_through_tensors():
    res = FedOpt().aggregate(t(0.0, 1.0), [upd("a", [0.1, 0.2])], version=0)
    arrays, meta = res.state.to_tensors()
    back = StrategyState.from_tensors(arrays, meta)
    assert back.adam.t == 1
    np.testing.assert_array_equal(back.adam.m["w"], res.state.adam.m["w"])


@pytest.mark.parametrize("bad", [
    lambda: GSFS(rho=0), lambda: GSFS(rho=1.5), lambda: GSFS(deadline_s=0), lambda: FedAvg(fraction=0),
    lambda: FedOpt(beta1=1.0), lambda: FedOpt(tau=0), lambda: FedOpt(tau=float("nan")),
    lambda: FedOpt(tau=float("inf")), lambda: FedAvg(eta=float("nan")),
    lambda: RobustAggregation(FedAvg(), {"combiner": "mode"}), lambda: RobustAggregation(FedAvg(), {"trim": 0.5}),
    lambda: RobustAggregation(FedAvg(), {"method": "median"}),
    lambda: DifferentialPrivacy(FedAvg(), clip_norm=0, rng=np.random.default_rng()),
    lambda: build_strategy("fedsgd"), lambda: build_strategy("gsfs", params={"unknown": 1}),
])
def test_invalid_settings_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()


def test_build_strategy_wraps_in_order():
    s = build_strategy("gsfs", params={"rho": 0.5}, robust={"combiner": "median"}, dp={"clip_norm": 1.0})
    assert isinstance(s, DifferentialPrivacy) and isinstance(s.inner, RobustAggregation)
    assert s.name == "gsfs" and s.control()["strategy"] == "gsfs"


def test_wrapped_synchronous_strategy_keeps_round_management():
    s = build_strategy("fedavg", params={"min_available": 2, "round_timeout_s": 10}, robust={"combiner": "median"},
                       dp={"clip_norm": 1.0})
    assert s.synchronous and s.round_timeout_s == 10
    assert not s.can_open_round(frozenset({"a"})) and s.can_open_round(frozenset({"a", "b"}))
    assert s.select(["a", "b"], np.random.default_rng(0)) == frozenset({"a", "b"})


def test_client_metric_means_follow_the_client_weights():
    ups = [UpdateView(sender="a", delta=t(1.0), num_samples=1, base_version=0, submissions=1, metrics={"f1": 0.5}),
           UpdateView(sender="b", delta=t(1.0), num_samples=3, base_version=0, submissions=1,
                      metrics={"f1": 0.9, "accuracy": 0.99})]
    res = FedAvg().aggregate(t(0.0), ups, version=0)
    assert res.info["client_metrics"]["f1"] == pytest.approx(0.25 * 0.5 + 0.75 * 0.9)
    assert res.info["client_metrics"]["accuracy"] == pytest.approx(0.99)  # only b reported it
