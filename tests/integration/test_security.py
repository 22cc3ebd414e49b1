"""Hostile actors against the real production broker (broker_config/production.conf +
acl) with certificates freshly issued by gateway.certs.

Each refusal is proven for real: refused connections never get a CONNACK, and a message
that must not be delivered is waited for (bounded) by a legitimate subscriber and never
arrives, while the legitimate message sent after it does.
"""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import subprocess
import time

import pytest

from brokers import find_mosquitto
from gateway.certs import CertificateAuthority
from gateway.protocol import topics
from prodbroker import (
    PREFIX,
    Client,
    Pki,
    plain_tcp_connect_gets_connack,
    start_production_broker,
    tls_probe,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]

NEVER_WAIT = 1.0  # how long a legitimate subscriber waits for a message that must not come


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.init(root / "ca")
    pki = Pki(root=root, ca=ca)
    for gw in ("gwA", "gwB", "gwRevoked"):
        pki.bundles[f"gateway-{gw}"] = ca.bundle_dir(ca.issue_gateway(gw).bundle)
    pki.bundles["aggregator"] = ca.bundle_dir(ca.issue_aggregator().bundle)
    pki.bundles["broker-localhost"] = ca.bundle_dir(
        ca.issue_broker("localhost", ip_addresses=["127.0.0.1"]).bundle)
    # a certificate whose whole validity lies in the past
    expired = ca.issue_gateway("gwExpired", days=1,
                               now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10))
    pki.bundles["gateway-gwExpired"] = ca.bundle_dir(expired.bundle)
    ca.revoke("gateway-gwRevoked", reason="key-compromise")
    # same CN as a real gateway, but from a CA the broker does not trust
    other = CertificateAuthority.init(root / "other-ca", common_name="fedgate CA")
    pki.bundles["other-gateway-gwA"] = other.bundle_dir(other.issue_gateway("gwA").bundle)
    return pki


@pytest.fixture(scope="module")
def broker(pki, tmp_path_factory):
    b = start_production_broker(pki, tmp_path_factory.mktemp("broker"))
    yield b
    b.stop()


def client_for(broker, pki: Pki, bundle: str | None, *, name: str) -> Client:
    if bundle is None:
        return Client(broker.port, client_id=name, ca=pki.ca_file())
    return Client(broker.port, client_id=name, ca=pki.ca_file(), cert=pki.cert(bundle),
                  key=pki.key(bundle))


@pytest.fixture
def connected(broker, pki):
    made: list[Client] = []

    def make(bundle: str, name: str) -> Client:
        c = client_for(broker, pki, bundle, name=name)
        assert c.connect(), f"{bundle} could not connect: {c.error} {c.connect_reason}"
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def log_tail(broker, since: int) -> str:
    return broker.log_path.read_bytes()[since:].decode(errors="replace")


def refused(broker, pki, bundle: str | None, name: str) -> tuple[bool, str, str]:
    start = broker.log_path.stat().st_size
    c = client_for(broker, pki, bundle, name=name)
    try:
        ok = c.connect(timeout=3.0)
    finally:
        c.close()
    time.sleep(0.1)
    return (not ok), f"{c.error} {c.connect_reason} {c.disconnect_reason}", log_tail(broker, start)


# --------------------------------------------------------------------------- who gets in


def test_legitimate_gateway_and_aggregator_connect(connected):
    connected("gateway-gwA", "ok-gwA")
    connected("aggregator", "ok-agg")


