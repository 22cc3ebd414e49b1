"""Helpers for the gateway service, drill and web tests: configs, a small rule classifier,
an MQTT listener on the real broker, store counts, waiting."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select

from gateway.config import config_from_dict
from gateway.model.modeldir import bundled_model_dir
from gateway.mqtt import MqttLink, MqttSettings
from gateway.store.db import open_store
from gateway.store.models import Detection, Flow

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = bundled_model_dir()


class RuleClassifier:
    """A small real classifier: half-open or refused TCP connections look like scanning
    (what IoT-23 labels PartOfAHorizontalPortScan); everything else is benign."""

    model_version = "rules-1"
    threshold = 0.5

    def classify(self, records):
        out = []
        for r in records:
            scan = r.proto == "tcp" and r.conn_state in ("S0", "REJ", "RSTOS0", "RSTR", "SH")
            out.append(("PartOfAHorizontalPortScan", 0.9) if scan else ("Benign", 0.1))
        return out


def gateway_doc(workdir: Path, *, broker_port: int | None = None, model: str | None = None,
                http: str = "", poll: float = 0.02, **sections) -> dict:
    doc = {
        "gateway": {"id": "gw1", "database": f"sqlite:///{workdir / 'gw.db'}"},
        "source": {"zeek_log": str(workdir / "conn.log"), "poll_interval_s": poll},
        "mqtt": {"enabled": broker_port is not None, "port": broker_port or 1883, "keepalive_s": 5,
                 "reconnect_min_s": 1.0, "reconnect_max_s": 2.0},
        "fl": {"status_interval_s": 1.0, "allow_unsigned": True},  # a lab: tests that verify give a key
        "http": {"listen": http},
    }
    doc["gateway"]["model"] = model or "none"  # the rule classifier (or nothing), not the bundled model
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return doc


def gateway_config(workdir: Path, **kwargs):
    return config_from_dict(gateway_doc(workdir, **kwargs))


def write_toml(path: Path, doc: dict) -> Path:
    import tomli_w

    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


def store_counts(url: str) -> tuple[int, int, int]:
    """(flow rows, distinct uids, detection rows) in the gateway store."""
    engine, sessions = open_store(url)
    try:
        with sessions() as s:
            rows = s.scalar(select(func.count()).select_from(Flow))
            uids = s.scalar(select(func.count(func.distinct(Flow.uid))))
            dets = s.scalar(select(func.count()).select_from(Detection))
        return int(rows), int(uids), int(dets)
    finally:
        engine.dispose()


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class Listener:
    """A real MQTT subscriber (persistent session, so a broker restart loses nothing)."""

    def __init__(self, port: int, topics: list[str], client_id: str = "test-listener"):
        self.link = MqttLink(MqttSettings(port=port, client_id=client_id, keepalive_s=5, reconnect_min_s=1,
                                          reconnect_max_s=2), subscriptions=[(t, 1) for t in topics])
        self.messages: list[tuple[str, bytes, bool]] = []

    def start(self) -> "Listener":
        self.link.start()
        assert self.link.wait_connected(10), "listener could not connect"
        return self

    def pump(self) -> list[tuple[str, bytes, bool]]:
        while True:
            try:
                m = self.link.inbox.get_nowait()
            except queue.Empty:
                return self.messages
            self.messages.append((m.topic, m.payload, m.retain))

    def alert_uids(self) -> set[str]:
        uids = set()
        for topic, payload, _ in self.pump():
            if topic.endswith("/alerts"):
                uids.update(d["uid"] for d in json.loads(payload)["detections"])
        return uids

    def last_status(self) -> dict | None:
        found = None
        for topic, payload, _ in self.pump():
            if topic.endswith("/status") and payload:
                found = json.loads(payload)
        return found

    def stop(self) -> None:
        self.link.stop()
