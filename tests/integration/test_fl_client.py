"""The gateway FL client against a real mosquitto (broker_config/dev.conf), a real SQLite
store and the real torch student: global-model validation, hot swap, durable outbox."""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_aggregator.broker import DEV_CONFIG, LocalBroker, find_mosquitto
from gateway.fl.client import ClientSettings, FLClient
from gateway.fl.control import Control, LocalSettings, encode_control
from gateway.fl.hotswap import EngineHotSwap
from gateway.inference import load_classifier
from gateway.fl.learner import TorchLearner
from gateway.fl.link import GatewayLink
from gateway.fl.state import ClientState
from gateway.flows.zeek import iter_records
from gateway.mqtt import MqttLink, MqttSettings
from gateway.protocol import signing, topics
from gateway.protocol.envelope import encode_global
from gateway.store import repository as repo
from gateway.store.db import open_store

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]

GW = "gw-test"


def wait_for(pred, timeout=20.0, pump=None, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pump is not None:
            pump()
        if pred():
            return
        if pump is None:
            time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def flows(iot23_dir):
    """A small labelled sample: benign honeypot flows and Hakai C&C flows."""
    benign = list(iter_records(iot23_dir / "CTU-Honeypot-Capture-7-1" / "conn.log.labeled"))
    mixed = []
    for r in iter_records(iot23_dir / "CTU-Malware-Capture-8-1" / "conn.log.labeled"):
        mixed.append(r)
        if len(mixed) >= 400:
            break
    return benign + mixed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, flows):
    from cloud_aggregator.experiment import build_initial_model

    out = tmp_path_factory.mktemp("model") / "initial"
    build_initial_model(flows, out, seed=0, onnx=True)
    return out


class Detector:
    """Keeps classifying flows with the engine on its own thread, like a gateway's
    detection path, and records which model version answered each batch."""

    def __init__(self, engine, flows):
        self.engine, self.flows = engine, flows[:64]
        self.versions: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                version, verdicts = self.engine.classify_versioned(self.flows)
                assert len(verdicts) == len(self.flows)
                self.versions.append(version)
            except BaseException as exc:  # noqa: BLE001 - the test asserts there are none
                self.errors.append(exc)
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


@pytest.fixture()
def broker(tmp_path):
    b = LocalBroker(workdir=tmp_path / "broker", config=DEV_CONFIG).start()
    yield b
    b.cleanup()


@pytest.fixture()
def store(tmp_path, flows):
    engine, sessions = open_store(f"sqlite:///{tmp_path / 'gw.db'}")
    with sessions.begin() as s:
        repo.insert_flows(s, flows, source="sample")
    yield sessions
    engine.dispose()


@pytest.fixture(scope="module")
def keys():
    return signing.generate_private_key(), signing.generate_private_key()


class Aggregatorish:
    """The test's side of the broker: publishes real signed envelopes and control
    messages, and collects what gateways publish."""

    def __init__(self, port: int):
        self.inbox: queue.Queue = queue.Queue()
        self.link = MqttLink(MqttSettings(port=port, client_id=f"test-{time.monotonic_ns()}"),
                             subscriptions=[(topics.all_updates(), 1), (topics.all_statuses(), 1)],
                             inbox=self.inbox)
        self.link.start()
        assert self.link.wait_connected(10)

    def publish(self, topic, payload, retain=True):
        self.link.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def messages(self):
        out = []
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def stop(self):
        self.link.stop()


def make_client(store, model_dir, port, verify_key, on_global=None, clock=time.monotonic, **kw):
    learner = TorchLearner(model_dir, threads=1)
    link = GatewayLink(MqttSettings(port=port, client_id=f"gw-{GW}", keepalive_s=5, reconnect_min_s=1,
                                    reconnect_max_s=2), gateway_id=GW)
    settings = ClientSettings(gateway_id=GW, status_interval_s=0.5, **kw)
    return FLClient(settings=settings, learner=learner, sessions=store, link=link, verify_key=verify_key,
                    on_global=on_global, clock=clock)


def signed_control(key, control):
    """A control message as the aggregator sends it: signed with its model key."""
    return encode_control(control, signing_key=key)


def global_envelope(weights, key, version, base=None):
    return encode_global(weights, sender="aggregator", version=version,
                         base_version=version - 1 if base is None else base, signing_key=key)


