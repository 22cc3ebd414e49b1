"""GSFS trigger reference point and the likelihood metric, on synthetic sequences and
hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.fl.control import ControlError, parse_control
from gateway.model.metrics import LIKELIHOOD_FLOOR, binary_likelihood
from gateway.fl.trigger import GSFSTrigger, TriggerConfig, TriggerConfigError


def trig(**kw) -> GSFSTrigger:
    return GSFSTrigger(config=TriggerConfig(**{"tau": 0.02, "eval_every": 2, "warmup": 100, **kw}))


# ------------------------------------------------------------------ reference "upload"


def test_first_global_becomes_the_reference():
    t = trig()
    d = t.on_global(0.40)
    assert not d.fire and t.state.reference == 0.40


def test_a_global_that_forgot_the_clients_data_makes_it_upload_after_e_steps():
    t = trig()
    t.on_global(0.50)
    t.reset(0.95)  # uploaded its own model, P = 0.95
    d = t.on_global(0.90)  # the federation lost 0.05 > tau of it
    assert d.fire and d.reason == "forgotten" and t.state.owed
    assert t.state.reference == 0.95  # kept: the global is measured against it
    assert t.step({"l": 1.0}).evaluate is False
    assert t.step({"l": 1.0}).evaluate is True
    # after E local steps the client's own fix is ready: upload whatever P says
    d = t.observe_metric(0.951)
    assert d.fire and d.reason == "forgotten"
    t.reset(0.951)
    assert not t.state.owed and t.state.reference == 0.951


def test_a_global_within_tau_keeps_the_client_quiet_and_a_better_one_raises_the_reference():
    t = trig()
    t.on_global(0.5)
    t.reset(0.95)
    assert not t.on_global(0.94).fire and t.state.reference == 0.95  # 0.01 <= tau
    assert not t.on_global(0.99).fire and t.state.reference == 0.99  # better: new reference
    # no slow drift below the best known point: three small steps down add up
    assert not t.on_global(0.98).fire
    assert not t.on_global(0.975).fire
    d = t.on_global(0.965)
    assert d.fire and d.reason == "forgotten"  # 0.99 - 0.965 = 0.025 > tau


def test_a_new_global_clears_an_unpaid_debt_when_it_fits_again():
    t = trig()
    t.on_global(0.5)
    t.reset(0.9)
    assert t.on_global(0.5).fire
    assert not t.on_global(0.91).fire and not t.state.owed
    assert t.observe_metric(0.905).fire is False


def test_non_finite_global_metric_counts_as_forgotten():
    t = trig()
    t.on_global(0.5)
    t.reset(0.9)
    assert t.on_global(float("nan")).reason == "forgotten"


def test_no_validation_data_means_no_reference():
    t = trig()
    t.on_global(0.5)
    t.reset(0.9)
    assert not t.on_global(None).fire and t.state.reference is None


def test_forgotten_ends_a_cooldown():
    t = trig(cooldown=3)
    t.on_global(0.5)
    t.reset(0.95)
    t.uploaded(0.5)
    assert t.state.quiet_left == 3
    assert t.on_global(0.5).fire  # same P as the base of the last upload, but forgotten
    assert t.state.quiet_left == 0 and t.admit(0.5) is True


def test_reference_global_is_the_literal_reset():
    t = trig(reference="global")
    t.on_global(0.5)
    t.reset(0.95)
    d = t.on_global(0.60)
    assert not d.fire and t.state.reference == 0.60 and not t.state.owed


def test_on_global_restarts_steps_and_warmup_and_keeps_layer_stats():
    t = trig(warmup=1)
    t.step({"l": 1.0})
    t.step({"l": 1.0})
    t.on_global(0.5)
    assert t.state.steps == 0 and t.state.observed == 0 and "l" in t.state.layers


def test_synthetic_sequence_of_globals():
    """A client whose data other gateways' windows keep pulling away from: it speaks
    exactly on the versions that forgot it by more than tau, and after its own upload."""
    t = trig()
    fired = []
    own = 0.97
    for v, p in enumerate([0.30, 0.96, 0.965, 0.93, 0.97, 0.972, 0.95, 0.94]):
        d = t.on_global(p)
        if d.fire:
            fired.append(v)
            t.reset(own)  # its upload after E steps
        elif v == 0:
            t.reset(own)  # the first session improved P by far more than tau: upload
    # v3: 0.97 - 0.93 = 0.04; v6: max(0.97, 0.972) - 0.95 = 0.022 > tau;
    # v7: reference reset to 0.97 at the v6 upload, 0.03 > tau
    assert fired == [3, 6, 7]


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("kwargs", [{"reference": "best"}, {"metric": "auc"}, {"metric": 1}, {"reference": None}])
def test_choice_settings_are_validated(kwargs):
    with pytest.raises(TriggerConfigError):
        TriggerConfig(**kwargs)


def test_defaults_and_control_overrides():
    cfg = TriggerConfig()
    assert cfg.reference == "upload" and cfg.metric == "f1"
    ctl = parse_control(b'{"strategy": "gsfs", "trigger": {"reference": "global", "metric": "likelihood"}}')
    new = cfg.with_overrides(ctl.trigger)
    assert new.reference == "global" and new.metric == "likelihood"
    assert cfg.with_overrides({"metric": "accuracy"}).metric == "accuracy"
    with pytest.raises(ControlError):
        parse_control(b'{"strategy": "gsfs", "trigger": {"metric": "recall"}}')


def test_a_new_metric_kind_forgets_the_reference():
    t = trig()
    t.on_global(0.5)
    t.reconfigure({"tau": 0.05})
    assert t.state.reference == 0.5
    t.reconfigure({"metric": "likelihood"})
    assert t.state.reference is None
    assert not t.on_global(0.2).fire and t.state.reference == 0.2


# ------------------------------------------------------------------ likelihood


def test_binary_likelihood_by_hand():
    # classes: 0 Benign, 1 Malicious, 2 DDoS. Row 0 benign with P(benign) 0.8,
    # row 1 DDoS with P(benign) 0.5 (true side: 0.5), row 2 Malicious with P(benign) 0.1
    probs = np.array([[0.8, 0.1, 0.1], [0.5, 0.2, 0.3], [0.1, 0.9, 0.0]])
    y = np.array([0, 2, 1])
    assert binary_likelihood(probs, y) == pytest.approx((0.8 * 0.5 * 0.9) ** (1 / 3))
    # weights 2, 1, 1: exp((2 log .8 + log .5 + log .9) / 4)
    assert binary_likelihood(probs, y, np.array([2.0, 1.0, 1.0])) == pytest.approx((0.8**2 * 0.5 * 0.9) ** 0.25)


def test_binary_likelihood_floor_keeps_one_hopeless_row_finite():
    probs = np.array([[1.0, 0.0], [1.0, 0.0]])
    got = binary_likelihood(probs, np.array([0, 1]), np.array([999.0, 1.0]))
    assert got == pytest.approx(math.exp(math.log(LIKELIHOOD_FLOOR) / 1000))
    assert 0 < got < 1


@pytest.mark.parametrize("bad", [
    (np.zeros((2, 2)), np.array([0]), None),
    (np.zeros((0, 2)), np.zeros(0, int), None),
    (np.full((2, 2), 0.5), np.array([0, 1]), np.array([0.0, 0.0])),
    (np.full((2, 2), 0.5), np.array([0, 1]), np.array([-1.0, 2.0])),
])
def test_binary_likelihood_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        binary_likelihood(*bad)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 2), st.floats(0.01, 100)), min_size=1, max_size=30))
def test_binary_likelihood_is_a_probability(rows):
    p0 = np.array([r[0] for r in rows])
    probs = np.stack([p0, (1 - p0) / 2, (1 - p0) / 2], axis=1)
    y = np.array([r[1] for r in rows])
    got = binary_likelihood(probs, y, np.array([r[2] for r in rows]))
    assert LIKELIHOOD_FLOOR - 1e-12 <= got <= 1.0 + 1e-12


# ------------------------------------------------------------------ stay


def test_stay_keeps_a_forgotten_client_in_the_next_windows():
    t = trig(stay=2)
    t.on_global(0.5)
    t.reset(0.95)
    assert t.on_global(0.60).reason == "forgotten" and t.state.stay_left == 2
    t.reset(0.95)  # its upload
    for left in (1, 0):  # the next two versions fit it, yet it speaks from them
        d = t.on_global(0.96)
        assert d.fire and d.reason == "forgotten" and t.state.stay_left == left
        assert t.observe_metric(0.96).reason == "forgotten"
        t.reset(0.96)
    assert not t.on_global(0.96).fire  # then quiet again


def test_stay_restarts_when_forgotten_again_and_is_validated():
    t = trig(stay=1)
    t.on_global(0.5)
    t.reset(0.95)
    t.on_global(0.6)
    t.reset(0.95)
    assert t.on_global(0.5).fire and t.state.stay_left == 1  # forgotten again: full stay
    assert not trig().on_global(0.5).fire  # stay 0 (default): nothing extra
    with pytest.raises(TriggerConfigError):
        TriggerConfig(stay=-1)


# ------------------------------------------------------------------ min_flows (tau_i)


def test_tau_i_of_a_small_validation_split_by_hand():
    t = trig(min_flows=3)
    assert t.tau == 0.02  # no support known yet: plain tau
    t.set_support(20)  # 3 / 20 = 0.15
    assert t.tau == pytest.approx(0.15)
    t.on_global(0.5)
    t.reset(1.0)
    assert not t.on_global(0.90).fire  # two flows of 20 lost: below tau_i
    assert t.on_global(0.80).reason == "forgotten"  # four flows
    t.set_support(1000)  # 0.003 < tau: tau wins
    assert t.tau == 0.02
    with pytest.raises(TriggerConfigError):
        t.set_support(float("nan"))
    with pytest.raises(TriggerConfigError):
        TriggerConfig(min_flows=-1)
