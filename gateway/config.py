"""The gateway's configuration: a TOML file, environment overrides, validated settings.

``load_config(path)`` reads the file, applies environment overrides and returns a
frozen :class:`GatewayConfig`.  Every problem is a :class:`ConfigError` that names the
key (``section.key``) and says what is wrong, so ``fedgate config check`` and
``fedgate gateway run`` can print one clear line instead of a traceback.

Environment overrides (applied after the file, before validation):

* ``FEDGATE__<SECTION>__<KEY>=value`` sets ``[section] key`` (names are case-insensitive;
  ``__`` separates the levels).  The value is read as a TOML value when it is one
  (``8883``, ``true``, ``0.5``, ``["gw1", "gw2"]``, ``"quoted"``), else taken as a
  plain string, e.g. ``FEDGATE__MQTT__HOST=broker``, ``FEDGATE__MQTT__PORT=8883``,
  ``FEDGATE__SOURCE__ZEEK_LOG=/var/log/zeek/conn.log``.
* ``FEDGATE_DB_URL=postgresql+psycopg://...`` is the short form of
  ``FEDGATE__GATEWAY__DATABASE`` (a database URL often comes from a secret store).

Relative paths in the file (and in overrides) are relative to the file's directory:
the path keys, ``zeek_archive_globs`` and a SQLite ``database`` (a plain path, or a
``sqlite:///relative.db`` URL).  ``fedgate config check`` prints every resolved path.

Minimal ``gw.toml`` (the bundled model classifies; the database is
``fedgate-state/gateway.db`` beside the file)::

    [gateway]
    id = "gw1"
    [source]
    zeek_log = "/opt/zeek/logs/current/conn.log"
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.fl.control import local_setting_problem
from gateway.flows.settings import FlowSettings
from gateway.protocol import topics

ENV_PREFIX = "FEDGATE__"
DB_URL_ENV = "FEDGATE_DB_URL"
DEFAULT_HTTP_LISTEN = "127.0.0.1:9108"
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
FL_STRATEGIES = ("gsfs", "fedavg", "fedopt")
COMPRESSIONS = ("none", "int8", "topk")
NO_MODEL = "none"  # [gateway] model = "none": store flows without classifying them
DATABASE_FILE = "gateway.db"  # the default database, a SQLite file in state_dir
DEPLOY_METRICS = ("accuracy", "f1", "macro_f1")


class ConfigError(ValueError):
    """A setting is missing, unknown, of the wrong type or out of range.

    ``key`` is the dotted name (``mqtt.port``); ``problem`` says what is wrong.
    """

    def __init__(self, key: str, problem: str, *, source: str | None = None):
        self.key = key
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def _is_device(name: str) -> bool:
    from gateway.model.device import check_device_name

    try:
        return bool(check_device_name(name))
    except ValueError:
        return False


# ---------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class GatewaySection:
    """``[gateway]``: who this gateway is and where it keeps its state.

    id (required): the gateway id, a topic segment and the certificate CN.
    prefix ["fedgate/v1"]: MQTT topic prefix.
    database [state_dir/gateway.db]: SQLAlchemy URL, or a path of a SQLite file.
    model [the model bundled with fedgate]: model directory (ONNX model, tokenizer,
      labels); "none" stores flows without classifying them (and so disables alerts
      and federated learning).
    global_model_public_key [None]: aggregator's Ed25519 public key (PEM); global
      models must be signed by it.  Required when federated learning is on, unless
      ``[fl] allow_unsigned = true`` (lab use only).
    global_model_public_keys [[]]: more public keys accepted besides that one, for a
      key rotation (the header's key id says which key signed a model): list the new
      key here before the aggregator switches to it, and the old one until every
      gateway has received a model signed with the new.
    state_dir ["fedgate-state"]: the gateway's own files: the default database, and
      received global models exported to ONNX (``models/global-<version>``; the newest
      few are kept).  Created at start.
    """

    id: str
    prefix: str = topics.DEFAULT_PREFIX
    database: str | None = None  # None: derived, a SQLite file in state_dir
    model: str | None = field(default_factory=lambda: bundled_model())
    global_model_public_key: str | None = None
    global_model_public_keys: tuple[str, ...] = ()
    state_dir: str = "fedgate-state"

    def __post_init__(self) -> None:
        try:
            topics.check_gateway_id(self.id)
        except ValueError as exc:
            raise ConfigError("gateway.id", str(exc)) from None
        try:
            topics.check_prefix(self.prefix)
        except ValueError as exc:
            raise ConfigError("gateway.prefix", str(exc)) from None
        _require(bool(self.state_dir), "gateway.state_dir", "must not be empty")
        if self.database is None:
            object.__setattr__(self, "database", os.path.join(self.state_dir, DATABASE_FILE))
        _require(bool(self.database), "gateway.database", "must not be empty")
        _require(self.model is None or bool(self.model), "gateway.model",
                 f'must be a model directory, or "{NO_MODEL}" to store flows unclassified')


def bundled_model() -> str:
    """The directory of the model shipped with fedgate (``[gateway] model``'s default)."""
    from gateway.model.modeldir import ModelDirError, bundled_model_dir

    try:
        return str(bundled_model_dir())
    except ModelDirError as exc:
        raise ConfigError("gateway.model", f"no bundled model ({exc}); give a model directory or \"{NO_MODEL}\"") from None


@dataclass(frozen=True, kw_only=True)
class SourceSection:
    """``[source]``: where flows come from (at least one).

    zeek_log [None]: live Zeek conn.log to follow (rotation and truncation survived).
    zeek_archive_globs [[]]: where Zeek archives rotated logs, as glob patterns (e.g.
      "/opt/zeek/logs/*/conn.*.log.gz"); a restarted gateway finishes the file it was
      reading there if it was rotated away while the gateway was down.
    poll_interval_s [0.02]: how often the tail looks for new lines; the floor of the
      line-to-detection latency.
    pcap_dir [None]: directory watched for capture files; each new file is replayed
      once (idempotent: a restart skips what was ingested).
    pcap_pattern ["*.pcap*"]: glob of the files taken from ``pcap_dir``.
    pcap_scan_interval_s [5.0]: how often ``pcap_dir`` is listed.
    interface [None]: network interface to sniff (needs CAP_NET_RAW).
    bpf [None]: capture filter for ``interface`` (tcpdump syntax).
    capture_method ["auto"]: how ``interface`` is captured: "tcpdump" (libpcap's ring,
      a pcap stream into the compiled reader; what "auto" picks where tcpdump is
      installed) or "scapy" (one recv per frame; loses packets past a few 10k/s).
    local_nets [[]]: networks counted as local by the capture's connection tracker
      ([] = Zeek's defaults: private ranges).
    capture_batch [256]: flows from the interface committed per transaction.
    capture_max_wait_s [1.0]: longest a captured flow waits for its batch to fill.
    """

    zeek_log: str | None = None
    zeek_archive_globs: tuple[str, ...] = ()
    poll_interval_s: float = 0.02
    pcap_dir: str | None = None
    pcap_pattern: str = "*.pcap*"
    pcap_scan_interval_s: float = 5.0
    interface: str | None = None
    bpf: str | None = None
    capture_method: str = "auto"
    local_nets: tuple[str, ...] = ()
    capture_batch: int = 256
    capture_max_wait_s: float = 1.0

    def __post_init__(self) -> None:
        _require(bool(self.zeek_log or self.pcap_dir or self.interface), "source",
                 "give at least one of zeek_log, pcap_dir, interface")
        _require(0 < self.poll_interval_s <= 60, "source.poll_interval_s", "must be in (0, 60] seconds")
        _require(0 < self.pcap_scan_interval_s <= 3600, "source.pcap_scan_interval_s",
                 "must be in (0, 3600] seconds")
        _require(bool(self.pcap_pattern), "source.pcap_pattern", "must not be empty")
        _require(1 <= self.capture_batch <= 1_000_000, "source.capture_batch", "must be in 1..1000000")
        _require(self.capture_method in ("auto", "tcpdump", "scapy"), "source.capture_method",
                 "must be one of auto, tcpdump, scapy")
        _require(0 < self.capture_max_wait_s <= 60, "source.capture_max_wait_s", "must be in (0, 60] seconds")
        import ipaddress

        for i, net in enumerate(self.local_nets):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"source.local_nets[{i}]", f"{net!r} is not a network (e.g. 192.168.0.0/16)") from None


@dataclass(frozen=True, kw_only=True)
class InferenceSection:
    """``[inference]``: the ONNX Runtime engine and alerting.

    provider ["auto"]: auto (CUDA when present, else CPU), cpu, cuda or tensorrt
      (TensorRT, with CUDA and CPU for what it leaves; engines are built at load).
    precision ["fp32"]: which graph of the model runs: fp32 (model.onnx), fp16
      (model.fp16.onnx: GPUs) or int8 (model.int8.onnx: CPUs); the model directory
      must hold it (``fedgate model export DIR --fp16 --int8``).
    batch_size [None]: most flows per inference batch; None sizes it for the device
      the model really runs on (256 on a CPU, 8192 on a GPU).
    device_id [0]: the GPU (CUDA, TensorRT).
    gpu_mem_limit_mb [None]: cap of ONNX Runtime's CUDA memory arena (None: no cap).
    max_wait_ms [5.0]: longest a flow waits for its batch to fill.
    alert_threshold [None]: malicious score at or above which a detection is published
      on ``{prefix}/gw/{id}/alerts``; None uses the model's own threshold.
    alerts [true]: publish alerts at all.
    alert_interval_s [0.5]: alerts are gathered and sent as one message per interval
      (at most 500 detections each).
    threads [None]: ONNX Runtime intra-op threads (None: one per core); 1 leaves the
      other cores to parsing, the store and training on a small box.
    """

    provider: str = "auto"
    precision: str = "fp32"
    batch_size: int | None = None
    device_id: int = 0
    gpu_mem_limit_mb: int | None = None
    max_wait_ms: float = 5.0
    alert_threshold: float | None = None
    alerts: bool = True
    alert_interval_s: float = 0.5
    threads: int | None = None

    def __post_init__(self) -> None:
        _require(self.provider in PROVIDERS, "inference.provider", f"must be one of {', '.join(PROVIDERS)}")
        _require(self.precision in PRECISIONS, "inference.precision", f"must be one of {', '.join(PRECISIONS)}")
        if self.batch_size is not None:
            _require(1 <= self.batch_size <= 65536, "inference.batch_size", "must be in 1..65536")
        _require(0 <= self.device_id <= 64, "inference.device_id", "must be in 0..64")
        if self.gpu_mem_limit_mb is not None:
            _require(self.gpu_mem_limit_mb >= 64, "inference.gpu_mem_limit_mb", "must be >= 64 (MiB)")
        _require(0 <= self.max_wait_ms <= 10_000, "inference.max_wait_ms", "must be in [0, 10000] ms")
        if self.alert_threshold is not None:
            _require(0.0 <= self.alert_threshold <= 1.0, "inference.alert_threshold", "must be in [0, 1]")
        if self.threads is not None:
            _require(1 <= self.threads <= 256, "inference.threads", "must be in 1..256")
        _require(0 < self.alert_interval_s <= 60, "inference.alert_interval_s", "must be in (0, 60] seconds")


@dataclass(frozen=True, kw_only=True)
class MqttSection:
    """``[mqtt]``: the broker (keys of :class:`gateway.mqtt.MqttSettings` / ``TlsSettings``).

    enabled [true]: false runs the gateway without a broker (no alerts, status or FL).
    host ["127.0.0.1"], port [1883]: broker address (8883 for TLS by convention).
    client_id [None]: MQTT client id; None means ``fedgate-gw-<id>``.
    username, password [None]: broker credentials.
    ca_file [None]: CA of the broker certificate; setting it turns TLS on.
    cert_file, key_file [None]: this gateway's certificate and key (mutual TLS).
    check_hostname [true]: verify the broker name against its certificate.
    keepalive_s [30]: the last will fires about 1.5 times this after a silent death.
    reconnect_min_s [1.0], reconnect_max_s [30.0]: reconnect back-off bounds.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        _require(bool(self.host), "mqtt.host", "must not be empty")
        _require(0 < self.port < 65536, "mqtt.port", f"{self.port} is not a TCP port (1..65535)")
        if self.client_id is not None:
            _require(0 < len(self.client_id) <= 128, "mqtt.client_id", "must be 1-128 characters")
        _require((self.cert_file is None) == (self.key_file is None), "mqtt.cert_file",
                 "give both cert_file and key_file, or neither")
        _require(self.cert_file is None or self.ca_file is not None, "mqtt.ca_file",
                 "a client certificate needs ca_file (TLS)")
        _require(1 <= self.keepalive_s <= 65535, "mqtt.keepalive_s", "must be in 1..65535 seconds")
        _require(0 < self.reconnect_min_s <= self.reconnect_max_s, "mqtt.reconnect_min_s",
                 "need 0 < reconnect_min_s <= reconnect_max_s")


@dataclass(frozen=True, kw_only=True)
class FlSection:
    """``[fl]``: federated learning (needs ``gateway.model`` with its torch weights).

    enabled [true]: take part in federated learning.
    strategy ["gsfs"]: until the aggregator's control topic says otherwise.
    local_epochs [1], max_local_steps [50], batch_size [64], lr [0.003]: local training.
    lr_decay [1.0]: the local rate on global version v is lr * lr_decay**v, in (0, 1].
    prox_mu [0.0]: FedProx proximal term mu/2 * ||w - w_global||^2 in the local loss.
    label_smoothing [0.1]: share of a uniform distribution in the local cross-entropy
        target, in [0, 0.5].
    retrain_interval_s [300.0]: GSFS; once the labelled flows changed, train again on
        the global version held, at most once per this many seconds (0: only on a new
        global version).
    missing_class_scale [1.0]: FedRS; local training multiplies the logits of classes
        this gateway has no flow of by this, in [0, 1] (1 = plain softmax).
    compression ["none"]: none, int8 or topk for uploaded deltas.
    status_interval_s [5.0]: retained status refresh period.
    threads [1]: torch threads for local training (keeps a core for detection).
    device ["auto"]: where local training runs: auto (CUDA when torch sees a GPU, else
        the CPU), cpu, cuda or cuda:N.
    allow_unsigned [false]: take part without ``gateway.global_model_public_key``, so
        that unsigned global models are loaded (lab use only). Without it, FL on and no
        key is a configuration error: anyone who can write the global topic would
        otherwise choose the model that classifies this gateway's traffic.
    """

    enabled: bool = True
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
    compression: str = "none"
    status_interval_s: float = 5.0
    threads: int = 1
    device: str = "auto"
    allow_unsigned: bool = False

    def __post_init__(self) -> None:
        _require(_is_device(self.device), "fl.device", "must be auto, cpu, cuda or cuda:N")
        _require(self.strategy in FL_STRATEGIES, "fl.strategy", f"must be one of {', '.join(FL_STRATEGIES)}")
        _require(self.compression in COMPRESSIONS, "fl.compression", f"must be one of {', '.join(COMPRESSIONS)}")
        for name in ("local_epochs", "max_local_steps", "batch_size", "threads"):
            _require(getattr(self, name) >= 1, f"fl.{name}", "must be >= 1")
        for name in ("lr", "lr_decay", "prox_mu", "missing_class_scale", "label_smoothing"):
            problem = local_setting_problem(name, getattr(self, name))
            _require(problem is None, f"fl.{name}", problem or "")
        _require(0 <= self.retrain_interval_s < float("inf"), "fl.retrain_interval_s", "must be finite and >= 0")
        _require(self.status_interval_s > 0, "fl.status_interval_s", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class EscalationSection:
    """``[escalation]``: ask the cloud teacher about flows the student is unsure of
    (gateway.escalation; the teacher runs as ``fedgate-aggregator teacher``).

    enabled [false]: escalate at all (needs [mqtt] and a model).  Escalated flows'
      Zeek fields (addresses included, labels not) leave the gateway.
    band_low [0.2], band_high [0.8]: a flow whose malicious score is within
      [band_low, band_high] is escalated.
    novelty_min [None]: a flow whose novelty score reaches this is escalated too
      (where the model gives novelty scores).
    max_rate [50.0]: flows escalated per second at most (token bucket) ...
    burst [500]: ... with up to this many at once; the rest keep the student's verdict.
    batch [64]: flows per request; max_wait_s [0.5]: longest a flow waits for its batch.
    timeout_s [10.0]: a request unanswered this long is given up (and expires at the
      broker, so a teacher that comes back never answers it).
    max_pending [5000]: flows queued for sending at most (the rest are counted, dropped).
    use_as_label [false]: federated learning trains on teacher verdicts of flows with no
      log or analyst label.
    """

    enabled: bool = False
    band_low: float = 0.2
    band_high: float = 0.8
    novelty_min: float | None = None
    max_rate: float = 50.0
    burst: int = 500
    batch: int = 64
    max_wait_s: float = 0.5
    timeout_s: float = 10.0
    max_pending: int = 5000
    use_as_label: bool = False

    def __post_init__(self) -> None:
        _require(0.0 <= self.band_low <= self.band_high <= 1.0, "escalation.band_low",
                 "need 0 <= band_low <= band_high <= 1")
        _require(0 < self.max_rate <= 1e6, "escalation.max_rate", "must be in (0, 1e6] flows/s")
        _require(1 <= self.burst <= 1_000_000, "escalation.burst", "must be in 1..1000000")
        _require(1 <= self.batch <= 256, "escalation.batch", "must be in 1..256 (the request limit)")
        _require(0 < self.max_wait_s <= 60, "escalation.max_wait_s", "must be in (0, 60] seconds")
        _require(0 < self.timeout_s <= 3600, "escalation.timeout_s", "must be in (0, 3600] seconds")
        _require(1 <= self.max_pending <= 1_000_000, "escalation.max_pending", "must be in 1..1000000")


@dataclass(frozen=True, kw_only=True)
class DeploySection:
    """``[deploy]``: what a received global model must pass before detection uses it
    (:mod:`gateway.fl.hotswap`).  Federated learning goes on from every verified
    version; these settings decide only which model classifies this gateway's traffic.

    gate [true]: score the new global and the deployed model on this gateway's labelled
      validation flows (labelled logs, analyst feedback: the FL validation split); keep
      the deployed model when the new one is worse by more than ``margin``, and say so
      on the status topic.
    metric ["accuracy"]: accuracy, f1 (malicious = positive) or macro_f1.
    margin [0.02]: how much worse a new global may score and still be deployed.
    min_flows [50]: with fewer labelled validation flows the gate cannot judge and the
      new global is deployed (the status says "unscored").
    canary [true]: after a swap, compare the share of flows alerted on with the share
      before it; roll the swap back when it jumps.
    canary_flows [500]: flows counted before and after a swap.
    canary_max_jump [0.15]: largest change of the alerted share (either way: a storm of
      false alarms, or alerts silenced) that does not roll back, in (0, 1].
    """

    gate: bool = True
    metric: str = "accuracy"
    margin: float = 0.02
    min_flows: int = 50
    canary: bool = True
    canary_flows: int = 500
    canary_max_jump: float = 0.15

    def __post_init__(self) -> None:
        _require(self.metric in DEPLOY_METRICS, "deploy.metric", f"must be one of {', '.join(DEPLOY_METRICS)}")
        _require(0 <= self.margin < 1, "deploy.margin", "must be in [0, 1)")
        _require(0 <= self.min_flows <= 10_000_000, "deploy.min_flows", "must be in 0..10000000")
        _require(1 <= self.canary_flows <= 10_000_000, "deploy.canary_flows", "must be in 1..10000000")
        _require(0 < self.canary_max_jump <= 1, "deploy.canary_max_jump", "must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class HttpSection:
    """``[http]``: the status page, its JSON (``/api/status``) and Prometheus ``/metrics``.

    listen ["127.0.0.1:9108"]: host:port to serve on; "" turns the server off.
      Keep it on loopback (or behind a proxy): the page has no authentication.
    recent_detections [200]: detections kept in memory for the page.
    """

    listen: str = DEFAULT_HTTP_LISTEN
    recent_detections: int = 200

    def __post_init__(self) -> None:
        if self.listen:
            parse_listen(self.listen)
        _require(1 <= self.recent_detections <= 100_000, "http.recent_detections", "must be in 1..100000")

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None


def parse_listen(text: str, key: str = "http.listen") -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:9108"`` for IPv6) -> (host, port); port 0 = any free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(key, f"{text!r} is not host:port (e.g. 127.0.0.1:9108)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


SECTIONS: dict[str, type] = {
    "gateway": GatewaySection,
    "source": SourceSection,
    "inference": InferenceSection,
    "mqtt": MqttSection,
    "fl": FlSection,
    "escalation": EscalationSection,
    "deploy": DeploySection,
    "http": HttpSection,
    "flows": FlowSettings,
}
PATH_KEYS = {
    "gateway": ("model", "global_model_public_key", "global_model_public_keys", "state_dir"),
    "source": ("zeek_log", "pcap_dir", "zeek_archive_globs"),
    "mqtt": ("ca_file", "cert_file", "key_file"),
}
_SQLITE_URL = re.compile(r"^(sqlite(?:\+\w+)?):///(.*)$")


def resolve_path(value: str, base: Path) -> str:
    """``value`` relative to ``base`` (the config file's directory) unless absolute; ``~`` expanded."""
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(base / value)


def resolve_database(value: str, base: Path) -> str:
    """A plain path or a ``sqlite:///relative`` URL made absolute against ``base``; other
    URLs (PostgreSQL, ``sqlite://`` in memory, ``:memory:``, ``file:`` URIs) as they are."""
    if "://" not in value:
        return resolve_path(value, base)
    m = _SQLITE_URL.match(value)
    if not m or not m.group(2) or m.group(2).startswith((":memory:", "file:")):
        return value
    path, sep, query = m.group(2).partition("?")
    return f"{m.group(1)}:///{resolve_path(path, base)}{sep}{query}"


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """The whole validated configuration (one frozen value)."""

    gateway: GatewaySection
    source: SourceSection
    inference: InferenceSection = field(default_factory=InferenceSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    fl: FlSection = field(default_factory=FlSection)
    escalation: EscalationSection = field(default_factory=EscalationSection)
    deploy: DeploySection = field(default_factory=DeploySection)
    http: HttpSection = field(default_factory=HttpSection)
    flows: FlowSettings = field(default_factory=FlowSettings)
    origin: str | None = None  # the file it came from, for messages

    def __post_init__(self) -> None:
        _require(not self.fl_on or bool(self.verify_key_paths) or self.fl.allow_unsigned,
                 "gateway.global_model_public_key",
                 "federated learning is on (gateway.model, mqtt.enabled, fl.enabled): give the aggregator's "
                 "public key, or set fl.allow_unsigned = true (lab use only)")

    @property
    def verify_key_paths(self) -> tuple[str, ...]:
        """Every public key a global model (and the control message) may be signed with."""
        g = self.gateway
        return ((g.global_model_public_key,) if g.global_model_public_key else ()) + tuple(g.global_model_public_keys)

    @property
    def fl_on(self) -> bool:
        """Federated learning takes part: a model to train, a broker, and [fl] enabled."""
        return self.gateway.model is not None and self.mqtt.enabled and self.fl.enabled

    @property
    def database_url(self) -> str:
        db = self.gateway.database
        return db if "://" in db else f"sqlite:///{db}"

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id or f"fedgate-gw-{self.gateway.id}"

    def mqtt_settings(self):
        """The broker settings as :class:`gateway.mqtt.MqttSettings`."""
        from gateway.mqtt import MqttSettings, TlsSettings

        m = self.mqtt
        tls = None
        if m.ca_file:
            tls = TlsSettings(ca_file=m.ca_file, cert_file=m.cert_file, key_file=m.key_file,
                              check_hostname=m.check_hostname)
        return MqttSettings(host=m.host, port=m.port, client_id=self.mqtt_client_id, username=m.username,
                            password=m.password, tls=tls, keepalive_s=m.keepalive_s,
                            reconnect_min_s=m.reconnect_min_s, reconnect_max_s=m.reconnect_max_s)

    def as_dict(self, *, redact: bool = True) -> dict[str, dict[str, Any]]:
        """The effective settings by section (passwords hidden unless ``redact=False``)."""
        out: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            values = dataclasses.asdict(getattr(self, name))
            out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
        if redact and out["mqtt"].get("password"):
            out["mqtt"]["password"] = "***"
        if redact:
            from gateway.store.db import redact as redact_url

            out["gateway"]["database"] = redact_url(self.database_url)
        else:
            out["gateway"]["database"] = self.database_url
        out["mqtt"]["client_id"] = self.mqtt_client_id
        return out

    def paths(self) -> dict[str, tuple[str | None, str]]:
        """Every file and directory the gateway uses, resolved: ``key -> (path, use)``, use
        being "read" (must exist), "write" (created at start) or "glob"."""
        g, src, m = self.gateway, self.source, self.mqtt
        db = self.database_url
        sqlite = _SQLITE_URL.match(db)
        out: dict[str, tuple[str | None, str]] = {
            "config": (self.origin and os.path.abspath(self.origin), "read"),
            "gateway.state_dir": (os.path.abspath(g.state_dir), "write"),
            "gateway.database": ((os.path.abspath(sqlite.group(2).partition("?")[0]) if sqlite and sqlite.group(2)
                                  and not sqlite.group(2).startswith((":memory:", "file:")) else None), "write"),
            "gateway.model": (g.model and os.path.abspath(g.model), "read"),
            "gateway.global_model_public_key": (g.global_model_public_key, "read"),
            "source.zeek_log": (src.zeek_log, "read"),
            "source.pcap_dir": (src.pcap_dir, "read"),
            "mqtt.ca_file": (m.ca_file, "read"),
            "mqtt.cert_file": (m.cert_file, "read"),
            "mqtt.key_file": (m.key_file, "read"),
        }
        for i, pattern in enumerate(src.zeek_archive_globs):
            out[f"source.zeek_archive_globs[{i}]"] = (pattern, "glob")
        return {k: v for k, v in out.items() if v[0] is not None}

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not what an operator wants in production."""
        notes = []
        if self.gateway.model is None:
            notes.append(f'gateway.model = "{NO_MODEL}": flows are stored but not classified (no alerts, no FL)')
        for key, (path, kind) in self.paths().items():
            if kind == "read" and path is not None and not os.path.exists(path):
                notes.append(f"{key}: {path} does not exist")
        if self.mqtt.enabled and self.mqtt.ca_file is None:
            notes.append("mqtt.ca_file is not set: plain MQTT (use TLS outside a lab)")
        if self.fl_on and not self.verify_key_paths:
            notes.append("fl.allow_unsigned: unsigned global models are accepted (lab use only)")
        if self.escalation.enabled and not (self.mqtt.enabled and self.gateway.model):
            notes.append("escalation.enabled needs mqtt.enabled and gateway.model: nothing is escalated")
        if self.http.listen and parse_listen(self.http.listen)[0] in ("0.0.0.0", "::"):
            notes.append("http.listen serves the unauthenticated status page on every interface")
        return notes


# ---------------------------------------------------------------- loading


def _env_value(text: str) -> Any:
    """A TOML value if ``text`` is one, else the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env(doc: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """``doc`` with the environment overrides applied; also the keys they set."""
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    applied: list[str] = []
    for name in sorted(env):
        value = env[name]
        if name == DB_URL_ENV:
            doc.setdefault("gateway", {})["database"] = value
            applied.append("gateway.database")
            continue
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if len(parts) != 2 or not all(parts):
            raise ConfigError(name, f"environment override must look like {ENV_PREFIX}SECTION__KEY")
        section, key = parts
        table = doc.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(section, "is not a table")
        table[key] = _env_value(value)
        applied.append(f"{section}.{key}")
    return doc, applied


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return True


def _type_name(annotation: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return "a list of strings"
    return names.get(annotation, str(annotation))


def build_section(name: str, table: Mapping[str, Any], *, base: Path | None = None):
    """One section from its TOML table: unknown keys, types, paths, then range checks."""
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{name}.{key}", f"must be {_type_name(hints[key])}, got {value!r}")
        if hints[key] is float or hints[key] == (float | None):
            value = None if value is None else float(value)
        if typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        if name == "gateway" and key == "model" and isinstance(value, str) and value.strip().lower() == NO_MODEL:
            value = None  # classification off (TOML has no null)
        if base is not None and key in PATH_KEYS.get(name, ()):
            if isinstance(value, str) and value:
                value = resolve_path(value, base)
            elif isinstance(value, tuple):
                value = tuple(resolve_path(v, base) for v in value)
        if base is not None and name == "gateway" and key == "database" and isinstance(value, str) and value:
            value = resolve_database(value, base)
        kwargs[key] = value
    if base is not None:  # relative path defaults are relative to the file too
        for f in dataclasses.fields(cls):
            if f.name in PATH_KEYS.get(name, ()) and f.name not in kwargs and isinstance(f.default, str):
                kwargs[f.name] = resolve_path(f.default, base)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in kwargs:
            raise ConfigError(f"{name}.{key}", "is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # a settings class kept beside its package ("section.key: problem")
        key, _, problem = str(exc).partition(": ")
        raise ConfigError(key, problem) from None


def config_from_dict(doc: Mapping[str, Any], *, base: Path | None = None, origin: str | None = None) -> GatewayConfig:
    """Validate a parsed document (sections -> tables) into a :class:`GatewayConfig`."""
    try:
        unknown = sorted(set(doc) - set(SECTIONS))
        if unknown:
            raise ConfigError(unknown[0], f"unknown section (known: {', '.join(SECTIONS)})")
        for name, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(name, "must be a table ([" + name + "])")
        if "gateway" not in doc:
            raise ConfigError("gateway", "section is missing (it needs at least id)")
        if "source" not in doc:
            raise ConfigError("source", "section is missing (give zeek_log, pcap_dir or interface)")
        sections = {name: build_section(name, doc.get(name, {}), base=base) for name in SECTIONS}
        return GatewayConfig(**sections, origin=origin)
    except ConfigError as exc:
        if origin and exc.source is None:
            raise ConfigError(exc.key, exc.problem, source=origin) from None
        raise


def load_config(path: str | os.PathLike, *, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read ``path`` (TOML), apply the environment overrides, validate."""
    path = Path(path)
    origin = str(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", "file not found", source=origin) from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read: {exc.strerror or exc}", source=origin) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"not valid TOML: {exc}", source=origin) from None
    try:
        doc, _ = apply_env(doc, os.environ if env is None else env)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.problem, source=origin) from None
    return config_from_dict(doc, base=path.resolve().parent, origin=origin)


def env_overrides(env: Mapping[str, str] | None = None) -> list[str]:
    """The keys the environment overrides (for ``config check``)."""
    return apply_env({}, os.environ if env is None else env)[1]
