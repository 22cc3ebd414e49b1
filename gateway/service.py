"""The running gateway: sources -> classifier -> store -> alerts, FL, status, metrics, page.

``fedgate gateway run --config gw.toml`` builds a :class:`GatewayService` from a
:class:`gateway.config.GatewayConfig` and runs it until SIGTERM/SIGINT.

Threads (each source commits its own batches; SQLite's WAL and busy timeout serialise
the writers):

* ``tail``: :func:`gateway.ingest.follow` on the live ``conn.log`` (records, their
  detections and the tail position in one transaction per poll);
* ``pcap-dir``: lists ``source.pcap_dir``; every capture file whose size stopped
  changing is read once (flows + detections per batch, the file marked done with its
  identity at its end, so a restart skips it and a crash mid-file re-reads it without
  storing anything twice);
* ``capture`` + ``capture-commit``: live capture enqueues finished flows; the
  committer takes batches (``capture_batch`` flows or ``capture_max_wait_s``);
* ``link`` (or the FL client's worker): MQTT events, the durable outbox drain (alerts
  and model updates), the retained status with its last will;
* ``status-http``: the status page, ``/api/status`` and Prometheus ``/metrics``.

After each committed batch the detections at or above the alert threshold go to an
alert thread that writes them to the durable outbox (topic ``{prefix}/gw/{id}/alerts``),
one message per ``alert_interval_s``, so alerts raised while the broker is down are
delivered when it is back, and the sources never wait for it.

Shutdown (:meth:`GatewayService.stop`): the sources finish and commit the batch in hand
(offsets saved with it), the outbox worker says "offline" on the status topic and
disconnects, the page stops, the database is closed.
"""

from __future__ import annotations

import collections
import inspect
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from gateway import ingest
from gateway.config import GatewayConfig
from gateway.flows.record import ConnRecord
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.protocol import topics
from gateway.store import repository
from gateway.store.db import StoreError, describe_db_error, open_store

log = logging.getLogger(__name__)

DEFAULT_ALERT_THRESHOLD = 0.5
MAX_ALERTS_PER_MESSAGE = 500
STATUS_INTERVAL_S = 5.0


class ServiceError(RuntimeError):
    """The gateway cannot start (database, model or source unusable); says which and why."""


# ---------------------------------------------------------------- classifier wrapper


class MeteredClassifier:
    """A :class:`gateway.ingest.FlowClassifier` that times every call into the metrics.

    The model itself may be swapped (:meth:`swap`) while sources keep calling
    :meth:`classify`: a call uses the model it started with.
    """

    def __init__(self, inner: ingest.FlowClassifier, metrics: GatewayMetrics):
        self._inner = inner
        self.metrics = metrics
        metrics.set_model_version(inner.model_version)

    @property
    def model_version(self) -> str:
        return self._inner.model_version

    @property
    def threshold(self) -> float:
        value = getattr(self._inner, "threshold", None)
        return float(value) if isinstance(value, (int, float)) else DEFAULT_ALERT_THRESHOLD

    @property
    def inner(self) -> ingest.FlowClassifier:
        return self._inner

    def classify(self, records: Sequence[ConnRecord]) -> list[tuple[str, float]]:
        inner = self._inner
        started = time.perf_counter()
        verdicts = inner.classify(records)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        return verdicts

    def swap(self, inner: ingest.FlowClassifier) -> None:
        self._inner = inner
        self.metrics.set_model_version(inner.model_version)


