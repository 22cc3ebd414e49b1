"""Local learning-rate decay per global version and the FedProx term (pure arithmetic and
settings checks)."""

from __future__ import annotations

import pytest

from gateway.fl.client import ClientConfigError, ClientSettings, decayed_lr


def test_decayed_lr_by_hand():
    assert decayed_lr(2e-3, 1.0, 9) == 2e-3  # default: constant
    assert decayed_lr(2e-3, 0.8, 0) == 2e-3
    assert decayed_lr(2e-3, 0.8, 1) == pytest.approx(1.6e-3)
    assert decayed_lr(2e-3, 0.8, 3) == pytest.approx(2e-3 * 0.512)
    assert decayed_lr(2e-3, 0.5, -1) == 2e-3  # no version yet counts as version 0


# (setting, its default, bad values): every real-valued local-training setting
DEFAULTS_AND_BAD = [
    ("lr", 3e-3, [0.0, -1e-3, 10.5, float("nan")]),
    ("lr_decay", 1.0, [0.0, -0.5, 1.01, float("nan")]),  # default: constant rate
    ("prox_mu", 0.0, [-0.1, 1001.0, float("nan")]),  # default: plain local training
    ("missing_class_scale", 1.0, [-0.1, 1.5, float("nan")]),  # default: plain softmax
    ("label_smoothing", 0.1, [-0.1, 0.6, float("nan")]),  # default: smoothed targets
    ("retrain_interval_s", 300.0, [-1.0, float("inf"), float("nan")]),
]


@pytest.mark.parametrize(("name", "default", "bad_values"), DEFAULTS_AND_BAD)
def test_client_settings_defaults_and_refusals(name, default, bad_values):
    assert getattr(ClientSettings(gateway_id="gw1"), name) == default
    for bad in bad_values:
        with pytest.raises(ClientConfigError, match=name):
            ClientSettings(gateway_id="gw1", **{name: bad})


@pytest.mark.parametrize(("name", "value"), [("prox_mu", 0.1), ("label_smoothing", 0), ("retrain_interval_s", 0)])
def test_client_settings_keep_an_edge_value(name, value):
    assert getattr(ClientSettings(gateway_id="gw1", **{name: value}), name) == value


@pytest.mark.parametrize(("name", "bad"), [("lr", 0.0), ("lr_decay", 1.5), ("prox_mu", -1.0),
                                           ("missing_class_scale", 2.0), ("label_smoothing", 0.9)])
def test_experiment_settings_refuse_the_same_ranges(name, bad, tmp_path):
    from cloud_aggregator.experiment import ExperimentSettings

    with pytest.raises(ValueError, match=name):
        ExperimentSettings(gateway_data=(tmp_path,), out=tmp_path, **{name: bad})
