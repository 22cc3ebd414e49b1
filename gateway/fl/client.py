"""The gateway's federated-learning client (edge module: threads, store, MQTT).

One worker thread owns everything: it takes events from the link's queue (received
messages, connection changes, broker acknowledgements), validates and loads global
models, trains, and drains the durable outbox. paho's thread only enqueues, so no
training, database write or decoding runs there.

Strategies (the retained control topic says which; ``ClientSettings.strategy`` until it
does):

* GSFS: after loading global version v the client shows v's P to the trigger
  (:meth:`~gateway.fl.trigger.GSFSTrigger.on_global`: with the default ``reference``
  "upload", a v more than tau below the client's reference has forgotten its data and
  the session ends in an upload), then trains up to ``max_local_steps`` steps from v;
  the :class:`~gateway.fl.trigger.GSFSTrigger` watches per-layer gradient norms and,
  every ``eval_every`` steps, the validation metric P. When it fires the client
  uploads the delta from v (base version, sample count, metrics) and resets the
  trigger's reference to P. After ``max_uploads_per_version`` uploads it stops training
  until the next global model (further steps would only be overwritten by the server's
  newest-update-per-client pool or thrown away on the next broadcast). A client whose
  model barely changes uploads nothing: that is where GSFS saves bytes. When the store's
  labelled flows change (a labelled log, analyst feedback) the client trains again on
  the version it holds, at most once per ``retrain_interval_s``, continuing from its
  local model: its next upload is still the delta from v and replaces its earlier one
  in the server's pool. Without this, a federation where every gateway went quiet would
  never train again (no upload, no new version, no session).
* FedAvg / FedOpt: the client answers each round announced on the control topic (if
  selected) by training ``local_epochs`` epochs (at most ``max_local_steps`` steps)
  from the announced global version and uploading the delta, once per round.

P is the binary F1 (malicious = positive) on the local validation split, or the
accuracy when that split holds a single class (F1 is then meaningless); the trigger's
``metric`` may instead say "accuracy" (flow-weighted binary accuracy) or "likelihood"
(the geometric-mean probability of each validation flow's true side,
:func:`gateway.model.metrics.binary_likelihood`).

A received global model is checked by :func:`gateway.protocol.validation.validate_envelope`
(signature, digest, names, shapes, dtypes, finiteness, version not older); a rejected
one is counted by reason and logged, and the gateway keeps its current model (and keeps
detecting with it). An accepted one is loaded into torch, handed to ``on_global`` (the
gateway service refreshes its ONNX session there without stopping detection, and
records the version in ``model_versions``).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from gateway.fl import versionfile
from gateway.fl.control import (
    LOCAL_SETTING_RANGES,
    Control,
    ControlError,
    local_setting_problem,
    parse_control,
)
from gateway.fl.learner import TorchLearner, steps_per_epoch
from gateway.fl.link import Acked, GatewayLink, LinkDown, LinkUp
from gateway.fl.localdata import load_labelled
from gateway.fl.outbox import Outbox
from gateway.fl.split import stratified_split
from gateway.fl.state import ClientEvent, ClientLifecycle, ClientState
from gateway.fl.trigger import GSFSTrigger, TriggerConfig, TriggerConfigError
from gateway.model.data import FlowDataset
from gateway.mqtt import Inbound
from gateway.protocol import signing
from gateway.protocol.chunking import Reassembler, is_chunk, parse_chunk, split_message
from gateway.protocol.compression import Compression
from gateway.protocol.envelope import Kind, decode_header, encode_update
from gateway.protocol.errors import EnvelopeError, RejectReason, Rejection
from gateway.protocol.validation import ValidationPolicy, keys_by_id, size_limits, spec_of, validate_envelope
from gateway.store import repository as repo

log = logging.getLogger(__name__)

STRATEGIES = ("gsfs", "fedavg", "fedopt")
# The retained control message arrives just after the retained global model: a GSFS
# session waits this long for it (it may say FedAvg) before starting on its own.
CONTROL_GRACE_S = 2.0


class ClientConfigError(ValueError):
    """A client setting out of range."""


def decayed_lr(lr: float, decay: float, version: int) -> float:
    """The local learning rate of a session on global version ``version``: lr * decay**v."""
    return lr * decay ** max(0, version)


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """Settings of the FL client (keyword-only; the control topic may override the
    local-training ones and the trigger).

    strategy            gsfs | fedavg | fedopt until the control topic says (default gsfs)
    local_epochs        epochs per FedAvg/FedOpt round (default 1)
    max_local_steps     cap on optimiser steps per round / per global version (default 50)
    batch_size          (default 64)
    lr                  peak learning rate of local AdamW (default 3e-3)
    lr_decay            the local learning rate of a session on global version v is
                        lr * lr_decay**v, in (0, 1] (default 1.0: constant). A decaying
                        step is what lets FedAvg-style training settle on non-IID
                        clients (Li et al., ICLR 2020); with a constant one each round
                        pulls the global model as far towards the sampled clients
                        as the first did, and the central metric keeps swinging
    prox_mu             FedProx proximal term mu/2 * ||w - w_global||^2 added to the local
                        loss, >= 0 (default 0.0: plain local training). It bounds client
                        drift on non-IID data (Li et al., MLSys 2020): a gateway whose
                        data the global already fits stops pulling the shared weights
                        towards its own labels once its data gradient is small
    missing_class_scale FedRS restricted softmax, in [0, 1] (default 1.0: plain softmax):
                        local training multiplies the logits of classes the gateway has
                        no flow of by this, so a gateway of benign traffic only does not
                        teach the shared classifier that attacks do not exist (Li & Zhan,
                        KDD 2021)
    label_smoothing     share of a uniform distribution in the local cross-entropy target,
                        in [0, 0.5] (default 0.1). Without it a gateway's 50 AdamW steps
                        keep raising the logits of flows it already classifies, and
                        that push lands on every other gateway's flows that share
                        tokens with them (IoT-23, GSFS: a window of one benign gateway
                        scaled to a tenth still flipped another gateway's C&C flows)
    retrain_interval_s  GSFS: once the labelled flows of the store changed (new labelled
                        logs, analyst feedback) the gateway trains again on the global
                        version it holds, at most once per this many seconds (default
                        300; 0 = only when a new global version arrives). Without it a
                        federation where every gateway went quiet never learns what
                        its analysts label: no upload, so no new version, so no session
    val_fraction        local validation share, stratified (default 0.2)
    seed                data split and training seed (default 0)
    compression         none | int8 | topk for uploaded deltas (default none)
    topk_fraction       share of entries kept by top-k (default 0.01)
    max_chunk_bytes     uploads above this travel in chunks (default 256 KiB)
    max_uploads_per_version  GSFS uploads per global version (default 1)
    status_interval_s   retained status refresh period (default 5 s)
    teacher_labels      train on the cloud teacher's verdicts of escalated flows that have
                        no log or analyst label (default False; gateway.escalation)
    trigger             GSFS trigger settings (:class:`TriggerConfig`)
    """

    gateway_id: str
    strategy: str = "gsfs"
    local_epochs: int = 1
    max_local_steps: int = 50
    batch_size: int = 64
    lr: float = 3e-3
    lr_decay: float = 1.0
    prox_mu: float = 0.0
    missing_class_scale: float = 1.0
    label_smoothing: float = 0.1
    retrain_interval_s: float = 300.0
    val_fraction: float = 0.2
    seed: int = 0
    compression: Compression = Compression.NONE
    topk_fraction: float = 0.01
    max_chunk_bytes: int = 256 * 1024
    max_uploads_per_version: int = 1
    status_interval_s: float = 5.0
    teacher_labels: bool = False
    trigger: TriggerConfig = field(default_factory=TriggerConfig)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ClientConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        object.__setattr__(self, "compression", Compression(self.compression))
        for name in ("local_epochs", "max_local_steps", "batch_size", "max_uploads_per_version"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ClientConfigError(f"{name} must be an integer >= 1, got {v!r}")
        for name in LOCAL_SETTING_RANGES:
            problem = local_setting_problem(name, getattr(self, name))
            if problem:
                raise ClientConfigError(f"{name} {problem}")
        if not 0 <= self.retrain_interval_s < math.inf:
            raise ClientConfigError(f"retrain_interval_s must be finite and >= 0, got {self.retrain_interval_s}")
        if not 0 < self.val_fraction < 1:
            raise ClientConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_chunk_bytes < 1024:
            raise ClientConfigError("max_chunk_bytes must be >= 1024")
        if self.status_interval_s <= 0:
            raise ClientConfigError("status_interval_s must be > 0")


@dataclass
class ClientCounters:
    uploads: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    globals_loaded: int = 0
    duplicates_ignored: int = 0
    rejected: Counter = field(default_factory=Counter)
    control_rejected: int = 0
    train_steps: int = 0
    triggers: Counter = field(default_factory=Counter)
    quiet_versions: int = 0  # GSFS versions skipped by the trigger's cooldown
    forgotten: int = 0  # GSFS versions whose P fell more than tau below the reference


class _StopTraining(Exception):
    """Raised from the step callback to end local training early (upload cap reached)."""


class FLClient:
    def __init__(
        self,
        *,
        settings: ClientSettings,
        learner: TorchLearner,
        sessions: sessionmaker[Session],
        link: GatewayLink,
        verify_key: signing.Ed25519PublicKey | list[signing.Ed25519PublicKey] | None = None,
        on_global: Callable[[int, dict[str, np.ndarray], dict], object] | None = None,
        eval_data: FlowDataset | None = None,
        clock: Callable[[], float] = time.monotonic,
        allow_unsigned: bool = False,
        version_file: str | Path | None = None,
    ):
        if not keys_by_id(verify_key) and not allow_unsigned:
            raise ClientConfigError("no key to verify global models with: give verify_key, or allow_unsigned=True "
                                    "(lab use only: anyone who can write the global topic would choose the model)")
        self.settings = settings
        self.learner = learner
        self.sessions = sessions
        self.link = link
        self.verify_key = verify_key
        self.on_global = on_global
        self.eval_data = eval_data
        self.clock = clock
        self.lifecycle = ClientLifecycle()
        self.trigger = GSFSTrigger(config=settings.trigger)
        self.outbox = Outbox(sessions=sessions, publish=link.publish)
        self.counters = ClientCounters()
        self.strategy = settings.strategy
        self.local = {
            "epochs": settings.local_epochs, "max_steps": settings.max_local_steps, "lr": settings.lr,
            "lr_decay": settings.lr_decay, "prox_mu": settings.prox_mu,
            "missing_class_scale": settings.missing_class_scale, "label_smoothing": settings.label_smoothing,
            "batch_size": settings.batch_size,
            "compression": settings.compression, "topk_fraction": settings.topk_fraction,
        }
        self.spec = spec_of(learner.weights())
        # a global model of this model's size, no more: what the chunk reassembler and the
        # validation accept (retained junk on the global topics cannot fill memory)
        self.max_global_bytes, self.max_global_decoded = size_limits(self.spec, kind=Kind.GLOBAL)
        self.reassembler = Reassembler(clock=clock, max_messages=2, max_per_source=2,
                                       max_message_bytes=self.max_global_bytes)
        # the newest version accepted before a restart: nothing older is loaded again
        self.version_file = None if version_file is None else Path(version_file)
        self.version_floor = versionfile.read_version(self.version_file)
        self.version: int | None = None
        self.base_weights: dict[str, np.ndarray] | None = None
        self.residual: dict[str, np.ndarray] | None = None
        self.control: Control | None = None
        self.answered_rounds: set[int] = set()
        self.gsfs_due = False
        self.retrain_due = False  # the aggregator dropped a window (refused candidate)
        self._global_at = 0.0
        self._global_metric: float | None = None  # P of the current global version
        self.last_eval: dict = {}
        self._data_key: tuple[int, int, int] | None = None
        self._session_at: float | None = None  # clock of the last GSFS session's start
        self._session_data_key: tuple[int, int, int] | None = None  # the data it trained on
        self._next_data_check = 0.0
        self.train_data: FlowDataset | None = None
        self.val_data: FlowDataset | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_status = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, thread: bool = True) -> "FLClient":
        """Connect and (with ``thread``) start the worker thread."""
        self.lifecycle.fire(ClientEvent.START)
        self.link.start()
        if not thread:
            return self
        self._thread = threading.Thread(target=self._run, name=f"fl-{self.settings.gateway_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.lifecycle.can(ClientEvent.STOP):
            self.lifecycle.fire(ClientEvent.STOP)
        self.link.stop()

    @property
    def state(self) -> ClientState:
        return self.lifecycle.state

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pump_once(0.2)

    def pump_once(self, timeout: float = 0.2) -> None:
        """One turn of the worker: handle at most one event, train if due, drain the
        outbox, expire stale chunks, refresh the status. Tests drive the client with it
        instead of :meth:`start`'s thread."""
        try:
            event = self.link.events.get(timeout=timeout)
        except queue.Empty:
            event = None
        try:
            if event is not None:
                self.handle(event)
            if self.link.events.empty():
                self._maybe_train()
            self.outbox.drain()
            for gone in self.reassembler.expire():
                self._count_rejection(Rejection(RejectReason.INCOMPLETE_CHUNK,
                                                f"{gone.message_id}: {gone.have}/{gone.count} chunks"))
            if self.clock() - self._last_status >= self.settings.status_interval_s:
                self.publish_status()
        except Exception:  # noqa: BLE001 - the worker must survive any one bad event
            log.exception("FL client: error while handling %r", type(event).__name__)

    # ------------------------------------------------------------------ events
    def handle(self, event) -> None:
        if isinstance(event, Acked):
            self.outbox.on_ack(event.mid, event.reason_code, event.reason)
        elif isinstance(event, LinkUp):
            self.outbox.on_connected()
            self.publish_status()
        elif isinstance(event, LinkDown):
            self.outbox.on_disconnected()
        elif isinstance(event, Inbound):
            if self.link.is_model_topic(event.topic):
                self._on_model_message(event.payload)
            elif event.topic == self.link.control_topic:
                self._on_control(event.payload)

    def _count_rejection(self, rejection: Rejection) -> None:
        self.counters.rejected[rejection.reason.value] += 1
        log.warning("gateway %s rejected a global model: %s", self.settings.gateway_id, rejection)

    def _on_model_message(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained topic
        if is_chunk(payload):
            try:
                whole, evicted = self.reassembler.add(parse_chunk(payload), source="global")
            except EnvelopeError as exc:
                self._count_rejection(exc.as_rejection())
                return
            for gone in evicted:
                self._count_rejection(Rejection(RejectReason.INCOMPLETE_CHUNK, gone.message_id))
            if whole is None:
                return
            payload = whole
        self.receive_global(payload)

    def receive_global(self, data: bytes) -> bool:
        """Validate and load a global model envelope; True if it was loaded."""
        self.counters.bytes_down += len(data)
        try:
            header, _ = decode_header(data)
            if header.kind is Kind.GLOBAL and self.version is not None and header.version == self.version:
                self.counters.duplicates_ignored += 1  # the retained copy again (reconnect)
                return False
        except EnvelopeError:
            pass  # validate_envelope below names the reason
        self.lifecycle.fire(ClientEvent.GLOBAL_RECEIVED)
        policy = ValidationPolicy(kind=Kind.GLOBAL, expected=self.spec, verify_key=self.verify_key,
                                  current_version=self.version if self.version is not None else self.version_floor,
                                  max_bytes=self.max_global_bytes, max_decoded_bytes=self.max_global_decoded)
        result = validate_envelope(data, policy)
        if isinstance(result, Rejection):
            self._count_rejection(result)
            self.lifecycle.fire(ClientEvent.GLOBAL_REJECTED)
            self.publish_status()
            return False
        previous = self.learner.weights() if self.version is not None else None
        try:
            self.learner.load(result.tensors)
        except ValueError as exc:
            self._count_rejection(Rejection(RejectReason.SHAPES, str(exc)[:200]))
            if previous is not None:
                self.learner.load(previous)
            self.lifecycle.fire(ClientEvent.GLOBAL_REJECTED)
            return False
        version = int(result.header.version)
        self.version = version
        if self.version_file is not None and (self.version_floor is None or version > self.version_floor):
            try:
                versionfile.write_version(self.version_file, version)
                self.version_floor = version
            except OSError as exc:  # FL goes on; a restart then trusts the older floor
                log.error("gateway %s: cannot record global version %d in %s: %s", self.settings.gateway_id,
                          version, self.version_file, exc)
        self.base_weights = {k: np.array(v, copy=True) for k, v in result.tensors.items()}
        self.counters.globals_loaded += 1
        path = None
        if self.on_global is not None:
            try:
                path = self.on_global(version, self.base_weights, dict(result.header.metrics))
            except Exception:  # noqa: BLE001 - detection keeps the old session; logged
                log.exception("gateway %s: on_global hook failed for version %d", self.settings.gateway_id, version)
        # with a hook, detection uses the version only if the hook put it in (its
        # deployment gate may keep the running model); without one the learner is the model
        with self.sessions.begin() as session:
            repo.register_model_version(session, f"global-{version}", parent=f"global-{result.header.base_version}",
                                        path=str(path) if path else None, metrics=dict(result.header.metrics),
                                        activate=self.on_global is None or path is not None)
        self.lifecycle.fire(ClientEvent.GLOBAL_LOADED)
        log.info("gateway %s loaded global version %d", self.settings.gateway_id, version)
        self._after_new_global()
        self.publish_status()
        return True

    def _on_control(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            control = parse_control(payload, verify_keys=self.verify_key)
            if control.trigger:
                self.trigger.reconfigure(control.trigger)
        except (ControlError, TriggerConfigError) as exc:
            self.counters.control_rejected += 1
            log.warning("gateway %s ignored a control message: %s", self.settings.gateway_id, exc)
            return
        if (self.control is not None and control.refused > self.control.refused
                and control.version == self.version):
            # the aggregator refused a candidate and dropped its window's updates: a GSFS
            # gateway's upload may have been among them, so it trains again on this version
            self.retrain_due = True
        self.control = control
        self.strategy = control.strategy
        for key, value in vars(control.local).items():
            if value is not None:
                self.local[key] = value

    # ------------------------------------------------------------------ training
    def _after_new_global(self) -> None:
        # The trigger hears of the new global (its P) when the GSFS session starts
        # (train_gsfs): the control message that says which P to compute may still be
        # on its way, and nothing changes the weights in between.
        self._ensure_data()
        self.gsfs_due = True
        self.retrain_due = False
        self._global_at = self.clock()

    def validation_data(self) -> FlowDataset | None:
        """The local labelled validation split (loaded or refreshed from the store):
        what the trigger's P and the deployment gate score on."""
        self._ensure_data()
        return self.val_data

    def _ensure_data(self) -> None:
        """(Re)load the local labelled flows when the store changed; split them."""
        with self.sessions() as session:
            key = repo.labelled_data_key(session, teacher=self.settings.teacher_labels)
            if key == self._data_key and self.train_data is not None:
                return
            records, classes = load_labelled(session, teacher_labels=self.settings.teacher_labels)
        parts = stratified_split(classes, [1 - self.settings.val_fraction, self.settings.val_fraction],
                                 seed=self.settings.seed)
        train_idx, val_idx = parts
        self.train_data = self.learner.encode([records[i] for i in train_idx], [classes[i] for i in train_idx])
        self.val_data = self.learner.encode([records[i] for i in val_idx], [classes[i] for i in val_idx])
        self.trigger.set_support(float(self.val_data.flows))  # tau_i of small splits (min_flows)
        self._data_key = key
        log.info("gateway %s: %d labelled flows (%d train rows, %d validation rows after dedupe)",
                 self.settings.gateway_id, len(records), len(self.train_data), len(self.val_data))

    def _val_metric(self) -> float:
        """P on the validation split, as the trigger's ``metric`` says: binary F1
        (accuracy if the split holds one class only), accuracy, or the likelihood of
        the true side (:func:`gateway.model.metrics.binary_likelihood`)."""
        if self.val_data is None or len(self.val_data) == 0:
            return 0.0
        if self.trigger.config.metric == "likelihood":
            return self.learner.likelihood(self.val_data)
        m = self.learner.evaluate(self.val_data)
        if self.trigger.config.metric == "accuracy":
            return float(m["accuracy"])
        single_class = len(np.unique(self.val_data.y != 0)) < 2
        return float(m["accuracy"] if single_class else m["f1"])

    def _maybe_train(self) -> None:
        if self.lifecycle.state is not ClientState.IDLE or self.version is None:
            return
        if self.strategy == "gsfs":
            if self.control is None and self.clock() - self._global_at < CONTROL_GRACE_S:
                return
            if self.gsfs_due:
                self.gsfs_due = False
                self.train_gsfs(arrival=True)
            elif self.retrain_due:
                self.retrain_due = False
                log.info("gateway %s: the aggregator refused a candidate; training again on version %s",
                         self.settings.gateway_id, self.version)
                self.train_gsfs(admitted=True)
            elif self.trigger.retry_due(self.clock()):  # quiet on this version, nothing newer came
                self.train_gsfs(admitted=True)
            elif self._new_labels_due():
                log.info("gateway %s: labelled flows changed since the last session; training on version %s",
                         self.settings.gateway_id, self.version)
                self.train_gsfs(admitted=True)
        else:
            c = self.control
            if (c is not None and c.synchronous and c.round > 0 and c.round not in self.answered_rounds
                    and c.selects(self.settings.gateway_id)
                    and (c.version is None or self.version >= c.version)):
                self.answered_rounds.add(c.round)
                self.train_round(c.round)

    def _new_labels_due(self) -> bool:
        """GSFS: the labelled data changed since the last session, which is at least
        ``retrain_interval_s`` old (the store is asked at most once per interval)."""
        interval = self.settings.retrain_interval_s
        now = self.clock()
        if interval <= 0 or self._session_at is None or now - self._session_at < interval:
            return False
        if now < self._next_data_check:
            return False
        self._next_data_check = now + interval
        self._ensure_data()
        return self._data_key != self._session_data_key

    def _round_plan(self) -> tuple[FlowDataset, int]:
        """Training rows for this round and the epochs to run within the step cap."""
        self._ensure_data()
        data = self.train_data
        bs, cap = int(self.local["batch_size"]), int(self.local["max_steps"])
        if len(data) > cap * bs:  # subsample rows so one epoch fits the cap
            rng = np.random.default_rng([self.settings.seed, self.version or 0, len(self.answered_rounds)])
            data = data.subset(np.sort(rng.choice(len(data), cap * bs, replace=False)))
        epochs = max(1, min(int(self.local["epochs"]), cap // steps_per_epoch(len(data), bs)))
        return data, epochs

    def train_gsfs(self, *, admitted: bool = False, arrival: bool = False) -> None:
        """One GSFS session from the current global version (runs on the worker).

        ``arrival``: the learner holds a global version not yet shown to the trigger:
        its P goes to :meth:`GSFSTrigger.on_global` first (a global that forgot this
        gateway's data makes the session end in an upload, cooldown or not).
        ``admitted``: skip the cooldown check (the retry after ``cooldown_s``)."""
        if self.train_data is None:
            self._ensure_data()
        self._session_at, self._session_data_key = self.clock(), self._data_key
        if len(self.train_data) == 0:
            return
        if arrival:
            self._global_metric = self._val_metric() if len(self.val_data) else None
            if self.trigger.on_global(self._global_metric).fire:
                self.counters.forgotten += 1
                log.info("gateway %s: global version %s forgot this gateway's data (P %.4f, reference %.4f)",
                         self.settings.gateway_id, self.version, self._global_metric,
                         self.trigger.state.reference)
        base_metric = self._global_metric  # P of this global version
        log.info("gateway %s: global version %s, P %s, reference %s", self.settings.gateway_id, self.version,
                 base_metric, self.trigger.state.reference)
        if not admitted and not self.trigger.admit(base_metric, self.clock()):
            self.counters.quiet_versions += 1
            log.info("gateway %s: quiet on version %s (cooldown; the global model looks as at its last upload)",
                     self.settings.gateway_id, self.version)
            return
        self.lifecycle.fire(ClientEvent.TRAIN_START)
        uploads = 0
        data, _ = self._round_plan()
        bs, cap = int(self.local["batch_size"]), int(self.local["max_steps"])
        epochs = max(1, cap // steps_per_epoch(len(data), bs))  # GSFS spends the whole step budget

        def on_step(step: int, norms: dict[str, float], loss: float) -> None:
            nonlocal uploads
            self.counters.train_steps += 1
            decision = self.trigger.step(norms)
            fired, metric = decision.reason if decision.fire else None, None
            if decision.evaluate or step == total_steps:
                metric = self._val_metric()
                perf = self.trigger.observe_metric(metric)
                if perf.fire and fired is None:
                    fired = perf.reason  # "performance", or "forgotten" (an owed upload)
            if fired is not None:
                self.counters.triggers[fired] += 1
                log.info("gateway %s: %s trigger fired at step %d (P %s, reference %s)", self.settings.gateway_id,
                         fired, step, metric, self.trigger.state.reference)
                metric = self._val_metric() if metric is None else metric
                self._upload(round_=self.version or 0, data=data,
                             metrics={"val_metric": metric, "trigger_" + fired: 1.0, "steps": float(step)})
                self.trigger.reset(metric)
                self.trigger.uploaded(base_metric)
                uploads += 1
                if uploads >= self.settings.max_uploads_per_version:
                    raise _StopTraining
            if step >= total_steps:
                raise _StopTraining

        total_steps = min(cap, epochs * steps_per_epoch(len(data), bs))
        try:
            self.learner.train(data, epochs=epochs, lr=self._session_lr(), batch_size=bs,
                               prox_mu=float(self.local["prox_mu"]),
                               missing_class_scale=float(self.local["missing_class_scale"]),
                               label_smoothing=float(self.local["label_smoothing"]),
                               seed=self.settings.seed + (self.version or 0), on_step=on_step)
        except _StopTraining:
            pass
        finally:
            self.learner.model.eval()
            self._evaluate_after_training(round_=self.version or 0, uploaded=uploads)
            self.lifecycle.fire(ClientEvent.TRAIN_DONE)

    def _session_lr(self) -> float:
        return decayed_lr(float(self.local["lr"]), float(self.local["lr_decay"]), self.version or 0)

    def train_round(self, round_: int) -> None:
        """Answer a FedAvg/FedOpt round: train from the current global model, upload."""
        self._ensure_data()
        if len(self.train_data) == 0:
            return
        if self.base_weights is not None:
            self.learner.load(self.base_weights)  # every round starts from the global model
        self.lifecycle.fire(ClientEvent.TRAIN_START)
        try:
            data, epochs = self._round_plan()

            def on_step(step: int, norms: dict[str, float], loss: float) -> None:
                self.counters.train_steps += 1

            self.learner.train(data, epochs=epochs, lr=self._session_lr(),
                               batch_size=int(self.local["batch_size"]), prox_mu=float(self.local["prox_mu"]),
                               missing_class_scale=float(self.local["missing_class_scale"]),
                               label_smoothing=float(self.local["label_smoothing"]),
                               seed=self.settings.seed + round_, on_step=on_step)
            self._upload(round_=round_, data=data, metrics={"val_metric": self._val_metric()})
        finally:
            self._evaluate_after_training(round_=round_, uploaded=1)
            self.lifecycle.fire(ClientEvent.TRAIN_DONE)

    def _evaluate_after_training(self, *, round_: int, uploaded: int) -> None:
        """The local model on the experiment's held-out test flows (when given)."""
        if self.eval_data is None or len(self.eval_data) == 0:
            return
        m = self.learner.evaluate(self.eval_data)
        self.last_eval = {"version": self.version, "round": round_, "uploaded": uploaded,
                          "accuracy": m.get("accuracy"), "f1": m.get("f1")}
        self.publish_status()

    def _upload(self, *, round_: int, data: FlowDataset, metrics: dict[str, float]) -> None:
        """Queue the delta from the base global version in the durable outbox."""
        assert self.base_weights is not None and self.version is not None
        now = self.learner.weights()
        delta = {k: (now[k] - self.base_weights[k]).astype(np.float32)
                 for k in now if np.issubdtype(now[k].dtype, np.floating)}
        enc = encode_update(delta, sender=self.settings.gateway_id, base_version=self.version,
                            num_samples=max(1, int(round(data.flows))), round=round_, metrics=metrics,
                            compression=self.local["compression"], residual=self.residual,
                            topk_fraction=float(self.local["topk_fraction"]))
        self.residual = enc.residual
        for frame in split_message(enc.data, max_chunk_bytes=self.settings.max_chunk_bytes,
                                   message_id=enc.message_id):
            self.outbox.put(self.link.update_topic, frame, qos=1)
        self.counters.uploads += 1
        self.counters.bytes_up += len(enc.data)
        self.outbox.drain()

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        c = self.counters
        return {
            "state": self.lifecycle.state.value, "strategy": self.strategy, "version": self.version,
            "uploads": c.uploads, "bytes_up": c.bytes_up, "bytes_down": c.bytes_down,
            "globals_loaded": c.globals_loaded, "rejected": dict(c.rejected),
            "control_rejected": c.control_rejected, "train_steps": c.train_steps,
            "triggers": dict(c.triggers), "quiet_versions": c.quiet_versions,
            "forgotten": c.forgotten, "outbox_acked": self.outbox.acked, "eval": self.last_eval,
        }

    def publish_status(self) -> None:
        self._last_status = self.clock()
        st = self.status()
        state = st.pop("state")
        self.link.publish_status("offline" if state == "stopped" else state, **st)
