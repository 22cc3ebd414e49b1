"""Helpers for the aggregator integration tests: the real dev broker config, a tiny
model, and a gateway-side publisher built on gateway.mqtt (no mocked broker)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from gateway.mqtt import MqttLink, MqttSettings, Will
from gateway.protocol import topics
from gateway.protocol.envelope import encode_update

REPO = Path(__file__).resolve().parents[2]
DEV_CONF = REPO / "broker_config" / "dev.conf"


def dev_config_text() -> str:
    """broker_config/dev.conf with its port and data directory made placeholders for
    tests/brokers.py; as root, mosquitto would drop to user 'mosquitto', which cannot
    write into pytest's private temporary directory, so tests keep root there."""
    text = DEV_CONF.read_text()
    text, n1 = re.subn(r"(?m)^listener 1883 127\.0\.0\.1$", "listener {port} 127.0.0.1", text)
    text, n2 = re.subn(r"(?m)^persistence_location .*$", "persistence_location {dir}/", text)
    assert n1 == 1 and n2 == 1, "dev.conf no longer has the listener/persistence lines tests rewrite"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        text += "\nuser root\n"
    return text


def tiny_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.weight": rng.normal(size=(16, 8)).astype(np.float32),
        "encoder.bias": np.zeros(8, np.float32),
        "head.weight": rng.normal(size=(8, 2)).astype(np.float32),
        "position_ids": np.arange(4, dtype=np.int64),  # non-float buffer: never in deltas
    }


def tiny_delta(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, np.float32) for k, v in tiny_model().items() if v.dtype == np.float32}


def craft_update(tensors: dict[str, np.ndarray], *, sender: str, base_version: int = 0) -> bytes:
    """An update envelope carrying ``tensors`` exactly as given (no float32 cast), as a
    misbehaving gateway could send it: valid framing and digest, wrong content."""
    import hashlib
    import struct

    import safetensors.numpy as st_numpy
    import zstandard

    good = encode_update({"x": np.zeros(1, np.float32)}, sender=sender, base_version=base_version,
                         num_samples=1).data
    hlen = struct.unpack_from(">I", good, 4)[0]
    header = json.loads(good[8:8 + hlen])
    raw = st_numpy.save(tensors)
    body = zstandard.ZstdCompressor().compress(raw)
    header.update(digest=hashlib.sha256(body).hexdigest(), payload_bytes=len(raw))
    hb = json.dumps(header).encode()
    return good[:4] + struct.pack(">I", len(hb)) + hb + body


class FakeGatewayClient:
    """A real MQTT client speaking the gateway side of the protocol (status + updates)."""

    def __init__(self, gateway_id: str, port: int, prefix: str = topics.DEFAULT_PREFIX, keepalive_s: int = 30):
        self.gateway_id = gateway_id
        self.prefix = prefix
        self.status_topic = topics.gateway_status(gateway_id, prefix)
        self.link = MqttLink(
            MqttSettings(client_id=f"test-{gateway_id}", port=port, keepalive_s=keepalive_s),
            will=Will(self.status_topic, json.dumps({"state": "offline"}).encode()),
        )

    def start(self) -> "FakeGatewayClient":
        self.link.start()
        assert self.link.wait_connected(10)
        self.status("online")
        return self

    def status(self, state: str) -> None:
        self.link.publish(self.status_topic, json.dumps({"state": state, "ts": time.time()}).encode(),
                          qos=1, retain=True).wait_for_publish(5)

    def send(self, data: bytes) -> None:
        info = self.link.publish(topics.gateway_update(self.gateway_id, self.prefix), data, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def update(self, value: float, *, base: int, samples: int = 10, rnd: int = 0, **kw) -> str:
        enc = encode_update(tiny_delta(value), sender=self.gateway_id, base_version=base, num_samples=samples,
                            round=rnd, **kw)
        self.send(enc.data)
        return enc.message_id

    def stop(self) -> None:
        self.link.stop()