def test_bad_and_forged_global_models_are_rejected_good_one_is_swapped_in(broker, store, model_dir, keys, flows,
                                                                         tmp_path):
    good_key, forger = keys
    engine = load_classifier(model_dir, provider="cpu")
    initial_version = engine.model_version
    client = make_client(store, model_dir, broker.port, good_key.public_key(), strategy="fedavg")
    client.on_global = EngineHotSwap(engine=engine, learner=client.learner, models_dir=tmp_path / "models")
    agg = Aggregatorish(broker.port)
    try:
        with Detector(engine, flows) as detector:
            client.start(thread=False)
            pump = lambda: client.pump_once(0.05)  # noqa: E731
            wait_for(lambda: client.link.connected, pump=pump, what="gateway connected")
            w0 = client.learner.weights()
            rng = np.random.default_rng(0)
            w1 = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in w0.items()}
            agg.publish(topics.global_model(), global_envelope(w1, good_key, 1))
            wait_for(lambda: client.version == 1, pump=pump, what="version 1 loaded")
            assert client.state is ClientState.IDLE and engine.model_version == "global-1"

            w2 = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in w1.items()}
            forged = global_envelope(w2, forger, 2)  # signed by someone else
            tampered = bytearray(global_envelope(w2, good_key, 2))
            tampered[-10] ^= 0xFF  # body changed after signing
            wrong_shape = dict(w2)
            name = next(iter(wrong_shape))
            wrong_shape[name] = np.zeros((3, 3), np.float32)
            nan_model = {k: v.copy() for k, v in w2.items()}
            nan_model[name].flat[0] = np.nan
            bad = [forged, bytes(tampered), global_envelope(wrong_shape, good_key, 2),
                   global_envelope(nan_model, good_key, 2), b"\x00not an envelope",
                   global_envelope(w2, good_key, 0, base=0)]  # older than the current version
            for payload in bad:
                agg.publish(topics.global_model(), payload)
            want = {"signature", "digest", "shapes", "non_finite", "schema", "stale_base"}
            wait_for(lambda: set(client.counters.rejected) >= want, pump=pump, what="all rejections")
            assert client.version == 1 and engine.model_version == "global-1"
            assert all(np.allclose(client.learner.weights()[k], w1[k]) for k in w1)  # still the good model
            assert client.state is ClientState.IDLE
            seen_before_swap = len(detector.versions)

            agg.publish(topics.global_model(), global_envelope(w2, good_key, 2))
            wait_for(lambda: client.version == 2, pump=pump, what="version 2 loaded")
            assert engine.model_version == "global-2"
            assert all(np.allclose(client.learner.weights()[k], w2[k]) for k in w2)
            wait_for(lambda: detector.versions and detector.versions[-1] == "global-2", what="detector on v2")
        # detection never stopped and only ever used verified models, in order
        assert not detector.errors
        assert len(detector.versions) > seen_before_swap > 0
        order = [v for i, v in enumerate(detector.versions) if i == 0 or detector.versions[i - 1] != v]
        assert order == [initial_version, "global-1", "global-2"]
        with store() as s:
            active = repo.active_model_version(s)
            assert active.version == "global-2" and active.parent == "global-1"
            assert active.path and Path(active.path, "model.onnx").is_file()

        # the gateway's retained status tells the world what it rejected
        def status_seen():
            for m in agg.messages():
                if m.topic.endswith("/status"):
                    st = json.loads(m.payload)
                    if st.get("version") == 2 and st["rejected"].get("signature"):
                        return True
            return False
        wait_for(status_seen, pump=pump, what="status with rejections")
    finally:
        client.stop()
        agg.stop()
        engine.close()


def test_outbox_keeps_update_while_broker_down_and_the_aggregator_counts_it_once(broker, store, model_dir, keys,
                                                                                  tmp_path):
    from cloud_aggregator.service import AggregatorConfig, AggregatorService

    key = keys[0]
    client = make_client(store, model_dir, broker.port, key.public_key(), strategy="gsfs", max_local_steps=3)
    # The real aggregator (GSFS, K = 1 of 1). Its control message tells the gateway a
    # trigger that cannot fire, so the only update is the one this test makes.
    never = {"tau": 1e6, "k": 1e6, "warmup": 10**6, "eval_every": 10**6}
    service = AggregatorService(
        AggregatorConfig(database=f"sqlite:///{tmp_path / 'agg.db'}", strategy="gsfs",
                         strategy_params={"rho": 1.0, "deadline_s": 1.0, "trigger": never},
                         known_senders=frozenset({GW}),
                         mqtt=MqttSettings(port=broker.port, client_id="agg-outbox-test", reconnect_min_s=1,
                                           reconnect_max_s=2)),
        initial_weights=client.learner.weights(), signing_key=key)
    try:
        service.start()
        client.start(thread=False)
        pump = lambda: client.pump_once(0.05)  # noqa: E731
        wait_for(lambda: client.version == 0 and client.trigger.config.tau == 1e6, pump=pump,
                 what="global version 0 and control loaded")

        broker.stop()
        wait_for(lambda: not client.link.connected, pump=pump, what="link down")
        client.train_round(1)  # an update produced while the broker is away
        for _ in range(5):
            pump()
        with store() as s:
            assert len(repo.outbox_pending(s)) == 1
        assert service.accepted == 0

        broker.start()  # same port and persistence directory
        wait_for(lambda: client.outbox.acked == 1, timeout=30, pump=pump, what="update acknowledged by the broker")
        with store() as s:
            assert repo.outbox_pending(s) == []
        assert service.wait_for(lambda svc: svc.version == 1, timeout=20), service.counters()
        for _ in range(20):  # give a duplicate every chance to arrive
            pump()
        assert service.accepted == 1 and service.rejections.get("replay", 0) == 0
        wait_for(lambda: client.version == 1, pump=pump, what="the gateway received version 1")
    finally:
        client.stop()
        service.stop()