@pytest.mark.parametrize(
    "bundle, why",
    [
        (None, "no client certificate"),
        ("other-gateway-gwA", "certificate from another CA"),
        ("gateway-gwExpired", "expired certificate"),
        ("gateway-gwRevoked", "revoked certificate (CRL)"),
        ("broker-localhost", "server-only certificate used as a client"),
    ],
)
def test_refused_at_tls_handshake(broker, pki, bundle, why):
    was_refused, detail, log = refused(broker, pki, bundle, f"hostile-{why[:10]}")
    assert was_refused, f"{why}: broker accepted the connection ({detail})"
    # the broker logged the refusal (OpenSSL's reason), the audit trail of the attempt
    assert "certificate verify failed" in log or "did not return a certificate" in log, log
    # and the client was told why: the TLS alert the broker sent
    reply, alert = tls_probe(broker.port, ca=pki.ca_file(),
                             cert=pki.cert(bundle) if bundle else None,
                             key=pki.key(bundle) if bundle else None)
    assert not reply.startswith(b"\x20"), f"{why}: got a CONNACK"
    expected_alert = {
        "other-gateway-gwA": "unknown ca",
        "broker-localhost": "unsupported certificate",
        "gateway-gwRevoked": "certificate revoked",
        "gateway-gwExpired": "certificate expired",
        None: "certificate required",
    }[bundle]
    assert expected_alert in alert.lower(), alert
    if bundle in ("gateway-gwRevoked", "gateway-gwExpired"):
        # OpenSSL, given the broker's CA and CRL, names the same reason, and so does
        # `fedgate certs verify`, the operator's first check when a gateway is refused
        word = "revoked" if "Revoked" in bundle else "validity"
        reason = openssl_verify(pki, bundle)
        assert ("revoked" if "Revoked" in bundle else "expired") in reason, reason
        assert any(word in p for p in pki.ca.verify(pki.bundles[bundle])["problems"])


