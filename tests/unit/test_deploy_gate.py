"""The gateway's deployment gate and alert-rate canary (issue 16.3), pure logic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, DeploySection
from gateway.fl.hotswap import CANARY_TRANSITIONS, AlertCanary, CanaryEvent, CanaryState, deploy_verdict


def test_a_worse_candidate_is_kept_out_beyond_the_margin():
    kw = dict(metric="accuracy", margin=0.02, flows=500, min_flows=50)
    assert deploy_verdict({"accuracy": 0.90}, {"accuracy": 0.95}, **kw).reason == "worse"
    assert not deploy_verdict({"accuracy": 0.90}, {"accuracy": 0.95}, **kw).deploy
    assert deploy_verdict({"accuracy": 0.94}, {"accuracy": 0.95}, **kw).reason == "within_margin"
    assert deploy_verdict({"accuracy": 0.97}, {"accuracy": 0.95}, **kw).reason == "better"
    few = deploy_verdict({"accuracy": 0.1}, {"accuracy": 0.95}, **{**kw, "flows": 10})
    assert few.deploy and few.reason == "unscored"  # too few labelled flows to judge on
    assert deploy_verdict({}, {}, **kw).reason == "unscored"
    assert not deploy_verdict({"f1": 0.5, "accuracy": 1.0}, {"f1": 0.9, "accuracy": 0.0},
                              **{**kw, "metric": "f1"}).deploy


def test_the_canary_rolls_back_a_jump_either_way():
    up = AlertCanary(flows=100, max_jump=0.15)
    for _ in range(3):
        assert up.observe(50, 1) is None  # baseline 0.02
    up.swapped()
    assert up.state is CanaryState.WATCHING and up.observe(60, 30) is None
    assert up.observe(60, 30) is CanaryState.ROLLED_BACK  # 0.5 after, 0.02 before
    down = AlertCanary(flows=100, max_jump=0.15)
    down.observe(200, 160)  # an attack under way: 0.8 alerted
    down.swapped()
    assert down.observe(100, 0) is CanaryState.ROLLED_BACK  # silenced: a backdoor, or the attack ended
    calm = AlertCanary(flows=100, max_jump=0.15)
    calm.observe(100, 10)
    calm.swapped()
    assert calm.observe(100, 20) is CanaryState.PASSED and calm.observe(100, 90) is None  # decided once


def test_a_canary_without_a_baseline_judges_nothing():
    c = AlertCanary(flows=100, max_jump=0.15)
    c.observe(10, 0)  # < flows / 5 before the swap
    c.swapped()
    assert c.observe(100, 100) is CanaryState.PASSED


def test_the_canary_transition_table_is_closed():
    for (state, event), target in CANARY_TRANSITIONS.items():
        assert isinstance(state, CanaryState) and isinstance(event, CanaryEvent) and isinstance(target, CanaryState)
    assert (CanaryState.IDLE, CanaryEvent.JUMP) not in CANARY_TRANSITIONS


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), max_size=40), st.integers(0, 40))
def test_the_canary_window_stays_bounded(batches, swap_at):
    c = AlertCanary(flows=100, max_jump=0.15)
    for i, (flows, alerts) in enumerate(batches):
        if i == swap_at:
            c.swapped()
        c.observe(flows, min(alerts, flows))
        assert c._recent_flows == sum(f for f, _ in c._recent)
        assert len(c._recent) <= 101 and (not c._recent or c._recent_flows - c._recent[0][0] < 100)


@pytest.mark.parametrize("bad, key", [({"margin": 1.0}, "deploy.margin"), ({"metric": "loss"}, "deploy.metric"),
                                      ({"canary_max_jump": 0.0}, "deploy.canary_max_jump"),
                                      ({"canary_flows": 0}, "deploy.canary_flows")])
def test_bad_deploy_settings_name_the_key(bad, key):
    with pytest.raises(ConfigError) as err:
        DeploySection(**bad)
    assert err.value.key == key
