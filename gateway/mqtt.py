"""The one MQTT client factory every fedgate component uses (paho-mqtt 2).

What it guarantees, so components don't each re-learn it:
- ``CallbackAPIVersion.VERSION2`` and MQTT 5;
- the last will is set before connecting; ``clean_start=False`` with a session expiry,
  so QoS 1 messages queue at the broker while the client is away;
- reconnection with exponential back-off (``reconnect_delay_set``);
- subscriptions are (re)made in ``on_connect`` after checking its reason code;
- TLS: CA, optional client certificate/key, TLS 1.2 or newer, hostname checking on;
- callbacks only enqueue: every received message lands in :attr:`MqttLink.inbox`
  (a ``queue.Queue`` of :class:`Inbound`); decoding, database writes and training
  happen on the owner's threads, never on paho's network thread;
- with ``manual_ack=True`` paho does not acknowledge QoS 1 messages by itself: the
  owner calls :meth:`MqttLink.ack` after it has stored the message (at-least-once).

Example::

    link = MqttLink(MqttSettings(client_id="agg"), subscriptions=[("fedgate/v1/gw/+/update", 1)],
                    manual_ack=True)
    link.start(); link.wait_connected(10)
    msg = link.inbox.get()
    store(msg.payload); link.ack(msg)
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TlsSettings:
    """ca_file: CA bundle that signed the broker's certificate (required).
    cert_file/key_file: this client's certificate and key (mutual TLS), optional.
    check_hostname: verify the broker's name against its certificate (keep it on)."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if not self.ca_file:
            raise ValueError("TLS needs ca_file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file, or neither")

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


@dataclass(frozen=True, kw_only=True)
class MqttSettings:
    """Connection settings (defaults suit the dev broker on loopback).

    host, port: broker address (1883 plain, 8883 TLS by convention).
    client_id: stable id; the broker keeps this client's session under it.
    username, password: broker credentials, optional.
    tls: :class:`TlsSettings` or None for plain TCP (dev only).
    keepalive_s: MQTT keep-alive; the last will fires ~1.5x this after a silent death.
    session_expiry_s: how long the broker keeps the session (and queued QoS 1
      messages) after a disconnect.
    reconnect_min_s, reconnect_max_s: exponential reconnect back-off bounds.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str
    username: str | None = None
    password: str | None = None
    tls: TlsSettings | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.client_id or len(self.client_id) > 128:
            raise ValueError("client_id must be 1-128 characters")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if self.keepalive_s < 1 or self.session_expiry_s < 0:
            raise ValueError("keepalive_s must be >= 1 and session_expiry_s >= 0")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Inbound:
    """A received message as the network thread enqueued it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    duplicate: bool = False
    # MQTT 5 request/response properties (None when the sender set none)
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass
class LinkCounters:
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    received: int = 0
    published: int = 0


class MqttLink:
    """A paho client configured the fedgate way; see the module docstring."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        will: Will | None = None,
        manual_ack: bool = False,
        inbox: queue.Queue | None = None,
        on_connection_change: Callable[[bool], None] | None = None,
    ):
        self.settings = settings
        self.subscriptions = list(subscriptions)
        self.manual_ack = manual_ack
        self.inbox: queue.Queue[Inbound] = inbox if inbox is not None else queue.Queue()
        self.counters = LinkCounters()
        self._on_connection_change = on_connection_change
        self._connected = threading.Event()
        self._started = False
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        if settings.username is not None:
            c.username_pw_set(settings.username, settings.password)
        if settings.tls is not None:
            c.tls_set_context(settings.tls.context())
            c.tls_insecure_set(not settings.tls.check_hostname)
        if will is not None:  # must precede connect
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.reconnect_delay_set(min_delay=max(1, int(settings.reconnect_min_s)),
                              max_delay=max(1, int(settings.reconnect_max_s)))
        c.max_queued_messages_set(0)  # unbounded client-side queue while offline
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c

    # -- paho callbacks: run on the network thread; only record and enqueue ----------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.counters.connect_failures += 1
            log.warning("MQTT connect to %s:%s refused: %s", self.settings.host, self.settings.port, reason_code)
            return
        self.counters.connects += 1
        log.info("MQTT connected to %s:%s (session present: %s)", self.settings.host,
                 self.settings.port, getattr(flags, "session_present", None))
        if self.subscriptions:
            client.subscribe([(t, q) for t, q in self.subscriptions])
        self._connected.set()
        if self._on_connection_change:
            self._on_connection_change(True)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.error("MQTT subscription refused: %s", rc)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        self.counters.disconnects += 1
        if reason_code.is_failure:
            log.warning("MQTT disconnected: %s (reconnecting with back-off)", reason_code)
        if self._on_connection_change:
            self._on_connection_change(False)

    def _on_message(self, client, userdata, message) -> None:
        self.counters.received += 1
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        self.inbox.put(Inbound(message.topic, bytes(message.payload), message.qos,
                               bool(message.retain), message.mid, bool(message.dup),
                               response_topic, None if correlation is None else bytes(correlation)))

    # -- owner API ------------------------------------------------------------------
    def start(self) -> "MqttLink":
        """Connect in the background (retrying with back-off) and start paho's loop."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        self.client.connect_async(self.settings.host, self.settings.port,
                                  keepalive=self.settings.keepalive_s,
                                  clean_start=False, properties=props)
        self.client.loop_start()
        self._started = True
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None,
                expiry_s: int | None = None) -> paho.MQTTMessageInfo:
        """Queue a publish; ``info.is_published()`` / ``info.wait_for_publish()`` tell
        when the broker acknowledged it (QoS 1).  ``response_topic`` /
        ``correlation_data``: MQTT 5 request/response properties; ``expiry_s``: the broker
        drops the message if it is not delivered within that many seconds."""
        props = None
        if response_topic is not None or correlation_data is not None or expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if expiry_s is not None:
                props.MessageExpiryInterval = max(1, int(expiry_s))
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish to %s not queued: %s", topic, info.rc)
        self.counters.published += 1
        return info

    def ack(self, message: Inbound) -> None:
        """Acknowledge a QoS>0 message received with ``manual_ack`` (after storing it)."""
        if self.manual_ack and message.qos > 0:
            self.client.ack(message.mid, message.qos)

    def stop(self, *, publish_will: bool = False) -> None:
        """Disconnect and stop the loop.  ``publish_will`` asks the broker to send the
        last will anyway (MQTT 5 reason code 0x04) so others see us go."""
        if not self._started:
            return
        try:
            if publish_will:
                from paho.mqtt.reasoncodes import ReasonCode
                self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
            else:
                self.client.disconnect()
        finally:
            self.client.loop_stop()
            self._started = False
            self._connected.clear()


def make_link(settings: MqttSettings, **kwargs) -> MqttLink:
    """Factory spelled the way the rest of the code base calls it."""
    return MqttLink(settings, **kwargs)
