"""GSFS trigger on synthetic sequences, against values computed by hand."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.fl.trigger import (
    GSFSTrigger,
    LayerStats,
    TriggerConfig,
    TriggerConfigError,
    TriggerState,
)


def test_ema_statistics_match_hand_computation():
    # a = 0.5; g = 1, 3, 2
    # step 1: mu = 1, var = 0 (first value initialises)
    # step 2: diff = 3 - 1 = 2; mu = .5*1 + .5*3 = 2; var = .5*0 + .5*4 = 2
    # step 3: diff = 2 - 2 = 0; mu = 2; var = .5*2 + 0 = 1
    trig = GSFSTrigger(config=TriggerConfig(ema=0.5, k=3.0, warmup=10, eval_every=100))
    for g in (1.0, 3.0, 2.0):
        assert not trig.step({"l": g}).fire
    assert trig.state.layers["l"] == LayerStats(mean=2.0, var=1.0)
    assert trig.state.steps == 3 and trig.state.observed == 3


def test_gradient_trigger_fires_only_after_warmup_and_only_on_outlier():
    cfg = TriggerConfig(ema=0.5, k=2.0, warmup=3, eval_every=100)
    trig = GSFSTrigger(config=cfg)
    # During warm-up even a huge value does not fire.
    for g in (1.0, 3.0, 2.0):
        assert not trig.step({"a": g, "b": 1.0}).fire
    # Now mu_a = 2, s_a = 1 -> threshold 2 + 2*1 = 4.  b: mu=1, var=0 -> threshold 1.
    d = trig.step({"a": 3.9, "b": 1.0})
    assert not d.fire  # 3.9 < 4 and 1.0 is not > 1.0
    # after 3.9: diff=1.9, mu_a=2.95, var=.5*1+.5*3.61=2.305, s=1.518 -> threshold 5.986
    assert trig.state.layers["a"].mean == pytest.approx(2.95)
    assert trig.state.layers["a"].var == pytest.approx(2.305)
    d = trig.step({"a": 6.0, "b": 1.0})
    assert d.fire and d.reason == "gradient" and d.layers == ("a",)


def test_gradient_trigger_names_every_layer_that_fired():
    trig = GSFSTrigger(config=TriggerConfig(ema=0.5, k=1.0, warmup=1, eval_every=100))
    trig.step({"x": 1.0, "y": 1.0, "z": 1.0})
    d = trig.step({"x": 2.0, "y": 0.5, "z": 1.5})  # s = 0 for all: fires on any increase
    assert d.fire and d.layers == ("x", "z")


def test_performance_trigger_every_e_steps_with_tau():
    cfg = TriggerConfig(tau=0.05, eval_every=2, warmup=1000)
    trig = GSFSTrigger(config=cfg)
    assert not trig.step({"l": 1.0}).evaluate
    assert trig.step({"l": 1.0}).evaluate  # step 2
    # First metric with no reference becomes the reference.
    d = trig.observe_metric(0.80)
    assert not d.fire and trig.state.reference == 0.80
    trig.step({"l": 1.0})
    assert trig.step({"l": 1.0}).evaluate  # step 4
    assert not trig.observe_metric(0.84).fire  # |0.84-0.80| = 0.04 <= 0.05
    assert not trig.observe_metric(0.85).fire  # exactly tau: not greater
    d = trig.observe_metric(0.7499)  # |.7499 - .80| = .0501 > .05 (drops count too)
    assert d.fire and d.reason == "performance" and d.metric == pytest.approx(0.7499)


def test_reset_sets_reference_restarts_warmup_and_keeps_layer_stats():
    trig = GSFSTrigger(config=TriggerConfig(ema=0.5, k=1.0, warmup=2, eval_every=3))
    for g in (1.0, 1.0, 1.0):
        trig.step({"l": g})
    before = trig.state.layers
    trig.reset(0.9)
    assert trig.state == TriggerState(steps=0, observed=0, reference=0.9, layers=before)
    # Warm-up restarted: an outlier right after the reset does not fire.
    assert not trig.step({"l": 100.0}).fire


def test_non_finite_gradient_is_not_folded_into_stats_and_fires_after_warmup():
    trig = GSFSTrigger(config=TriggerConfig(ema=0.5, warmup=1, eval_every=100))
    trig.step({"l": 1.0})
    d = trig.step({"l": float("nan")})
    assert d.fire and d.layers == ("l",)
    assert trig.state.layers["l"] == LayerStats(mean=1.0, var=0.0)


def test_non_finite_metric_fires():
    trig = GSFSTrigger(config=TriggerConfig())
    trig.reset(0.5)
    assert trig.observe_metric(float("nan")).fire


def test_state_round_trips_as_a_value():
    cfg = TriggerConfig(ema=0.8, warmup=2)
    a = GSFSTrigger(config=cfg)
    for g in (1.0, 2.0, 1.5):
        a.step({"l": g})
    b = GSFSTrigger(config=cfg, state=a.state)
    assert a.step({"l": 9.0}) == b.step({"l": 9.0})
    assert a.state == b.state


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tau": -0.1},
        {"ema": 1.0},
        {"ema": -0.1},
        {"k": 0},
        {"warmup": 0},
        {"eval_every": 0},
        {"warmup": 2.5},
        {"tau": float("nan")},
        {"k": "3"},
        {"eval_every": True},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(TriggerConfigError):
        TriggerConfig(**kwargs)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        TriggerConfig(0.1)  # type: ignore[misc]


def test_overrides_from_control_topic():
    cfg = TriggerConfig()
    new = cfg.with_overrides({"tau": 0.2, "warmup": 5.0})
    assert new.tau == 0.2 and new.warmup == 5 and isinstance(new.warmup, int)
    assert cfg.tau == 0.01  # original unchanged
    with pytest.raises(TriggerConfigError, match="unknown"):
        cfg.with_overrides({"tau": 0.1, "bogus": 1})
    with pytest.raises(TriggerConfigError):
        cfg.with_overrides({"ema": 2})
    trig = GSFSTrigger(config=cfg)
    trig.step({"l": 1.0})
    trig.reconfigure({"k": 5})
    assert trig.config.k == 5.0 and trig.state.steps == 1


@settings(max_examples=60, deadline=None)
@given(
    overrides=st.dictionaries(
        st.sampled_from(["tau", "ema", "k", "warmup", "eval_every", "junk"]),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 50), st.text(max_size=3), st.none()),
        max_size=4,
    )
)
def test_hostile_overrides_are_rejected_or_valid(overrides):
    cfg = TriggerConfig()
    try:
        new = cfg.with_overrides(overrides)
    except TriggerConfigError:
        return
    assert 0 <= new.ema < 1 and new.k > 0 and new.warmup >= 1 and new.eval_every >= 1
    assert math.isfinite(new.tau) and new.tau >= 0


@settings(max_examples=60, deadline=None)
@given(
    seq=st.lists(
        st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=60
    ),
    ema=st.floats(min_value=0, max_value=0.99),
)
def test_statistics_stay_finite_and_non_negative(seq, ema):
    trig = GSFSTrigger(config=TriggerConfig(ema=ema, warmup=1))
    for g in seq:
        trig.step({"l": g})
    s = trig.state.layers["l"]
    assert math.isfinite(s.mean) and math.isfinite(s.var) and s.var >= 0
    assert min(seq) - 1e-6 <= s.mean <= max(seq) + 1e-6
