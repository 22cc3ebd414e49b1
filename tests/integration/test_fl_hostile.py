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


# ---------------------------------------------------------------- intake hardening (issue 16.6)


def test_a_restarted_gateway_never_accepts_a_global_older_than_the_one_it_ran(client, tmp_path):
    """The version is persisted (state_dir); a new client on the same file refuses older
    signed globals -- a recorded old model cannot be replayed after a restart."""
    from gateway.fl.versionfile import read_version

    key, weights = client.test_key, client.learner.weights()
    version_file = tmp_path / "state" / "fl-global-version.json"

    def gateway():
        link = GatewayLink(MqttSettings(port=1, client_id="gw-restart"), gateway_id="gw-restart")
        c = FLClient(settings=ClientSettings(gateway_id="gw-restart"), learner=client.learner,
                     sessions=client.sessions, link=link, verify_key=key.public_key(), version_file=version_file)
        c.lifecycle.fire("start")
        return c

    def signed(v):
        return encode_global(weights, sender="aggregator", version=v, base_version=v - 1, signing_key=key)

    first = gateway()
    assert first.receive_global(signed(7)) and read_version(version_file) == 7
    again = gateway()  # a restart: a fresh client, the same state_dir
    assert again.version is None and again.version_floor == 7
    assert not again.receive_global(signed(6)) and again.counters.rejected["stale_base"] == 1
    assert again.receive_global(signed(7)) and again.version == 7  # the retained current one loads again
    assert again.receive_global(signed(8)) and read_version(version_file) == 8
    version_file.write_text("not json")  # never guess a floor: the service disables FL and says why
    with pytest.raises(ValueError, match="not a global-version file"):
        gateway()


def test_retained_junk_chunks_cannot_fill_the_gateways_memory(client):
    """The reassembler is bounded by the expected model size: a set announcing more is
    refused at its first chunk, and many sets keep at most two in memory."""
    from gateway.protocol import chunking

    assert client.reassembler.max_message_bytes == client.max_global_bytes
    assert client.max_global_bytes < 4 * sum(v.nbytes for v in client.learner.weights().values()) + 200_000
    huge = chunking.split_message(np.random.default_rng(0).bytes(client.max_global_bytes + 10_000),
                                  max_chunk_bytes=64 * 1024)
    before = client.counters.rejected["oversize"]
    client._on_model_message(huge[0])
    assert client.counters.rejected["oversize"] == before + 1 and len(client.reassembler) == 0
    for i in range(50):
        junk = chunking.split_message(np.random.default_rng(i).bytes(8192), max_chunk_bytes=1024,
                                      message_id=f"junk{i}")[0]
        client._on_model_message(junk)
    assert len(client.reassembler) <= 2


def test_unsigned_forged_or_out_of_range_control_is_ignored(client):
    from gateway.fl.control import Control, LocalSettings, encode_control

    before, rejected = client.control, client.counters.control_rejected
    forger = signing.generate_private_key()
    for bad in (encode_control(Control(strategy="fedavg", round=9)),
                encode_control(Control(strategy="fedavg", round=9), signing_key=forger),
                b'{"strategy": "fedavg", "round": 9, "local": {"epochs": 100000}}'):
        client._on_control(bad)
    assert client.counters.control_rejected == rejected + 3 and client.control is before
    good = Control(strategy="gsfs", local=LocalSettings(max_steps=7))
    client._on_control(encode_control(good, signing_key=client.test_key))
    assert client.control == good and client.local["max_steps"] == 7
