"""Alerts are at-least-once across a kill: detections committed while their alerts were
still held in memory are alerted again on the next start (real SQLite file)."""

from __future__ import annotations

import json

import pytest

from gateway import ingest
from gateway.flows.zeek import iter_records
from gateway.service import AlertQueue
from gateway.store import repository
from gateway.store.db import open_store
from gateway_helpers import RuleClassifier

pytestmark = pytest.mark.integration

TOPIC = "fedgate/v1/gw/gw1/alerts"


def _alert_uids(sessions) -> list[str]:
    with sessions() as session:
        rows = repository.outbox_pending(session, limit=10_000)
        return [d["uid"] for r in rows if r.topic == TOPIC for d in json.loads(r.payload)["detections"]]


def _queue(sessions) -> AlertQueue:
    return AlertQueue(sessions=sessions, topic=TOPIC, gateway_id="gw1", interval_s=0.05,
                      on_error=lambda reason: pytest.fail(reason))


def test_unclean_stop_requeues_committed_detections_and_clean_stop_does_not(tmp_path, iot23_dir):
    engine, sessions = open_store(f"sqlite:///{tmp_path / 'gw.db'}")
    classifier = RuleClassifier()
    records = list(iter_records(iot23_dir / "CTU-Malware-Capture-8-1" / "conn.log.labeled"))[:400]
    verdicts = classifier.classify(records)
    expected = {r.uid for r, (_, score) in zip(records, verdicts) if score >= 0.5}
    assert expected, "the sample must hold flows the rule classifier alerts on"

    # first start: nothing to recover; the cursor is now "running"
    first = _queue(sessions)
    assert first.recover(threshold=0.5) == 0
    first.start()
    # a batch is committed, then the process dies before its alerts reach the outbox
    ingest.commit_batch(sessions, records, source="conn.log", classifier=classifier, verdicts=verdicts)
    assert _alert_uids(sessions) == []

    # restart: every committed alert-worthy detection is queued again and written
    second = _queue(sessions)
    assert second.recover(threshold=0.5) == len(expected)
    second.start()
    second.stop()  # graceful: writes what it holds, marks the cursor clean
    assert set(_alert_uids(sessions)) == expected

    # after a clean stop nothing is sent twice
    third = _queue(sessions)
    assert third.recover(threshold=0.5) == 0
    third.start()
    third.stop()
    assert sorted(_alert_uids(sessions)) == sorted(expected)
    first.stop()
    engine.dispose()
