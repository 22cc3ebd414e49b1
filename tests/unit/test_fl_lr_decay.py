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


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01, float("nan")])
def test_client_settings_refuse_bad_decay(bad):
    with pytest.raises(ClientConfigError):
        ClientSettings(gateway_id="gw1", lr_decay=bad)


def test_client_settings_default_is_constant():
    assert ClientSettings(gateway_id="gw1").lr_decay == 1.0


@pytest.mark.parametrize("bad", [-0.1, 1001.0, float("nan")])
def test_client_settings_refuse_bad_prox_mu(bad):
    with pytest.raises(ClientConfigError):
        ClientSettings(gateway_id="gw1", prox_mu=bad)


def test_client_settings_prox_mu_defaults_to_plain_local_training():
    assert ClientSettings(gateway_id="gw1").prox_mu == 0.0
    assert ClientSettings(gateway_id="gw1", prox_mu=0.1).prox_mu == 0.1


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_client_settings_refuse_bad_missing_class_scale(bad):
    with pytest.raises(ClientConfigError):
        ClientSettings(gateway_id="gw1", missing_class_scale=bad)


def test_client_settings_missing_class_scale_defaults_to_plain_softmax():
    assert ClientSettings(gateway_id="gw1").missing_class_scale == 1.0


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_client_settings_refuse_bad_retrain_interval(bad):
    with pytest.raises(ClientConfigError):
        ClientSettings(gateway_id="gw1", retrain_interval_s=bad)


def test_client_settings_retrain_interval_default_and_off():
    assert ClientSettings(gateway_id="gw1").retrain_interval_s == 300.0
    assert ClientSettings(gateway_id="gw1", retrain_interval_s=0).retrain_interval_s == 0


@pytest.mark.parametrize("bad", [-0.1, 0.6, float("nan")])
def test_client_settings_refuse_bad_label_smoothing(bad):
    with pytest.raises(ClientConfigError):
        ClientSettings(gateway_id="gw1", label_smoothing=bad)


def test_client_settings_smooth_local_labels_by_default():
    assert ClientSettings(gateway_id="gw1").label_smoothing == 0.1
    assert ClientSettings(gateway_id="gw1", label_smoothing=0).label_smoothing == 0
