"""The production broker carrying real protocol traffic, through the project's own MQTT
client factory (gateway.mqtt) over mutual TLS: signed global models survive a broker
restart; forged, unsigned and replayed global models that reach a gateway are rejected
by the receiver's validation (gateway.protocol.validation) with a typed reason; size
limits hold.
"""

from __future__ import annotations

import collections
import logging
import time

import numpy as np
import pytest

from brokers import find_mosquitto
from gateway.certs import CertificateAuthority
from gateway.mqtt import MqttLink, MqttSettings, TlsSettings
from gateway.protocol import signing, topics
from gateway.protocol.envelope import Envelope, Kind, encode_global
from gateway.protocol.errors import RejectReason, Rejection
from gateway.protocol.validation import ValidationPolicy, spec_of, validate_envelope
from prodbroker import PREFIX, Client, Pki, start_production_broker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]

log = logging.getLogger("test.production_broker")
WEIGHTS = {"layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
           "layer.bias": np.zeros(3, dtype=np.float32)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.init(root / "ca")
    pki = Pki(root=root, ca=ca)
    for issued in (ca.issue_gateway("edge1"), ca.issue_aggregator(),
                   ca.issue_broker("localhost", ip_addresses=["127.0.0.1"])):
        pki.bundles[issued.bundle] = ca.bundle_dir(issued.bundle)
    return pki


@pytest.fixture(scope="module")
def broker(pki, tmp_path_factory):
    b = start_production_broker(pki, tmp_path_factory.mktemp("broker"))
    yield b
    b.stop()


def link(broker, pki: Pki, bundle: str, client_id: str, subscriptions=()) -> MqttLink:
    settings = MqttSettings(
        host="localhost", port=broker.port, client_id=client_id, session_expiry_s=0,
        tls=TlsSettings(ca_file=str(pki.ca_file()), cert_file=str(pki.cert(bundle)),
                        key_file=str(pki.key(bundle))),
    )
    lk = MqttLink(settings, subscriptions=subscriptions).start()
    assert lk.wait_connected(10), f"{bundle} did not connect"
    return lk


class GlobalModelReceiver:
    """What a gateway does with each global-model message: validate, log and count
    rejections, remember the accepted version and message ids."""

    def __init__(self, verify_key):
        self.verify_key = verify_key
        self.current_version: int | None = None
        self.seen_ids: set[str] = set()
        self.rejected: collections.Counter[RejectReason] = collections.Counter()
        self.accepted: list[Envelope] = []

    def handle(self, payload: bytes) -> Envelope | Rejection:
        policy = ValidationPolicy(
            kind=Kind.GLOBAL, verify_key=self.verify_key, current_version=self.current_version,
            is_replay=lambda sender, mid: mid in self.seen_ids,
            expected={k: (v.shape, "float32") for k, v in WEIGHTS.items()},
        )
        result = validate_envelope(payload, policy)
        if isinstance(result, Rejection):
            self.rejected[result.reason] += 1
            log.warning("global model rejected: %s", result)
            return result
        self.current_version = result.header.version
        self.seen_ids.add(result.header.message_id)
        self.accepted.append(result)
        return result


def next_global(lk: MqttLink, timeout: float = 5.0):
    msg = lk.inbox.get(timeout=timeout)
    assert msg.topic == topics.global_model(PREFIX)
    return msg


def test_signed_retained_global_model_survives_broker_restart(broker, pki):
    key = signing.generate_private_key()
    model = encode_global(WEIGHTS, sender="aggregator", version=3, base_version=2,
                          signing_key=key)
    agg = link(broker, pki, "aggregator", "agg-restart")
    try:
        info = agg.publish(topics.global_model(PREFIX), model, qos=1, retain=True)
        info.wait_for_publish(5)
        assert info.is_published()
    finally:
        agg.stop()

    broker.restart()  # SIGTERM: mosquitto writes its persistence file, then starts again

    gw = link(broker, pki, "gateway-edge1", "edge1-after-restart",
              subscriptions=[(topics.global_model(PREFIX), 1)])
    try:
        msg = next_global(gw)
        assert msg.retain and msg.payload == model
        receiver = GlobalModelReceiver(key.public_key())
        env = receiver.handle(msg.payload)
        assert isinstance(env, Envelope) and env.header.version == 3
        np.testing.assert_array_equal(env.tensors["layer.weight"], WEIGHTS["layer.weight"])
    finally:
        gw.stop()


def test_forged_unsigned_and_replayed_global_models_are_rejected(broker, pki, caplog):
    """Even if a bad model gets onto the global topic (a stolen aggregator certificate,
    a broker restored from an old backup), the gateway refuses to load it."""
    key = signing.generate_private_key()
    forger = signing.generate_private_key()
    v5 = encode_global(WEIGHTS, sender="aggregator", version=5, base_version=4, signing_key=key)
    v6 = encode_global(WEIGHTS, sender="aggregator", version=6, base_version=5, signing_key=key)
    forged = encode_global(WEIGHTS, sender="aggregator", version=7, base_version=6,
                           signing_key=forger)
    unsigned = encode_global(WEIGHTS, sender="aggregator", version=8, base_version=6)
    # a genuinely signed header with other weights spliced in: the signed digest no
    # longer matches the body
    v9 = encode_global(WEIGHTS, sender="aggregator", version=9, base_version=6, signing_key=key)
    other = encode_global({k: v + 1 for k, v in WEIGHTS.items()}, sender="aggregator",
                          version=9, base_version=6, signing_key=key)
    tampered = v9[: len(v9) - len(_body(v9))] + _body(other)

    gw = link(broker, pki, "gateway-edge1", "edge1-validation",
              subscriptions=[(topics.global_model(PREFIX), 1)])
    agg = link(broker, pki, "aggregator", "agg-validation")
    receiver = GlobalModelReceiver(key.public_key())
    try:
        while not gw.inbox.empty():  # a retained model from an earlier test
            gw.inbox.get_nowait()
        sent = [("v6", v6), ("forged", forged), ("unsigned", unsigned), ("old v5", v5),
                ("v6 again", v6), ("tampered", tampered)]
        for _, payload in sent:
            agg.publish(topics.global_model(PREFIX), payload, qos=1, retain=True).wait_for_publish(5)
        with caplog.at_level(logging.WARNING, logger="test.production_broker"):
            results = {name: receiver.handle(next_global(gw).payload) for name, _ in sent}
    finally:
        agg.stop()
        gw.stop()

    assert isinstance(results["v6"], Envelope)
    assert results["forged"].reason is RejectReason.SIGNATURE
    assert results["unsigned"].reason is RejectReason.SIGNATURE
    assert results["old v5"].reason is RejectReason.STALE_BASE
    assert results["v6 again"].reason is RejectReason.REPLAY
    assert results["tampered"].reason is RejectReason.DIGEST
    assert [e.header.version for e in receiver.accepted] == [6]
    assert sum(receiver.rejected.values()) == 5
    assert receiver.rejected[RejectReason.SIGNATURE] >= 2
    assert sum("global model rejected" in r.getMessage() for r in caplog.records) == 5


def _body(envelope: bytes) -> bytes:
    header_len = int.from_bytes(envelope[4:8], "big")
    return envelope[8 + header_len:]


@pytest.mark.slow
def test_oversize_publish_is_refused_and_not_delivered(broker, pki):
    """max_packet_size (8 MiB) holds: a few-MB model passes, a larger packet is refused
    (its sender disconnected) and never reaches a subscriber."""
    sub = Client(broker.port, client_id="size-sub", ca=pki.ca_file(),
                 cert=pki.cert("gateway-edge1"), key=pki.key("gateway-edge1"))
    agg = Client(broker.port, client_id="size-agg", ca=pki.ca_file(),
                 cert=pki.cert("aggregator"), key=pki.key("aggregator"))
    big = b"x" * 9_000_000
    ok = b"y" * 4_000_000
    try:
        assert sub.connect() and agg.connect()
        assert sub.subscribe(topics.global_control(PREFIX)) == [1]
        assert agg.publish(topics.global_control(PREFIX), ok, timeout=20) < 0x80
        assert sub.wait_for(lambda m: len(m.payload) == len(ok), timeout=20) is not None
        info = agg.client.publish(topics.global_control(PREFIX), big, qos=1)
        assert agg.closed.wait(15)  # the broker dropped the oversize sender ...
        assert info.mid not in agg.pubacks  # ... without acknowledging the message
        deadline = time.monotonic() + 5  # ... and says so in its log
        while "disconnected due to oversize packet" not in broker.log_path.read_text():
            assert time.monotonic() < deadline, broker.log_path.read_text()[-1000:]
            time.sleep(0.1)
    finally:
        agg.close()
    try:
        assert sub.wait_for(lambda m: len(m.payload) == len(big), timeout=1.0) is None
        assert all(len(m.payload) != len(big) for m in sub.seen)
    finally:
        sub.close()


@pytest.mark.slow
def test_aggregator_and_gateway_run_over_mutual_tls(broker, pki, tmp_path):
    """The real aggregator service, configured from TOML with the CA/cert/key paths,
    and a gateway over the production broker: the gateway's update is pooled and
    aggregated; its forged update in another gateway's name is refused by the broker
    (other topic) or by the aggregator's validation (own topic, other sender); the signed
    global model reaches the gateway and verifies."""
    import json

    from aggregator_helpers import tiny_delta, tiny_model
    from cloud_aggregator.service import AggregatorConfig, AggregatorService
    from gateway.mqtt import Will
    from gateway.protocol.envelope import encode_update

    key_path = tmp_path / "signing" / "global-model.key"
    made = signing.generate_private_key()  # what `fedgate certs signing-key` / `keygen` write
    signing.save_private_key(made, key_path)
    signing.save_public_key(made, str(key_path) + ".pub")
    config_path = tmp_path / "aggregator.toml"
    config_path.write_text(f"""
[aggregator]
database = "{tmp_path / 'agg.db'}"
signing_key = "{key_path}"
known_senders = ["edge1", "edge2"]
tick_s = 0.05
[mqtt]
host = "localhost"
port = {broker.port}
client_id = "agg-e2e"
session_expiry_s = 0
ca_file = "{pki.ca_file()}"
cert_file = "{pki.cert('aggregator')}"
key_file = "{pki.key('aggregator')}"
[strategy]
name = "gsfs"
rho = 0.5
""")
    config = AggregatorConfig.from_toml(config_path)
    assert config.mqtt.tls is not None and config.mqtt.tls.check_hostname
    svc = AggregatorService(config, initial_weights=tiny_model()).start()
    status = topics.gateway_status("edge1", PREFIX)
    gw = MqttLink(
        MqttSettings(host="localhost", port=broker.port, client_id="edge1-e2e", session_expiry_s=0,
                     tls=TlsSettings(ca_file=str(pki.ca_file()), cert_file=str(pki.cert("gateway-edge1")),
                                     key_file=str(pki.key("gateway-edge1")))),
        subscriptions=[(topics.global_model_all(PREFIX), 1)],
        will=Will(status, b'{"state":"offline"}'),
    ).start()
    try:
        assert svc.wait_connected(10) and gw.wait_connected(10)
        gw.publish(status, json.dumps({"state": "online", "ts": time.time()}).encode(),
                   retain=True).wait_for_publish(5)
        assert svc.wait_for(lambda s: "edge1" in s.pool.live_clients(), 10)
        as_edge2 = encode_update(tiny_delta(9.0), sender="edge2", base_version=0, num_samples=1).data
        # on edge2's topic: the broker drops it (ACL); on its own topic: the validation
        gw.publish(topics.gateway_update("edge2", PREFIX), as_edge2).wait_for_publish(5)
        gw.publish(topics.gateway_update("edge1", PREFIX), as_edge2).wait_for_publish(5)
        assert svc.wait_for(lambda s: s.rejections["sender_mismatch"] == 1, 10), dict(svc.rejections)
        good = encode_update(tiny_delta(0.5), sender="edge1", base_version=0, num_samples=8).data
        gw.publish(topics.gateway_update("edge1", PREFIX), good).wait_for_publish(5)
        assert svc.wait_for(lambda s: s.version == 1, 15), dict(svc.rejections)
        assert svc.accepted == 1 and sum(svc.rejections.values()) == 1

        public = signing.load_public_key(str(key_path) + ".pub")
        accepted: list[Envelope] = []
        deadline = time.monotonic() + 10
        while not accepted and time.monotonic() < deadline:
            msg = gw.inbox.get(timeout=max(0.1, deadline - time.monotonic()))
            if msg.topic == topics.global_model(PREFIX):
                result = validate_envelope(msg.payload, ValidationPolicy(
                    kind=Kind.GLOBAL, verify_key=public, expected=spec_of(tiny_model())))
                if isinstance(result, Envelope) and result.header.version == 1:
                    accepted.append(result)
        assert accepted, "no signed global model v1 reached the gateway"
        np.testing.assert_allclose(accepted[0].tensors["encoder.bias"], 0.5)
    finally:
        gw.stop()
        svc.stop()


def test_client_factory_checks_the_broker_host_name(pki, tmp_path):
    """gateway.mqtt's TLS settings verify the broker's name: a broker whose certificate
    (from the right CA) is for another host is refused; with hostname checking off the
    same broker is accepted, so the name, and nothing else, made the difference."""
    wrong = pki.ca.issue_broker("elsewhere.example")
    pki.bundles[wrong.bundle] = pki.ca.bundle_dir(wrong.bundle)
    impostor = start_production_broker(pki, tmp_path / "impostor", broker_bundle=wrong.bundle)
    try:
        def attempt(check_hostname: bool) -> bool:
            lk = MqttLink(MqttSettings(
                host="localhost", port=impostor.port, client_id=f"hostcheck-{check_hostname}",
                session_expiry_s=0,
                tls=TlsSettings(ca_file=str(pki.ca_file()), cert_file=str(pki.cert("gateway-edge1")),
                                key_file=str(pki.key("gateway-edge1")),
                                check_hostname=check_hostname))).start()
            try:
                return lk.wait_connected(2 if check_hostname else 10)
            finally:
                lk.stop()

        assert not attempt(True)
        assert attempt(False)
    finally:
        impostor.stop()


def test_gateway_link_status_will_and_refusals_through_the_acl(broker, pki):
    """The gateway's FL link (gateway.fl.link) over mTLS: its status and last will pass
    the ACL (a gateway that dies is seen offline), and a publish the ACL refuses comes
    back to the gateway as a PUBACK event with reason 0x87, which its outbox can count."""
    import json

    from gateway.fl.link import Acked, GatewayLink

    watcher = Client(broker.port, client_id="status-watcher", ca=pki.ca_file(),
                     cert=pki.cert("aggregator"), key=pki.key("aggregator"))
    settings = MqttSettings(
        host="localhost", port=broker.port, client_id="fedgate-gw-edge1", session_expiry_s=0,
        tls=TlsSettings(ca_file=str(pki.ca_file()), cert_file=str(pki.cert("gateway-edge1")),
                        key_file=str(pki.key("gateway-edge1"))))
    gw = GatewayLink(settings, gateway_id="edge1", prefix=PREFIX).start()
    try:
        assert watcher.connect()
        assert watcher.subscribe(topics.all_statuses(PREFIX)) == [1]
        assert gw.mqtt.wait_connected(10)
        gw.publish_status("online")
        online = watcher.wait_for(lambda m: m.topic.endswith("/edge1/status")
                                  and json.loads(m.payload)["state"] == "online", timeout=5)
        assert online is not None

        own = gw.publish(gw.update_topic, b"update bytes")
        foreign = gw.publish(topics.gateway_update("edge2", PREFIX), b"update bytes")
        acks: dict[int, int] = {}
        deadline = time.monotonic() + 5
        while not {own, foreign} <= set(acks) and time.monotonic() < deadline:
            event = gw.events.get(timeout=max(0.05, deadline - time.monotonic()))
            if isinstance(event, Acked):
                acks[event.mid] = event.reason_code
        assert acks[own] < 0x80 and acks[foreign] == 0x87

        # die without DISCONNECT: the broker publishes the retained "offline" will
        gw.mqtt.client.loop_stop()
        gw.mqtt.client.socket().close()
        offline = watcher.wait_for(lambda m: m.topic.endswith("/edge1/status")
                                   and json.loads(m.payload)["state"] == "offline", timeout=10)
        assert offline is not None and offline.topic == topics.gateway_status("edge1", PREFIX)
    finally:
        watcher.close()  # gw: its loop is stopped and its socket closed above


@pytest.mark.slow
def test_gateway_service_runs_over_mutual_tls(broker, pki, tmp_path):
    """The real gateway service (`fedgate gateway run`'s GatewayService), configured like
    deploy/config/gateway-*.toml (CA, certificate and key paths, TLS 1.2+, hostname
    checking), against the production broker: it connects as its certificate identity,
    its retained status and its alerts pass the ACL and reach the aggregator identity."""
    import json

    from benchmarks.live_latency import write_at_rate
    from gateway.config import config_from_dict
    from gateway.service import GatewayService
    from gateway_helpers import RuleClassifier, store_counts, wait_until

    (tmp_path / "conn.log").touch()
    config = config_from_dict({
        "gateway": {"id": "edge1", "database": f"sqlite:///{tmp_path / 'gw.db'}", "model": "none"},
        "source": {"zeek_log": str(tmp_path / "conn.log")},
        "mqtt": {"host": "localhost", "port": broker.port, "keepalive_s": 5,
                 "ca_file": str(pki.ca_file()), "cert_file": str(pki.cert("gateway-edge1")),
                 "key_file": str(pki.key("gateway-edge1"))},
        "fl": {"status_interval_s": 1.0},
        "http": {"listen": ""},
    })
    watcher = Client(broker.port, client_id="svc-watcher", ca=pki.ca_file(),
                     cert=pki.cert("aggregator"), key=pki.key("aggregator"))
    service = GatewayService(config, classifier=RuleClassifier()).start()
    try:
        assert watcher.connect()
        assert watcher.subscribe(f"{PREFIX}/gw/edge1/#") == [1]
        assert wait_until(lambda: service.link.connected, 15), "gateway service did not connect"
        status = watcher.wait_for(lambda m: m.topic.endswith("/status")
                                  and json.loads(m.payload).get("state") == "online", timeout=10)
        assert status is not None
        n = 1500  # the writer's first few hundred flows are all benign
        write_at_rate(tmp_path / "conn.log", rate=3000, count=n)
        assert wait_until(lambda: store_counts(config.database_url)[0] == n, 30)
        alert = watcher.wait_for(lambda m: m.topic == topics.gateway_alerts("edge1", PREFIX), timeout=15)
        assert alert is not None and json.loads(alert.payload)["detections"]
    finally:
        service.stop()
        watcher.close()


def test_a_gateway_certificate_cannot_take_over_the_aggregators_client_id(broker, pki):
    """Issue 16.6: with production.conf's use_username_as_clientid the broker keys
    every session by certificate identity, so a gateway connecting with the aggregator's
    configured client id (or its CN) neither disconnects the aggregator nor receives or
    sends anything as it."""
    agg = Client(broker.port, client_id="fedgate-aggregator", ca=pki.ca_file(), cert=pki.cert("aggregator"),
                 key=pki.key("aggregator"))
    assert agg.connect()
    assert agg.subscribe(f"{PREFIX}/gw/+/status") == [1]
    try:
        for client_id in ("fedgate-aggregator", "@aggregator", "aggregator"):
            intruder = Client(broker.port, client_id=client_id, ca=pki.ca_file(), cert=pki.cert("gateway-edge1"),
                              key=pki.key("gateway-edge1"))
            assert intruder.connect()  # it may connect -- as edge1
            try:
                time.sleep(1.0)
                assert not agg.closed.is_set(), f"{client_id!r} took the aggregator's session over: " \
                                                f"{agg.disconnect_reason}"
                assert intruder.publish(f"{PREFIX}/global/model", b"junk", retain=True) == 0x87  # still edge1's ACL
            finally:
                intruder.close()
        edge = Client(broker.port, client_id="anything", ca=pki.ca_file(), cert=pki.cert("gateway-edge1"),
                      key=pki.key("gateway-edge1"))
        assert edge.connect()
        assert edge.publish(f"{PREFIX}/gw/edge1/status", b'{"state": "online"}') == 0
        edge.close()
        assert agg.wait_for(lambda m: m.topic == f"{PREFIX}/gw/edge1/status", 10) is not None  # still served
        assert not agg.closed.is_set()
    finally:
        agg.close()
