"""The running aggregator: intake, pool, strategy, evaluation, signing, broadcast.

Threads: paho's network thread only enqueues (``gateway.mqtt``); one worker thread
(``_run``) does everything else in order: validate -> store -> acknowledge each update,
track gateway status, reassemble chunks, decide with the strategy, aggregate, evaluate,
checkpoint, sign and publish.  Every durable step is one SQL transaction, committed
before the matching acknowledgement or publish, so a kill -9 at any point restarts
from the same global version with no acknowledged update lost (the broker redelivers
what was not acknowledged; replays of what was stored are recognised and not counted
twice).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as st_numpy
from sqlalchemy.exc import IntegrityError, OperationalError

from cloud_aggregator import gate as gates
from cloud_aggregator import store
from cloud_aggregator.link import AggregatorLink, ConnectionChanged
from cloud_aggregator.pool import PooledUpdate, UpdatePool, parse_status
from cloud_aggregator.safety import GateSettings, RobustSettings
from cloud_aggregator.strategies import Strategy, StrategyState, build_strategy
from cloud_aggregator.strategies import aggregate as agg_math
from gateway.fl.control import Control, LocalSettings, encode_control
from gateway.mqtt import Inbound, MqttSettings, TlsSettings
from gateway.protocol import chunking, signing, topics
from gateway.protocol.envelope import Envelope, Kind, decode_header, encode_global
from gateway.protocol.errors import EnvelopeError, RejectReason, Rejection
from gateway.protocol.validation import ValidationPolicy, size_limits, spec_of, validate_envelope

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
Evaluator = Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    """Aggregator settings (TOML sections [aggregator], [mqtt], [strategy], [strategy.robust],
    [strategy.dp], [local]); defaults in brackets.

    database ["aggregator.db"]: SQLite file or any SQLAlchemy URL.
    sqlite_synchronous ["NORMAL"]: "NORMAL" keeps acknowledged updates through a crash of
      the process; "FULL" (one fsync per intake transaction) through a power cut too.
    aggregator_id ["aggregator"]: sender id of global models; MQTT client id.
    prefix ["fedgate/v1"]: topic prefix.
    initial_model [the bundled model's model.safetensors]: the version-0 weights, read
      on the first start (an empty store) only.
    signing_key [None]: Ed25519 private key file (``fedgate-aggregator keygen PATH``);
      a path that does not exist refuses to start (a new key made silently would cut
      every gateway off, or hand the model to whoever placed the file).  None publishes
      unsigned models (development only).
    strategy ["gsfs"], strategy_params [{}], dp [None], seed [0].
    robust [RobustSettings()]: robust aggregation and the aggregate check, on by default
      (:class:`cloud_aggregator.safety.RobustSettings`; a mapping is read as its TOML table).
    gate [GateSettings()]: the deployment gate (``[gate]``): with ``validation_log`` and
      ``model_dir`` every candidate is scored before it is published
      (:class:`cloud_aggregator.safety.GateSettings`; or hand the service a scorer).
    max_staleness [10]: updates based more than this many versions back are refused.
    known_senders [None]: accepted gateway ids (None: any well-formed id).
    max_update_bytes [None]: largest update envelope accepted; None derives it from the
      model (:func:`gateway.protocol.validation.size_limits`: at most twice the model's
      float32 size decompressed, plus a little), so the bound follows the model.
    max_update_norm_ratio [100]: an update whose L2 norm is beyond this multiple of the
      global weights' norm is refused at intake (reason ``norm``): no honest delta is
      a hundred models long, and it keeps absurd values out of the pool and the rounds.
    chunk_sets_per_gateway [2]: chunked updates one gateway may have in reassembly at
      once (its own oldest is dropped beyond it).
    chunk_bytes [1_000_000]: global models above this travel in chunks (0: never).
    chunk_timeout_s [120]: incomplete chunked updates are dropped after this long.
    tick_s [0.2]: how often the worker checks deadlines when idle.
    checkpoints_kept [5]: old checkpoints pruned beyond this many.
    intake_batch [64]: most messages stored in one transaction (then acknowledged).
    decode_threads [2]: threads validating the update envelopes of a batch (1: inline).
    evaluator [None]: "module:factory"; factory(**evaluator_args) returns a callable
      weights -> metrics (the central validation set), e.g.
      "cloud_aggregator.experiment:CentralEvaluator" with model_dir and test_log.
    evaluator_args [{}]: keyword arguments of the factory (paths relative to the TOML).
    local [{}]: local-training settings published on the control topic.
    mqtt: broker connection (:class:`gateway.mqtt.MqttSettings`).
    """

    database: str = "aggregator.db"
    sqlite_synchronous: str = "NORMAL"
    aggregator_id: str = "aggregator"
    prefix: str = topics.DEFAULT_PREFIX
    initial_model: str | None = field(default_factory=lambda: _bundled_weights())
    signing_key: str | None = None
    strategy: str = "gsfs"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    robust: RobustSettings = field(default_factory=RobustSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    dp: Mapping[str, Any] | None = None
    seed: int = 0
    max_staleness: int | None = 10
    known_senders: frozenset[str] | None = None
    max_update_bytes: int | None = None
    max_update_norm_ratio: float = 100.0
    chunk_sets_per_gateway: int = 2
    chunk_bytes: int = 1_000_000
    chunk_timeout_s: float = 120.0
    tick_s: float = 0.2
    checkpoints_kept: int = 5
    intake_batch: int = 64
    decode_threads: int = 2
    evaluator: str | None = None
    evaluator_args: Mapping[str, Any] = field(default_factory=dict)
    local: Mapping[str, Any] = field(default_factory=dict)
    mqtt: MqttSettings = field(default_factory=lambda: MqttSettings(client_id="fedgate-aggregator"))

    def __post_init__(self) -> None:
        topics.check_prefix(self.prefix)
        topics.check_gateway_id(self.aggregator_id)
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")
        if self.chunk_bytes and self.chunk_bytes < 1024:
            raise ValueError("chunk_bytes must be 0 or at least 1024")
        if (self.max_update_bytes is not None and self.max_update_bytes < 1024) or self.chunk_timeout_s <= 0 \
                or self.tick_s <= 0:
            raise ValueError("max_update_bytes >= 1024, chunk_timeout_s > 0 and tick_s > 0 required")
        if not (isinstance(self.max_update_norm_ratio, (int, float)) and math.isfinite(self.max_update_norm_ratio)
                and self.max_update_norm_ratio > 0):
            raise ValueError("max_update_norm_ratio must be a positive number")
        if not 1 <= self.chunk_sets_per_gateway <= 64:
            raise ValueError("chunk_sets_per_gateway must be in 1..64")
        if self.checkpoints_kept < 1 or self.intake_batch < 1 or self.decode_threads < 1:
            raise ValueError("checkpoints_kept, intake_batch and decode_threads must be >= 1")
        if self.sqlite_synchronous not in store.SQLITE_SYNCHRONOUS:
            raise ValueError(f"sqlite_synchronous must be one of {store.SQLITE_SYNCHRONOUS}")
        if self.known_senders is not None:
            object.__setattr__(self, "known_senders", frozenset(topics.check_gateway_id(s) for s in self.known_senders))
        if not isinstance(self.robust, RobustSettings):
            if self.robust is None:
                raise TypeError("robust: give RobustSettings (RobustSettings.off() turns the defences off)")
            object.__setattr__(self, "robust", RobustSettings.from_mapping(self.robust))
        if not isinstance(self.gate, GateSettings):
            object.__setattr__(self, "gate", GateSettings.from_mapping(self.gate))
        LocalSettings(**dict(self.local))  # validates names
        build_strategy(self.strategy, params=self.strategy_params, robust=self.robust, dp=self.dp)

    def build_strategy(self) -> Strategy:
        return build_strategy(self.strategy, params=self.strategy_params, robust=self.robust, dp=self.dp,
                              seed=self.seed)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "AggregatorConfig":
        from gateway.config import resolve_database, resolve_path

        path = Path(path)
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        unknown = set(doc) - {"aggregator", "mqtt", "strategy", "local", "gate"}
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
        agg = dict(doc.get("aggregator", {}))
        strat = dict(doc.get("strategy", {}))
        mq = dict(doc.get("mqtt", {}))
        base = path.resolve().parent

        def rel(p: str | None) -> str | None:  # relative to the file, as the gateway's config
            return None if p is None else resolve_path(p, base)

        tls = None
        if mq.get("ca_file"):
            tls = TlsSettings(ca_file=rel(mq.pop("ca_file")), cert_file=rel(mq.pop("cert_file", None)),
                              key_file=rel(mq.pop("key_file", None)),
                              check_hostname=mq.pop("check_hostname", True))
        mq.setdefault("client_id", agg.get("aggregator_id", "aggregator"))
        mqtt = MqttSettings(tls=tls, **mq)
        for key in ("initial_model", "signing_key"):
            if agg.get(key):
                agg[key] = rel(agg[key])
        if agg.get("evaluator_args"):
            agg["evaluator_args"] = {k: (rel(v) if isinstance(v, str) and k.endswith(("_dir", "_log", "_path", "_file"))
                                         else v) for k, v in agg["evaluator_args"].items()}
        if agg.get("database"):
            agg["database"] = resolve_database(agg["database"], base)
        if "known_senders" in agg:
            agg["known_senders"] = frozenset(agg["known_senders"]) if agg["known_senders"] else None
        name = strat.pop("name", "gsfs")
        robust = RobustSettings.from_mapping(strat.pop("robust", None))
        dp = strat.pop("dp", None)
        gate = dict(doc.get("gate", {}))
        for key in ("validation_log", "model_dir"):
            if isinstance(gate.get(key), str):
                gate[key] = rel(gate[key])
        return cls(strategy=name, strategy_params=strat, robust=robust, gate=GateSettings.from_mapping(gate), dp=dp,
                   local=doc.get("local", {}), mqtt=mqtt, **agg)


def _bundled_weights() -> str:
    from gateway.model.modeldir import WEIGHTS, bundled_model_dir

    return str(bundled_model_dir() / WEIGHTS)


def load_evaluator(spec: str | None, args: Mapping[str, Any] | None = None) -> Evaluator | None:
    """``"package.module:factory"`` -> factory(**args), a callable weights -> metrics.

    For the central validation set of the model the gateways run::

        evaluator = "cloud_aggregator.experiment:CentralEvaluator"
        evaluator_args = { model_dir = "models/default", test_log = "data/val/conn.log.labeled" }
    """
    if not spec:
        return None
    module, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"evaluator {spec!r} must look like 'package.module:factory'")
    return getattr(importlib.import_module(module), attr)(**dict(args or {}))


class SigningKeyMissing(ValueError):
    """The configured model-signing key file does not exist."""


def load_signing_key(path: str | None) -> signing.Ed25519PrivateKey | None:
    """The aggregator's model-signing key; :class:`SigningKeyMissing` when the file is
    not there -- it is never created here."""
    if path is None:
        return None
    if not os.path.exists(path):
        raise SigningKeyMissing(f"aggregator.signing_key {path} does not exist: create it once with "
                                f"`fedgate-aggregator keygen {path}` and give the gateways {path}.pub")
    return signing.load_private_key(path)


@dataclass
class _Batch:
    """One intake transaction: the rows it writes at the end (one statement per table,
    not three per update) and the counter changes applied after it commits."""

    accepted: int = 0
    rejections: Counter = field(default_factory=Counter)
    pooled: list[tuple[PooledUpdate, bytes]] = field(default_factory=list)  # (update, envelope), arrival order
    clients: set[str] = field(default_factory=set)  # senders whose client row changed


@dataclass(frozen=True)
class _Arrived:
    """An update as the network thread enqueued it, its validation already started."""

    msg: Inbound
    decoded: Future


class _Qos0Refused:
    """Enqueued (at most one at a time) when QoS 0 messages were refused: the worker
    takes the counts and records them."""


class _DecodingInbox(queue.Queue):
    """The worker's queue.  An update put in it (by paho's network thread) starts its
    validation on the decode threads at once, so decoding overlaps the worker's SQL and
    commit of the batch before (hashing, zstd and sqlite release the GIL) instead of
    starting when its own batch does -- at most ``ahead`` of them at a time (the rest
    are validated inline by the worker), so the decoded tensors waiting in memory stay
    bounded whatever arrives.

    QoS 1 messages are bounded by MQTT flow control (the broker sends at most its
    in-flight limit of unacknowledged ones); QoS 0 messages are not, so they are refused
    here, before they take any room: their payload is dropped, only a count per sender
    is kept (:meth:`take_qos0`) and one marker queued for the worker."""

    MAX_QOS0_SENDERS = 256  # beyond this, refused QoS 0 messages are counted under "?"

    def __init__(self, start: Callable[[Inbound], Future | None], *, ahead: int):
        super().__init__()
        self._start = start
        self.ahead = ahead
        self._lock = threading.Lock()
        self._decoding = 0
        self._qos0: Counter[str] = Counter()

    def put(self, item, block=True, timeout=None):  # noqa: ANN001 - queue.Queue's signature
        if isinstance(item, Inbound):
            if item.qos == 0:
                self._refuse_qos0(item)
                return
            decoded = self._start_bounded(item)
            if decoded is not None:
                item = _Arrived(item, decoded)
        super().put(item, block, timeout)

    def _start_bounded(self, item: Inbound) -> Future | None:
        with self._lock:
            if self._decoding >= self.ahead:
                return None
            self._decoding += 1
        decoded = self._start(item)
        if decoded is None:
            with self._lock:
                self._decoding -= 1
        return decoded

    def _get(self):  # noqa: ANN202 - queue.Queue's hook, called under its mutex by get()
        item = super()._get()
        if isinstance(item, _Arrived):  # its decoded tensors leave the queue with it
            with self._lock:
                self._decoding -= 1
        return item

    @property
    def decoding(self) -> int:
        """Decoded (or decoding) updates waiting in the queue, at most ``ahead``."""
        return self._decoding

    def _refuse_qos0(self, item: Inbound) -> None:
        parts = item.topic.split("/")
        sender = parts[-2] if len(parts) >= 2 else "?"
        with self._lock:
            if sender not in self._qos0 and len(self._qos0) >= self.MAX_QOS0_SENDERS:
                sender = "?"
            first = not self._qos0
            self._qos0[sender] += 1
        if first:
            super().put(_Qos0Refused())

    def take_qos0(self) -> Counter[str]:
        with self._lock:
            taken, self._qos0 = self._qos0, Counter()
        return taken


# validation verdicts that depend on the pool as it was when validation ran
_POOL_DEPENDENT = frozenset({RejectReason.REPLAY, RejectReason.UNKNOWN_BASE, RejectReason.STALE_BASE})


class AggregatorService:
    """Owns the store, the pool, the strategy and the MQTT link.

    initial_weights: version-0 weights when the store is empty (else config.initial_model).
    evaluator: callable weights -> metrics for the central validation set (optional;
      reported with each version, decides nothing).
    gate_scorer: callable weights -> metrics (accuracy, f1, macro_f1) on the deployment
      gate's labelled validation flows; overrides ``config.gate``'s validation_log (the
      experiment passes flows disjoint from its test parts).  None and no
      validation_log: no gate (the aggregate check still runs).
    clock: seconds (``time.time``); injected so tests can drive deadlines.
    """

    def __init__(self, config: AggregatorConfig, *, initial_weights: Mapping[str, np.ndarray] | None = None,
                 evaluator: Evaluator | None = None, signing_key: signing.Ed25519PrivateKey | None = None,
                 gate_scorer: gates.Scorer | None = None, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self.strategy = config.build_strategy()
        self.evaluator = (evaluator if evaluator is not None
                          else load_evaluator(config.evaluator, config.evaluator_args))
        self.gate_scorer = (gate_scorer if gate_scorer is not None or not config.gate.enabled
                            else gates.build_scorer(config.gate))
        if not config.gate.enabled:
            self.gate_scorer = None
        self.refused: Counter[str] = Counter()  # candidates not published, by reason
        self.gate_passed = 0
        self._current_scores: dict[str, float] | None = None  # the gate's score of the current global
        self._recent_steps: list[float] = []  # step norms of the last published versions
        self.signing_key = signing_key if signing_key is not None else load_signing_key(config.signing_key)
        self.sessions = store.make_sessions(config.database, synchronous=config.sqlite_synchronous,
                                            wal_autocheckpoint=store.WalCheckpointer.BACKSTOP_PAGES)
        engine = self.sessions.kw["bind"]
        self._checkpointer = store.WalCheckpointer(engine) if engine.dialect.name == "sqlite" else None
        self.pool = UpdatePool(clock=clock)
        self.reassembler: chunking.Reassembler  # made by _load once the model is known (its size bounds)
        self.max_update_bytes = self.max_decoded_bytes = 0
        self.rng = np.random.default_rng(config.seed)
        self.inbox: queue.Queue = _DecodingInbox(self._start_decode, ahead=2 * config.intake_batch)
        self.link = AggregatorLink(config.mqtt, prefix=config.prefix, inbox=self.inbox)
        self.rejections: Counter[str] = Counter()
        self.accepted = 0
        self.weights: Tensors = {}
        self.state = StrategyState()
        self.global_envelope: bytes = b""
        self.global_parts = 1
        self._last_round_end = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()
        self._decoder = (ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="decode")
                         if config.decode_threads > 1 else None)
        self._load(initial_weights)

    # ------------------------------------------------------------------ state
    def _load(self, initial_weights: Mapping[str, np.ndarray] | None) -> None:
        with self.sessions.begin() as s:
            row = store.ensure_state(s, strategy=self.strategy.name)
            ckpt = store.latest_checkpoint(s)
            if ckpt is None:
                if initial_weights is None and self.config.initial_model:
                    initial_weights = st_numpy.load_file(self.config.initial_model)
                if initial_weights is None:
                    raise ValueError("empty aggregator store: give initial weights (initial_model)")
                self.weights = {k: np.asarray(v) for k, v in initial_weights.items()}
                self.state = StrategyState()
                self.global_envelope = self._encode_global(version=0, base_version=0, metrics={})
                arrays, meta = self.state.to_tensors()
                store.save_checkpoint(s, version=0, weights=self.weights, state_arrays=arrays, state_meta=meta,
                                      envelope=self.global_envelope, keep=self.config.checkpoints_kept)
                row.version = 0
            else:
                self.weights = store.unpack_tensors(ckpt.weights)
                self.state = StrategyState.from_tensors(store.unpack_tensors(ckpt.state), ckpt.state_meta or {})
                self.global_envelope = ckpt.envelope or b""
                if row.version != ckpt.version:
                    log.warning("state row says version %s, newest checkpoint %s; using the checkpoint",
                                row.version, ckpt.version)
                    row.version = ckpt.version
            if row.strategy != self.strategy.name:
                log.warning("store was used with strategy %r, now %r", row.strategy, self.strategy.name)
                row.strategy = self.strategy.name
            self.update_spec = spec_of(self.weights, floating_only=True)
            wire, decoded = size_limits(self.update_spec, kind=Kind.UPDATE)
            self.max_update_bytes = self.config.max_update_bytes or wire
            self.max_decoded_bytes = max(decoded, self.max_update_bytes) if self.config.max_update_bytes else decoded
            self.weights_norm = agg_math.global_norm({k: self.weights[k] for k in self.update_spec})
            self.reassembler = self._new_reassembler()
            self._restore_runtime(s, row)
        if self.gate_scorer is not None:
            self._current_scores = self._score(self.weights)
        log.info("aggregator at version %s with %s pooled updates", self.pool.version, len(self.pool))

    def _new_reassembler(self) -> chunking.Reassembler:
        # at most 64 sets in reassembly, a few per gateway, each no larger than an update
        # of this model: memory stays below 64 x max_update_bytes whatever arrives
        return chunking.Reassembler(clock=self.clock, timeout_s=self.config.chunk_timeout_s,
                                    max_per_source=self.config.chunk_sets_per_gateway,
                                    max_message_bytes=self.max_update_bytes)

    def _reload(self) -> None:
        """Rebuild pool, reassembler and counters from the store (after a failed commit)."""
        self.pool = UpdatePool(clock=self.clock, replay_window=self.pool.replay_window)
        self.reassembler = self._new_reassembler()
        self.rejections = Counter()
        with self.sessions.begin() as s:
            self._restore_runtime(s, store.get_state(s))

    def _restore_runtime(self, s, row) -> None:
        """Pool, chunks in reassembly and counters as the store has them."""
        self.global_parts = row.global_parts
        self.pool.restore(version=row.version, updates=store.load_pool(s), clients=store.load_clients(s),
                          seen=store.load_seen(s, limit=self.pool.replay_window), round_number=row.round,
                          selected=row.selected or (), round_opened_at=row.round_opened_at)
        recent = store.rounds(s, limit=self.config.robust.step_history)
        self._last_round_end = recent[-1].finished_at if recent else 0.0
        self._recent_steps = [float(r.info["step_norm"]) for r in recent
                              if isinstance((r.info or {}).get("step_norm"), (int, float))]
        self.refused = Counter(store.refusal_counts(s))
        self.gate_passed = row.gate_passed
        self._restore_chunks(s)
        for reason, n in store.rejection_counts(s).items():
            self.rejections[reason] = n
        self.accepted = store.accepted_total(s)

    def _restore_chunks(self, s) -> None:
        """Chunks in reassembly as the store has them, within the reassembler's bounds:
        expired ones and those of unknown senders are deleted first, the rest streamed
        in (never all rows in memory at once); what the bounds refuse is deleted."""
        gone = store.purge_chunks(s, older_than=self.clock() - self.config.chunk_timeout_s,
                                  senders=self.config.known_senders)
        unreadable: set[tuple[str, str]] = set()

        def chunks():
            for sender, message_id, frame, first_seen in store.iter_chunks(s):
                try:
                    yield sender, chunking.parse_chunk(frame), first_seen
                except EnvelopeError:  # cannot happen for frames we stored; never fatal
                    unreadable.add((sender, message_id))

        dropped = self.reassembler.restore(chunks()) | unreadable
        for sender, message_id in dropped:
            store.drop_chunks(s, sender, message_id)
        if gone or dropped:
            log.warning("restart: %s stored chunks expired or of unknown senders and %s chunked messages beyond "
                        "the reassembly bounds deleted", gone, len(dropped))

    @property
    def version(self) -> int:
        return self.pool.version

    def _encode_global(self, *, version: int, base_version: int, metrics: Mapping[str, float],
                       weights: Mapping[str, np.ndarray] | None = None) -> bytes:
        return encode_global(self.weights if weights is None else weights, sender=self.config.aggregator_id,
                             version=version,
                             base_version=base_version, round=self.pool.round, metrics=metrics,
                             signing_key=self.signing_key)

    def _control_bytes(self) -> bytes:
        settings = self.strategy.control()
        return encode_control(Control(
            strategy=settings["strategy"], version=self.pool.version,
            round=self.pool.round if self.strategy.synchronous else 0,
            selected=self.pool.selected if self.strategy.synchronous and self.pool.round_opened_at else None,
            local=LocalSettings(**dict(self.config.local)), trigger=settings.get("trigger", {}),
            refused=sum(self.refused.values())), signing_key=self.signing_key)

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, connect: bool = True) -> "AggregatorService":
        """Start the worker thread, and the MQTT link unless ``connect`` is False (a
        benchmark or test then feeds ``inbox`` itself)."""
        if connect:
            self.link.start()
        self._thread = threading.Thread(target=self._run, name="aggregator-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.link.stop()
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)
        if self._checkpointer is not None:
            self._checkpointer.stop()

    def _committed(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.poke()

    def wait_connected(self, timeout: float) -> bool:
        return self.link.mqtt.wait_connected(timeout)

    def wait_for(self, predicate: Callable[["AggregatorService"], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (checked after every change) or timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.2))
        return True

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                items = [self.inbox.get(timeout=self.config.tick_s)]
            except queue.Empty:
                items = []
            while items and len(items) < self.config.intake_batch:
                try:  # whatever else is already waiting goes into the same transaction
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                if any(isinstance(i, ConnectionChanged) and i.up for i in items):
                    self._publish_current()
                messages: list[Inbound] = []
                decoded: dict[int, Future] = {}
                refused_qos0 = False
                for item in items:
                    if isinstance(item, _Arrived):
                        decoded[len(messages)] = item.decoded
                        item = item.msg
                    if isinstance(item, Inbound):
                        messages.append(item)
                    refused_qos0 |= isinstance(item, _Qos0Refused)
                if refused_qos0:
                    self._count_qos0(self.inbox.take_qos0())
                if messages:
                    self._handle_batch(messages, decoded)
                self.tick()
            except Exception:  # keep running: log, and the next message gets its chance
                log.exception("aggregator worker error")
            self._notify()

    # ------------------------------------------------------------------ intake
    def handle_batch(self, messages: list[Inbound]) -> list[Inbound]:
        """Store what ``messages`` carry in ONE transaction (group commit), then
        acknowledge them all; returns the messages that could not be stored.

        If that commit fails, nothing of it is acknowledged, the in-memory pool is
        rebuilt from the store (memory never runs ahead of disk) and the messages are
        stored one transaction each, so one bad row cannot hold back the others.  A
        message that fails on its own stays unacknowledged: the broker redelivers it.
        """
        return self._handle_batch(messages, self._decode_ahead(messages))

    def _handle_batch(self, messages: list[Inbound], decoded: dict[int, Future]) -> list[Inbound]:
        try:
            self._store_batch(messages, decoded)
            return []
        except Exception:
            log.exception("storing %s messages in one transaction failed; reloading state from the store%s",
                          len(messages), "" if len(messages) == 1 else " and storing them one by one")
            self._reload()
        if len(messages) == 1:
            return list(messages)
        failed = []
        for msg in messages:
            try:
                self._store_batch([msg], {})
            except Exception as exc:
                self._reload()
                if isinstance(exc, IntegrityError) and self._refuse_old_replay(msg):
                    continue
                log.exception("message on %s not stored (left unacknowledged: the broker redelivers it)",
                              msg.topic[:120])
                failed.append(msg)
        return failed

    def _refuse_old_replay(self, msg: Inbound) -> bool:
        """An update accepted so long ago that the pool's replay window forgot it passes
        the pool, and its replay key then collides in the store: count it as the replay
        it is and acknowledge it, instead of leaving it unacknowledged for ever."""
        if not msg.topic.endswith("/update") or chunking.is_chunk(msg.payload):
            return False
        try:
            header, _ = decode_header(msg.payload)
        except EnvelopeError:
            return False
        batch = _Batch()
        with self.sessions.begin() as s:
            if not store.was_seen(s, header.sender, header.message_id):
                return False
            self._reject(header.sender, Rejection(RejectReason.REPLAY, f"{header.sender}/{header.message_id} "
                                                  "accepted before (beyond the replay window in memory)"), s, batch)
        self.rejections.update(batch.rejections)
        self.link.ack(msg)
        return True

    def _store_batch(self, messages: list[Inbound], decoded: dict[int, Future]) -> None:
        batch = _Batch()
        with self.sessions.begin() as s:
            for i, msg in enumerate(messages):
                self._handle_one(msg, s, batch, decoded.get(i))
            store.store_updates(s, batch.pooled, {c: self.pool.clients[c] for c in batch.clients})
        # committed: only now are the counters moved on and the messages acknowledged
        self.rejections.update(batch.rejections)
        self.accepted += batch.accepted
        for msg in messages:
            self.link.ack(msg)
        self._committed()

    def _decode_ahead(self, messages: list[Inbound]) -> dict[int, Future]:
        """Validate the whole update envelopes of a batch on the decode threads; the
        results are then used in message order (see :meth:`_recheck`)."""
        if len(messages) < 2:
            return {}
        ahead = {i: self._start_decode(msg) for i, msg in enumerate(messages)}
        return {i: f for i, f in ahead.items() if f is not None}

    def _start_decode(self, msg: Inbound) -> Future | None:
        """Start validating a whole update envelope on a decode thread (None: it is
        something else, or there are no decode threads; the worker handles it inline).
        Runs on paho's network thread too: it only reads the pool."""
        if self._decoder is None or not msg.topic.endswith("/update") or chunking.is_chunk(msg.payload):
            return None
        try:
            sender, _ = topics.parse_gateway_topic(msg.topic, self.config.prefix)
            return self._decoder.submit(validate_envelope, msg.payload, self.policy(sender))
        except (topics.TopicError, RuntimeError):  # not a gateway id (the worker rejects it); shut down
            return None

    def _recheck(self, result: Envelope | Rejection) -> Envelope | Rejection | None:
        """A verdict reached ahead of the worker saw the pool as it was then.  Staleness
        is decided again against the current version; a replay or version rejection is
        redone inline (None), since a commit that failed since may have rolled the pool
        back.  A replay accepted ahead is still caught when the pool is offered it."""
        if isinstance(result, Rejection):
            return None if result.reason in _POOL_DEPENDENT else result
        limit, base = self.config.max_staleness, result.header.base_version
        if limit is not None and self.pool.version - base > limit:
            return Rejection(RejectReason.STALE_BASE, f"base {base} is {self.pool.version - base} versions old "
                                                      f"(max {limit})")
        return result

    def handle(self, msg: Inbound) -> None:
        """One received message (status or update, whole or chunk); acks after storing."""
        self.handle_batch([msg])

    def _count_qos0(self, refused: Mapping[str, int]) -> None:
        """Record QoS 0 messages the inbox refused unread (one transaction)."""
        if not refused:
            return
        batch = _Batch()
        with self.sessions.begin() as s:
            for sender, n in refused.items():
                store.count_rejection(s, RejectReason.QOS0.value, f"{n} message(s) at QoS 0 (updates and statuses "
                                                                  "need QoS 1)", sender, n=n)
                batch.rejections[RejectReason.QOS0.value] += n
        self.rejections.update(batch.rejections)
        log.warning("refused %s QoS 0 messages from %s", sum(refused.values()), sorted(refused)[:10])

    def _handle_one(self, msg: Inbound, s, batch: "_Batch", decoded: Future | None = None) -> None:
        if msg.qos == 0:  # no flow control, no acknowledgement: never taken in
            self._reject(msg.topic.split("/")[-2] if msg.topic.count("/") else "?",
                         Rejection(RejectReason.QOS0, "updates and statuses need QoS 1"), s, batch)
            return
        try:
            sender, kind = topics.parse_gateway_topic(msg.topic, self.config.prefix)
        except topics.TopicError:
            if msg.topic.endswith("/update"):  # '+' matched a level that is no gateway id
                self._reject("?", Rejection(RejectReason.UNKNOWN_SENDER, f"topic {msg.topic[:120]!r}"), s, batch)
            return
        if kind == "status":
            if self.config.known_senders is not None and sender not in self.config.known_senders:
                log.warning("status of unknown gateway %s ignored (it does not count towards N)", sender)
                return
            parsed = parse_status(msg.payload)
            if isinstance(parsed, Rejection):  # counted; the gateway's last good status stands
                self._reject(sender, parsed, s, batch)
                return
            online, status = parsed
            self.pool.set_status(sender, online, status)
            batch.clients.add(sender)  # written with the batch (its newest state)
            log.info("gateway %s is %s", sender, "online" if online else "offline")
        elif kind == "update":
            if chunking.is_chunk(msg.payload):
                self._handle_chunk(sender, msg, s, batch)
            else:
                self._intake(sender, msg.payload, s, batch, decoded.result() if decoded else None)

    def _handle_chunk(self, sender: str, msg: Inbound, s, batch: "_Batch") -> None:
        if self.config.known_senders is not None and sender not in self.config.known_senders:
            # refused before anything is stored: an unknown id cannot fill the chunk table
            self._reject(sender, Rejection(RejectReason.UNKNOWN_SENDER, f"chunk from unknown gateway {sender!r}"),
                         s, batch)
            return
        try:
            chunk = chunking.parse_chunk(msg.payload)
        except EnvelopeError as exc:
            self._reject(sender, exc.as_rejection(), s, batch)
            return
        try:
            whole, evicted = self.reassembler.add(chunk, source=sender)
        except EnvelopeError as exc:  # the chunk set failed (size, digest, disagreement): its rows go
            store.drop_chunks(s, sender, chunk.message_id)
            self._reject(sender, exc.as_rejection(), s, batch)
            return
        for gone in evicted:
            self._expired(gone, s, batch)
        if whole is None:
            store.save_chunk(s, sender=sender, message_id=chunk.message_id, index=chunk.index,
                             frame=msg.payload, first_seen=self.clock())
            return
        store.drop_chunks(s, sender, chunk.message_id)
        self._intake(sender, whole, s, batch)

    def _expired(self, gone: chunking.Expired, s, batch: "_Batch") -> None:
        store.drop_chunks(s, gone.source, gone.message_id)
        self._reject(gone.source, Rejection(RejectReason.INCOMPLETE_CHUNK,
                                            f"message {gone.message_id}: {gone.have}/{gone.count} chunks"), s, batch)

    def policy(self, sender: str | None = None) -> ValidationPolicy:
        return ValidationPolicy(kind=Kind.UPDATE, expected=self.update_spec, known_senders=self.config.known_senders,
                                topic_sender=sender, max_bytes=self.max_update_bytes,
                                max_decoded_bytes=self.max_decoded_bytes,
                                current_version=self.pool.version, max_staleness=self.config.max_staleness,
                                is_replay=self.pool.is_replay)

    def _intake(self, sender: str, data: bytes, s, batch: "_Batch", result: Envelope | Rejection | None = None) -> None:
        if result is not None:
            result = self._recheck(result)
        if result is None:
            result = validate_envelope(data, self.policy(sender))
        if isinstance(result, Rejection):
            self._reject(sender, result, s, batch)
            return
        norm = agg_math.global_norm(result.tensors)
        limit = self.config.max_update_norm_ratio * max(self.weights_norm, 1.0)
        if not math.isfinite(norm) or norm > limit:
            self._reject(sender, Rejection(RejectReason.NORM, f"update norm {norm:.4g} > {limit:.4g} "
                                                              f"({self.config.max_update_norm_ratio:g} x the model's)"),
                         s, batch)
            return
        h = result.header
        update = PooledUpdate(sender=h.sender, message_id=h.message_id, base_version=h.base_version, round=h.round,
                              num_samples=h.num_samples, delta=result.tensors, received_at=self.clock(),
                              metrics=h.metrics, wire_bytes=result.wire_bytes)
        stored = self.pool.offer(update)
        if isinstance(stored, Rejection):
            self._reject(h.sender, stored, s, batch)
            return
        # the envelope as received (already compressed): nothing is re-encoded
        batch.pooled.append((stored, data))
        batch.clients.add(h.sender)
        batch.accepted += 1
        log.info("update %s from %s (base %s, %s samples, s_i=%s) pooled", h.message_id[:8], h.sender,
                 h.base_version, h.num_samples, stored.submissions)

    def _reject(self, sender: str, rejection: Rejection, s, batch: "_Batch") -> None:
        batch.rejections[rejection.reason.value] += 1
        log.warning("rejected message from %s: %s", sender, rejection)
        store.count_rejection(s, rejection.reason.value, rejection.detail, sender)

    # ------------------------------------------------------------------ decisions
    def tick(self) -> None:
        expired = self.reassembler.expire()
        if expired:
            batch = _Batch()
            with self.sessions.begin() as s:
                for gone in expired:
                    self._expired(gone, s, batch)
            self.rejections.update(batch.rejections)
        if self.strategy.synchronous:
            self._manage_round()
        view = self.pool.view()
        if self.strategy.should_aggregate(view):
            self.aggregate_now(view)

    def _manage_round(self) -> None:
        pool = self.pool
        timeout = getattr(self.strategy, "round_timeout_s", 300.0)
        stuck = pool.round_opened_at is not None and self.clock() - pool.round_opened_at > 2 * timeout
        if pool.round_opened_at is not None and not stuck:
            return
        live = pool.live_clients()
        if not live or not self.strategy.can_open_round(live):
            return
        selected = self.strategy.select(live, self.rng)
        closed = [u.sender for u in pool.updates() if u.round <= pool.round]  # answers to rounds now over
        pool.start_round(pool.round + 1, selected)
        pool.drop_updates(closed)
        with self.sessions.begin() as s:
            store.remove_pool_updates(s, closed)
            row = store.ensure_state(s, strategy=self.strategy.name)
            row.round, row.selected, row.round_opened_at = pool.round, sorted(selected), pool.round_opened_at
            row.updated_at = self.clock()
        self.link.publish_control(self._control_bytes())
        log.info("round %s opened for %s", pool.round, sorted(selected))

    def aggregate_now(self, view=None) -> bool:
        """Aggregate the eligible pooled updates into a candidate global model; publish
        it as the next version if it passes the aggregate check and the deployment gate
        (:mod:`cloud_aggregator.gate`), else record the refusal and drop the window.
        True when a new version was published."""
        view = view or self.pool.view()
        updates = self.strategy.eligible(view)
        if not updates:
            return False
        started = self.clock()
        result = self.strategy.aggregate(self.weights, updates, version=self.pool.version, state=self.state,
                                         live_clients=len(view.live_clients))
        old_version, new_version = self.pool.version, self.pool.version + 1
        senders = list(result.senders)
        leftovers = [u.sender for u in view.updates if u.sender not in senders] if self.strategy.synchronous else []
        verdict = gates.check_candidate(result.weights, self.weights, settings=self.config.robust,
                                        recent_steps=self._recent_steps)
        figures = dict(verdict.figures)
        scores: dict[str, float] = {}
        if verdict.ok and self.gate_scorer is not None:
            scores = self._score(result.weights)
            verdict = gates.gate_decision(scores, self._current_scores, settings=self.config.gate)
            figures.update(verdict.figures)
        if not verdict.ok:
            self._refuse(result, verdict, figures, senders + leftovers, old_version)
            return False
        metrics: dict[str, float] = {}
        if self.evaluator is not None:
            try:
                metrics = {k: float(v) for k, v in self.evaluator(result.weights).items()}
            except Exception:  # a broken evaluator must not stop federated learning
                log.exception("central evaluation failed for version %s", new_version)
        envelope = self._encode_global(version=new_version, base_version=old_version,
                                       metrics={**metrics, **gates.header_scores(scores)}, weights=result.weights)
        finished = self.clock()
        arrays, meta = result.state.to_tensors()
        live = len(view.live_clients)
        info = {**result.info, **{k: figures[k] for k in ("step_norm", "weights_norm") if k in figures}}
        if scores:
            info["gate"] = {f"gate_{k}": v for k, v in scores.items()}
        try:
            with self.sessions.begin() as s:
                store.save_checkpoint(s, version=new_version, weights=result.weights, state_arrays=arrays,
                                      state_meta=meta, envelope=envelope, keep=self.config.checkpoints_kept)
                store.add_round(s, version=new_version, strategy=self.strategy.name, round=self.pool.round,
                                num_updates=len(updates), live_clients=live, senders=senders,
                                client_weights=list(result.client_weights), metrics=json_safe(metrics),
                                info=json_safe(info),
                                bytes_up=store.bytes_up_between(s, self._last_round_end, finished),
                                bytes_down=len(envelope) * max(live, 1),
                                started_at=view.opened_at if view.opened_at is not None else started,
                                finished_at=finished)
                store.remove_pool_updates(s, senders + leftovers)
                store.save_clients(s, {sender: replace(self.pool.clients[sender], window_submissions=0)
                                       for sender in senders if sender in self.pool.clients})
                row = store.ensure_state(s, strategy=self.strategy.name)
                row.version = new_version
                row.round_opened_at = None
                row.selected = []
                row.updated_at = finished
                if scores:
                    row.gate_passed = (row.gate_passed or 0) + 1
        except Exception:
            log.exception("checkpoint of version %s failed; staying at version %s", new_version, old_version)
            self._reload()
            raise
        # committed: only now does memory move on
        self._committed()
        self.weights = result.weights
        self.weights_norm = agg_math.global_norm({k: self.weights[k] for k in self.update_spec})
        self.state = result.state
        self.global_envelope = envelope
        if scores:
            self._current_scores = scores
            self.gate_passed += 1
        if "step_norm" in figures:
            self._recent_steps = (self._recent_steps + [figures["step_norm"]])[-self.config.robust.step_history:]
        self.pool.aggregated(senders, new_version)
        self.pool.drop_updates(leftovers)
        self._last_round_end = finished
        self._publish_current()
        log.info("global version %s from %s updates %s; central metrics %s; gate %s", new_version, len(updates),
                 senders, metrics, scores or "off")
        return True

    def _score(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The gate's scores of ``weights`` ({} when the scorer fails: the gate then refuses)."""
        try:
            return {k: float(v) for k, v in self.gate_scorer(weights).items()}
        except Exception:  # noqa: BLE001 - refused and counted, never published unscored
            log.exception("the deployment gate could not score a candidate")
            return {}

    def _refuse(self, result, verdict: gates.Verdict, figures: Mapping[str, float], dropped: list[str],
                base_version: int) -> None:
        """A candidate that is not published: recorded with why, its window's updates
        dropped (their senders train again: GSFS gateways are told by the control
        message's ``refused`` count, a synchronous strategy opens the next round)."""
        now = self.clock()
        try:
            with self.sessions.begin() as s:
                store.add_refusal(s, at=now, base_version=base_version, round=self.pool.round, reason=verdict.reason,
                                  detail=verdict.detail, senders=list(result.senders),
                                  client_weights=[float(w) for w in result.client_weights],
                                  figures=json_safe(dict(figures)))
                store.remove_pool_updates(s, dropped)
                store.save_clients(s, {sender: replace(self.pool.clients[sender], window_submissions=0)
                                       for sender in dropped if sender in self.pool.clients})
                row = store.ensure_state(s, strategy=self.strategy.name)
                row.round_opened_at = None
                row.selected = []
                row.updated_at = now
        except Exception:
            log.exception("recording a refused candidate failed")
            self._reload()
            raise
        self._committed()
        self.refused[verdict.reason] += 1
        self.pool.refused(dropped)
        log.warning("candidate after version %s NOT published (%s): %s; updates of %s dropped", base_version,
                    verdict.reason, verdict.detail, sorted(dropped))
        self.link.publish_control(self._control_bytes())

    def _publish_current(self) -> None:
        if not self.global_envelope:
            return
        parts = self.link.publish_global(self.global_envelope, chunk_bytes=self.config.chunk_bytes,
                                         previous_parts=self.global_parts)
        if parts != self.global_parts:
            with self.sessions.begin() as s:
                store.ensure_state(s, strategy=self.strategy.name).global_parts = parts
            self.global_parts = parts
        self.link.publish_control(self._control_bytes())

    # ------------------------------------------------------------------ reporting
    def counters(self) -> dict[str, Any]:
        return {"version": self.pool.version, "accepted": self.accepted, "pooled": len(self.pool),
                "live_clients": sorted(self.pool.live_clients()), "rejections": dict(self.rejections),
                "refused": dict(self.refused), "gate_passed": self.gate_passed}


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` with non-finite floats as None and numpy scalars as Python numbers, so
    it fits a JSON column on every backend (PostgreSQL refuses NaN and Infinity)."""
    if depth > 16:
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def run(config: AggregatorConfig, *, stop: threading.Event | None = None) -> None:
    """Run until ``stop`` is set (the CLI sets it on SIGINT/SIGTERM)."""
    stop = stop or threading.Event()
    service = AggregatorService(config).start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        service.stop()


def status(database: str, *, last_rounds: int = 20) -> store.StatusSummary:
    """What ``fedgate-aggregator status`` shows, read from the aggregator DB."""
    sessions = store.make_sessions(database, create=False)
    with sessions() as s:
        try:
            return store.status_summary(s, last_rounds=last_rounds)
        except OperationalError:  # no tables: the aggregator never ran on this database
            return store.StatusSummary({}, [], [], [], {})
