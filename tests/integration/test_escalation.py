"""Escalation to the cloud teacher end to end, over a real mosquitto, on the CPU.

A gateway (the real service: tail -> student -> store) escalates the flows its
classifier is unsure of; the real teacher service (ONNX Runtime, the committed model
directory) answers over MQTT 5 request/response; the answers are stored as second
detections.  Then: timeouts when no teacher runs, a teacher that was down never answers
stale requests, both rate limits, a request naming another gateway's response topic,
and teacher verdicts as training labels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from aggregator_helpers import dev_config_text
from benchmarks.live_latency import write_at_rate
from brokers import Mosquitto, find_mosquitto
from cloud_aggregator.teacher import TeacherService, TeacherSettings
from gateway.config import EscalationSection
from gateway.escalation import Escalator
from gateway.flows.zeek import iter_records
from gateway.fl.localdata import feedback_class, load_labelled
from gateway.inference import load_classifier
from gateway.mqtt import MqttLink, MqttSettings
from gateway.protocol import escalation as wire
from gateway.service import GatewayService
from gateway.store import repository
from gateway.store.db import open_store
from gateway.store.models import Detection, Flow
from gateway_helpers import DEFAULT_MODEL, gateway_config, store_counts, wait_until

HONEYPOT_LOG = Path(__file__).resolve().parents[2] / "data" / "iot23" / "CTU-Honeypot-Capture-4-1" / "conn.log.labeled"
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")]


class UnsureClassifier:
    """Half the TCP flows are scored 0.5 (in the escalation band), the rest are sure."""

    model_version = "unsure-1"
    threshold = 0.5

    def classify(self, records):
        return [("Malicious", 0.5) if r.proto == "tcp" and r.orig_p % 2 else ("Benign", 0.01) for r in records]


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(config_text=dev_config_text(), workdir=tmp_path / "broker").start()
    yield b
    b.cleanup()


@pytest.fixture(scope="module")
def teacher_engine():
    engine = load_classifier(DEFAULT_MODEL, provider="cpu")
    yield engine
    engine.close()


def _mqtt(port: int, client_id: str) -> MqttSettings:
    return MqttSettings(port=port, client_id=client_id, keepalive_s=5, reconnect_min_s=1, reconnect_max_s=2)


def _teacher(broker, engine, **kw) -> TeacherService:
    t = TeacherService(TeacherSettings(model_dir=str(DEFAULT_MODEL), mqtt=_mqtt(broker.port, "teacher"), **kw),
                       engine=engine).start()
    assert t.wait_connected(10)
    return t


def _escalating_gateway(tmp_path, broker, **escalation):
    (tmp_path / "conn.log").touch()
    settings = {"enabled": True, "band_low": 0.4, "band_high": 0.6, "timeout_s": 3.0, "max_wait_s": 0.1,
                "max_rate": 10_000.0, "burst": 10_000, **escalation}
    cfg = gateway_config(tmp_path, broker_port=broker.port, escalation=settings, fl={"enabled": False})
    service = GatewayService(cfg, classifier=UnsureClassifier()).start()
    assert wait_until(lambda: service.link.connected and service.escalator.link.connected, 10)
    return cfg, service


def _teacher_detections(url: str) -> dict[str, tuple[str, float, str]]:
    engine, sessions = open_store(url)
    try:
        with sessions() as s:
            rows = s.execute(select(Detection.uid, Detection.label, Detection.score, Detection.model_version)
                             .where(Detection.model_version.startswith(repository.TEACHER_VERSION_PREFIX)))
            return {u: (lab, sc, v) for u, lab, sc, v in rows}
    finally:
        engine.dispose()


def test_round_trip_stores_the_teachers_verdict_as_a_second_detection(tmp_path, broker, teacher_engine):
    teacher = _teacher(broker, teacher_engine)
    cfg, service = _escalating_gateway(tmp_path, broker)
    try:
        write_at_rate(tmp_path / "conn.log", rate=3000, count=400)
        records = list(iter_records(tmp_path / "conn.log"))
        unsure = [r for r in records if r.proto == "tcp" and r.orig_p % 2]
        assert 0 < len(unsure) < len(records)
        assert wait_until(lambda: len(_teacher_detections(cfg.database_url)) == len(unsure), 30), \
            service.escalator.status()
        got = _teacher_detections(cfg.database_url)
        want = dict(zip((r.uid for r in unsure), teacher_engine.classify(unsure)))
        assert set(got) == set(want)
        for uid, (label, score, version) in got.items():
            assert version == f"teacher/{teacher_engine.model_version}"
            assert label == want[uid][0] and score == pytest.approx(want[uid][1], abs=1e-5)
        # the student's own detection stays: two detections per escalated flow
        assert store_counts(cfg.database_url)[2] == len(records) + len(unsure)
        st = service.status()["escalation"]
        assert st["offered"] == st["sent"] == st["answered"] == len(unsure)
        assert st["timed_out"] == st["rate_limited"] == st["unmatched"] == 0 and st["in_flight"] == 0
        assert teacher.counters.flows == len(unsure) and not teacher.counters.refused
    finally:
        service.stop()
        teacher.stop()


def test_no_teacher_means_timeouts_and_a_late_teacher_never_answers_stale_requests(tmp_path, broker,
                                                                                    teacher_engine):
    # the teacher's persistent session exists, then it goes down
    _teacher(broker, teacher_engine).stop()
    cfg, service = _escalating_gateway(tmp_path, broker, timeout_s=1.0)
    try:
        write_at_rate(tmp_path / "conn.log", rate=3000, count=200)
        esc, c = service.escalator, service.escalator.counters
        assert wait_until(lambda: store_counts(cfg.database_url)[2] == 200, 10)
        assert wait_until(lambda: c.sent == c.offered > 0 and esc.pending_flows == 0, 20), esc.status()
        assert c.timed_out == c.sent and c.answered == 0
        time.sleep(1.5)  # past the message expiry of every request
        teacher = _teacher(broker, teacher_engine)  # resumes its session: expired requests are gone
        try:
            time.sleep(1.0)
            assert teacher.counters.requests == 0 and esc.counters.unmatched == 0
            assert _teacher_detections(cfg.database_url) == {}
            # and new flows are answered again
            before = esc.counters.answered
            write_at_rate(tmp_path / "conn.log", rate=3000, count=100, uid_offset=200)
            assert wait_until(lambda: esc.counters.answered > before, 20), esc.status()
        finally:
            teacher.stop()
        assert service.state == "running"
    finally:
        service.stop()


def test_gateway_rate_limit_bounds_what_is_sent(tmp_path, broker, teacher_engine):
    teacher = _teacher(broker, teacher_engine)
    cfg, service = _escalating_gateway(tmp_path, broker, max_rate=5.0, burst=10)
    try:
        started = time.monotonic()
        write_at_rate(tmp_path / "conn.log", rate=5000, count=400)
        esc = service.escalator
        assert wait_until(lambda: store_counts(cfg.database_url)[0] == 400, 20)
        c = esc.counters
        assert wait_until(lambda: c.sent == c.offered - c.rate_limited and esc.pending_flows == 0
                          and c.answered == c.sent, 20), esc.status()
        assert esc.counters.offered > 40, esc.status()
        elapsed = time.monotonic() - started
        assert esc.counters.sent <= 10 + 5.0 * elapsed + 1
        assert esc.counters.rate_limited == esc.counters.offered - esc.counters.sent > 0
        assert len(_teacher_detections(cfg.database_url)) == esc.counters.answered
    finally:
        service.stop()
        teacher.stop()


def test_teacher_rate_limit_is_answered_rate_limited(tmp_path, broker, teacher_engine):
    teacher = _teacher(broker, teacher_engine, rate=1.0, burst=8)
    cfg, service = _escalating_gateway(tmp_path, broker, batch=8)
    try:
        write_at_rate(tmp_path / "conn.log", rate=3000, count=200)
        esc, c = service.escalator, service.escalator.counters
        assert wait_until(lambda: store_counts(cfg.database_url)[0] == 200, 10)
        assert wait_until(lambda: c.sent == c.offered > 16 and esc.pending_flows == 0, 20), esc.status()
        assert esc.counters.refused["rate_limited"] > 0
        assert esc.counters.answered + esc.counters.refused["rate_limited"] == esc.counters.sent
        assert teacher.counters.refused["rate_limited"] > 0 and teacher.counters.flows <= 8 + 8
    finally:
        service.stop()
        teacher.stop()


def test_a_request_naming_another_gateways_topic_is_answered_on_its_own(broker, teacher_engine):
    teacher = _teacher(broker, teacher_engine)
    mine = MqttLink(_mqtt(broker.port, "gw-evil"), subscriptions=[("fedgate/v1/gw/evil/verdict", 1)])
    theirs = MqttLink(_mqtt(broker.port, "gw-victim"), subscriptions=[("fedgate/v1/gw/victim/verdict", 1)])
    try:
        mine.start(), theirs.start()
        assert mine.wait_connected(10) and theirs.wait_connected(10)
        time.sleep(0.3)  # subscriptions made
        rec = next(iter_records(HONEYPOT_LOG))
        body = wire.encode_request("evil", "x", [wire.EscalatedFlow("s", rec.uid, 0.5, "Benign", rec)])
        mine.publish("fedgate/v1/gw/evil/escalate", body, response_topic="fedgate/v1/gw/victim/verdict",
                     correlation_data=b"c" * 16, expiry_s=5)
        got = mine.inbox.get(timeout=10)
        assert got.correlation_data == b"c" * 16 and wire.decode_response(got.payload).error == "wrong_topic"
        # a body claiming another gateway is refused the same way
        body = wire.encode_request("victim", "x", [wire.EscalatedFlow("s", rec.uid, 0.5, "Benign", rec)])
        mine.publish("fedgate/v1/gw/evil/escalate", body, response_topic="fedgate/v1/gw/evil/verdict",
                     correlation_data=b"d" * 16, expiry_s=5)
        assert wire.decode_response(mine.inbox.get(timeout=10).payload).error == "wrong_topic"
        # garbage is answered "schema"; no correlation data is dropped
        mine.publish("fedgate/v1/gw/evil/escalate", b"\xff" * 100, response_topic="fedgate/v1/gw/evil/verdict",
                     correlation_data=b"e" * 16, expiry_s=5)
        assert wire.decode_response(mine.inbox.get(timeout=10).payload).error == "schema"
        mine.publish("fedgate/v1/gw/evil/escalate", body, response_topic="fedgate/v1/gw/evil/verdict")
        assert wait_until(lambda: teacher.counters.dropped == 1, 5)
        assert theirs.inbox.empty() and teacher.counters.flows == 0
    finally:
        mine.stop()
        theirs.stop()
        teacher.stop()


def test_teacher_verdicts_become_training_labels_when_asked(tmp_path, broker, teacher_engine):
    teacher = _teacher(broker, teacher_engine)
    cfg, service = _escalating_gateway(tmp_path, broker, use_as_label=True)
    try:
        write_at_rate(tmp_path / "conn.log", rate=3000, count=200)
        assert wait_until(lambda: service.escalator.counters.answered > 0
                          and service.escalator.pending_flows == 0, 20)
        answered = _teacher_detections(cfg.database_url)
    finally:
        service.stop()
        teacher.stop()
    engine, sessions = open_store(cfg.database_url)
    try:
        with sessions() as s:
            # the replayed IoT-23 lines carry the log's labels, and those win
            assert load_labelled(s, teacher_labels=True) == load_labelled(s)
        with sessions.begin() as s:  # a live gateway's flows have no labels
            s.execute(update(Flow).values(label=None, detailed_label=None))
        with sessions() as s:
            assert load_labelled(s) == ([], [])
            records, classes = load_labelled(s, teacher_labels=True)
            key = repository.labelled_data_key(s, teacher=True)
    finally:
        engine.dispose()
    assert sorted(r.uid for r in records) == sorted(answered)
    assert all(c == feedback_class(answered[r.uid][0]) for r, c in zip(records, classes))
    assert key[-1] == len(answered)


def test_escalator_refuses_to_queue_past_its_bound(tmp_path, broker):
    """Nothing drains the queue (the worker is not started): offers past max_pending are
    counted as dropped, memory stays bounded."""
    engine, sessions = open_store(f"sqlite:///{tmp_path / 'gw.db'}")
    try:
        esc = Escalator(EscalationSection(enabled=True, max_pending=50, band_low=0.0, band_high=1.0,
                                          max_rate=1e6, burst=1_000_000),
                        mqtt=_mqtt(broker.port, "gw-bound"), gateway_id="gwb", sessions=sessions)
        rec = next(iter_records(HONEYPOT_LOG))
        queued = esc.offer("s", [rec] * 200, [("Benign", 0.5)] * 200, "v")
        assert queued == 50 and esc.counters.dropped == 150 and esc.status()["queued"] == 50
        json.dumps(esc.status())  # the status page can serialise it
    finally:
        engine.dispose()