def test_gsfs_gateway_quiet_on_a_version_trains_again_when_labelled_flows_arrive(broker, store, model_dir, keys,
                                                                                 iot23_dir):
    key = keys[0]
    now = [1000.0]  # the client's clock; the broker and MQTT run in real time
    client = make_client(store, model_dir, broker.port, key.public_key(), strategy="gsfs", max_local_steps=3,
                         retrain_interval_s=60, clock=lambda: now[0])
    agg = Aggregatorish(broker.port)
    never = {"tau": 1e6, "k": 1e6, "warmup": 10**6, "eval_every": 10**6}
    try:
        client.start(thread=False)
        pump = lambda: client.pump_once(0.05)  # noqa: E731
        wait_for(lambda: client.link.connected, pump=pump, what="connected")
        agg.publish(topics.global_control(), signed_control(key, Control(strategy="gsfs", trigger=never)))
        agg.publish(topics.global_model(), global_envelope(client.learner.weights(), key, 1))
        wait_for(lambda: client.counters.train_steps == 3, pump=pump, what="the session on version 1")
        trained_on = client.train_data.flows + client.val_data.flows
        now[0] += 600  # long after: the gateway stays quiet while its labelled data is unchanged
        for _ in range(20):
            pump()
        assert client.counters.train_steps == 3 and client.counters.uploads == 0

        later = []
        for r in iter_records(iot23_dir / "CTU-Honeypot-Capture-4-1" / "conn.log.labeled"):
            later.append(r)
            if len(later) >= 40:
                break
        with store.begin() as s:  # new labelled flows (a labelled log, analyst labels)
            repo.insert_flows(s, later, source="later")
            repo.insert_flows(s, [r._replace(label=None, detailed_label=None) for r in later],
                              source="live")  # unlabelled live flows are not training data
        for _ in range(20):  # the store was asked at +600 s; the next look is due 60 s later
            pump()
        assert client.counters.train_steps == 3
        now[0] += 61
        wait_for(lambda: client.counters.train_steps == 6, pump=pump, what="a session on the new flows")
        assert client.version == 1 and client.train_data.flows + client.val_data.flows == trained_on + len(later)
        now[0] += 600  # nothing changed since that session: no further one
        for _ in range(20):
            pump()
        assert client.counters.train_steps == 6
    finally:
        client.stop()
        agg.stop()


def test_fedavg_round_announcement_is_answered_once(broker, store, model_dir, keys):
    key = keys[0]
    client = make_client(store, model_dir, broker.port, key.public_key(), strategy="gsfs", max_local_steps=2)
    agg = Aggregatorish(broker.port)
    try:
        client.start(thread=False)
        pump = lambda: client.pump_once(0.05)  # noqa: E731
        wait_for(lambda: client.link.connected, pump=pump, what="connected")
        agg.publish(topics.global_control(),
                    signed_control(key, Control(strategy="fedavg", version=1, round=1, selected=frozenset({GW}),
                                           local=LocalSettings(epochs=1, max_steps=2))))
        agg.publish(topics.global_model(), global_envelope(client.learner.weights(), key, 1))
        wait_for(lambda: client.counters.uploads == 1, pump=pump, what="round answered")
        agg.publish(topics.global_control(),  # the same round again (e.g. retained redelivery)
                    signed_control(key, Control(strategy="fedavg", version=1, round=1)))
        for _ in range(20):
            pump()
        assert client.counters.uploads == 1 and client.strategy == "fedavg"
        agg.publish(topics.global_control(),
                    signed_control(key, Control(strategy="fedavg", version=1, round=2, selected=frozenset({"other"}))))
        for _ in range(20):
            pump()
        assert client.counters.uploads == 1  # not selected
        agg.publish(topics.global_control(), b'{"strategy": "bogus"}')
        wait_for(lambda: client.counters.control_rejected == 1, pump=pump, what="bad control counted")
    finally:
        client.stop()
        agg.stop()


