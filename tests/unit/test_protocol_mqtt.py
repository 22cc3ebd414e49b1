"""gateway/mqtt.py settings: validation and the TLS context it builds (no sockets)."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.mqtt import MqttLink, MqttSettings, TlsSettings, Will


def self_signed(tmp_path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_context_is_strict(tmp_path):
    ca, _ = self_signed(tmp_path, "ca")
    cert, key = self_signed(tmp_path, "client")
    ctx = TlsSettings(ca_file=ca, cert_file=cert, key_file=key).context()
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED


def test_link_with_tls_and_will_is_built_without_connecting(tmp_path):
    ca, _ = self_signed(tmp_path, "ca")
    link = MqttLink(MqttSettings(client_id="gw-1", port=8883, tls=TlsSettings(ca_file=ca), username="gw-1"),
                    subscriptions=[("fedgate/v1/global/model/#", 1)], will=Will("fedgate/v1/gw/gw-1/status", b"{}"),
                    manual_ack=True)
    assert not link.connected and link.manual_ack
    link.stop()  # never started: a no-op


@pytest.mark.parametrize("bad", [
    lambda: MqttSettings(client_id=""),
    lambda: MqttSettings(client_id="x", port=70000),
    lambda: MqttSettings(client_id="x", keepalive_s=0),
    lambda: MqttSettings(client_id="x", reconnect_min_s=5, reconnect_max_s=1),
    lambda: TlsSettings(ca_file=""),
    lambda: TlsSettings(ca_file="ca.pem", cert_file="c.pem"),
])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


def test_settings_are_keyword_only():
    with pytest.raises(TypeError):
        MqttSettings("127.0.0.1", 1883, "x")  # type: ignore[misc]