def openssl_verify(pki: Pki, bundle: str) -> str:
    """Why OpenSSL rejects ``bundle`` with the broker's CA and CRL (what the broker runs)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    out = subprocess.run(
        ["openssl", "verify", "-crl_check", "-CRLfile", str(pki.ca.crl_path),
         "-CAfile", str(pki.ca_file()), "-purpose", "sslclient", str(pki.cert(bundle))],
        capture_output=True, text=True,
    )
    return out.stdout + out.stderr


def test_plain_tcp_to_tls_port_gets_no_connack(broker):
    reply = plain_tcp_connect_gets_connack(broker.port)
    assert not reply.startswith(b"\x20"), f"plain MQTT got a CONNACK: {reply!r}"


def test_plain_paho_client_without_tls_is_refused(broker, pki):
    c = Client(broker.port, client_id="plain", ca=None, tls=False)
    try:
        assert not c.connect(timeout=2.0)
    finally:
        c.close()


def test_client_checks_the_broker_host_name(broker, pki, tmp_path):
    # a broker certificate from the right CA but for another host: the client refuses it
    ca = pki.ca
    other = ca.issue_broker("not-this-host.example")
    c = Client(broker.port, client_id="hostcheck", ca=pki.ca_file(),
               cert=pki.cert("gateway-gwA"), key=pki.key("gateway-gwA"))
    # connect to the real broker, whose certificate is for "localhost": accepted ...
    try:
        assert c.connect()
    finally:
        c.close()
    # ... and a server presenting the other host's certificate is refused by the client
    import socket
    import ssl
    import threading

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(ca.bundle_dir(other.bundle) / "tls.crt"),
                               str(ca.bundle_dir(other.bundle) / "tls.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            server_ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    impostor = Client(port, client_id="hostcheck2", ca=pki.ca_file(),
                      cert=pki.cert("gateway-gwA"), key=pki.key("gateway-gwA"))
    try:
        assert not impostor.connect(timeout=2.0)
        assert "CERTIFICATE_VERIFY_FAILED" in (impostor.error or "") or "hostname" in (
            impostor.error or "").lower(), impostor.error
    finally:
        impostor.close()
        listener.close()
        t.join(timeout=2)


# --------------------------------------------------------------------------- the ACL


def test_gateway_cannot_publish_on_another_gateways_topic(connected):
    agg = connected("aggregator", "acl-agg1")
    assert agg.subscribe(topics.all_updates(PREFIX)) == [1]
    gw_a = connected("gateway-gwA", "acl-gwA1")
    denied = gw_a.publish(topics.gateway_update("gwB", PREFIX), b"forged-as-B")
    allowed = gw_a.publish(topics.gateway_update("gwA", PREFIX), b"genuine-A")
    assert denied == 0x87  # MQTT v5 "not authorized"
    assert allowed == 0
    genuine = agg.wait_for(lambda m: m.payload == b"genuine-A", timeout=5)
    assert genuine is not None and genuine.topic == "fedgate/v1/gw/gwA/update"
    # the forged one was sent first on the same connection: had the broker forwarded it,
    # it would have arrived before the genuine one; wait a little longer anyway
    assert agg.wait_for(lambda m: m.payload == b"forged-as-B", timeout=NEVER_WAIT) is None
    assert all(m.payload != b"forged-as-B" for m in agg.seen)


def test_gateway_cannot_publish_the_global_model(connected):
    gw_b = connected("gateway-gwB", "acl-gwB2")
    assert gw_b.subscribe(f"{PREFIX}/global/#") == [1]
    gw_a = connected("gateway-gwA", "acl-gwA2")
    assert gw_a.publish(topics.global_model(PREFIX), b"evil-model", retain=True) == 0x87
    assert gw_a.publish(topics.global_control(PREFIX), b"evil-control", retain=True) == 0x87
    agg = connected("aggregator", "acl-agg2")
    assert agg.publish(topics.global_control(PREFIX), b"control-v1", retain=True) == 0
    assert gw_b.wait_for(lambda m: m.payload == b"control-v1", timeout=5) is not None
    assert gw_b.wait_for(lambda m: m.payload.startswith(b"evil"), timeout=NEVER_WAIT) is None
    assert all(not m.payload.startswith(b"evil") for m in gw_b.seen)
    # and nothing evil was retained for later subscribers either
    late = connected("gateway-gwB", "acl-gwB2-late")
    assert late.subscribe(f"{PREFIX}/global/#") == [1]
    got = late.wait_for(lambda m: m.payload.startswith(b"evil"), timeout=NEVER_WAIT)
    assert got is None
    assert [m.payload for m in late.seen if m.topic.endswith("/control")] == [b"control-v1"]


def test_aggregator_publishes_global_and_gateways_receive_it(connected):
    gw = connected("gateway-gwA", "acl-gwA3")
    assert gw.subscribe(topics.global_model(PREFIX)) == [1]
    agg = connected("aggregator", "acl-agg3")
    assert agg.publish(topics.global_model(PREFIX), b"model-v7", retain=True) == 0
    msg = gw.wait_for(lambda m: m.payload == b"model-v7", timeout=5)
    assert msg is not None and msg.topic == "fedgate/v1/global/model"


def test_gateway_cannot_read_other_gateways_or_write_their_status(connected):
    gw_a = connected("gateway-gwA", "acl-gwA4")
    # mosquitto grants a wildcard SUBSCRIBE and applies the read ACL per message, so the
    # proof is in delivery: B's genuine update reaches the aggregator, never gateway A
    gw_a.subscribe(topics.all_updates(PREFIX))
    gw_a.subscribe(f"{PREFIX}/gw/gwB/#")
    agg = connected("aggregator", "acl-agg4")
    assert agg.subscribe(topics.all_updates(PREFIX)) == [1]
    gw_b = connected("gateway-gwB", "acl-gwB4")
    assert gw_b.publish(topics.gateway_update("gwB", PREFIX), b"B-private-update") == 0
    assert agg.wait_for(lambda m: m.payload == b"B-private-update", timeout=5) is not None
    assert gw_a.wait_for(lambda m: m.payload == b"B-private-update", timeout=NEVER_WAIT) is None
    # a gateway may not mark another one offline either
    assert gw_a.publish(topics.gateway_status("gwB", PREFIX), b"offline", retain=True) == 0x87
    assert gw_a.publish(topics.gateway_status("gwA", PREFIX), b"online", retain=True) < 0x80


def test_escalation_rights_teacher_answers_only_the_asker_reads(connected):
    """The teacher (aggregator identity) reads escalations and writes verdicts; a gateway
    writes its own escalations, reads its own verdicts, and never another gateway's."""
    teacher = connected("aggregator", "esc-teacher")
    assert teacher.subscribe(topics.all_escalations(PREFIX)) == [1]
    gw_a = connected("gateway-gwA", "esc-gwA")
    gw_b = connected("gateway-gwB", "esc-gwB")
    assert gw_a.subscribe(topics.gateway_verdict("gwA", PREFIX)) == [1]
    gw_a.subscribe(topics.gateway_verdict("gwB", PREFIX))  # granted or not, nothing of B's may arrive
    assert gw_b.subscribe(topics.gateway_verdict("gwB", PREFIX)) == [1]
    assert gw_a.publish(topics.gateway_escalate("gwA", PREFIX), b"ask-A") == 0
    assert gw_a.publish(topics.gateway_escalate("gwB", PREFIX), b"ask-as-B") == 0x87
    assert teacher.wait_for(lambda m: m.payload == b"ask-A", timeout=5) is not None
    assert teacher.publish(topics.gateway_verdict("gwB", PREFIX), b"verdict-B") == 0
    assert teacher.publish(topics.gateway_verdict("gwA", PREFIX), b"verdict-A") == 0
    assert gw_b.wait_for(lambda m: m.payload == b"verdict-B", timeout=5) is not None
    assert gw_a.wait_for(lambda m: m.payload == b"verdict-A", timeout=5) is not None
    assert all(m.payload != b"verdict-B" for m in gw_a.seen)
    assert all(m.payload != b"ask-as-B" for m in teacher.seen)
    # a gateway cannot answer for the teacher on another gateway's verdict topic
    assert gw_a.publish(topics.gateway_verdict("gwB", PREFIX), b"fake-verdict") == 0x87