def test_gateway_process_reports_a_bad_model_directory_in_one_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gateway.fl.run", "--gateway-id", "gw-x", "--db",
                          f"sqlite:///{tmp_path / 'x.db'}", "--model", str(tmp_path), "--allow-unsigned"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "config.json" in out.stderr and "Traceback" not in out.stderr


def test_a_gateway_without_a_verify_key_refuses_to_start_unless_allowed(tmp_path):
    """Issue 16.1: no key to verify global models with -> the FL client and the gateway
    process refuse to start (a lab says allow_unsigned / --allow-unsigned)."""
    import subprocess
    import sys

    from gateway.fl.client import ClientConfigError

    with pytest.raises(ClientConfigError, match="allow_unsigned"):
        FLClient(settings=ClientSettings(gateway_id=GW), learner=None, sessions=None, link=None)
    out = subprocess.run([sys.executable, "-m", "gateway.fl.run", "--gateway-id", "gw-x", "--db",
                          f"sqlite:///{tmp_path / 'x.db'}", "--model", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--verify-key" in out.stderr and "--allow-unsigned" in out.stderr


def test_deployment_gate_keeps_a_worse_global_out_and_the_canary_rolls_back(broker, store, model_dir, keys, flows,
                                                                            tmp_path):
    """Issue 16.3, the gateway side, with the real engine and the FL client's own
    labelled validation flows: a verified global that scores better is swapped in; one
    that scores worse than the deployed model by more than the margin is kept out of
    detection (FL still moves to it); a jump of the alerted share after a swap rolls it
    back to the model before."""
    from gateway.config import DeploySection
    from gateway.model.labels import record_label

    key = keys[0]
    engine = load_classifier(model_dir, provider="cpu")
    client = make_client(store, model_dir, broker.port, key.public_key(), strategy="fedavg")
    hot = EngineHotSwap(engine=engine, learner=client.learner, models_dir=tmp_path / "models",
                        settings=DeploySection(margin=0.02, canary_flows=100, canary_max_jump=0.15),
                        validation=client.validation_data, initial_dir=model_dir)
    client.on_global = hot
    w0 = client.learner.weights()  # the random initial student: calls nearly everything malicious
    trainer = TorchLearner(model_dir, threads=1)
    trainer.train(trainer.encode(flows, [record_label(r) for r in flows]), epochs=40, lr=3e-3, seed=0, batch_size=16)
    good = trainer.weights()
    agg = Aggregatorish(broker.port)
    try:
        client.start(thread=False)
        pump = lambda: client.pump_once(0.05)  # noqa: E731
        wait_for(lambda: client.link.connected, pump=pump, what="gateway connected")
        agg.publish(topics.global_model(), global_envelope(good, key, 1))
        wait_for(lambda: engine.model_version == "global-1", pump=pump, what="a better version 1 swapped in")
        assert hot.status()["last"]["reason"] == "better"

        agg.publish(topics.global_model(), global_envelope(w0, key, 2))
        wait_for(lambda: client.version == 2, pump=pump, what="version 2 verified")
        assert engine.model_version == "global-1"  # kept out of detection
        st = hot.status()
        assert st["refused"] == 1 and st["last"]["decision"] == "kept" and st["last"]["reason"] == "worse"
        assert st["last"]["candidate"] < st["last"]["deployed"] - 0.02
        assert all(np.array_equal(client.learner.weights()[k], w0[k]) for k in w0)  # FL goes on from v2
        with store() as s:
            assert repo.active_model_version(s).version == "global-1"

        for _ in range(4):  # baseline: 2 alerts in 100 flows each batch
            hot.observe(100, 2)
        agg.publish(topics.global_model(), global_envelope(good, key, 3))
        wait_for(lambda: engine.model_version == "global-3", pump=pump, what="version 3 swapped in")
        assert hot.status()["swapped"] == 2 and hot.status()["canary"] == "watching"
        hot.observe(60, 40)  # after the swap: 40 of 60 flows alerted...
        assert engine.model_version == "global-3"
        hot.observe(60, 40)  # ... 0.67 against 0.02: rolled back
        assert engine.model_version == "global-1"
        st = hot.status()
        assert st["rolled_back"] == 1 and st["canary"] == "rolled_back" and st["deployed"] == "global-1"
        assert st["last"]["before"] == pytest.approx(0.02) and st["last"]["after"] == pytest.approx(80 / 120)
    finally:
        client.stop()
        agg.stop()
        engine.close()
