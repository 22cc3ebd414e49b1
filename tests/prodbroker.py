"""Run the real ``broker_config/production.conf`` in tests, with certificates from
:mod:`gateway.certs`, and small paho helpers that report what really happened.

Only deployment-specific values are rewritten (port, file paths, ``user``); every other
directive of the production file is kept as is, which :func:`render_production_conf`
checks.
"""

from __future__ import annotations

import getpass
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from brokers import Mosquitto
from gateway.certs import BUNDLE_CERT, BUNDLE_KEY, CertificateAuthority

REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_CONF = REPO_ROOT / "broker_config" / "production.conf"
PRODUCTION_ACL = REPO_ROOT / "broker_config" / "acl"
PREFIX = "fedgate/v1"

# directives whose value is site-specific; everything else is tested verbatim
_SITE_DIRECTIVES = ("listener", "cafile", "certfile", "keyfile", "crlfile", "acl_file",
                    "persistence_location", "user")


def directives(text: str) -> list[tuple[str, str]]:
    """(key, value) of every non-comment line, in order."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value.strip()))
    return out


def render_production_conf(*, port: int, workdir: Path, ca: Path, cert: Path, key: Path,
                           crl: Path, acl: Path, text: str | None = None) -> str:
    """production.conf with this test's port, paths and user; nothing else changed."""
    text = PRODUCTION_CONF.read_text() if text is None else text
    values = {
        "listener": f"{port} 127.0.0.1",
        "cafile": str(ca),
        "certfile": str(cert),
        "keyfile": str(key),
        "crlfile": str(crl),
        "acl_file": str(acl),
        "persistence_location": f"{workdir}/",
        # mosquitto started as root drops to `user`; run as whoever runs the tests so it
        # can read the 0600 keys and write the tmp dir
        "user": getpass.getuser(),
    }
    lines = []
    seen = set()
    for line in text.splitlines():
        stripped = line.strip()
        key = stripped.partition(" ")[0]
        if stripped and not stripped.startswith("#") and key in values:
            if key in seen:
                raise AssertionError(f"{key} appears twice in production.conf")
            seen.add(key)
            line = f"{key} {values[key]}"
        lines.append(line)
    missing = set(_SITE_DIRECTIVES) - seen
    if missing:
        raise AssertionError(f"production.conf lacks {sorted(missing)}")
    rendered = "\n".join(lines) + "\n"
    kept = [(k, v) for k, v in directives(rendered) if k not in values]
    assert kept == [(k, v) for k, v in directives(text) if k not in values]
    return rendered


@dataclass
class Pki:
    """A CA in ``root`` with the identities the security tests need."""

    root: Path
    ca: CertificateAuthority
    bundles: dict[str, Path] = field(default_factory=dict)

    def ca_file(self) -> Path:
        return self.ca.ca_path

    def cert(self, bundle: str) -> Path:
        return self.bundles[bundle] / BUNDLE_CERT

    def key(self, bundle: str) -> Path:
        return self.bundles[bundle] / BUNDLE_KEY


def start_production_broker(pki: Pki, workdir: Path, *, port: int | None = None,
                            broker_bundle: str = "broker-localhost") -> Mosquitto:
    workdir.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(config_text="", workdir=workdir, port=port)
    broker.config_path.write_text(render_production_conf(
        port=broker.port, workdir=workdir, ca=pki.ca_file(), cert=pki.cert(broker_bundle),
        key=pki.key(broker_bundle), crl=pki.ca.crl_path, acl=PRODUCTION_ACL,
    ))
    return broker.start()


# --------------------------------------------------------------------------- clients


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


class Client:
    """A paho MQTT v5 client over TLS whose events are recorded for assertions."""

    def __init__(self, port: int, *, client_id: str, ca: Path | None, cert: Path | None = None,
                 key: Path | None = None, tls: bool = True, server_hostname_check: bool = True):
        self.port = port
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.settled = threading.Event()  # CONNACK or connection closed, whichever first
        self.connect_reason: str | None = None
        self.disconnect_reason: str | None = None
        self.error: str | None = None
        self.messages: queue.Queue[Received] = queue.Queue()
        self.seen: list[Received] = []  # every message wait_for took off the queue
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self.puback_event = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        if tls:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(ca) if ca else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = server_hostname_check
            if cert is not None:
                ctx.load_cert_chain(str(cert), str(key))
            self.client.tls_set_context(ctx)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    # callbacks only record and return
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connect_reason = str(reason_code)
        if not reason_code.is_failure:
            self.connected.set()
        else:
            self.closed.set()
        self.settled.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnect_reason = str(reason_code)
        self.closed.set()
        self.settled.set()

    def _on_message(self, client, userdata, msg):
        self.messages.put(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subacks.put([rc.value for rc in reason_codes])

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.puback_event:
            self.pubacks[mid] = reason_code.value
            self.puback_event.notify_all()

    def connect(self, timeout: float = 5.0) -> bool:
        """True when the broker accepted the connection (CONNACK success) in ``timeout``."""
        try:
            self.client.connect("localhost", self.port, keepalive=30,
                                clean_start=True, properties=Properties(1))
        except (ssl.SSLError, OSError) as exc:  # refused during the TLS handshake
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        self.client.loop_start()
        self.settled.wait(timeout)
        return self.connected.is_set()

    def subscribe(self, topic: str, timeout: float = 5.0) -> list[int]:
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                timeout: float = 5.0) -> int:
        """Publish QoS 1 and return the PUBACK reason code (0 = accepted)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        deadline = time.monotonic() + timeout
        with self.puback_event:
            while info.mid not in self.pubacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no PUBACK for {topic}")
                self.puback_event.wait(left)
            return self.pubacks[info.mid]

    def wait_for(self, predicate, timeout: float) -> Received | None:
        """The first received message matching ``predicate`` within ``timeout``, or None;
        messages that do not match are kept in ``self.seen``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                return None
            self.seen.append(msg)
            if predicate(msg):
                return msg

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def plain_tcp_connect_gets_connack(port: int, timeout: float = 3.0) -> bytes:
    """Send an MQTT CONNECT in clear text to ``port``; return whatever comes back
    (b"" when the broker just closes the connection)."""
    packet = _CONNECT
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(packet)
        try:
            return sock.recv(64)
        except (TimeoutError, ConnectionResetError):
            return b""


# CONNECT, MQTT 3.1.1, clean session, keepalive 30, client id "probe"
_CONNECT = bytes([0x10, 17, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 5]) + b"probe"


def tls_probe(port: int, *, ca: Path, cert: Path | None = None, key: Path | None = None,
              timeout: float = 3.0) -> tuple[bytes, str]:
    """TLS handshake + MQTT CONNECT on a bare socket: (reply bytes, error text).

    paho reports a TLS 1.3 refusal (the alert comes after the client's handshake ends)
    only as "Unspecified error"; this shows the alert the broker sent, e.g.
    "sslv3 alert certificate revoked"."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                # read first: a refusing broker's alert follows the handshake (TLS 1.3),
                # and writing into a closing connection could hide it behind a reset
                sock.settimeout(1.5)  # generous: a loaded broker may be slow to refuse
                try:
                    early = sock.recv(64)
                    return early, "" if early else "connection closed"
                except TimeoutError:
                    sock.settimeout(timeout)
                sock.sendall(_CONNECT)
                return sock.recv(64), ""
    except (ssl.SSLError, OSError) as exc:
        return b"", f"{type(exc).__name__}: {exc}"