def load_classifier(config: GatewayConfig) -> ingest.FlowClassifier | None:
    """The ONNX engine for ``gateway.model`` (None when no model is configured)."""
    if config.gateway.model is None:
        return None
    model_dir = Path(config.gateway.model)
    if not model_dir.is_dir():
        raise ServiceError(f"gateway.model: {model_dir} is not a directory")
    try:
        from gateway import inference
    except ImportError as exc:
        raise ServiceError(f"gateway.model is set but the inference engine is not available: {exc}") from exc
    loader = getattr(inference, "load_classifier")
    inf = config.inference
    wanted = {"provider": inf.provider, "precision": inf.precision, "max_batch": inf.batch_size,
              "max_wait_ms": inf.max_wait_ms, "threads": inf.threads, "device_id": inf.device_id,
              "gpu_mem_limit_mb": inf.gpu_mem_limit_mb}
    params = inspect.signature(loader).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    try:
        return loader(model_dir, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ServiceError(f"gateway.model: cannot load {model_dir}: {exc}") from exc


# ---------------------------------------------------------------- recent detections (for the page)


@dataclass(frozen=True)
class RecentDetection:
    ts: float
    source: str
    uid: str
    orig_h: str
    resp_h: str
    resp_p: int
    proto: str
    label: str
    score: float


def alert_payload(gateway_id: str, model_version: str, detections: Sequence[RecentDetection]) -> bytes:
    """The JSON published on ``{prefix}/gw/{id}/alerts``."""
    return json.dumps({
        "gateway": gateway_id, "model_version": model_version, "sent_at": time.time(),
        "detections": [vars(d) for d in detections],
    }, separators=(",", ":")).encode()


class AlertQueue:
    """Gathers the alerts of committed batches and writes them to the durable outbox
    from its own thread, one message per ``interval_s`` (at most
    ``MAX_ALERTS_PER_MESSAGE`` detections each), all in one transaction.

    Why a thread: the sources' next batch does not wait for the outbox write, and the
    broker sees a few larger messages instead of one per batch (fewer acknowledgements
    to record, so fewer writers competing for SQLite).

    At-least-once across a kill: each write also saves a cursor (the time the write
    began, marked ``running``; a graceful stop marks it ``clean``) in the same
    transaction.  On start, after an unclean stop, :meth:`recover` queues again the
    detections stored since ``cursor - RECOVERY_MARGIN_S`` that reach the threshold: the
    detections are committed before their alerts are queued, so nothing held in memory
    at the kill is lost; a few alerts may be sent twice (receivers key them by uid).
    """

    RECOVERY_MARGIN_S = 30.0  # covers batches created before a write but committed after it

    def __init__(self, *, sessions, topic: str, gateway_id: str, interval_s: float,
                 on_error: Callable[[str], None]):
        self.sessions = sessions
        self.topic = topic
        self.gateway_id = gateway_id
        self.interval_s = interval_s
        self.on_error = on_error
        self.cursor_key = f"alerts:{topic}"
        self._queue: queue.Queue[tuple[str, list[RecentDetection]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)

    def recover(self, *, threshold: float) -> int:
        """Queue again what an unclean stop may have lost; mark the cursor running.
        Returns how many alerts were queued again."""
        requeued = 0
        with self.sessions.begin() as session:
            cursor = repository.load_offset(session, self.cursor_key)
            if cursor is not None and cursor.file_identity != "clean":
                since = cursor.offset / 1000.0 - self.RECOVERY_MARGIN_S
                by_version: dict[str, list[RecentDetection]] = {}
                for c in repository.detections_to_alert(session, since=since, min_score=threshold):
                    by_version.setdefault(c.model_version, []).append(RecentDetection(
                        c.ts, c.source, c.uid, c.orig_h, c.resp_h, c.resp_p, c.proto, c.label,
                        round(float(c.score), 4)))
                for version, alerts in by_version.items():
                    self.put(version, alerts)
                    requeued += len(alerts)
                if requeued:
                    log.warning("alerts: the last stop was not clean; %d alerts of detections stored "
                                "since %.0f queued again (at-least-once)", requeued, since)
            self._save_cursor(session, "running")
        return requeued

    def _save_cursor(self, session, state: str, at: float | None = None) -> None:
        repository.save_offset(session, self.cursor_key, file_identity=state,
                               offset=int((time.time() if at is None else at) * 1000))

    def start(self) -> "AlertQueue":
        self._thread.start()
        return self

    def put(self, model_version: str, alerts: list[RecentDetection]) -> None:
        self._queue.put((model_version, alerts))

    def _run(self) -> None:
        pending: dict[str, list[RecentDetection]] = {}
        first_at: float | None = None
        while True:
            timeout = None if first_at is None else max(0.0, first_at + self.interval_s - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = ()  # the interval is over: write
            if item is None:  # stop: write what is left, then end
                self._write(pending, final=True)
                return
            if item:
                version, alerts = item
                pending.setdefault(version, []).extend(alerts)
                first_at = first_at if first_at is not None else time.monotonic()
                if sum(map(len, pending.values())) < MAX_ALERTS_PER_MESSAGE:
                    continue
            if self._write(pending):
                pending, first_at = {}, None
            else:  # the store refused: try again after a pause, keep the alerts
                first_at = time.monotonic()

    def _write(self, pending: dict[str, list[RecentDetection]], *, final: bool = False) -> bool:
        if not pending and not final:
            return True
        began = time.time()
        try:
            with self.sessions.begin() as session:
                self._save_cursor(session, "clean" if final else "running", at=began)
                for version, alerts in pending.items():
                    for i in range(0, len(alerts), MAX_ALERTS_PER_MESSAGE):
                        repository.outbox_add(session, self.topic,
                                              alert_payload(self.gateway_id, version,
                                                            alerts[i:i + MAX_ALERTS_PER_MESSAGE]), qos=1)
            return True
        except SQLAlchemyError as exc:
            self.on_error(str(exc).splitlines()[0])
            return False

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)


# ---------------------------------------------------------------- the link worker (no FL)


class LinkWorker:
    """MQTT events, the durable outbox and the retained status when FL is off.

    (With FL on, :class:`gateway.fl.client.FLClient`'s worker does the same on the
    same link, so exactly one thread consumes the link's events.)
    """

    def __init__(self, *, link, outbox, status: Callable[[], dict], interval_s: float = STATUS_INTERVAL_S):
        self.link = link
        self.outbox = outbox
        self.status = status
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_status = 0.0

    def start(self) -> "LinkWorker":
        self.link.start()
        self._thread = threading.Thread(target=self._run, name="link", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        from gateway.fl.link import Acked, LinkDown, LinkUp

        while not self._stop.is_set():
            try:
                event = self.link.events.get(timeout=0.2)
            except queue.Empty:
                event = None
            try:
                if isinstance(event, Acked):
                    self.outbox.on_ack(event.mid, event.reason_code, event.reason)
                elif isinstance(event, LinkUp):
                    self.outbox.on_connected()
                    self.publish_status()
                elif isinstance(event, LinkDown):
                    self.outbox.on_disconnected()
                self.outbox.drain()
                if time.monotonic() - self._last_status >= self.interval_s:
                    self.publish_status()
            except Exception:  # noqa: BLE001 - keep the link alive; the row stays pending
                log.exception("link worker: error handling %r", type(event).__name__)

    def publish_status(self) -> None:
        self._last_status = time.monotonic()
        st = dict(self.status())
        state = st.pop("state", "online")
        self.link.publish_status(state, **st)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.link.stop()


# ---------------------------------------------------------------- the service


class GatewayService:
    """Everything a running gateway does; see the module docstring.

    classifier: use this instead of loading ``gateway.model`` (tests, benchmarks).
    learner: FL learner to use instead of building a TorchLearner from ``gateway.model``.
    """

    def __init__(self, config: GatewayConfig, *, classifier: ingest.FlowClassifier | None = None,
                 learner: Any | None = None):
        self.config = config
        self.metrics = GatewayMetrics()
        self._given_classifier = classifier
        self._given_learner = learner
        self.classifier: MeteredClassifier | None = None
        self.engine = None
        self.sessions = None
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.link = None
        self.outbox = None
        self.fl_client = None
        self.escalator = None  # gateway.escalation.Escalator when [escalation] is on
        self._hotswap = None  # EngineHotSwap (gate, export, swap, canary), made with the FL client
        self.link_worker: LinkWorker | None = None
        self.alert_queue: AlertQueue | None = None
        self.http = None
        self.started_at: float | None = None
        self.state = "starting"
        self.recent: collections.deque[RecentDetection] = collections.deque(maxlen=config.http.recent_detections)
        self.alert_topic = topics.gateway_alerts(config.gateway.id, config.gateway.prefix)
        self.tail_counters = ingest.FollowCounters()
        self._tail_seen = (0, 0)
        self.errors: collections.deque[str] = collections.deque(maxlen=20)
        self._capture_queue: queue.Queue[ConnRecord] = queue.Queue(maxsize=100_000)
        self.capture_listening = threading.Event()  # set once source.interface is being captured
        self._threshold = config.inference.alert_threshold
        self._lock = threading.Lock()

    # ------------------------------------------------------------ start / stop
    def start(self) -> "GatewayService":
        """Open the store, load the model, connect, serve the page, start the sources.

        Raises :class:`ServiceError` naming the setting at fault; whatever had started
        is stopped again."""
        try:
            return self._start()
        except BaseException:
            self.stop(timeout=5)
            raise

    def _start(self) -> "GatewayService":
        cfg = self.config
        try:  # the gateway's own directory (the default database lives there)
            os.makedirs(cfg.gateway.state_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ServiceError(f"gateway.state_dir: cannot create {cfg.gateway.state_dir}: {exc.strerror or exc}") from exc
        try:
            self.engine, self.sessions = open_store(cfg.database_url)
        except StoreError as exc:
            raise ServiceError(f"gateway.database: {exc}") from exc
        inner = self._given_classifier if self._given_classifier is not None else load_classifier(cfg)
        if inner is not None:
            self.classifier = MeteredClassifier(inner, self.metrics)
            if self._threshold is None:
                self._threshold = self.classifier.threshold
            try:
                with self.sessions.begin() as session:
                    repository.register_model_version(session, inner.model_version, path=cfg.gateway.model,
                                                      activate=True)
            except SQLAlchemyError as exc:
                raise ServiceError(f"gateway.database: {describe_db_error(self.engine, exc)}") from exc
        else:
            log.warning("no model configured: flows are stored without detections")
        self._check_sources()
        self.metrics.add_callback(self._link_figures)  # scrape-time figures (tail, outbox, FL)
        if cfg.mqtt.enabled:
            self._start_link()
        if cfg.http.listen:
            self._start_http()
        self.started_at = time.time()
        self.state = "running"
        if cfg.source.zeek_log:
            self._spawn("tail", self._run_tail)
        if cfg.source.pcap_dir:
            self._spawn("pcap-dir", self._run_pcap_dir)
        if cfg.source.interface:
            self._spawn("capture", self._run_capture)
            self._spawn("capture-commit", self._run_capture_commit)
        log.info("gateway %s running (model %s)", cfg.gateway.id,
                 self.classifier.model_version if self.classifier else "none")
        return self

    @property
    def batch_size(self) -> int:
        """Flows per batch of a capture file: the configured size, else the engine's own
        (sized for its device), else the CPU default."""
        inner = self.classifier.inner if self.classifier is not None else None
        return self.config.inference.batch_size or getattr(inner, "max_batch", None) or 256

    def _check_sources(self) -> None:
        src = self.config.source
        if src.zeek_log and not Path(src.zeek_log).parent.is_dir():
            raise ServiceError(f"source.zeek_log: directory {Path(src.zeek_log).parent} does not exist")
        if src.pcap_dir and not Path(src.pcap_dir).is_dir():
            raise ServiceError(f"source.pcap_dir: {src.pcap_dir} is not a directory")

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:  # noqa: BLE001 - a dead source is reported, the rest runs on
                log.exception("source %s stopped", name)
                self.errors.append(f"{name}: {exc}")
                self.state = "degraded"

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _start_link(self) -> None:
        from gateway.fl.link import GatewayLink
        from gateway.fl.outbox import Outbox

        cfg = self.config
        self.link = GatewayLink(cfg.mqtt_settings(), gateway_id=cfg.gateway.id, prefix=cfg.gateway.prefix)
        wants_fl = cfg.fl.enabled and self.classifier is not None and (
            cfg.gateway.model is not None or self._given_learner is not None)
        fl = self._build_fl_client() if wants_fl else None
        if fl is not None:
            self.fl_client = fl
            self.outbox = fl.outbox
            fl.start()
        else:
            self.outbox = Outbox(sessions=self.sessions, publish=self.link.publish)
            self.link_worker = LinkWorker(link=self.link, outbox=self.outbox, status=self.status_summary,
                                          interval_s=cfg.fl.status_interval_s).start()
        if cfg.inference.alerts:
            self.alert_queue = AlertQueue(sessions=self.sessions, topic=self.alert_topic, gateway_id=cfg.gateway.id,
                                          interval_s=cfg.inference.alert_interval_s,
                                          on_error=self._alert_write_failed)
            try:
                self.alert_queue.recover(
                    threshold=self._threshold if self._threshold is not None else DEFAULT_ALERT_THRESHOLD)
            except SQLAlchemyError as exc:
                raise ServiceError(f"gateway.database: {describe_db_error(self.engine, exc)}") from exc
            self.alert_queue.start()
        if cfg.escalation.enabled and self.classifier is not None:
            from gateway.escalation import Escalator

            self.escalator = Escalator(cfg.escalation, mqtt=cfg.mqtt_settings(), gateway_id=cfg.gateway.id,
                                       prefix=cfg.gateway.prefix, sessions=self.sessions,
                                       on_verdicts=self._teacher_verdicts).start()

    def _teacher_verdicts(self, version: str, answers: list) -> None:
        """The cloud teacher's stored verdicts on escalated flows: those at or above the
        alert threshold are alerted (with the teacher's version), like the student's."""
        threshold = self._threshold if self._threshold is not None else DEFAULT_ALERT_THRESHOLD
        alerts = [RecentDetection(rec.ts, v.source, rec.uid, rec.orig_h, rec.resp_h, rec.resp_p, rec.proto,
                                  v.label, round(float(v.score), 4))
                  for rec, v in answers if v.score >= threshold]
        if not alerts:
            return
        self.recent.extend(alerts)
        if self.config.inference.alerts and self.alert_queue is not None:
            self.metrics.alerts.inc(len(alerts))
            self.alert_queue.put(version, alerts)

    def _alert_write_failed(self, reason: str) -> None:
        self.metrics.store_errors.inc()
        log.error("alerts not queued yet (kept in memory, retried): %s", reason)

    def _build_fl_client(self):
        from gateway.fl.client import ClientSettings, FLClient
        from gateway.protocol import signing

        cfg = self.config
        try:
            learner = self._given_learner
            if learner is None:
                from gateway.fl.learner import TorchLearner

                learner = TorchLearner(cfg.gateway.model, threads=cfg.fl.threads, device=cfg.fl.device)
            key = [signing.load_public_key(p) for p in cfg.verify_key_paths] or None
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            log.error("federated learning disabled: %s", exc)
            self.errors.append(f"fl: {exc}")
            return None
        settings = ClientSettings(gateway_id=cfg.gateway.id, strategy=cfg.fl.strategy,
                                  local_epochs=cfg.fl.local_epochs, max_local_steps=cfg.fl.max_local_steps,
                                  batch_size=cfg.fl.batch_size, lr=cfg.fl.lr, lr_decay=cfg.fl.lr_decay,
                                  prox_mu=cfg.fl.prox_mu, missing_class_scale=cfg.fl.missing_class_scale,
                                  retrain_interval_s=cfg.fl.retrain_interval_s,
                                  label_smoothing=cfg.fl.label_smoothing,
                                  compression=cfg.fl.compression,
                                  status_interval_s=cfg.fl.status_interval_s,
                                  teacher_labels=cfg.escalation.enabled and cfg.escalation.use_as_label)
        service = self

        class _ServiceFLClient(FLClient):
            def status(self) -> dict:  # the FL figures plus the gateway's own
                return {**service.status_summary(), **super().status()}

        from gateway.fl.versionfile import FILE_NAME

        try:
            client = _ServiceFLClient(settings=settings, learner=learner, sessions=self.sessions, link=self.link,
                                      verify_key=key, allow_unsigned=cfg.fl.allow_unsigned, on_global=self._on_global,
                                      version_file=Path(cfg.gateway.state_dir) / FILE_NAME)
        except ValueError as exc:  # e.g. an unreadable version file: never guess a floor
            log.error("federated learning disabled: %s", exc)
            self.errors.append(f"fl: {exc}")
            return None
        inner = self.classifier.inner
        if callable(getattr(inner, "swap", None)):
            from gateway.fl.hotswap import EngineHotSwap

            # the newest three model directories stay (the current one and two to fall back to)
            self._hotswap = EngineHotSwap(engine=inner, learner=learner, keep=3, settings=cfg.deploy,
                                          models_dir=Path(cfg.gateway.state_dir) / "models",
                                          validation=client.validation_data, initial_dir=cfg.gateway.model,
                                          on_change=self._model_rolled_back)
        return client

    def _on_global(self, version: int, weights: dict, metrics: dict) -> Path | None:
        """A validated global model (already loaded into the FL learner): unless the
        deployment gate keeps it out, export it to ONNX beside the others and hot-swap
        the engine; detection never stops (the old session serves until the new one is
        validated and swapped in).  Returns the directory now in use, or None."""
        if self.classifier is None or self.fl_client is None:
            return None
        if self._hotswap is None:
            log.warning("engine %r cannot hot-swap; keeping %s", type(self.classifier.inner).__name__,
                        self.classifier.model_version)
            return None
        started = time.perf_counter()
        out = self._hotswap(version, weights, metrics)
        if out is None:
            self.metrics.deploy_refused.inc()
            return None
        self.metrics.deploy_swapped.inc()
        self.metrics.set_model_version(self.classifier.model_version)
        log.info("detection now uses %s (exported and swapped in %.1fs)", self.classifier.model_version,
                 time.perf_counter() - started)
        return out

    def _model_rolled_back(self, version: str) -> None:
        """The canary swapped the previous model back in (on a source thread)."""
        self.metrics.canary_rollbacks.inc()
        self.metrics.set_model_version(version)
        try:
            with self.sessions.begin() as session:
                mv = session.get(repository.ModelVersion, version)
                repository.register_model_version(session, version, parent=mv.parent if mv else None,
                                                  path=mv.path if mv else None, metrics=mv.metrics if mv else None,
                                                  activate=True)
        except SQLAlchemyError as exc:
            log.error("rolled back to %s, but the store could not record it: %s", version, exc)
        if self.fl_client is not None:
            self.fl_client.publish_status()

    def _start_http(self) -> None:
        from gateway.web.server import StatusServer, json_route, static_route

        routes = {
            "/": static_route("gateway.web", "index.html"),
            "/api/status": json_route(self.status),
            "/metrics": lambda: (CONTENT_TYPE, self.metrics.exposition()),
            "/healthz": json_route(lambda: {"state": self.state}),
        }
        try:
            self.http = StatusServer(self.config.http.address, routes=routes).start()
        except OSError as exc:
            raise ServiceError(f"http.listen: cannot listen on {self.config.http.listen}: {exc.strerror or exc}") \
                from exc

    def stop(self, timeout: float = 30.0) -> None:
        """Finish and commit the batch in hand, say offline, close everything."""
        self.state = "stopping"
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                log.error("thread %s did not finish within %.0fs", t.name, timeout)
        if self.escalator is not None:
            self.escalator.stop()  # answers still in flight are given up (counted)
        if self.alert_queue is not None:
            self.alert_queue.stop()  # the last alerts reach the outbox before the link goes
            self._let_outbox_drain(min(2.0, max(0.0, deadline - time.monotonic())))
        if self.fl_client is not None:
            self.fl_client.stop()
        if self.link_worker is not None:
            self.link_worker.stop()
        if self.http is not None:
            self.http.stop()
        close = getattr(self.classifier.inner if self.classifier else None, "close", None)
        if callable(close):
            close()
        if self.engine is not None:
            self.engine.dispose()
        self.state = "stopped"

    def _let_outbox_drain(self, seconds: float) -> None:
        """Give a connected link a moment to send what is queued (what is not sent stays
        in the outbox table and goes after the next start)."""
        end = time.monotonic() + seconds
        while self.link is not None and self.link.connected and time.monotonic() < end:
            try:
                if self.outbox.pending() == 0:
                    return
            except SQLAlchemyError:
                return
            time.sleep(0.05)

    # ------------------------------------------------------------ sources
    def _run_tail(self) -> None:
        path = self.config.source.zeek_log
        counters = ingest.follow(path, session_factory=self.sessions, classifier=self.classifier,
                                 interval=self.config.source.poll_interval_s, stop=self.stop_event,
                                 counters=self.tail_counters,
                                 archive_globs=self.config.source.zeek_archive_globs,
                                 on_batch=lambda recs, verdicts: self.after_commit(
                                     ingest.default_source(path), recs, verdicts))
        log.info("tail %s ended: %s", path, counters)

    def _run_pcap_dir(self) -> None:
        src = self.config.source
        directory = Path(src.pcap_dir)
        seen: dict[Path, tuple[int, float]] = {}
        done: set[tuple[Path, int, float]] = set()
        while not self.stop_event.is_set():
            for path in sorted(directory.glob(src.pcap_pattern)):
                if self.stop_event.is_set():
                    break
                try:
                    st = path.stat()
                except OSError:
                    continue
                key = (st.st_size, st.st_mtime)
                if (path, *key) in done:
                    continue
                if seen.get(path) != key:  # still being written: wait for a stable size
                    seen[path] = key
                    continue
                try:
                    self.ingest_capture_file(path)
                except StoreError as exc:
                    self.metrics.store_errors.inc()
                    log.error("%s: %s (retried at the next scan)", path, exc)
                    continue
                done.add((path, *key))
            self.stop_event.wait(src.pcap_scan_interval_s)

    def ingest_capture_file(self, path: Path) -> int:
        """Read one capture file into the store (once); returns flows read."""
        from gateway.flows.pcap import CaptureError, CaptureStats, pcap_records

        source = ingest.default_source(path)
        with open(path, "rb") as fh:
            head = fh.read(ingest.IDENTITY_PREFIX)
        ident = ingest.file_identity(head)
        size = path.stat().st_size
        with self.sessions() as session:
            saved = repository.load_offset(session, source)
        if saved is not None and saved.file_identity == ident and saved.offset >= size:
            return 0
        stats = CaptureStats()
        batch: list[ConnRecord] = []
        total = 0
        with open(path, "rb") as fh:
            try:
                for rec in pcap_records(fh, stats=stats, settings=self.config.flows):
                    batch.append(rec)
                    if len(batch) >= self.batch_size:
                        total += self.commit(source, batch, live=False)
                        batch = []
            except CaptureError as exc:
                self.metrics.rejected.labels(source).inc()
                log.error("%s: %s (flows before the damage are kept)", path, exc)
        total += self.commit(source, batch, offset=(ident, size, None), live=False)
        if stats.truncated:
            self.metrics.rejected.labels(source).inc()
        return total

    def _run_capture(self) -> None:
        from gateway.flows.pcap import live_records

        src = self.config.source
        for rec in live_records(src.interface, method=src.capture_method, bpf=src.bpf,
                                local_nets=src.local_nets or None, settings=self.config.flows,
                                stop=self.stop_event.is_set, poll_interval=min(1.0, src.capture_max_wait_s),
                                on_ready=self.capture_listening.set):
            self._capture_queue.put(rec)
            self.metrics.queue_depth.set(self._capture_queue.qsize())

    def _run_capture_commit(self) -> None:
        src = self.config.source
        source = f"capture:{src.interface}"
        while True:
            batch: list[ConnRecord] = []
            deadline = time.monotonic() + src.capture_max_wait_s
            while len(batch) < src.capture_batch:
                try:
                    batch.append(self._capture_queue.get(timeout=max(0.01, deadline - time.monotonic())))
                except queue.Empty:
                    break
            if batch:
                while True:
                    try:
                        self.commit(source, batch)
                        break
                    except StoreError as exc:  # keep the batch in memory and retry
                        self.metrics.store_errors.inc()
                        log.error("capture %s: %s; retrying", src.interface, exc)
                        if self.stop_event.wait(1.0):
                            log.error("capture %s: %d flows not stored at shutdown", src.interface, len(batch))
                            return
                self.metrics.queue_depth.set(self._capture_queue.qsize())
            elif self.stop_event.is_set() and not any(t.name == "capture" and t.is_alive() for t in self.threads):
                return

    # ------------------------------------------------------------ one batch
    def commit(self, source: str, records: list[ConnRecord], *, offset: tuple | None = None,
               live: bool = True) -> int:
        """Classify and store ``records`` (+ offset) in one transaction; then alerts."""
        verdicts = ingest._classify(self.classifier, records) if records else None  # noqa: SLF001
        ingest.commit_batch(self.sessions, records, source=source, classifier=self.classifier,
                            verdicts=verdicts, offset=offset)
        if records:
            self.after_commit(source, records, verdicts, live=live)
        return len(records)

    def _sync_tail_counters(self) -> None:
        """Carry the tail's rejected lines and store errors into the metrics."""
        if not self.config.source.zeek_log:
            return
        with self._lock:
            c = self.tail_counters
            source = ingest.default_source(self.config.source.zeek_log)
            if c.rejected > self._tail_seen[0]:
                self.metrics.rejected.labels(source).inc(c.rejected - self._tail_seen[0])
            if c.store_errors > self._tail_seen[1]:
                self.metrics.store_errors.inc(c.store_errors - self._tail_seen[1])
            self._tail_seen = (c.rejected, c.store_errors)

    def after_commit(self, source: str, records: list[ConnRecord], verdicts, *, live: bool = True) -> None:
        """Metrics, recent detections and alerts for a committed batch (``live``: from
        the tail or the capture, whose delay since the connection ended is measured)."""
        m = self.metrics
        self._sync_tail_counters()
        m.flows.labels(source).inc(len(records))
        m.batch_size.observe(len(records))
        if live:
            now = time.time()
            for rec in records:
                m.detection_delay.observe(max(0.0, now - rec.ts - (rec.duration or 0.0)))
        if verdicts is None:
            return
        threshold = self._threshold if self._threshold is not None else DEFAULT_ALERT_THRESHOLD
        labels: collections.Counter[str] = collections.Counter()
        alerts: list[RecentDetection] = []
        for rec, (label, score) in zip(records, verdicts):
            labels[label] += 1
            if score >= threshold:
                det = RecentDetection(rec.ts, source, rec.uid, rec.orig_h, rec.resp_h, rec.resp_p,
                                      rec.proto, label, round(float(score), 4))
                alerts.append(det)
        for label, n in labels.items():
            m.detections.labels(label).inc(n)
        if self._hotswap is not None:
            self._hotswap.observe(len(records), len(alerts))
        self.recent.extend(alerts)
        if alerts and self.config.inference.alerts:
            m.alerts.inc(len(alerts))
            if self.alert_queue is not None:
                self.alert_queue.put(self.classifier.model_version if self.classifier else "none", alerts)
        if self.escalator is not None:
            self.escalator.offer(source, records, verdicts,
                                 self.classifier.model_version if self.classifier else "none")

    # ------------------------------------------------------------ status
    def _link_figures(self) -> dict:
        self._sync_tail_counters()
        figures: dict[str, Any] = {}
        if self.link is not None:
            self.metrics.mqtt_connected.set(1 if self.link.connected else 0)
        if self.fl_client is not None:
            c = self.fl_client.counters
            figures.update(fl_uploads=c.uploads, fl_upload_bytes=c.bytes_up, fl_globals_loaded=c.globals_loaded,
                           fl_global_version=-1 if self.fl_client.version is None else self.fl_client.version,
                           fl_rejected=dict(c.rejected))
        if self.outbox is not None:
            try:
                figures["outbox_pending"] = self.outbox.pending()
            except SQLAlchemyError:
                figures["outbox_pending"] = None
        if self.config.source.zeek_log and self.sessions is not None:
            figures["tail_backlog_bytes"] = self._tail_backlog()
        return figures

    def _tail_backlog(self) -> int | None:
        """Bytes of the current conn.log past the committed position (is the tail keeping up?)."""
        path = self.config.source.zeek_log
        try:
            st = os.stat(path)
            with self.sessions() as session:
                saved = repository.load_offset(session, ingest.default_source(path))
        except (OSError, SQLAlchemyError):
            return None
        if saved is None or saved.file_identity != f"{st.st_dev}:{st.st_ino}":
            return st.st_size  # nothing of this file committed yet (new or rotated)
        return max(0, st.st_size - saved.offset)

    def _inference_figures(self) -> dict | None:
        """Precision and the execution provider that really ran the model (None without
        an engine that can say)."""
        describe = getattr(self.classifier.inner if self.classifier else None, "describe", None)
        if not callable(describe):
            return None
        d = describe()
        return {k: d.get(k) for k in ("precision", "provider_ran", "providers", "io_binding", "max_batch")}

    def status_summary(self) -> dict:
        """The compact figures published on the retained status topic."""
        m = self.metrics
        return {
            "state": "online" if self.state in ("running", "degraded") else self.state,
            "model_version": self.classifier.model_version if self.classifier else None,
            "flows": int(sum(m.by_label("fedgate_gw_flows_total", "source").values())),
            "detections_by_label": {k: int(v) for k, v in m.by_label("fedgate_gw_detections_total", "label").items()},
            "alerts": int(m.value("fedgate_gw_alerts_total")),
            "deploy": self._hotswap.status() if self._hotswap is not None else None,
        }

    def status(self) -> dict:
        """Everything the status page shows (``/api/status``)."""
        m = self.metrics
        figures = self._link_figures()
        now = time.time()
        fl = None
        if self.fl_client is not None:
            own = self.status_summary()
            fl = {k: v for k, v in self.fl_client.status().items() if k not in own} \
                | {"state": self.fl_client.state.value}
        return {
            "gateway": self.config.gateway.id,
            "state": self.state,
            "now": now,
            "uptime_s": None if self.started_at is None else round(now - self.started_at, 1),
            "model_version": self.classifier.model_version if self.classifier else None,
            "inference": self._inference_figures(),
            "alert_threshold": self._threshold,
            "mqtt_connected": bool(self.link is not None and self.link.connected),
            "sources": {
                "zeek_log": self.config.source.zeek_log, "pcap_dir": self.config.source.pcap_dir,
                "interface": self.config.source.interface,
            },
            "flows_by_source": {k: int(v) for k, v in m.by_label("fedgate_gw_flows_total", "source").items()},
            "flows": int(sum(m.by_label("fedgate_gw_flows_total", "source").values())),
            "detections_by_label": {k: int(v) for k, v in m.by_label("fedgate_gw_detections_total", "label").items()},
            "alerts": int(m.value("fedgate_gw_alerts_total")),
            "store_errors": int(m.value("fedgate_gw_store_errors_total")),
            "inference_batches": int(m.value("fedgate_gw_inference_seconds_count")),
            "inference_seconds_sum": m.value("fedgate_gw_inference_seconds_sum"),
            "outbox_pending": figures.get("outbox_pending"),
            "tail_backlog_bytes": figures.get("tail_backlog_bytes"),
            "recent_detections": [vars(d) for d in list(self.recent)[-50:]][::-1],
            "fl": fl,
            "escalation": self.escalator.status() if self.escalator is not None else None,
            "deploy": self._hotswap.status() if self._hotswap is not None else None,
            "errors": list(self.errors),
        }


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def run(config: GatewayConfig, *, stop: threading.Event | None = None,
        classifier: ingest.FlowClassifier | None = None) -> GatewayService:
    """Run the gateway until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT)."""
    stop = stop or threading.Event()
    service = GatewayService(config, classifier=classifier).start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        service.stop()
    return service
