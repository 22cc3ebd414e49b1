"""Hybrid edge/cloud detection: flows the edge student is unsure of go to the cloud teacher.

After each committed batch the gateway offers its verdicts to an :class:`Escalator`.
A flow is escalated when the student's malicious score falls in the configured band
(``[escalation] band_low <= score <= band_high``: neither clearly benign nor clearly
malicious), or when its novelty score (where the engine gives one) reaches
``novelty_min``.  A token bucket bounds the flows sent per second; what it refuses,
and what does not fit the bounded queue, is counted and keeps its student verdict.

The :class:`Escalator`'s own thread batches the flows into MQTT 5 requests on
``{prefix}/gw/{id}/escalate`` (response topic ``{prefix}/gw/{id}/verdict``, 16 random
bytes of correlation data, a message expiry equal to the timeout: a teacher that comes
back late never answers a stale request) and matches the answers by correlation data.
An answer is stored as a second detection of the flow, model version
``teacher/<teacher version>`` (:data:`gateway.store.repository.TEACHER_VERSION_PREFIX`),
beside the student's; with ``use_as_label`` federated learning trains on it where no
log label or analyst label exists.  A request not answered within ``timeout_s`` (the
teacher is down, overloaded or the link dropped) is counted as timed out and forgotten.

The escalation link is its own MQTT client (``<client id>-escalation``) built by
:class:`gateway.mqtt.MqttLink`: VERSION2 callbacks, MQTT 5, back-off, its one
subscription made in ``on_connect``; its callbacks only enqueue.  It carries no last
will: the gateway's status (and its will) live on the main link.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from sqlalchemy.exc import SQLAlchemyError

from gateway.flows.record import ConnRecord
from gateway.mqtt import Inbound, MqttLink, MqttSettings
from gateway.protocol import topics
from gateway.protocol.escalation import (
    EscalatedFlow, EscalationError, Verdict, decode_response, encode_request,
)
from gateway.store import repository

log = logging.getLogger(__name__)


def uncertain(scores: Sequence[float], *, low: float, high: float,
              novelty: Sequence[float | None] | None = None, novelty_min: float | None = None) -> list[int]:
    """Indices of the flows to escalate: score in ``[low, high]``, or novelty at or
    above ``novelty_min`` (when both are given).  PURE."""
    out = []
    for i, s in enumerate(scores):
        if low <= s <= high:
            out.append(i)
        elif novelty is not None and novelty_min is not None and novelty[i] is not None \
                and novelty[i] >= novelty_min:
            out.append(i)
    return out


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up.  PURE given ``clock``."""

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic):
        if not rate > 0 or not burst >= 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self, n: int) -> int:
        """Grant up to ``n`` tokens now; returns how many were granted."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        granted = min(n, int(self.tokens))
        self.tokens -= granted
        return granted


@dataclass
class EscalationCounters:
    offered: int = 0  # flows in the band (or novel)
    rate_limited: int = 0  # refused by the token bucket
    dropped: int = 0  # the queue was full
    offline: int = 0  # the link was down when their batch was due
    requests: int = 0
    sent: int = 0  # flows sent
    answered: int = 0  # flows with a stored teacher verdict
    timed_out: int = 0  # flows whose request got no answer in time
    unmatched: int = 0  # answers to no pending request (late, duplicated or forged)
    refused: Counter = field(default_factory=Counter)  # teacher's error replies, by reason, in flows
    bad_answers: int = 0  # answers that are not valid responses
    store_errors: int = 0
    last_latency_s: float | None = None

    def as_dict(self) -> dict:
        d = dict(vars(self))
        d["refused"] = dict(self.refused)
        return d


@dataclass
class _Pending:
    deadline: float
    sent_at: float
    flows: dict[tuple[str, str], tuple[ConnRecord, EscalatedFlow]]


VerdictCallback = Callable[[str, list[tuple[ConnRecord, Verdict]]], None]
"""``on_verdicts(model_version, [(record, verdict)])`` after answers are stored."""


class Escalator:
    """The edge side of escalation; see the module docstring.

    ``settings`` is the gateway's ``[escalation]`` section
    (:class:`gateway.config.EscalationSection`); ``sessions`` a SQLAlchemy session
    factory of the gateway store.
    """

    POLL_S = 0.05

    def __init__(self, settings, *, mqtt: MqttSettings, gateway_id: str, prefix: str = topics.DEFAULT_PREFIX,
                 sessions, on_verdicts: VerdictCallback | None = None, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.gateway_id = gateway_id
        self.request_topic = topics.gateway_escalate(gateway_id, prefix)
        self.response_topic = topics.gateway_verdict(gateway_id, prefix)
        self.sessions = sessions
        self.on_verdicts = on_verdicts
        self.clock = clock
        self.counters = EscalationCounters()
        self.bucket = TokenBucket(settings.max_rate, settings.burst, clock=clock)
        self._flows: queue.Queue[tuple[ConnRecord, EscalatedFlow]] = queue.Queue(maxsize=settings.max_pending)
        self._inbox: queue.Queue[Inbound] = queue.Queue()
        self._pending: dict[bytes, _Pending] = {}  # the worker's alone
        self._in_flight = 0  # flows in self._pending, readable from any thread
        self._lock = threading.Lock()  # offer() runs on the sources' threads
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        client_id = f"{mqtt.client_id}-escalation"[:128]
        self.link = MqttLink(replace(mqtt, client_id=client_id), subscriptions=[(self.response_topic, 1)],
                             inbox=self._inbox)

    # ------------------------------------------------------------ sources' side
    def offer(self, source: str, records: Sequence[ConnRecord], verdicts: Sequence[tuple[str, float]],
              model_version: str, novelty: Sequence[float | None] | None = None) -> int:
        """Queue the uncertain flows of a committed batch (cheap; never blocks).
        Returns how many were queued."""
        s = self.settings
        picked = uncertain([v[1] for v in verdicts], low=s.band_low, high=s.band_high,
                           novelty=novelty, novelty_min=s.novelty_min)
        if not picked:
            return 0
        with self._lock:
            self.counters.offered += len(picked)
            granted = self.bucket.take(len(picked))
            self.counters.rate_limited += len(picked) - granted
        queued = 0
        for i in picked[:granted]:
            label, score = verdicts[i]
            flow = EscalatedFlow(source=source, uid=records[i].uid, score=float(score), label=label,
                                 record=records[i], novelty=None if novelty is None else novelty[i])
            try:
                self._flows.put_nowait((records[i], flow))
                queued += 1
            except queue.Full:
                with self._lock:
                    self.counters.dropped += 1
        self._model_version = model_version
        return queued

    # ------------------------------------------------------------ worker
    def start(self) -> "Escalator":
        self.link.start()
        self._thread = threading.Thread(target=self._run, name="escalation", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.link.stop()

    @property
    def pending_flows(self) -> int:
        return self._in_flight

    def _run(self) -> None:
        batch: list[tuple[ConnRecord, EscalatedFlow]] = []
        first_at: float | None = None
        while not self._stop.is_set():
            try:
                self._on_answer(self._inbox.get(timeout=self.POLL_S))
            except queue.Empty:
                pass
            except Exception:  # noqa: BLE001 - one bad answer must not stop escalation
                log.exception("escalation: answer not handled")
            while len(batch) < self.settings.batch:
                try:
                    batch.append(self._flows.get_nowait())
                except queue.Empty:
                    break
            now = self.clock()
            if batch and first_at is None:
                first_at = now
            if batch and (len(batch) >= self.settings.batch or now - first_at >= self.settings.max_wait_s):
                self._send(batch)
                batch, first_at = [], None
            self._expire(now)

    def _send(self, batch: list[tuple[ConnRecord, EscalatedFlow]]) -> None:
        if not self.link.connected:
            self.counters.offline += len(batch)
            return
        flows = [f for _, f in batch]
        try:
            payload = encode_request(self.gateway_id, getattr(self, "_model_version", "unknown"), flows)
        except EscalationError as exc:  # e.g. an oversize batch of huge records
            log.warning("escalation: batch of %d not sent: %s", len(batch), exc)
            self.counters.dropped += len(batch)
            return
        corr = os.urandom(16)
        now = self.clock()
        self._pending[corr] = _Pending(now + self.settings.timeout_s, now,
                                       {(f.source, f.uid): (r, f) for r, f in batch})
        self._in_flight += len(batch)
        self.link.publish(self.request_topic, payload, qos=1, response_topic=self.response_topic,
                          correlation_data=corr, expiry_s=math.ceil(self.settings.timeout_s))
        self.counters.requests += 1
        self.counters.sent += len(batch)

    def _expire(self, now: float) -> None:
        for corr in [c for c, p in self._pending.items() if p.deadline <= now]:
            gone = self._pending.pop(corr)
            self._in_flight -= len(gone.flows)
            self.counters.timed_out += len(gone.flows)

    def _on_answer(self, msg: Inbound) -> None:
        pending = self._pending.pop(msg.correlation_data, None) if msg.correlation_data else None
        if pending is None:
            self.counters.unmatched += 1
            return
        self._in_flight -= len(pending.flows)
        try:
            resp = decode_response(msg.payload)
        except EscalationError as exc:
            self.counters.bad_answers += 1
            self.counters.timed_out += len(pending.flows)  # never answered in substance
            log.warning("escalation: unreadable answer (%s)", exc)
            return
        if resp.error is not None:
            self.counters.refused[resp.error] += len(pending.flows)
            return
        asked = pending.flows
        answers = [(asked[(v.source, v.uid)][0], v) for v in resp.verdicts if (v.source, v.uid) in asked]
        self.counters.bad_answers += len(resp.verdicts) - len(answers)
        version = repository.TEACHER_VERSION_PREFIX + str(resp.teacher_version)
        try:
            with self.sessions.begin() as session:
                repository.insert_detections(session, [(v.source, v.uid, v.label, v.score) for _, v in answers],
                                             model_version=version)
        except SQLAlchemyError as exc:
            self.counters.store_errors += 1
            log.error("escalation: teacher verdicts not stored: %s", str(exc).splitlines()[0])
            return
        self.counters.answered += len(answers)
        self.counters.last_latency_s = round(self.clock() - pending.sent_at, 4)
        if self.on_verdicts is not None and answers:
            self.on_verdicts(version, answers)

    def status(self) -> dict:
        return {**self.counters.as_dict(), "connected": self.link.connected, "queued": self._flows.qsize(),
                "in_flight": self.pending_flows}
