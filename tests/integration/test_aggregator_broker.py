"""Aggregator against a real mosquitto started from broker_config/dev.conf.

Every rejection reason an aggregator can meet, arriving over MQTT; a gateway whose
last will says offline stops counting towards N; the retained, signed global model
survives a broker restart.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator_helpers import FakeGatewayClient, craft_update, dev_config_text, tiny_delta, tiny_model
from brokers import Mosquitto, find_mosquitto
from cloud_aggregator import store
from cloud_aggregator.service import AggregatorConfig, AggregatorService
from gateway.mqtt import MqttLink, MqttSettings
from gateway.protocol import chunking, signing, topics
from gateway.protocol.envelope import Kind, encode_global, encode_update
from gateway.protocol.validation import ValidationPolicy, validate_envelope

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(config_text=dev_config_text(), workdir=tmp_path / "broker").start()
    yield b
    b.stop()


def make_service(tmp_path: Path, port: int, **kw) -> AggregatorService:
    key = kw.pop("signing_key", None)
    evaluator = kw.pop("evaluator", None)
    cfg = AggregatorConfig(database=str(tmp_path / "agg.db"), mqtt=MqttSettings(client_id="agg", port=port),
                           tick_s=0.05, **kw)
    svc = AggregatorService(cfg, initial_weights=tiny_model(), signing_key=key, evaluator=evaluator).start()
    assert svc.wait_connected(10)
    return svc


def test_each_rejection_reason_is_counted_and_service_keeps_running(tmp_path, broker):
    svc = make_service(tmp_path, broker.port, known_senders=frozenset({"gw1", "gw2"}), max_staleness=0,
                       max_update_bytes=200_000, chunk_timeout_s=0.5,
                       strategy_params={"rho": 1.0, "deadline_s": 3600})
    gw = FakeGatewayClient("gw1", broker.port).start()
    other = FakeGatewayClient("gw2", broker.port).start()  # live: with rho = 1, gw1 alone is no quorum
    try:
        assert svc.wait_for(lambda s: {"gw1", "gw2"} <= s.pool.live_clients(), 10)
        good = encode_update(tiny_delta(0.1), sender="gw1", base_version=0, num_samples=5)
        bad_shape = {k: v for k, v in tiny_delta(0.1).items()}
        bad_shape["head.weight"] = np.zeros((2, 8), np.float32)
        digest_broken = bytearray(good.data)
        digest_broken[-1] ^= 0xFF
        hostile = {
            "schema": b"not an envelope",
            "unknown_sender": None,  # sent on gw9's topic below
            "sender_mismatch": encode_update(tiny_delta(0.1), sender="gw2", base_version=0, num_samples=1).data,
            "names": encode_update({"x": np.zeros(2, np.float32)}, sender="gw1", base_version=0, num_samples=1).data,
            "shapes": encode_update(bad_shape, sender="gw1", base_version=0, num_samples=1).data,
            "dtypes": craft_update({k: v.astype(np.float16) if k == "encoder.bias" else v
                                    for k, v in tiny_delta(0.1).items()}, sender="gw1"),
            "non_finite": encode_update({k: np.full_like(v, np.nan) for k, v in tiny_delta(0).items()},
                                        sender="gw1", base_version=0, num_samples=1).data,
            "oversize": encode_update({k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32)
                                       for k, v in tiny_delta(0).items()} | {}, sender="gw1", base_version=0,
                                      num_samples=1).data + b"\0" * 200_000,
            "digest": bytes(digest_broken),
            "unknown_base": encode_update(tiny_delta(0.1), sender="gw1", base_version=7, num_samples=1).data,
            "wrong_kind": encode_global(tiny_model(), sender="gw1", version=1, base_version=0),
        }
        for reason, data in hostile.items():
            if data is not None:
                gw.send(data)
        intruder = FakeGatewayClient("gw9", broker.port).start()
        intruder.send(encode_update(tiny_delta(0.1), sender="gw9", base_version=0, num_samples=1).data)
        assert svc.wait_for(lambda s: s.rejections["unknown_sender"] == 1, 10)
        intruder.status("offline")  # so it does not count towards N below
        intruder.stop()
        # replay: the same accepted update twice
        gw.send(good.data)
        gw.send(good.data)
        # a chunked update that never completes
        big = encode_update(tiny_delta(0.3), sender="gw1", base_version=0, num_samples=1).data * 3
        frames = chunking.split_message(big, max_chunk_bytes=1024)
        gw.send(frames[0])
        expected = {r for r in hostile} | {"replay", "incomplete_chunk"}
        assert svc.wait_for(lambda s: expected <= set(s.rejections), 15), svc.counters()
        assert all(svc.rejections[r] == 1 for r in expected), svc.counters()
        assert svc.accepted == 1  # the one good update, once
        assert svc.version == 0
        # stale_base: gw2 completes the quorum, the version moves on, then a base-0 update
        other.update(0.3, base=0)
        assert svc.wait_for(lambda s: s.version == 1, 10), svc.counters()
        gw.update(0.2, base=0)
        assert svc.wait_for(lambda s: s.rejections["stale_base"] == 1, 10)
        # the service still takes good updates
        gw.update(0.2, base=1)
        assert svc.wait_for(lambda s: s.accepted == 3, 10)
        with store.make_sessions(str(tmp_path / "agg.db"))() as s:
            counts = store.rejection_counts(s)
        assert counts == dict(svc.rejections)  # persisted, not only in memory
    finally:
        gw.stop()
        other.stop()
        svc.stop()


def test_chunked_update_is_reassembled_and_pooled(tmp_path, broker):
    svc = make_service(tmp_path, broker.port, strategy_params={"rho": 1.0, "deadline_s": 3600})
    gw = FakeGatewayClient("gw1", broker.port).start()
    try:
        rng = np.random.default_rng(5)
        delta = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in tiny_delta(0).items()}
        enc = encode_update(delta, sender="gw1", base_version=0, num_samples=5)
        frames = chunking.split_message(enc.data, max_chunk_bytes=1024)
        assert len(frames) > 1
        for f in reversed(frames):
            gw.send(f)
        assert svc.wait_for(lambda s: s.version == 1, 10), svc.counters()
        np.testing.assert_allclose(svc.weights["encoder.weight"], tiny_model()["encoder.weight"] + delta["encoder.weight"],
                                   rtol=1e-6)
        with store.make_sessions(str(tmp_path / "agg.db"))() as s:
            assert store.load_chunks(s) == []  # pending chunks cleaned up
    finally:
        gw.stop()
        svc.stop()


GATEWAY_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r}); sys.path.insert(0, {integ!r})
from aggregator_helpers import FakeGatewayClient
gw = FakeGatewayClient({gid!r}, {port}, keepalive_s=1).start()
print("up", flush=True)
time.sleep(600)
"""


