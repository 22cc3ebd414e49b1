"""Hostile global-model messages fed straight to a gateway's FL client (real torch
student, real SQLite store; the MQTT link is built but never connected): every one is
rejected with a typed reason, the client keeps its model and its state machine stays
consistent. Hypothesis generates the bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.fl.client import ClientSettings, FLClient
from gateway.fl.learner import TorchLearner
from gateway.fl.link import GatewayLink
from gateway.fl.state import ClientState
from gateway.flows.zeek import iter_records
from gateway.mqtt import MqttSettings
from gateway.protocol import signing
from gateway.protocol.envelope import encode_global
from gateway.store.db import open_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(tmp_path_factory, iot23_dir):
    from cloud_aggregator.experiment import build_initial_model

    tmp = tmp_path_factory.mktemp("hostile")
    flows = list(iter_records(iot23_dir / "CTU-Honeypot-Capture-7-1" / "conn.log.labeled"))
    build_initial_model(flows, tmp / "model", seed=0)
    engine, sessions = open_store(f"sqlite:///{tmp / 'gw.db'}")
    key = signing.generate_private_key()
    link = GatewayLink(MqttSettings(port=1, client_id="gw-hostile"), gateway_id="gw-hostile")
    c = FLClient(settings=ClientSettings(gateway_id="gw-hostile"), learner=TorchLearner(tmp / "model"),
                 sessions=sessions, link=link, verify_key=key.public_key())
    c.lifecycle.fire("start")
    weights = c.learner.weights()
    assert c.receive_global(encode_global(weights, sender="aggregator", version=3, base_version=2, signing_key=key))
    c.test_key = key
    c.good = encode_global(weights, sender="aggregator", version=4, base_version=3, signing_key=key)
    yield c
    engine.dispose()


def check_unchanged(c, before):
    assert c.version == 3 and c.state is ClientState.IDLE
    now = c.learner.weights()
    assert all(np.array_equal(now[k], before[k]) for k in before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_rejected(client, data):
    before = client.learner.weights()
    rejected = sum(client.counters.rejected.values())
    assert client.receive_global(data) is False
    assert sum(client.counters.rejected.values()) == rejected + 1
    check_unchanged(client, before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_of_a_signed_model_is_rejected(client, pos, flip):
    data = bytearray(client.good)
    data[pos % len(data)] ^= flip
    before = client.learner.weights()
    assert client.receive_global(bytes(data)) is False
    check_unchanged(client, before)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0))
def test_truncated_models_are_rejected(client, cut):
    data = client.good[: cut % len(client.good)]
    before = client.learner.weights()
    assert client.receive_global(data) is False
    check_unchanged(client, before)