def test_aggregator_cannot_be_impersonated_by_a_gateway_id():
    # the aggregator's username can never be a gateway id, so no gateway cert carries it
    from gateway.certs import AGGREGATOR_IDENTITY, CertError, gateway_common_name

    with pytest.raises(CertError):
        gateway_common_name(AGGREGATOR_IDENTITY)


# --------------------------------------------------------------------------- lifecycle


def test_revocation_takes_effect_on_reload_and_restart_cuts_the_session(broker, pki):
    """The runbook's revocation: revoke, copy the CRL, `systemctl reload mosquitto`
    (SIGHUP): new connections with the certificate are refused at once.  A session that
    was already open survives a reload (TLS checks happen at the handshake) and ends
    only with a broker restart, after which the client cannot come back."""
    ca = pki.ca
    issued = ca.issue_gateway("gwLater")
    pki.bundles["gateway-gwLater"] = ca.bundle_dir(issued.bundle)
    live = client_for(broker, pki, "gateway-gwLater", name="later-live")
    try:
        assert live.connect()
        revoked = ca.revoke("gateway-gwLater", reason="key-compromise")
        assert [r.serial for r in revoked] == [issued.serial]
        broker.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        alert = ""
        while time.monotonic() < deadline and "revoked" not in alert:
            time.sleep(0.1)
            _, alert = tls_probe(broker.port, ca=pki.ca_file(),
                                 cert=pki.cert("gateway-gwLater"), key=pki.key("gateway-gwLater"))
        assert "certificate revoked" in alert.lower(), alert
        assert live.connected.is_set() and not live.closed.is_set()
        broker.restart()
        assert live.closed.wait(5)
        again = client_for(broker, pki, "gateway-gwLater", name="later-again")
        try:
            assert not again.connect(timeout=2.0)
        finally:
            again.close()
    finally:
        live.close()


def test_rotation_new_certificate_works_old_one_refused(broker, pki):
    ca = pki.ca
    old = ca.issue_gateway("gwRotate")
    old_dir = pki.root / "gwRotate-old"
    shutil.copytree(ca.bundle_dir(old.bundle), old_dir)
    new = ca.issue_gateway("gwRotate", rotate=True)
    assert [r.serial for r in ca.revoke("gateway-gwRotate", keep_latest=True,
                                        reason="superseded")] == [old.serial]
    broker.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    fresh = Client(broker.port, client_id="rotate-new", ca=pki.ca_file(),
                   cert=ca.bundle_dir(new.bundle) / "tls.crt",
                   key=ca.bundle_dir(new.bundle) / "tls.key")
    try:
        assert fresh.connect()
    finally:
        fresh.close()
    _, alert = tls_probe(broker.port, ca=pki.ca_file(), cert=old_dir / "tls.crt",
                         key=old_dir / "tls.key")
    assert "certificate revoked" in alert.lower(), alert