def test_dead_gateway_stops_counting_towards_n(tmp_path, broker):
    # rho = 1: all live gateways must report. gw3 dies (kill -9): its last will marks it
    # offline, N drops to 2, and the two reports are enough.
    svc = make_service(tmp_path, broker.port, strategy_params={"rho": 1.0, "deadline_s": 3600})
    here = Path(__file__).resolve().parent
    proc = subprocess.Popen([sys.executable, "-c", GATEWAY_SCRIPT.format(
        tests=str(here.parent), integ=str(here), gid="gw3", port=broker.port)], stdout=subprocess.PIPE)
    gws = [FakeGatewayClient(f"gw{i}", broker.port).start() for i in (1, 2)]
    try:
        assert proc.stdout.readline().strip() == b"up"
        assert svc.wait_for(lambda s: s.pool.live_clients() == {"gw1", "gw2", "gw3"}, 10)
        gws[0].update(0.1, base=0)
        gws[1].update(0.3, base=0)
        assert svc.wait_for(lambda s: s.accepted == 2, 10)
        assert not svc.wait_for(lambda s: s.version == 1, 0.5)  # 2 of 3 live: K = 3 not reached
        proc.kill()  # no DISCONNECT: the broker publishes the will after ~1.5 keep-alives
        proc.wait()
        assert svc.wait_for(lambda s: s.version == 1, 15), svc.counters()
        assert "gw3" not in svc.pool.live_clients()
        with store.make_sessions(str(tmp_path / "agg.db"))() as s:
            summary = store.status_summary(s)
        assert {c["gateway"]: c["online"] for c in summary.clients} == {"gw1": True, "gw2": True, "gw3": False}
        assert summary.rounds[-1]["live"] == 2 and summary.rounds[-1]["updates"] == 2
    finally:
        proc.kill()
        for g in gws:
            g.stop()
        svc.stop()


