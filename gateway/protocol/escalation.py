"""Escalation messages: a gateway asks the cloud teacher about flows it is unsure of.

MQTT 5 request/response (pure: bytes in, values out; no socket here)::

    gateway  -> {prefix}/gw/{id}/escalate   request, QoS 1, properties:
                                              ResponseTopic  = {prefix}/gw/{id}/verdict
                                              CorrelationData = 16 random bytes
                                              MessageExpiryInterval = the gateway's timeout
    teacher  -> {prefix}/gw/{id}/verdict    response, QoS 1, the same CorrelationData

The teacher answers only on the verdict topic of the gateway the request came from
(a request naming another response topic is refused), so a gateway can neither read nor
steer another gateway's verdicts; the ACL grants each gateway its own verdict topic.

Request body (JSON)::

    {"v": 1, "gateway": "gw1", "model_version": "student-...",
     "flows": [{"source": "...", "uid": "...", "score": 0.61, "label": "DDoS",
                "novelty": null, "record": {<Zeek conn fields, no labels>}}, ...]}

Response body (JSON)::

    {"v": 1, "teacher_version": "teacher-...",
     "verdicts": [{"source": "...", "uid": "...", "label": "DDoS", "score": 0.97}, ...]}
    or {"v": 1, "error": "rate_limited" | "too_large" | "schema" | ...}

Both are bounded (:data:`MAX_BYTES`, :data:`MAX_FLOWS`); anything else is an
:class:`EscalationError` with a short reason the receiver counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from gateway.flows.record import ConnRecord

VERSION = 1
MAX_FLOWS = 256
MAX_BYTES = 512 * 1024
MAX_TEXT = 256  # a uid, source, label or version longer than this is refused
CORRELATION_BYTES = 16
# The Zeek fields a request carries: everything a prompt template may read, never the
# log's own labels (a gateway's ground truth is not the teacher's business).
RECORD_FIELDS: tuple[str, ...] = tuple(f for f in ConnRecord._fields if f not in ("label", "detailed_label", "extra"))
_INT_FIELDS = {"orig_p", "resp_p", "orig_bytes", "resp_bytes", "missed_bytes", "orig_pkts", "orig_ip_bytes",
               "resp_pkts", "resp_ip_bytes", "ip_proto"}
_FLOAT_FIELDS = {"ts", "duration"}
_BOOL_FIELDS = {"local_orig", "local_resp"}
_STR_FIELDS = {"uid", "orig_h", "resp_h", "proto", "service", "conn_state", "history"}
ERRORS = ("rate_limited", "too_large", "schema", "wrong_topic", "overloaded", "internal")


class EscalationError(ValueError):
    """A request or response that does not fit the protocol; ``reason`` is short."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class EscalatedFlow:
    source: str
    uid: str
    score: float
    label: str
    record: ConnRecord
    novelty: float | None = None


@dataclass(frozen=True)
class Request:
    gateway: str
    model_version: str
    flows: tuple[EscalatedFlow, ...]


@dataclass(frozen=True)
class Verdict:
    source: str
    uid: str
    label: str
    score: float


@dataclass(frozen=True)
class Response:
    teacher_version: str | None
    verdicts: tuple[Verdict, ...]
    error: str | None = None


def verdict_topic_for(request_topic: str) -> str:
    """The one response topic a request on ``.../gw/{id}/escalate`` may name."""
    head, sep, tail = request_topic.rpartition("/")
    if not sep or tail != "escalate":
        raise EscalationError("wrong_topic", f"not an escalation topic: {request_topic!r}")
    return f"{head}/verdict"


# ------------------------------------------------------------------ encode


def encode_request(gateway: str, model_version: str, flows: list[EscalatedFlow]) -> bytes:
    if not 0 < len(flows) <= MAX_FLOWS:
        raise EscalationError("too_large", f"{len(flows)} flows (1..{MAX_FLOWS})")
    body = {"v": VERSION, "gateway": gateway, "model_version": model_version, "flows": [
        {"source": f.source, "uid": f.uid, "score": round(float(f.score), 6), "label": f.label,
         "novelty": None if f.novelty is None else round(float(f.novelty), 6),
         "record": {k: _jsonable(getattr(f.record, k)) for k in RECORD_FIELDS}}
        for f in flows]}
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_BYTES:
        raise EscalationError("too_large", f"{len(data)} bytes > {MAX_BYTES}")
    return data


