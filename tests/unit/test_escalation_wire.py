"""Escalation's pure parts: the wire format (round trips, hostile bytes), the band
selection, the token bucket, label precedence, and the teacher's answering rules."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from cloud_aggregator.teacher import TeacherService, TeacherSettings
from gateway.escalation import TokenBucket, uncertain
from gateway.flows.record import ConnRecord
from gateway.fl.localdata import merge_labels
from gateway.mqtt import Inbound
from gateway.protocol import escalation as wire

REC = ConnRecord(ts=1.5, uid="C1", orig_h="192.168.1.2", orig_p=4000, resp_h="1.2.3.4", resp_p=23, proto="tcp",
                 service=None, duration=0.25, orig_bytes=0, resp_bytes=0, conn_state="S0", local_orig=True,
                 local_resp=False, missed_bytes=0, history="S", orig_pkts=1, orig_ip_bytes=40, resp_pkts=0,
                 resp_ip_bytes=0, tunnel_parents=(), ip_proto=6, label="Malicious", detailed_label="DDoS")


def flow(uid="C1", score=0.5):
    return wire.EscalatedFlow(source="src", uid=uid, score=score, label="DDoS", record=REC._replace(uid=uid))


def test_request_round_trip_carries_no_labels():
    data = wire.encode_request("gw1", "student-1", [flow("C1"), flow("C2", 0.3)])
    assert b"Malicious" not in data and b"detailed" not in data
    req = wire.decode_request(data)
    assert req.gateway == "gw1" and req.model_version == "student-1" and len(req.flows) == 2
    assert req.flows[0].record == REC._replace(label=None, detailed_label=None)
    assert req.flows[1].uid == req.flows[1].record.uid == "C2" and req.flows[1].score == 0.3


def test_response_round_trip_and_errors():
    v = wire.Verdict("src", "C1", "DDoS", 0.97)
    assert wire.decode_response(wire.encode_response("t-1", [v])) == wire.Response("t-1", (v,))
    assert wire.decode_response(wire.encode_error("rate_limited")).error == "rate_limited"
    with pytest.raises(ValueError):
        wire.encode_error("nope")


@pytest.mark.parametrize("data,reason", [
    (b"", "schema"), (b"{}", "schema"), (b"[]", "schema"), (b'{"v": 2}', "schema"),
    (b'{"v": 1, "flows": []}', "schema"), (b'{"v": 1, "gateway": "g", "flows": [1]}', "schema"),
    (b"\xff\xfe", "schema"), (b" " * (wire.MAX_BYTES + 1), "too_large"),
])
def test_bad_requests_are_named(data, reason):
    with pytest.raises(wire.EscalationError) as exc:
        wire.decode_request(data)
    assert exc.value.reason == reason


def test_hostile_fields_are_refused():
    good = json.loads(wire.encode_request("gw1", "v", [flow()]))
    for path, value in [(("score",), 1.5), (("score",), "NaN"), (("uid",), ""), (("uid",), "x" * 300),
                        (("record", "orig_p"), 1.5), (("record", "orig_p"), True), (("record", "ts"), None),
                        (("record", "label"), "Benign"), (("record", "tunnel_parents"), ["a"] * 100),
                        (("novelty",), float("inf"))]:
        body = json.loads(json.dumps(good))
        target = body["flows"][0]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        data = json.dumps(body).encode()  # Python writes inf as Infinity: refused too
        with pytest.raises(wire.EscalationError):
            wire.decode_request(data)
    too_many = [flow(f"C{i}") for i in range(wire.MAX_FLOWS + 1)]
    with pytest.raises(wire.EscalationError, match="too_large"):
        wire.encode_request("gw1", "v", too_many)
    body = json.loads(wire.encode_request("gw1", "v", [flow()]))
    body["flows"] *= wire.MAX_FLOWS + 1
    with pytest.raises(wire.EscalationError, match="too_large"):
        wire.decode_request(json.dumps(body).encode()[: wire.MAX_BYTES])
    with pytest.raises(wire.EscalationError):  # trailing junk
        wire.decode_request(wire.encode_request("gw1", "v", [flow()]) + b"junk")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_decode_or_raise_escalation_error(data):
    for decode in (wire.decode_request, wire.decode_response):
        try:
            decode(data)
        except wire.EscalationError:
            pass


def test_topics_and_the_one_allowed_response_topic():
    assert wire.verdict_topic_for("fedgate/v1/gw/gw1/escalate") == "fedgate/v1/gw/gw1/verdict"
    with pytest.raises(wire.EscalationError):
        wire.verdict_topic_for("fedgate/v1/gw/gw1/update")


def test_band_and_novelty_selection():
    scores = [0.1, 0.2, 0.5, 0.8, 0.9]
    assert uncertain(scores, low=0.2, high=0.8) == [1, 2, 3]
    assert uncertain(scores, low=0.2, high=0.8, novelty=[9.0, None, 0.0, 0.0, 0.1], novelty_min=5.0) == [0, 1, 2, 3]
    assert uncertain(scores, low=0.3, high=0.3) == []


def test_token_bucket():
    now = [0.0]
    b = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert b.take(8) == 5 and b.take(1) == 0
    now[0] = 0.25
    assert b.take(10) == 2
    now[0] = 100.0
    assert b.take(100) == 5  # never more than the burst saved up
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


def test_label_precedence_feedback_then_log_then_teacher():
    unlabelled = REC._replace(uid="U", label=None, detailed_label=None)
    labelled = REC._replace(uid="L")
    reviewed = REC._replace(uid="R", label=None, detailed_label=None)
    records, classes = merge_labels([unlabelled, labelled, reviewed], [(reviewed, "benign")],
                                    [(unlabelled, "Okiru"), (labelled, "Benign"), (reviewed, "DDoS")])
    assert dict(zip((r.uid for r in records), classes)) == {"U": "Okiru", "L": "DDoS", "R": "Benign"}
    assert merge_labels([unlabelled], []) == ([], [])


class _Rules:
    model_version = "rules-t"

    def classify(self, records):
        return [("DDoS", 0.9) if r.conn_state == "S0" else ("Benign", 0.1) for r in records]


def _msg(topic, payload, *, response=None, corr=b"k" * 16):
    return Inbound(topic, payload, 1, False, 1, False, response, corr)


def test_teacher_answers_only_on_the_senders_verdict_topic():
    t = TeacherService(TeacherSettings(model_dir="unused", rate=100, burst=3), engine=_Rules())
    req = wire.encode_request("gw1", "v", [flow("A"), flow("B")])
    topic, payload, corr = t.answer(_msg("fedgate/v1/gw/gw1/escalate", req, response="fedgate/v1/gw/gw1/verdict"))
    assert topic == "fedgate/v1/gw/gw1/verdict" and corr == b"k" * 16
    assert [(v.uid, v.label) for v in wire.decode_response(payload).verdicts] == [("A", "DDoS"), ("B", "DDoS")]
    # another gateway's response topic, or body, is refused on the sender's own topic
    topic, payload, _ = t.answer(_msg("fedgate/v1/gw/gw1/escalate", req, response="fedgate/v1/gw/gw2/verdict"))
    assert topic == "fedgate/v1/gw/gw1/verdict" and wire.decode_response(payload).error == "wrong_topic"
    topic, payload, _ = t.answer(_msg("fedgate/v1/gw/gw2/escalate", req, response="fedgate/v1/gw/gw2/verdict"))
    assert topic == "fedgate/v1/gw/gw2/verdict" and wire.decode_response(payload).error == "wrong_topic"
    # per-gateway bucket: 3 tokens, 2 used
    _, payload, _ = t.answer(_msg("fedgate/v1/gw/gw1/escalate", req, response="fedgate/v1/gw/gw1/verdict"))
    assert wire.decode_response(payload).error == "rate_limited"
    # unanswerable: no correlation data, not an escalation topic
    assert t.answer(_msg("fedgate/v1/gw/gw1/escalate", req, response="fedgate/v1/gw/gw1/verdict", corr=None)) is None
    assert t.answer(_msg("fedgate/v1/gw/gw1/update", req, response="fedgate/v1/gw/gw1/verdict")) is None
    assert t.counters.flows == 2 and t.counters.dropped == 2
    assert t.counters.refused == {"wrong_topic": 2, "rate_limited": 1}
