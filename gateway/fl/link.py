"""A gateway's MQTT link for federated learning (edge module).

Built on :class:`gateway.mqtt.MqttLink` (the one client factory): MQTT 5, paho
VERSION2 callbacks, will set before connect, reconnect back-off, subscriptions made in
``on_connect``. This wrapper adds what a gateway needs:

* the last will: ``{"state": "offline"}`` retained on the gateway's status topic;
* subscriptions to the retained global model (and its chunk topics) and control topics;
* broker acknowledgements (``on_publish`` with the message id and PUBACK reason code)
  and connection changes enqueued as :class:`Acked` / :class:`LinkUp` / :class:`LinkDown`
  on the same queue as received messages, so the FL worker handles them in order.

Callbacks only enqueue; the worker does everything else.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from dataclasses import dataclass

from paho.mqtt.enums import MQTTErrorCode

from gateway.mqtt import MqttLink, MqttSettings, Will
from gateway.protocol import topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkUp:
    at: float


@dataclass(frozen=True)
class LinkDown:
    at: float


@dataclass(frozen=True)
class Acked:
    mid: int
    reason_code: int
    reason: str


def status_payload(state: str, **fields) -> bytes:
    return json.dumps({"state": state, "ts": time.time(), **fields}, separators=(",", ":"), default=str).encode()


class GatewayLink:
    def __init__(self, settings: MqttSettings, *, gateway_id: str, prefix: str = topics.DEFAULT_PREFIX,
                 events: queue.Queue | None = None):
        self.gateway_id = topics.check_gateway_id(gateway_id)
        self.prefix = topics.check_prefix(prefix)
        self.events: queue.Queue = events if events is not None else queue.Queue()
        self.status_topic = topics.gateway_status(gateway_id, prefix)
        self.update_topic = topics.gateway_update(gateway_id, prefix)
        self.model_topic = topics.global_model(prefix)
        self.control_topic = topics.global_control(prefix)
        self.mqtt = MqttLink(
            settings,
            subscriptions=[(topics.global_model_all(prefix), 1), (self.control_topic, 1)],
            will=Will(self.status_topic, status_payload("offline", gateway=gateway_id), qos=1, retain=True),
            inbox=self.events,
            on_connection_change=self._connection_changed,
        )
        self.mqtt.client.on_publish = self._on_publish

    # paho network thread: enqueue only
    def _connection_changed(self, up: bool) -> None:
        self.events.put(LinkUp(time.time()) if up else LinkDown(time.time()))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        value = getattr(reason_code, "value", 0)
        self.events.put(Acked(mid, int(value or 0), str(reason_code) if value else ""))

    # owner API
    def start(self) -> "GatewayLink":
        self.mqtt.start()
        return self

    @property
    def connected(self) -> bool:
        return self.mqtt.connected

    def is_model_topic(self, topic: str) -> bool:
        return topic == self.model_topic or topic.startswith(self.model_topic + "/")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Hand a message to paho; its mid, or None when not connected (nothing queued)."""
        if not self.mqtt.connected:
            return None
        info = self.mqtt.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    def publish_status(self, state: str, **fields) -> None:
        """Retained status (best effort: a newer status supersedes a lost one)."""
        if self.mqtt.connected:
            self.mqtt.publish(self.status_topic, status_payload(state, gateway=self.gateway_id, **fields),
                              qos=1, retain=True)

    def stop(self) -> None:
        """Say offline (retained) and disconnect."""
        try:
            if self.mqtt.connected:
                info = self.mqtt.publish(self.status_topic, status_payload("offline", gateway=self.gateway_id),
                                         qos=1, retain=True)
                info.wait_for_publish(timeout=2)
        except (RuntimeError, ValueError) as exc:
            log.debug("offline status not sent: %s", exc)
        self.mqtt.stop()
