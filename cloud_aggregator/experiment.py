"""``fedgate-aggregator experiment``: compare GSFS, FedAvg and FedOpt on real gateways.

For every data directory (an IoT-23 scenario: naturally non-IID) the harness keeps a
stratified test part out of all training, writes the rest into that gateway's own
SQLite store, then for each strategy (and compression) starts a real mosquitto from
``broker_config/dev.conf``, the aggregator, and ONE gateway process per data directory
(``python -m gateway.fl.run``), all from the same initial model and seeds. It watches the
broker like any other client: every global model (verified with the aggregator's
public key, evaluated centrally on the pooled test parts), every update (count and
bytes) and every gateway status (each client's own model scored on the same test
parts after each round). The report (Markdown, JSON, PNG plots) lands in ``--out``.

The initial model has never seen a gateway's flows: a student with random weights
(seeded), whose vocabulary is built from the training parts (the word list only) and
whose label list is the union of the training labels.

Training is kept light so that seven gateways share two CPU cores: each gateway's
flows are deduplicated into weighted rows (IoT-23 is very repetitive), at most
``--max-train-flows`` flows per gateway are kept (stratified sample, documented in
the report), and local training is capped at ``--max-local-steps`` steps per round.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click

from cloud_aggregator.strategies import fedopt
from gateway.fl.control import MAX_LABEL_SMOOTHING, MAX_PROX_MU, local_setting_problem
from gateway.model.prompt import DEFAULT_TEMPLATE, get_template

log = logging.getLogger(__name__)

STRATEGY_NAMES = ("gsfs", "fedavg", "fedopt")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class ExperimentSettings:
    """Everything one experiment run needs (keyword-only; defaults documented).

    strategies      strategies to compare, in order (default gsfs, fedavg, fedopt)
    compressions    update compressions to run each strategy with (default none)
    gateway_data    one data directory per gateway
    rounds          global versions to reach per run (default 10)
    out             report directory
    seed            split, initial model and training seed (default 0)
    test_fraction   stratified share of every scenario kept for testing (default 0.2)
    max_train_flows flows per gateway kept for training (stratified sample; default 100000,
                    i.e. all of IoT-23: deduplication makes training cost depend on distinct prompts)
    local_epochs    FedAvg/FedOpt local epochs per round (default 20; the step cap binds first)
    max_local_steps local optimiser steps per round (default 50)
    batch_size      (default 64)
    lr              local learning rate (default 2e-3)
    lr_decay        local learning rate on global version v: lr * lr_decay**v, in (0, 1]
                    (default 1.0: constant)
    prox_mu         FedProx proximal term of local training, mu/2 * ||w - w_global||^2 (default 0)
    label_smoothing local cross-entropy label smoothing, in [0, 0.5] (default 0.1)
    missing_class_scale  FedRS: local training scales the logits of classes a gateway has no
                    flow of by this, in [0, 1] (default 1.0: plain softmax)
    fedopt_eta      FedOpt server Adam learning rate (default 0.01, FedOpt's own)
    fedopt_tau      FedOpt server Adam adaptivity, added to sqrt(v) (default 1e-3, FedOpt's own)
    template        prompt template of the initial model, NAME/vN or NAME for its newest
                    version (default gateway.model.prompt.DEFAULT_TEMPLATE, edge-compact/v2)
    target_f1       F1 for the "time to target" column (default 0.99)
    round_timeout_s FedAvg/FedOpt: a round aggregates what arrived after this long (default 120)
    stall_timeout_s a run ends early when no new global version came for this long: under
                    GSFS that means no gateway's trigger fired (converged) (default 45)
    gsfs_deadline_s GSFS server deadline: aggregate what arrived after this (default 8)
    dp_noise        DP noise multiplier (None: DP off)
    dp_clip         DP clipping norm (default 1.0)
    quick           tiny settings for demos and tests
    """

    strategies: tuple[str, ...] = STRATEGY_NAMES
    compressions: tuple[str, ...] = ("none",)
    gateway_data: tuple[Path, ...]
    rounds: int = 10
    out: Path
    seed: int = 0
    test_fraction: float = 0.2
    max_train_flows: int = 100_000
    local_epochs: int = 20
    max_local_steps: int = 50
    batch_size: int = 64
    lr: float = 2e-3
    lr_decay: float = 1.0
    prox_mu: float = 0.0
    missing_class_scale: float = 1.0
    label_smoothing: float = 0.1
    fedopt_eta: float = fedopt.DEFAULT_ETA
    fedopt_tau: float = fedopt.DEFAULT_TAU
    template: str = DEFAULT_TEMPLATE
    target_f1: float = 0.99
    round_timeout_s: float = 120.0
    stall_timeout_s: float = 45.0
    gsfs_deadline_s: float = 8.0
    dp_noise: float | None = None
    dp_clip: float = 1.0
    quick: bool = False

    def __post_init__(self) -> None:
        bad = [s for s in self.strategies if s not in STRATEGY_NAMES]
        if not self.strategies or bad:
            raise ValueError(f"unknown strategies {bad}; choose from {', '.join(STRATEGY_NAMES)}")
        bad = [c for c in self.compressions if c not in ("none", "int8", "topk")]
        if not self.compressions or bad:
            raise ValueError(f"unknown compressions {bad}; choose from none, int8, topk")
        if not self.gateway_data:
            raise ValueError("give at least one --gateway-data directory")
        if self.rounds < 1 or self.max_local_steps < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("rounds, max_local_steps, local_epochs and batch_size must be >= 1")
        if not 0 < self.test_fraction < 1:
            raise ValueError("test_fraction must be in (0, 1)")
        for name in ("lr", "lr_decay", "prox_mu", "missing_class_scale", "label_smoothing"):
            problem = local_setting_problem(name, getattr(self, name))
            if problem:
                raise ValueError(f"{name} {problem}")
        if self.max_train_flows < 10:
            raise ValueError("max_train_flows must be >= 10")
        try:  # FedOpt's own rules; its messages name "eta" / "tau"
            fedopt.FedOpt(eta=self.fedopt_eta, tau=self.fedopt_tau)
        except ValueError as exc:
            raise ValueError(f"fedopt_{exc}") from None
        if self.dp_noise is not None and self.dp_noise <= 0:
            raise ValueError("dp_noise must be > 0")
        get_template(self.template)  # an unknown one raises (a ValueError too)


# --------------------------------------------------------------------------- data


@dataclass
class GatewayData:
    name: str  # gateway id
    scenario: str
    train: list  # ConnRecord
    test: list
    train_flows_total: int  # before the training sample cap


def gateway_id_for(scenario: str) -> str:
    from gateway.protocol.topics import check_gateway_id

    gid = "".join(c if c.isalnum() or c in "-_." else "-" for c in scenario)[:64].strip("-.") or "gw"
    return check_gateway_id(gid)


def split_scenarios(paths: Sequence[Path], *, test_fraction: float, max_train_flows: int, seed: int
                    ) -> list[GatewayData]:
    """Stratified train/test split of every scenario; training part capped (stratified)."""
    import numpy as np

    from gateway.fl.split import stratified_split
    from gateway.model.labels import record_label

    out = []
    names: set[str] = set()
    for path in paths:
        scenario = _one_scenario(Path(path))
        classes = [record_label(r) for r in scenario.records]
        train_idx, test_idx = stratified_split(classes, [1 - test_fraction, test_fraction], seed=seed)
        total = len(train_idx)
        if total > max_train_flows:
            keep_share = max_train_flows / total
            keep, _ = stratified_split([classes[i] for i in train_idx], [keep_share, 1 - keep_share], seed=seed + 1)
            train_idx = train_idx[np.sort(keep)]
        gid = gateway_id_for(scenario.name)
        if gid in names:
            raise ValueError(f"two data directories are both named {scenario.name!r}")
        names.add(gid)
        out.append(GatewayData(name=gid, scenario=scenario.name, train=[scenario.records[i] for i in train_idx],
                               test=[scenario.records[i] for i in test_idx], train_flows_total=total))
    return out


def _one_scenario(path: Path):
    from gateway.model.data import load_scenarios

    scenarios = load_scenarios([path])
    if len(scenarios) != 1:
        raise ValueError(f"{path}: expected one labelled conn log, found {len(scenarios)}")
    return scenarios[0]


def build_initial_model(train_records: Sequence, out: Path, *, seed: int, onnx: bool = False,
                        template: str = DEFAULT_TEMPLATE):
    """A randomly initialised student (seeded) with a vocabulary of ``template``'s
    words for ``train_records`` and their label set (ONNX export only if asked: the
    experiment's gateways train, they do not detect)."""
    from gateway.model.labels import LabelSet, record_label
    from gateway.model.modeldir import save_model_dir
    from gateway.model.opt import build_model
    from gateway.model.tokenizer import FlowTokenizer

    tokenizer = FlowTokenizer.build(train_records, get_template(template))
    labels = LabelSet.from_labels(record_label(r) for r in train_records)
    model = build_model("student", tokenizer, labels, seed=seed)
    return save_model_dir(model, tokenizer, labels, out, version=f"initial-seed{seed}", onnx=onnx,
                          extra={"preset": "student", "init": "random", "seed": seed})


# --------------------------------------------------------------------------- preparation


@dataclass
class Prepared:
    gateways: list[GatewayData]
    model_dir: Path
    test_log: Path
    store_templates: dict[str, Path]  # gateway id -> prepared SQLite store (copied per run)
    key_path: Path
    pub_path: Path
    test_counts: dict[str, int] = field(default_factory=dict)


def prepare(settings: ExperimentSettings, *, say=print) -> Prepared:
    """Split the data, build the initial model, write the stores, the test log and a key."""
    from gateway.flows.zeek import write_tsv
    from gateway.model.labels import record_label
    from gateway.protocol import signing
    from gateway.store import repository as repo
    from gateway.store.db import open_store

    out = settings.out
    (out / "data").mkdir(parents=True, exist_ok=True)
    gateways = split_scenarios(settings.gateway_data, test_fraction=settings.test_fraction,
                               max_train_flows=settings.max_train_flows, seed=settings.seed)
    train_all = [r for g in gateways for r in g.train]
    model_dir = out / "initial-model"
    build_initial_model(train_all, model_dir, seed=settings.seed, template=settings.template)
    test_records = [r for g in gateways for r in g.test]
    test_log = out / "data" / "test.conn.log"
    with open(test_log, "wb") as f:
        write_tsv(test_records, f)
    templates = {}
    for g in gateways:
        path = out / "data" / f"{g.name}.db"
        path.unlink(missing_ok=True)
        engine, sessions = open_store(f"sqlite:///{path}")
        with sessions.begin() as s:
            repo.insert_flows(s, g.train, source=g.scenario)
        engine.dispose()
        templates[g.name] = path
        say(f"  {g.name}: {len(g.train)} training flows (of {g.train_flows_total}), {len(g.test)} test flows")
    key_path = out / "keys" / "aggregator.key"
    key_path.parent.mkdir(exist_ok=True)
    key = signing.generate_private_key()
    signing.save_private_key(key, key_path)
    pub_path = signing.save_public_key(key, key_path.with_suffix(".pub"))
    counts: dict[str, int] = {}
    for r in test_records:
        lab = record_label(r) or "?"
        counts[lab] = counts.get(lab, 0) + 1
    return Prepared(gateways, model_dir, test_log, templates, key_path, Path(pub_path), counts)


class CentralEvaluator:
    """Scores weights on the pooled test parts (what the aggregator calls after each
    aggregation, and what the harness uses for version 0)."""

    def __init__(self, model_dir: Path, test_log: Path):
        from gateway.fl.learner import TorchLearner
        from gateway.fl.run import load_eval_data

        self.learner = TorchLearner(model_dir)
        self.initial_weights = self.learner.weights()
        self.data = load_eval_data(self.learner, test_log)

    def __call__(self, weights) -> dict[str, float]:
        self.learner.load({k: weights[k] for k in self.learner.weights()})
        m = self.learner.evaluate(self.data)
        return {"accuracy": m["accuracy"], "f1": m["f1"], "macro_f1": m.get("macro_f1", 0.0)}


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    label: str
    strategy: str
    compression: str
    dp: bool
    rounds: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


class Monitor:
    """A plain MQTT subscriber: counts updates (unique message ids) and their bytes,
    and collects every gateway status (the client models' test scores)."""

    def __init__(self, port: int, label: str):
        from gateway.mqtt import MqttLink, MqttSettings
        from gateway.protocol import topics

        self.inbox: queue.Queue = queue.Queue()
        self.link = MqttLink(MqttSettings(port=port, client_id=f"experiment-monitor-{label}"),
                             subscriptions=[(topics.all_updates(), 1), (topics.all_statuses(), 1)],
                             inbox=self.inbox)
        self.update_ids: dict[str, float] = {}  # message id -> first seen
        self.update_frames: set[tuple[str, int]] = set()
        self.bytes_up = 0
        self.update_times: list[tuple[float, int]] = []  # (time, wire bytes) per new frame
        self.online: set[str] = set()
        self.evals: dict[str, list[dict]] = {}

    def start(self) -> "Monitor":
        import threading

        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="experiment-monitor", daemon=True)
        self._thread.start()
        self.link.start()
        if not self.link.wait_connected(15):
            raise RuntimeError("experiment monitor could not connect to the broker")
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                self._record(m, time.time())

    def online_now(self) -> set[str]:
        with self._lock:
            return set(self.online)

    def _record(self, m, now: float) -> None:
        from gateway.protocol import chunking, topics
        from gateway.protocol.envelope import decode_header
        from gateway.protocol.errors import EnvelopeError

        try:
            gid, kind = topics.parse_gateway_topic(m.topic)
        except topics.TopicError:
            return
        if kind == "status":
            try:
                st = json.loads(m.payload) if m.payload else {}
            except ValueError:
                return
            if st.get("state") and st.get("state") != "offline":
                self.online.add(gid)
            else:
                self.online.discard(gid)
            ev = st.get("eval") or {}
            if ev.get("accuracy") is not None:
                lst = self.evals.setdefault(gid, [])
                if not lst or lst[-1] != ev:
                    lst.append(ev)
        elif kind == "update":
            try:
                if chunking.is_chunk(m.payload):
                    ch = chunking.parse_chunk(m.payload)
                    key = (ch.message_id, ch.index)
                    mid = ch.message_id
                else:
                    mid = decode_header(m.payload)[0].message_id
                    key = (mid, 0)
            except EnvelopeError:
                return
            if key in self.update_frames:
                return  # a resent copy (at-least-once)
            self.update_frames.add(key)
            self.update_ids.setdefault(mid, now)
            self.bytes_up += len(m.payload)
            self.update_times.append((now, len(m.payload)))

    def stop(self) -> None:
        self.link.stop()
        self._stop.set()
        self._thread.join(timeout=5)


def _strategy_params(settings: ExperimentSettings, strategy: str) -> dict:
    steps = settings.max_local_steps
    if strategy == "gsfs":
        # Server: rho = 1 (wait for every live gateway that triggers, or the deadline);
        # sample_weighted + coverage_scaled: the window's sample-weighted mean delta
        # times the window's share of all samples, i.e. FedAvg's full-participation
        # step with a quiet gateway's delta taken as zero, which is GSFS's own premise
        # (quiet = the global fits it). The gateway trigger below makes that premise
        # true: a gateway the global stopped fitting speaks. remember_quiet is off:
        # on IoT-23, remembered models (MIFA model form) froze the run at 0.95 (a
        # 10 %-weight gateway cannot move a mean of models) and remembered deltas (MIFA
        # delta form) re-applied 50-step deltas every window; one window fell to 0.46
        # (that run used the likelihood P).
        # Trigger (gateway/fl/trigger.py): P = accuracy on the local validation split
        # (F1 of 3 malicious flows fires on noise, the likelihood fires on confidence
        # gaps the global never closes: every gateway spoke every version); reference
        # "upload": a global more than tau_i below what the gateway reached makes it
        # upload (with the old reset-on-broadcast, the one DDoS gateway stayed quiet
        # while other windows erased its flows); tau 0.01 with min_flows 5 (a change
        # must be worth 5 validation flows: the 21-flow honeypot split otherwise fires
        # on one flow). stay 0: staying 2 or 4 versions after a forgotten one (so the
        # windows after a conflict hold both sides: IoT-23's 34-1 DDoS and 42-1 benign
        # flows look alike, and alternating windows swing the model 0.38..0.998 on
        # 34-1) did not stop the swing in 10 rounds and spent 33-47 uploads; without
        # it a run that reaches agreement goes quiet (seed 0: 0.9961 after 5 versions,
        # 17 uploads). P is evaluated once, at the end of the step budget; the
        # gradient trigger may fire from half-way on. No cooldown.
        return {"rho": 1.0, "eta": 1.0, "staleness_exponent": 1.0, "deadline_s": settings.gsfs_deadline_s,
                "sample_weighted": True, "coverage_scaled": True, "remember_quiet": False,
                "trigger": {"tau": 0.01, "ema": 0.9, "k": 4.0, "warmup": max(1, steps // 2), "eval_every": steps,
                            "reference": "upload", "metric": "accuracy", "min_flows": 5.0, "stay": 0,
                            "cooldown": 0}}
    if strategy == "fedopt":
        return {"eta": settings.fedopt_eta, "beta1": 0.9, "beta2": 0.99, "tau": settings.fedopt_tau,
                "round_timeout_s": settings.round_timeout_s}
    return {"eta": 1.0, "round_timeout_s": settings.round_timeout_s}


def run_one(settings: ExperimentSettings, prep: Prepared, *, strategy: str, compression: str,
            evaluator: CentralEvaluator, initial_metrics: dict, forks, on_round=None) -> RunResult:
    """One strategy/compression run; gateway processes come from ``forks`` (a
    :class:`gateway.fl.forkserver.ForkServer`)."""
    import shutil

    from cloud_aggregator import store as agg_store
    from cloud_aggregator.broker import LocalBroker
    from cloud_aggregator.service import AggregatorConfig, AggregatorService
    from gateway.mqtt import MqttSettings
    from gateway.protocol import signing

    label = strategy + ("" if compression == "none" else f"+{compression}") + ("+dp" if settings.dp_noise else "")
    work = settings.out / "runs" / label
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    result = RunResult(label=label, strategy=strategy, compression=compression, dp=bool(settings.dp_noise))
    broker = LocalBroker(workdir=work / "broker").start()
    pids: list[int] = []
    monitor = service = None
    started = time.time()
    try:
        monitor = Monitor(broker.port, label).start()
        trig = _strategy_params(settings, "gsfs")["trigger"]
        for g in prep.gateways:
            db = work / f"{g.name}.db"
            shutil.copy(prep.store_templates[g.name], db)
            argv = ["--gateway-id", g.name, "--db", f"sqlite:///{db}",
                   "--model", str(prep.model_dir), "--port", str(broker.port), "--verify-key", str(prep.pub_path),
                   "--eval-data", str(prep.test_log), "--strategy", strategy,
                   "--local-epochs", str(settings.local_epochs), "--max-local-steps", str(settings.max_local_steps),
                   "--batch-size", str(settings.batch_size), "--lr", str(settings.lr),
                   "--compression", compression, "--seed", str(settings.seed), "--threads", "1",
                   "--status-interval", "2", "--tau", str(trig["tau"]), "--warmup", str(trig["warmup"]),
                   "--eval-every", str(trig["eval_every"])]
            pids.append(forks.spawn(argv, str(work / "logs" / f"{g.name}.log")))
        names = {g.name for g in prep.gateways}
        deadline = time.time() + 180
        while not names <= monitor.online_now():
            if time.time() > deadline:
                raise RuntimeError(f"gateways never came online: {sorted(names - monitor.online_now())}")
            if not all(forks.alive(p) for p in pids):
                raise RuntimeError(f"a gateway process exited early; see {work / 'logs'}")
            time.sleep(0.2)
        gateways_up = time.time()
        dp = ({"clip_norm": settings.dp_clip, "noise_multiplier": settings.dp_noise}
              if settings.dp_noise else None)
        config = AggregatorConfig(
            database=f"sqlite:///{work / 'aggregator.db'}", strategy=strategy,
            strategy_params=_strategy_params(settings, strategy), dp=dp, seed=settings.seed,
            known_senders=frozenset(names), signing_key=str(prep.key_path),
            local={"epochs": settings.local_epochs, "max_steps": settings.max_local_steps, "lr": settings.lr,
                   "lr_decay": settings.lr_decay, "prox_mu": settings.prox_mu,
                   "missing_class_scale": settings.missing_class_scale, "label_smoothing": settings.label_smoothing,
                   "batch_size": settings.batch_size,
                   "compression": compression},
            mqtt=MqttSettings(port=broker.port, client_id=f"aggregator-{label}"))
        service = AggregatorService(config, initial_weights=evaluator.initial_weights, evaluator=evaluator,
                                    signing_key=signing.load_private_key(prep.key_path))
        for gid in names:  # seen online through their retained statuses: round 1 includes all
            service.pool.set_status(gid, True, {})
        t0 = time.time()
        service.start()
        last_version, last_change = 0, time.time()
        while service.version < settings.rounds:
            service.wait_for(lambda s: s.version > last_version, timeout=1.0)
            if service.version > last_version:
                last_version, last_change = service.version, time.time()
                if on_round:
                    on_round(label, last_version)
            elif time.time() - last_change > settings.stall_timeout_s:
                log.warning("%s: no new global version for %.0f s (no gateway triggered an upload); "
                            "ending the run at version %d", label, settings.stall_timeout_s, last_version)
                break
            if not any(forks.alive(p) for p in pids):
                raise RuntimeError(f"every gateway process exited; see {work / 'logs'}")
        service.stop()  # no aggregation beyond the last round
        time.sleep(1.5)  # let the last client evaluations arrive
        with service.sessions() as s:
            rows = [(r.version, r.num_updates, r.senders, dict(r.metrics or {}), dict(r.info or {}), r.bytes_up,
                     r.bytes_down, r.finished_at) for r in agg_store.rounds(s)]
        rejected = dict(service.rejections)
    finally:
        forks.terminate_all()
        if service is not None:
            service.stop()
        if monitor is not None:
            monitor.stop()
        broker.cleanup()
    rows = sorted((r for r in rows if r[0] <= settings.rounds), key=lambda r: r[0])
    result.rounds = _round_rows(rows, monitor, t0, initial_metrics, n_gateways=len(prep.gateways))
    result.summary = _summarise(result, settings, monitor, t0=t0, setup_s=gateways_up - started,
                                rejected=rejected)
    return result


def _client_average(monitor: Monitor, base_version: int) -> tuple[float | None, float | None, int]:
    accs, f1s = [], []
    for evals in monitor.evals.values():
        best = [e for e in evals if e.get("version") is not None and e["version"] <= base_version]
        if best:
            e = best[-1]
            accs.append(float(e["accuracy"]))
            f1s.append(float(e["f1"]))
    if not accs:
        return None, None, 0
    return sum(accs) / len(accs), sum(f1s) / len(f1s), len(accs)


def _round_rows(rows, monitor: Monitor, t0: float, initial_metrics: dict, *, n_gateways: int) -> list[dict]:
    out = [{"round": 0, "central_accuracy": initial_metrics["accuracy"], "central_f1": initial_metrics["f1"],
            "client_accuracy": None, "client_f1": None, "updates_aggregated": 0, "uploads": 0,
            "bytes_up": 0, "bytes_down": 0, "elapsed_s": 0.0, "round_s": None, "dp_epsilon": None}]
    prev_t = t0
    bytes_down = 0
    for version, n_upd, senders, metrics, info, _bytes_up, b_down, finished in rows:
        uploads = sum(1 for t in monitor.update_ids.values() if t <= finished)
        bytes_up = sum(b for t, b in monitor.update_times if t <= finished)
        bytes_down += b_down
        acc, f1, n = _client_average(monitor, version - 1)
        out.append({
            "round": version, "central_accuracy": metrics.get("accuracy"), "central_f1": metrics.get("f1"),
            "client_accuracy": acc, "client_f1": f1, "clients_scored": n, "updates_aggregated": n_upd,
            "senders": senders, "uploads": uploads, "bytes_up": bytes_up, "bytes_down": bytes_down,
            "elapsed_s": finished - t0, "round_s": finished - prev_t, "dp_epsilon": info.get("dp_epsilon"),
        })
        prev_t = finished
    return out


def _summarise(result: RunResult, settings: ExperimentSettings, monitor: Monitor, *, t0: float, setup_s: float,
               rejected: dict) -> dict:
    last = result.rounds[-1]
    target = next((r for r in result.rounds if r["central_f1"] is not None and r["central_f1"] >= settings.target_f1),
                  None)
    sizes = [b for _, b in monitor.update_times]
    tail = [r for r in result.rounds[1:]][-3:]

    def mean_of(key):
        vals = [r[key] for r in tail if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "rounds_reached": last["round"],
        "last3_central_accuracy": mean_of("central_accuracy"), "last3_central_f1": mean_of("central_f1"),
        "final_central_accuracy": last["central_accuracy"], "final_central_f1": last["central_f1"],
        "final_client_accuracy": last["client_accuracy"], "final_client_f1": last["client_f1"],
        "uploads": last["uploads"], "bytes_up": last["bytes_up"], "bytes_down": last["bytes_down"],
        "uploads_after_last_round": len(monitor.update_ids) - last["uploads"],
        "mean_update_bytes": (sum(sizes) / len(monitor.update_ids)) if monitor.update_ids else None,
        "wall_s": last["elapsed_s"], "setup_s": setup_s,
        "time_to_target_s": None if target is None else target["elapsed_s"],
        "round_to_target": None if target is None else target["round"],
        "dp_epsilon": last.get("dp_epsilon"), "rejections": rejected,
    }


# --------------------------------------------------------------------------- whole experiment


def run_experiment(settings: ExperimentSettings, *, console=None) -> dict:
    """Prepare, run every (compression, strategy) pair, write the report; returns it."""
    from rich.console import Console

    console = console or Console(stderr=True)
    t_start = time.time()
    settings.out.mkdir(parents=True, exist_ok=True)
    from gateway.fl.forkserver import ForkServer

    # started first: it imports the gateway code while the data is prepared
    forks = ForkServer(env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        return _run_all(settings, console, forks, t_start)
    finally:
        forks.close()


def _run_all(settings: ExperimentSettings, console, forks, t_start: float) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console.print(f"[bold]Preparing[/bold] {len(settings.gateway_data)} gateways in {settings.out}")
    prep = prepare(settings, say=console.print)
    evaluator = CentralEvaluator(prep.model_dir, prep.test_log)
    initial_metrics = evaluator(evaluator.initial_weights)
    raw_update_bytes = 4 * sum(int(v.size) for v in evaluator.initial_weights.values()
                               if v.dtype.kind == "f")
    runs: list[RunResult] = []
    pairs = [(c, s) for c in settings.compressions for s in settings.strategies]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        overall = progress.add_task("runs", total=len(pairs))
        for compression, strategy in pairs:
            task = progress.add_task(f"{strategy}/{compression} rounds", total=settings.rounds)
            res = run_one(settings, prep, strategy=strategy, compression=compression, evaluator=evaluator,
                          initial_metrics=initial_metrics, forks=forks,
                          on_round=lambda _label, v, t=task: progress.update(t, completed=v))
            runs.append(res)
            progress.update(overall, advance=1)
            s = res.summary
            console.print(f"  {res.label}: central acc {s['final_central_accuracy']:.4f} "
                          f"F1 {s['final_central_f1']:.4f}, {s['uploads']} uploads, "
                          f"{s['bytes_up'] / 1e6:.2f} MB up, {s['wall_s']:.0f} s")
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "gateway_data" else v)
                     for k, v in asdict(settings).items()},
        "gateways": [{"id": g.name, "scenario": g.scenario, "train_flows": len(g.train),
                      "train_flows_before_cap": g.train_flows_total, "test_flows": len(g.test)}
                     for g in prep.gateways],
        "test_labels": prep.test_counts,
        "initial_model": {"init": "random", "seed": settings.seed, "central": initial_metrics},
        "raw_float32_update_bytes": raw_update_bytes,
        "runs": [asdict(r) for r in runs],
        "total_wall_s": time.time() - t_start,
    }
    write_report(report, settings.out)
    return report


def run_seeds(settings: ExperimentSettings, seeds: Sequence[int], *, console=None) -> dict:
    """The whole experiment once per seed (split, initial model and training all follow
    the seed), each into ``out/seed-<s>``; writes ``seeds.md`` and ``seeds.json`` in
    ``out`` and returns their content. One 10-round run on non-IID gateways is a sample,
    not a result: a federated-learning comparison is read across seeds."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError("give distinct seeds")
    reports = [run_experiment(replace(settings, seed=int(s), out=settings.out / f"seed-{s}"), console=console)
               for s in seeds]
    result = {"seeds": [int(s) for s in seeds], "summary": seed_summary(reports),
              "per_seed": [{"seed": int(s), "rows": summary_rows(r)} for s, r in zip(seeds, reports)]}
    write_seed_report(result, settings.out)
    return result


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct integers, e.g. --seeds 0,1,2,3 (got {text!r})")
    return seeds


def seed_summary(reports: Sequence[dict]) -> list[dict]:
    """PURE. One row per run label (strategy, strategy+compression) over the reports of
    several seeds: final central accuracy and F1 as mean, sample standard deviation
    (0 for one seed) and minimum, the mean of the last three rounds' accuracy, and the
    mean uploads and MB up. Labels keep the order of the first report."""
    import statistics

    by_label: dict[str, list[dict]] = {}
    for report in reports:
        for row in summary_rows(report):
            by_label.setdefault(row["run"], []).append(row)

    def stats(values):
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return None, None, None
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), min(vals)

    out = []
    for label, rows in by_label.items():
        acc, acc_sd, acc_min = stats(r["central_acc"] for r in rows)
        f1, f1_sd, f1_min = stats(r["central_f1"] for r in rows)
        out.append({"run": label, "seeds": len(rows), "acc_mean": acc, "acc_std": acc_sd, "acc_min": acc_min,
                    "f1_mean": f1, "f1_std": f1_sd, "f1_min": f1_min,
                    "last3_acc_mean": stats(r["last3_acc"] for r in rows)[0],
                    "uploads_mean": stats(r["uploads"] for r in rows)[0],
                    "MB_up_mean": stats(r["MB_up"] for r in rows)[0]})
    return out


def write_seed_report(result: dict, out: Path) -> None:
    """seeds.json and seeds.md (summary over seeds, then each seed's final numbers)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    rows = result["summary"]
    cols = list(rows[0]) if rows else []
    lines = ["# fedgate experiment over seeds", "",
             f"Seeds {', '.join(str(s) for s in result['seeds'])}; each seed's full report is in seed-<s>/. "
             "acc/f1: final central accuracy and F1 (mean, sample standard deviation, minimum over seeds); "
             "last3_acc_mean: mean over seeds of the mean of the last three rounds.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "## Per seed (final central accuracy / F1, uploads, MB up)", "",
              "| seed | " + " | ".join(r["run"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for entry in result["per_seed"]:
        got = {r["run"]: r for r in entry["rows"]}
        cells = [(f"{_cell(got[r['run']]['central_acc'])} / {_cell(got[r['run']]['central_f1'])}, "
                  f"{got[r['run']]['uploads']}, {got[r['run']]['MB_up']:.2f}") if r["run"] in got else "-"
                 for r in rows]
        lines.append(f"| {entry['seed']} | " + " | ".join(cells) + " |")
    (out / "seeds.md").write_text("\n".join(lines) + "\n")


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def summary_rows(report: dict) -> list[dict]:
    raw = report["raw_float32_update_bytes"]
    rows = []
    for r in report["runs"]:
        s = r["summary"]
        rows.append({
            "run": r["label"], "rounds": s["rounds_reached"],
            "central_acc": s["final_central_accuracy"], "central_f1": s["final_central_f1"],
            "last3_acc": s.get("last3_central_accuracy"), "last3_f1": s.get("last3_central_f1"),
            "client_acc": s["final_client_accuracy"], "client_f1": s["final_client_f1"],
            "uploads": s["uploads"], "MB_up": s["bytes_up"] / 1e6, "MB_down": s["bytes_down"] / 1e6,
            "update_KB": None if s["mean_update_bytes"] is None else s["mean_update_bytes"] / 1e3,
            "raw/update": None if not s["mean_update_bytes"] else raw / s["mean_update_bytes"],
            "wall_s": s["wall_s"], "to_target_s": s["time_to_target_s"], "dp_eps": s["dp_epsilon"],
        })
    return rows


def write_report(report: dict, out: Path) -> None:
    """report.json, report.md and PNG plots in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plots = _plots(report, out)
    st = report["settings"]
    lines = [
        "# fedgate experiment report", "",
        f"{len(report['gateways'])} gateways, {st['rounds']} rounds, seed {st['seed']}, "
        f"local: {st['local_epochs']} epochs / at most {st['max_local_steps']} steps of batch {st['batch_size']}, "
        f"lr {st['lr']} x {st.get('lr_decay', 1.0)}^version, proximal mu {st.get('prox_mu', 0.0)}, missing-class logit scale {st.get('missing_class_scale', 1.0)}, label smoothing {st.get('label_smoothing', 0.0)}; FedOpt server Adam eta {st.get('fedopt_eta', 0.03)}, tau {st.get('fedopt_tau', 1e-3)}; prompt template {st.get('template', 'edge-compact/v2')}; test part {st['test_fraction']:.0%} of every scenario (never trained on); "
        f"training flows capped at {st['max_train_flows']} per gateway (stratified sample). "
        f"Initial model: random init (seed {st['seed']}), central accuracy "
        f"{report['initial_model']['central']['accuracy']:.4f}. Raw float32 delta: "
        f"{report['raw_float32_update_bytes'] / 1e3:.1f} KB. Total wall time {report['total_wall_s']:.0f} s.", "",
        "## Summary (final round; central = global model on the pooled test parts)", "",
    ]
    rows = summary_rows(report)
    cols = list(rows[0]) if rows else []
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]) for c in cols) + " |")
    lines += ["", f"last3: mean over the last three rounds (one round can land between two modes). "
              f"Time to target: first round whose central F1 >= {st['target_f1']}. raw/update: raw float32 "
              f"delta bytes over the mean wire bytes of an update. client: each gateway's own model after its "
              f"local training, scored on the pooled test parts (non-IID: a gateway that saw one scenario "
              f"scores low on the others). rounds: global versions reached; a GSFS run with fewer than "
              f"{st['rounds']} stopped because no gateway's trigger fired for {st.get('stall_timeout_s', 45):.0f} s "
              f"(every gateway's model fits the global within its tau_i): its last global model is final.", ""]
    lines += ["## Gateways", "", "| gateway | training flows (cap) | test flows |", "|---|---|---|"]
    for g in report["gateways"]:
        lines.append(f"| {g['id']} | {g['train_flows']} ({g['train_flows_before_cap']}) | {g['test_flows']} |")
    for r in report["runs"]:
        lines += ["", f"## {r['label']}: per round", "",
                  "| round | central acc | central F1 | client acc | client F1 | aggregated | uploads | "
                  "KB up | KB down | round s | elapsed s | DP eps | gateways aggregated |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["rounds"]:
            lines.append(
                f"| {row['round']} | {_fmt(row['central_accuracy'])} | {_fmt(row['central_f1'])} | "
                f"{_fmt(row['client_accuracy'])} | {_fmt(row['client_f1'])} | {row['updates_aggregated']} | "
                f"{row['uploads']} | {row['bytes_up'] / 1e3:.1f} | {row['bytes_down'] / 1e3:.1f} | "
                f"{_fmt(row['round_s'], '.1f')} | {row['elapsed_s']:.1f} | {_fmt(row['dp_epsilon'], '.3g')} | "
                f"{', '.join(row.get('senders') or []) or '-'} |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    (out / "report.md").write_text("\n".join(lines))


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    specs = [("central_f1", "central F1"), ("central_accuracy", "central accuracy"),
             ("client_f1", "client-average F1"), ("bytes_up", "cumulative bytes up")]
    for key, title in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in report["runs"]:
            pts = [(row["round"], row[key]) for row in r["rounds"] if row.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=r["label"])
        ax.set_xlabel("round (global version)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = out / f"{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path)
    return made


# --------------------------------------------------------------------------- command


QUICK = {"rounds": 2, "max_train_flows": 2000, "max_local_steps": 20, "local_epochs": 10, "round_timeout_s": 60.0,
         "stall_timeout_s": 20.0, "gsfs_deadline_s": 4.0}


@click.command("experiment", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--strategies", default="gsfs,fedavg,fedopt", show_default=True,
              help="Comma-separated strategies to compare.")
@click.option("--gateway-data", "gateway_data", multiple=True, required=True,
              type=click.Path(exists=True, path_type=Path),
              help="A data directory (one labelled conn log) per gateway; repeat the option, or list "
                   "more directories after it (--gateway-data data/iot23/*).")
@click.option("--rounds", default=10, show_default=True, type=int, help="Global versions per run.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report directory.")
@click.option("--compression", default="none", show_default=True,
              help="none, int8, topk, or a comma list (each strategy runs with each).")
@click.option("--dp-noise", type=float, default=None, help="Central DP noise multiplier (DP off if absent).")
@click.option("--dp-clip", type=float, default=1.0, show_default=True, help="Central DP clipping norm.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--seeds", default=None,
              help="Comma-separated seeds: the whole experiment once per seed into OUT/seed-<s>, then "
                   "OUT/seeds.md and seeds.json with mean, std and min over seeds (replaces --seed).")
@click.option("--max-train-flows", default=100_000, show_default=True, type=int,
              help="Training flows kept per gateway (stratified sample).")
@click.option("--max-local-steps", default=50, show_default=True, type=int)
@click.option("--local-epochs", default=20, show_default=True, type=int)
@click.option("--lr", default=2e-3, show_default=True, type=float)
@click.option("--lr-decay", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Local learning rate on global version v: lr * lr-decay**v.")
@click.option("--prox-mu", default=0.0, show_default=True, type=click.FloatRange(0, MAX_PROX_MU),
              help="FedProx proximal term of local training: mu/2 * ||w - w_global||^2.")
@click.option("--label-smoothing", default=0.1, show_default=True, type=click.FloatRange(0, MAX_LABEL_SMOOTHING),
              help="Label smoothing of the local cross-entropy (0 = plain).")
@click.option("--missing-class-scale", default=1.0, show_default=True, type=click.FloatRange(0, 1),
              help="FedRS restricted softmax: local training multiplies the logits of classes a "
                   "gateway has no flow of by this (1 = plain softmax).")
@click.option("--fedopt-eta", default=fedopt.DEFAULT_ETA, show_default=True, type=click.FloatRange(0, min_open=True),
              help="FedOpt: server Adam learning rate.")
@click.option("--fedopt-tau", default=fedopt.DEFAULT_TAU, show_default=True, type=click.FloatRange(0, min_open=True),
              help="FedOpt: server Adam adaptivity, added to sqrt(v); larger = less adaptive (a delta much "
                   "smaller than tau moves the weights by about eta/tau times itself).")
@click.option("--template", default=DEFAULT_TEMPLATE, show_default=True,
              help="Prompt template of the initial model: NAME/vN, or NAME for its newest version.")
@click.option("--target-f1", default=0.99, show_default=True, type=float)
@click.option("--quick", is_flag=True, help="Tiny settings (2 rounds, small data): demos and tests.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.argument("more_data", nargs=-1, type=click.Path(exists=True, path_type=Path))
def experiment_command(strategies, gateway_data, more_data, rounds, out, compression, dp_noise, dp_clip, seed, seeds,
                       max_train_flows, max_local_steps, local_epochs, lr, lr_decay, prox_mu, missing_class_scale,
                       label_smoothing, fedopt_eta, fedopt_tau, template, target_f1, quick, as_json) -> None:
    """Compare GSFS, FedAvg and FedOpt on real gateway processes over a real broker.

    Each --gateway-data directory becomes one gateway process with its own store;
    a stratified test part of every directory is never trained on and scores the
    central model and each client's model after every round. Writes report.md,
    report.json and PNG plots to --out.

    \b
    Examples:
      fedgate-aggregator experiment --gateway-data data/iot23/* --rounds 10 --out runs/exp
      fedgate-aggregator experiment --seeds 0,1,2,3 --gateway-data data/iot23/* --out runs/seeds
      fedgate-aggregator experiment --strategies gsfs,fedavg --compression none,int8 \\
          --gateway-data data/iot23/* --out runs/compress
      fedgate-aggregator experiment --quick --gateway-data data/iot23/CTU-Honeypot-Capture-7-1 \\
          --gateway-data data/iot23/CTU-Malware-Capture-8-1 --out /tmp/quick
      fedgate-aggregator experiment --template edge-compact/v3 --seeds 0,1 --gateway-data data/iot23/* --out runs/v3
    """
    from gateway.output import emit_json, emit_rows

    kwargs = dict(rounds=rounds, max_train_flows=max_train_flows, max_local_steps=max_local_steps,
                  local_epochs=local_epochs)
    if quick:
        kwargs.update(QUICK)
    try:
        settings = ExperimentSettings(
            strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()),
            compressions=tuple(c.strip() for c in compression.split(",") if c.strip()),
            gateway_data=tuple(gateway_data) + tuple(more_data), out=out, seed=seed, lr=lr, lr_decay=lr_decay, prox_mu=prox_mu,
            missing_class_scale=missing_class_scale, label_smoothing=label_smoothing, fedopt_eta=fedopt_eta,
            fedopt_tau=fedopt_tau, template=template, target_f1=target_f1,
            dp_noise=dp_noise, dp_clip=dp_clip, quick=quick, **kwargs)
        seed_list = None if seeds is None else _parse_seeds(seeds)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if seed_list is not None:
        result = run_seeds(settings, seed_list)
        if as_json:
            emit_json(result["summary"])
        else:
            emit_rows(result["summary"], ["run", "seeds", "acc_mean", "acc_std", "acc_min", "f1_mean",
                                          "uploads_mean", "MB_up_mean"],
                      title=f"experiment over seeds {seeds}")
            click.echo(f"report: {out / 'seeds.md'} (+ seeds.json, seed-<s>/)")
        return
    report = run_experiment(settings)
    rows = summary_rows(report)
    if as_json:
        emit_json(rows)
    else:
        emit_rows(rows, ["run", "rounds", "central_acc", "central_f1", "client_f1", "uploads", "MB_up", "wall_s"],
                  title=f"experiment: {settings.rounds} rounds, {len(settings.gateway_data)} gateways")
        click.echo(f"report: {out / 'report.md'} (+ report.json, *.png)")
