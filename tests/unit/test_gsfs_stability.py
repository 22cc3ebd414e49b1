"""GSFS stability options, against hand-computed values: coverage scaling of the server
step (quiet clients count as zero deltas) and the client trigger's cooldown."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_aggregator.strategies import DifferentialPrivacy, GSFS, StrategyState
from cloud_aggregator.strategies import aggregate as agg
from cloud_aggregator.strategies.base import UpdateView
from gateway.fl.control import ControlError, parse_control
from gateway.fl.trigger import GSFSTrigger, TriggerConfig, TriggerConfigError


def upd(sender, value, *, n, base=0, s=1):
    return UpdateView(sender=sender, delta={"w": np.array([value], np.float32)}, num_samples=n,
                      base_version=base, submissions=s)


W0 = {"w": np.array([0.0], np.float32)}


# ------------------------------------------------------------------ sample coverage


def test_sample_coverage_by_hand():
    # window a (newest n = 100 replaces the known 50) against b = 300: 100 / 400
    assert agg.sample_coverage({"a": 100}, {"a": 50, "b": 300}) == pytest.approx(0.25)
    # two live clients never heard from count with the mean known n = 200: 100 / 800
    assert agg.sample_coverage({"a": 100}, {"a": 100, "b": 300}, unheard=2) == pytest.approx(0.125)
    assert agg.sample_coverage({"a": 10, "b": 30}, {}) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        agg.sample_coverage({"a": -1}, {})
    with pytest.raises(ValueError):
        agg.sample_coverage({}, {})
    with pytest.raises(ValueError):
        agg.sample_coverage({"a": 1}, {}, unheard=-1)


def test_coverage_scaled_step_by_hand_and_state_round_trip():
    g = GSFS(eta=1.0, sample_weighted=True, coverage_scaled=True, staleness_exponent=0.0)
    state = StrategyState(client_samples=(("c", 600),))
    res = g.aggregate(W0, [upd("a", 1.0, n=100), upd("b", 2.0, n=300)], version=0, state=state, live_clients=3)
    # window mean (100*1 + 300*2) / 400 = 1.75; coverage 400 / 1000 = 0.4 -> 0.7
    assert res.weights["w"][0] == pytest.approx(0.7)
    assert res.info["step_scale"] == pytest.approx(0.4)
    assert dict(res.state.client_samples) == {"a": 100, "b": 300, "c": 600}
    arrays, meta = res.state.to_tensors()
    assert StrategyState.from_tensors(arrays, meta).client_samples == res.state.client_samples


def test_coverage_counts_unheard_live_clients_and_is_off_by_default():
    # first window: a (n = 300) alone, 3 live -> 2 unheard at mean 300: coverage 1/3
    on = GSFS(eta=1.0, sample_weighted=True, coverage_scaled=True)
    res = on.aggregate(W0, [upd("a", 3.0, n=300)], version=0, live_clients=3)
    assert res.weights["w"][0] == pytest.approx(1.0)
    off = GSFS(eta=1.0, sample_weighted=True)
    res = off.aggregate(W0, [upd("a", 3.0, n=300)], version=0, live_clients=3)
    assert res.weights["w"][0] == pytest.approx(3.0) and "step_scale" not in res.info
    assert res.state.client_samples == ()


def test_wrappers_pass_the_step_scale_through():
    inner = GSFS(eta=1.0, sample_weighted=True, coverage_scaled=True)
    dp = DifferentialPrivacy(inner, clip_norm=100.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    res = dp.aggregate(W0, [upd("a", 2.0, n=100)], version=0, state=StrategyState(client_samples=(("b", 300),)))
    assert res.weights["w"][0] == pytest.approx(0.5)  # 2.0 * 100 / 400


def _alternating_windows(strategy, rounds=40):
    """A big client (n = 900, optimum 1) and a small one (n = 100, optimum 0) report in
    alternate windows; each sends a full local step to its optimum (delta = x_i - w)."""
    w, state, trace = dict(W0), StrategyState(), []
    for r in range(rounds):
        x, n, name = (1.0, 900, "big") if r % 2 == 0 else (0.0, 100, "small")
        res = strategy.aggregate(w, [upd(name, x - float(w["w"][0]), n=n, base=r)], version=r, state=state,
                                 live_clients=2)
        w, state = res.weights, res.state
        trace.append(float(w["w"][0]))
    return trace


def test_coverage_scaling_stops_the_swing_between_windows():
    plain = _alternating_windows(GSFS(eta=1.0, sample_weighted=True))
    assert plain[-2:] == pytest.approx([1.0, 0.0])  # each window replaces the model: swing 1
    scaled = _alternating_windows(GSFS(eta=1.0, sample_weighted=True, coverage_scaled=True))
    # 2-cycle by hand: a = b + 0.9 (1 - b), b = a - 0.1 a  ->  a = 0.9 / 0.91, b = 0.9 a
    a = 0.9 / 0.91
    assert scaled[-2:] == pytest.approx([a, 0.9 * a], abs=1e-5)
    assert abs(scaled[-1] - scaled[-2]) < 0.1


def test_coverage_scaled_is_validated_as_keyword_only():
    with pytest.raises(TypeError):
        GSFS(0.6)  # noqa
    assert GSFS(coverage_scaled=True).coverage_scaled is True


# ------------------------------------------------------------------ trigger cooldown


def test_cooldown_off_by_default_admits_every_version():
    trig = GSFSTrigger()
    trig.uploaded(0.5)
    assert all(trig.admit(0.5) for _ in range(3))


def test_cooldown_skips_versions_while_the_global_looks_the_same():
    trig = GSFSTrigger(config=TriggerConfig(tau=0.02, cooldown=2))
    trig.uploaded(0.50)
    assert trig.admit(0.51) is False  # |0.51 - 0.50| <= tau: quiet, 1 left
    assert trig.state.quiet_left == 1
    assert trig.admit(0.50) is False
    assert trig.admit(0.50) is True  # cooldown over
    assert trig.admit(0.50) is True


def test_cooldown_ends_at_once_when_the_global_changed_for_the_client():
    trig = GSFSTrigger(config=TriggerConfig(tau=0.02, cooldown=3))
    trig.uploaded(0.90)
    assert trig.admit(0.30) is True  # the global model collapsed on this client's data
    assert trig.state.quiet_left == 0
    trig.uploaded(0.90)
    assert trig.admit(None) is True  # no metric: cannot tell, so speak
    trig.uploaded(0.90)
    assert trig.admit(float("nan")) is True


def test_reset_keeps_the_cooldown():
    trig = GSFSTrigger(config=TriggerConfig(cooldown=1))
    trig.uploaded(0.7)
    trig.reset(0.7)
    assert trig.state.quiet_left == 1 and trig.state.upload_base_metric == 0.7


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, float("inf")])
def test_cooldown_setting_is_validated(bad):
    with pytest.raises(TriggerConfigError):
        TriggerConfig(cooldown=bad)


def test_control_topic_may_set_the_cooldown():
    ctl = parse_control(b'{"strategy": "gsfs", "trigger": {"cooldown": 1}}')
    assert TriggerConfig().with_overrides(ctl.trigger).cooldown == 1
    with pytest.raises(ControlError):
        parse_control(b'{"strategy": "gsfs", "trigger": {"cooldown": -2}}')


# ------------------------------------------------------------------ remembered quiet clients


def test_remember_quiet_by_hand():
    g = GSFS(eta=1.0, sample_weighted=True, staleness_exponent=0.0, remember_quiet=True)
    state = StrategyState(remembered={"c": {"w": np.array([2.0], np.float32)}}, remembered_meta=(("c", 300, 0),))
    res = g.aggregate(W0, [upd("a", 1.0, n=100, base=1)], version=1, state=state)
    # quiet c takes part as delta 2 - 0 = 2: weights [100, 300] / 400 -> 0.25 * 1 + 0.75 * 2
    assert res.weights["w"][0] == pytest.approx(1.75)
    assert res.senders == ("a",) and res.client_weights == pytest.approx((0.25,))
    assert res.info["remembered"] == {"c": pytest.approx(0.75)}
    # a's newest local model is remembered as this global + its delta; c's is kept
    assert float(res.state.remembered["a"]["w"][0]) == pytest.approx(1.0)
    assert float(res.state.remembered["c"]["w"][0]) == pytest.approx(2.0)
    assert res.state.remembered_meta == (("a", 100, 1), ("c", 300, 0))
    arrays, meta = res.state.to_tensors()
    back = StrategyState.from_tensors(arrays, meta)
    assert back.remembered_meta == res.state.remembered_meta
    np.testing.assert_array_equal(back.remembered["a"]["w"], res.state.remembered["a"]["w"])


def test_remembered_models_are_discounted_by_the_versions_since():
    g = GSFS(eta=1.0, sample_weighted=True, staleness_exponent=1.0, remember_quiet=True)
    state = StrategyState(remembered={"c": {"w": np.array([2.0], np.float32)}}, remembered_meta=(("c", 300, 0),))
    res = g.aggregate(W0, [upd("a", 1.0, n=100, base=1)], version=1, state=state)
    # c: staleness 1 -> (1 + 1)^-1 = 0.5: weights [100, 150] / 250 -> 0.4 * 1 + 0.6 * 2
    assert res.weights["w"][0] == pytest.approx(1.6)


def test_remembered_models_pull_to_a_fixed_point_not_without_end():
    # quiet big client remembered at 1.0 (n = 300); small one (n = 100) steps to its optimum 0
    g = GSFS(eta=1.0, sample_weighted=True, staleness_exponent=0.0, remember_quiet=True)
    w = dict(W0)
    state = StrategyState(remembered={"big": {"w": np.array([1.0], np.float32)}}, remembered_meta=(("big", 300, 0),))
    for v in range(1, 6):
        res = g.aggregate(w, [upd("small", -float(w["w"][0]), n=100, base=v)], version=v, state=state)
        w, state = res.weights, res.state
        # w + 0.25 * (0 - w) + 0.75 * (1 - w) = 0.75 every time
        assert float(w["w"][0]) == pytest.approx(0.75)


def test_remember_quiet_stops_the_swing_between_windows():
    # the alternating windows of the coverage test: both clients' newest models count in
    # every window, so the global sits at the weighted mean 0.9 * 1 + 0.1 * 0 = 0.9
    trace = _alternating_windows(GSFS(eta=1.0, sample_weighted=True, staleness_exponent=0.0, remember_quiet=True))
    assert trace[0] == pytest.approx(1.0)  # only "big" known yet
    assert trace[1:] == pytest.approx([0.9] * (len(trace) - 1), abs=1e-6)


def test_wrappers_keep_the_remembered_models():
    inner = GSFS(eta=1.0, sample_weighted=True, staleness_exponent=0.0, remember_quiet=True)
    dp = DifferentialPrivacy(inner, clip_norm=100.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    state = StrategyState(remembered={"c": {"w": np.array([2.0], np.float32)}}, remembered_meta=(("c", 300, 0),))
    res = dp.aggregate(W0, [upd("a", 1.0, n=100, base=1)], version=1, state=state)
    assert res.weights["w"][0] == pytest.approx(1.75) and "a" in res.state.remembered


def test_a_quiet_client_retries_after_cooldown_s_on_the_same_version():
    trig = GSFSTrigger(config=TriggerConfig(tau=0.02, cooldown=1, cooldown_s=20.0))
    assert trig.retry_due(100.0) is False  # not quiet: nothing to retry
    trig.uploaded(0.5)
    assert trig.admit(0.5, now=10.0) is False
    assert trig.retry_due(29.9) is False
    assert trig.retry_due(30.0) is True
    assert trig.retry_due(31.0) is False  # once
    # a new version that the client is admitted on clears the wait
    trig.uploaded(0.5)
    assert trig.admit(0.5, now=40.0) is False
    assert trig.admit(0.5, now=45.0) is True
    assert trig.retry_due(100.0) is False
    with pytest.raises(TriggerConfigError):
        TriggerConfig(cooldown_s=0)


def test_remember_as_delta_reapplies_the_stale_delta_by_hand():
    g = GSFS(eta=1.0, sample_weighted=True, staleness_exponent=0.0, remember_quiet=True, remember_as="delta")
    w1 = {"w": np.array([5.0], np.float32)}
    state = StrategyState(remembered={"c": {"w": np.array([2.0], np.float32)}}, remembered_meta=(("c", 300, 0),))
    res = g.aggregate(w1, [upd("a", 1.0, n=100, base=1)], version=1, state=state)
    # c's kept delta 2 (not 2 - 5): 5 + 0.25 * 1 + 0.75 * 2 = 6.75; a's delta 1 is kept as is
    assert res.weights["w"][0] == pytest.approx(6.75)
    assert float(res.state.remembered["a"]["w"][0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        GSFS(remember_as="gradient")