def test_retained_signed_global_model_survives_broker_restart(tmp_path, broker):
    key = signing.generate_private_key()
    # the central evaluator is an injected callable: weights in, metrics out
    svc = make_service(tmp_path, broker.port, signing_key=key, strategy_params={"rho": 0.5},
                       evaluator=lambda w: {"bias_mean": float(w["encoder.bias"].mean())})
    gw = FakeGatewayClient("gw1", broker.port).start()
    try:
        gw.update(0.25, base=0)
        assert svc.wait_for(lambda s: s.version == 1, 10)
    finally:
        gw.stop()
        svc.stop()
    broker.restart()  # SIGTERM: mosquitto writes its persistence file, then starts again
    reader = MqttLink(MqttSettings(client_id="late-reader", port=broker.port),
                      subscriptions=[(topics.global_model_all(), 1), (topics.global_control(), 1)]).start()
    try:
        got = {}
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                msg = reader.inbox.get(timeout=0.5)
            except Exception:
                continue
            got[msg.topic] = msg
        model = got[topics.global_model()]
        assert model.retain
        result = validate_envelope(model.payload, ValidationPolicy(kind=Kind.GLOBAL, verify_key=key.public_key()))
        assert result.header.version == 1
        assert result.header.metrics == {"bias_mean": pytest.approx(0.25)}  # central metrics travel along
        np.testing.assert_allclose(result.tensors["encoder.bias"], 0.25)
        control = json.loads(got[topics.global_control()].payload)
        assert control["strategy"] == "gsfs" and control["version"] == 1
    finally:
        reader.stop()


def test_fedopt_rounds_are_announced_and_closed_by_the_selected_clients(tmp_path, broker):
    svc = make_service(tmp_path, broker.port, strategy="fedopt",
                       strategy_params={"eta": 0.1, "round_timeout_s": 60, "min_available": 2})
    gws = [FakeGatewayClient(f"gw{i}", broker.port).start() for i in (1, 2)]
    reader = MqttLink(MqttSettings(client_id="control-reader", port=broker.port),
                      subscriptions=[(topics.global_control(), 1)]).start()

    def next_control(predicate, timeout=10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = reader.inbox.get(timeout=0.5)
            except Exception:
                continue
            control = json.loads(msg.payload)
            if predicate(control):
                return control
        raise AssertionError("no matching control message")

    try:
        assert svc.wait_for(lambda s: s.pool.live_clients() == {"gw1", "gw2"}, 10)
        control = next_control(lambda c: c["round"] >= 1 and c["selected"] == ["gw1", "gw2"])
        assert control["strategy"] == "fedopt"
        rnd, base = control["round"], control["version"]
        gws[0].update(0.1, base=base, rnd=rnd, samples=10)
        assert not svc.wait_for(lambda s: s.version > base, 0.5)  # gw2 still owes its update
        gws[1].update(0.3, base=base, rnd=rnd, samples=30)
        assert svc.wait_for(lambda s: s.version == base + 1, 10)
        assert svc.state.adam is not None and svc.state.adam.t == 1  # server Adam stepped once
        nxt = next_control(lambda c: c["round"] == rnd + 1)
        assert nxt["version"] == base + 1
        # an update for the closed round does not count in the new one
        gws[0].update(0.1, base=base + 1, rnd=rnd, samples=10)
        assert not svc.wait_for(lambda s: s.version > base + 1, 1.0)
    finally:
        reader.stop()
        for g in gws:
            g.stop()
        svc.stop()