def encode_response(teacher_version: str, verdicts: list[Verdict]) -> bytes:
    body = {"v": VERSION, "teacher_version": teacher_version, "verdicts": [
        {"source": v.source, "uid": v.uid, "label": v.label, "score": round(float(v.score), 6)} for v in verdicts]}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def encode_error(reason: str) -> bytes:
    if reason not in ERRORS:
        raise ValueError(f"unknown error reason {reason!r}")
    return json.dumps({"v": VERSION, "error": reason}, separators=(",", ":")).encode()


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return list(value)
    return value


# ------------------------------------------------------------------ decode


def _load(data: bytes) -> dict:
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_BYTES:
        raise EscalationError("too_large", f"{len(data)} bytes > {MAX_BYTES}")
    try:
        body = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise EscalationError("schema", f"not JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise EscalationError("schema", "not a version-1 escalation object")
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _text(value, what: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT or "\x00" in value:
        raise EscalationError("schema", f"{what} must be a string of 1..{MAX_TEXT} characters")
    return value


def _number(value, what: str, lo: float = -math.inf, hi: float = math.inf, *, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise EscalationError("schema", f"{what} must be a finite number in [{lo}, {hi}]")
    return float(value)


def _record(raw, uid: str) -> ConnRecord:
    if not isinstance(raw, dict) or set(raw) - set(RECORD_FIELDS):
        raise EscalationError("schema", "record must be an object of Zeek conn fields")
    values = {}
    for name in RECORD_FIELDS:
        v = raw.get(name)
        if v is None:
            values[name] = None
        elif name in _INT_FIELDS:
            if isinstance(v, bool) or not isinstance(v, int) or not -(2**63) <= v < 2**63:
                raise EscalationError("schema", f"record.{name} must be an integer")
            values[name] = v
        elif name in _FLOAT_FIELDS:
            values[name] = _number(v, f"record.{name}")
        elif name in _BOOL_FIELDS:
            if not isinstance(v, bool):
                raise EscalationError("schema", f"record.{name} must be true/false")
            values[name] = v
        elif name in _STR_FIELDS:
            values[name] = _text(v, f"record.{name}")
        elif name == "tunnel_parents":
            if not isinstance(v, list) or len(v) > 16 or not all(isinstance(t, str) and len(t) <= MAX_TEXT for t in v):
                raise EscalationError("schema", "record.tunnel_parents must be a short list of strings")
            values[name] = tuple(v)
    for name in ("ts", "orig_h", "orig_p", "resp_h", "resp_p", "proto"):
        if values[name] is None:
            raise EscalationError("schema", f"record.{name} is required")
    values["uid"] = uid
    return ConnRecord(**values)


def decode_request(data: bytes) -> Request:
    body = _load(data)
    flows = body.get("flows")
    if not isinstance(flows, list) or not 0 < len(flows) <= MAX_FLOWS:
        raise EscalationError("too_large" if isinstance(flows, list) and flows else "schema",
                              f"flows must be a list of 1..{MAX_FLOWS}")
    out = []
    for f in flows:
        if not isinstance(f, dict):
            raise EscalationError("schema", "a flow must be an object")
        uid = _text(f.get("uid"), "uid")
        out.append(EscalatedFlow(
            source=_text(f.get("source"), "source"), uid=uid, score=_number(f.get("score"), "score", 0.0, 1.0),
            label=_text(f.get("label"), "label"), record=_record(f.get("record"), uid),
            novelty=_number(f.get("novelty"), "novelty", optional=True)))
    return Request(gateway=_text(body.get("gateway"), "gateway"),
                   model_version=_text(body.get("model_version"), "model_version"), flows=tuple(out))


def decode_response(data: bytes) -> Response:
    body = _load(data)
    if "error" in body:
        if body["error"] not in ERRORS:
            raise EscalationError("schema", "unknown error reason")
        return Response(None, (), error=body["error"])
    verdicts = body.get("verdicts")
    if not isinstance(verdicts, list) or len(verdicts) > MAX_FLOWS:
        raise EscalationError("schema", f"verdicts must be a list of at most {MAX_FLOWS}")
    out = []
    for v in verdicts:
        if not isinstance(v, dict):
            raise EscalationError("schema", "a verdict must be an object")
        out.append(Verdict(source=_text(v.get("source"), "source"), uid=_text(v.get("uid"), "uid"),
                           label=_text(v.get("label"), "label"), score=_number(v.get("score"), "score", 0.0, 1.0)))
    return Response(teacher_version=_text(body.get("teacher_version"), "teacher_version"), verdicts=tuple(out))
