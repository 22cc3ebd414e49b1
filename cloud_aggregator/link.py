"""The aggregator's MQTT link (built on gateway.mqtt, the one client factory).

Subscribes to every gateway's update and status topics with manual acknowledgement
(the service acks an update only after storing it), and publishes the retained global
model (chunk 0 or the whole envelope on ``{p}/global/model``, chunk i on
``{p}/global/model/i``) and the retained control message.
"""

from __future__ import annotations

import logging
import queue

from gateway.mqtt import Inbound, MqttLink, MqttSettings
from gateway.protocol import chunking, topics

log = logging.getLogger(__name__)


class ConnectionChanged:
    """Enqueued by the network thread when the link goes up or down."""

    def __init__(self, up: bool):
        self.up = up


class AggregatorLink:
    def __init__(self, settings: MqttSettings, *, prefix: str = topics.DEFAULT_PREFIX,
                 inbox: queue.Queue | None = None):
        self.prefix = topics.check_prefix(prefix)
        self.inbox: queue.Queue = inbox if inbox is not None else queue.Queue()
        self.mqtt = MqttLink(
            settings,
            subscriptions=[(topics.all_updates(prefix), 1), (topics.all_statuses(prefix), 1)],
            manual_ack=True,
            inbox=self.inbox,
            on_connection_change=lambda up: self.inbox.put(ConnectionChanged(up)),
        )

    def start(self) -> "AggregatorLink":
        self.mqtt.start()
        return self

    def stop(self) -> None:
        self.mqtt.stop()

    @property
    def connected(self) -> bool:
        return self.mqtt.connected

    def ack(self, message: Inbound) -> None:
        self.mqtt.ack(message)

    def publish_global(self, envelope: bytes, *, chunk_bytes: int, previous_parts: int) -> int:
        """Publish the global model retained; returns how many topics it used.  Chunk
        topics a larger previous model used are cleared (empty retained message)."""
        frames = chunking.split_message(envelope, max_chunk_bytes=chunk_bytes) if chunk_bytes else [envelope]
        for i, frame in enumerate(frames):
            topic = topics.global_model(self.prefix) if i == 0 else topics.global_model_part(i, self.prefix)
            self.mqtt.publish(topic, frame, qos=1, retain=True)
        for i in range(len(frames), previous_parts):
            self.mqtt.publish(topics.global_model_part(i, self.prefix), b"", qos=1, retain=True)
        return len(frames)

    def publish_control(self, payload: bytes) -> None:
        self.mqtt.publish(topics.global_control(self.prefix), payload, qos=1, retain=True)
