"""The cloud teacher: answers gateways' escalation requests with the teacher's verdicts.

``fedgate-aggregator teacher --config agg.toml --model build/teacher`` subscribes to
``{prefix}/gw/+/escalate`` and answers each request on the MQTT 5 response topic it
names, with the request's correlation data (:mod:`gateway.protocol.escalation`).  The
teacher model directory runs in the ONNX Runtime engine (:mod:`gateway.inference`):
on CUDA when a session really runs there, else the CPU.

Rules, so one gateway can neither steer nor starve the others:

* the response topic must be the verdict topic of the gateway the request came from
  (``.../gw/{id}/escalate`` -> ``.../gw/{id}/verdict``), and the body's gateway id must
  be the topic's; otherwise the answer is the error ``wrong_topic`` on the right topic;
* a request without correlation data cannot be matched and is dropped (counted);
* each gateway has its own token bucket (``rate`` flows/s, ``burst``); a request beyond
  it is answered ``rate_limited`` and not classified;
* malformed or oversize requests are answered ``schema`` / ``too_large``.

paho's thread only enqueues; one worker thread decodes, classifies and answers.  The
inbox is bounded: past ``max_queue`` requests waiting, new ones are answered
``overloaded`` by the worker without being classified.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from gateway.escalation import TokenBucket
from gateway.mqtt import Inbound, MqttLink, MqttSettings
from gateway.protocol import topics
from gateway.protocol.escalation import (
    EscalationError, Verdict, decode_request, encode_error, encode_response, verdict_topic_for,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TeacherSettings:
    """model_dir: the teacher model directory (``fedgate model train --preset teacher``).
    prefix ["fedgate/v1"]: topic prefix.
    provider ["auto"], precision ["fp32"]: how the teacher runs (gateway.inference).
    rate [500.0], burst [5000]: flows per second per gateway, and the burst, answered.
    max_queue [1000]: requests waiting at most; beyond, ``overloaded``.
    max_gateways [100000]: gateways whose token buckets are remembered (oldest forgotten).
    mqtt: broker connection (client id: the aggregator's plus ``-teacher``).
    """

    model_dir: str
    prefix: str = topics.DEFAULT_PREFIX
    provider: str = "auto"
    precision: str = "fp32"
    rate: float = 500.0
    burst: int = 5000
    max_queue: int = 1000
    max_gateways: int = 100_000
    mqtt: MqttSettings = field(default_factory=lambda: MqttSettings(client_id="fedgate-aggregator-teacher"))

    def __post_init__(self) -> None:
        topics.check_prefix(self.prefix)
        if not self.rate > 0 or self.burst < 1 or self.max_queue < 1 or self.max_gateways < 1:
            raise ValueError("rate > 0, burst >= 1, max_queue >= 1 and max_gateways >= 1 required")


@dataclass
class TeacherCounters:
    requests: int = 0
    flows: int = 0  # flows classified and answered
    refused: Counter = field(default_factory=Counter)  # error replies by reason
    dropped: int = 0  # no correlation data: nowhere to answer
    seconds: float = 0.0  # time spent classifying

    def as_dict(self) -> dict:
        return {**vars(self), "refused": dict(self.refused)}


class TeacherService:
    """See the module docstring; ``engine`` may be given (tests), else it is loaded."""

    def __init__(self, settings: TeacherSettings, *, engine=None):
        self.settings = settings
        if engine is None:
            from gateway.inference import load_classifier

            engine = load_classifier(Path(settings.model_dir), provider=settings.provider,
                                     precision=settings.precision, threads=None)
        self.engine = engine
        self.counters = TeacherCounters()
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()
        self._inbox: queue.Queue[Inbound] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.link = MqttLink(settings.mqtt, subscriptions=[(topics.all_escalations(settings.prefix), 1)],
                             inbox=self._inbox)

    @property
    def version(self) -> str:
        return self.engine.model_version

    def start(self) -> "TeacherService":
        self.link.start()
        self._thread = threading.Thread(target=self._run, name="teacher", daemon=True)
        self._thread.start()
        provider = getattr(self.engine, "provider_ran", "?")
        log.info("teacher %s serving escalations on %s (%s)", self.version,
                 topics.all_escalations(self.settings.prefix), provider)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.link.stop()
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()

    def wait_connected(self, timeout: float) -> bool:
        return self.link.wait_connected(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                overloaded = self._inbox.qsize() >= self.settings.max_queue
                answer = self.answer(msg, overloaded=overloaded)
                if answer is not None:
                    topic, payload, corr = answer
                    self.link.publish(topic, payload, qos=1, correlation_data=corr)
            except Exception:  # noqa: BLE001 - one bad request must not stop the teacher
                log.exception("teacher: request on %s not answered", msg.topic)

    def _bucket(self, gateway: str) -> TokenBucket:
        bucket = self._buckets.get(gateway)
        if bucket is None:
            bucket = self._buckets[gateway] = TokenBucket(self.settings.rate, self.settings.burst)
            while len(self._buckets) > self.settings.max_gateways:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(gateway)
        return bucket

    def answer(self, msg: Inbound, *, overloaded: bool = False) -> tuple[str, bytes, bytes] | None:
        """``(topic, payload, correlation data)`` answering ``msg``, or None when it cannot
        be answered (no correlation data, or not from a gateway's escalation topic)."""
        self.counters.requests += 1
        try:
            gateway, kind = topics.parse_gateway_topic(msg.topic, self.settings.prefix)
            own_topic = verdict_topic_for(msg.topic)
        except (topics.TopicError, EscalationError):
            self.counters.dropped += 1
            return None
        if kind != "escalate" or not msg.correlation_data:
            self.counters.dropped += 1
            return None

        def refuse(reason: str):
            self.counters.refused[reason] += 1
            return own_topic, encode_error(reason), msg.correlation_data

        if msg.response_topic != own_topic:
            return refuse("wrong_topic")
        if overloaded:
            return refuse("overloaded")
        try:
            request = decode_request(msg.payload)
        except EscalationError as exc:
            return refuse(exc.reason if exc.reason in ("too_large", "schema") else "schema")
        if request.gateway != gateway:
            return refuse("wrong_topic")
        if self._bucket(gateway).take(len(request.flows)) < len(request.flows):
            return refuse("rate_limited")
        started = time.perf_counter()
        verdicts = self.engine.classify([f.record for f in request.flows])
        self.counters.seconds += time.perf_counter() - started
        self.counters.flows += len(request.flows)
        answers = [Verdict(f.source, f.uid, label, float(score)) for f, (label, score) in zip(request.flows, verdicts)]
        return own_topic, encode_response(self.version, answers), msg.correlation_data


def settings_from_aggregator_toml(path: str, *, model_dir: str, **overrides) -> TeacherSettings:
    """The teacher's settings from the aggregator's TOML (its [mqtt] broker and
    credentials, its prefix), with client id ``<aggregator client id>-teacher``."""
    from cloud_aggregator.service import AggregatorConfig

    agg = AggregatorConfig.from_toml(path)
    mqtt = replace(agg.mqtt, client_id=f"{agg.mqtt.client_id}-teacher"[:128])
    return TeacherSettings(model_dir=model_dir, prefix=agg.prefix, mqtt=mqtt, **overrides)


def run(settings: TeacherSettings, *, stop: threading.Event) -> TeacherService:
    service = TeacherService(settings).start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        service.stop()
    return service
