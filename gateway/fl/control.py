"""The retained control message the aggregator publishes on ``{prefix}/global/control``.

PURE: bytes in, a validated :class:`Control` out (or :class:`ControlError`). JSON::

    {"schema": 1,
     "strategy": "gsfs" | "fedavg" | "fedopt",
     "version": 3,              # the current global model version
     "round": 4,                # FedAvg/FedOpt: the open round (0: none open)
     "selected": ["gw-a", ...], # FedAvg/FedOpt: who should answer (null: everyone)
     "refused": 2,              # candidates the aggregator refused so far (their window's
                                # updates were dropped: a GSFS gateway trains again)
     "local": {"epochs": 1, "max_steps": 50, "lr": 0.003, "lr_decay": 1.0, "prox_mu": 0.0,
               "missing_class_scale": 1.0, "label_smoothing": 0.1, "batch_size": 64,
               "compression": "none", "topk_fraction": 0.01},
     "trigger": {"tau": 0.01, "ema": 0.9, "k": 3, "warmup": 20, "eval_every": 25}}

Everything but ``strategy`` is optional; a gateway keeps its own settings for what the
message leaves out. Unknown top-level keys are ignored (newer aggregators may add
some); wrong types and out-of-range values are refused as a whole: every number has a
bound (:data:`CONTROL_BOUNDS`, :data:`TRIGGER_BOUND`).

Signed: an aggregator with a signing key adds ``"key_id"`` and ``"signature"`` (Ed25519,
base64) over the canonical JSON of everything else (sorted keys, no spaces), the key
the global models are signed with; a gateway that holds keys accepts only a control
message signed by one of them (the control topic decides which strategy it runs and
how it trains: as much worth protecting as the model).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from gateway.fl.trigger import TriggerConfig, TriggerConfigError
from gateway.protocol import signing
from gateway.protocol.compression import Compression
from gateway.protocol.topics import TopicError, check_gateway_id
from gateway.protocol.validation import keys_by_id

STRATEGIES = ("gsfs", "fedavg", "fedopt")
MAX_CONTROL_BYTES = 64 * 1024
MAX_SELECTED = 10_000  # gateway ids a round may select
# upper bounds of the integers a control message may carry (inclusive)
CONTROL_BOUNDS = {"version": 2**31 - 1, "round": 2**31 - 1, "refused": 2**31 - 1,
                  "epochs": 1000, "max_steps": 1_000_000, "batch_size": 65_536}
TRIGGER_BOUND = 1e6  # largest magnitude of a trigger setting (steps, seconds, thresholds)
MAX_LABEL_SMOOTHING = 0.5  # beyond this the target no longer favours the true class much
MAX_PROX_MU = 1000.0  # beyond this the proximal term freezes local training outright

# The one home of the ranges of the real-valued local settings (the control topic's
# "local" block): (low, high, low included). The control topic, ClientSettings, the
# gateway's [fl] section and the experiment all check against these.
LOCAL_SETTING_RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, 10.0, False),
    "lr_decay": (0.0, 1.0, False),
    "prox_mu": (0.0, MAX_PROX_MU, True),
    "missing_class_scale": (0.0, 1.0, True),
    "label_smoothing": (0.0, MAX_LABEL_SMOOTHING, True),
    "topk_fraction": (0.0, 1.0, False),
}


def local_setting_problem(name: str, value: object) -> str | None:
    """Why ``value`` is not a valid ``name`` (a key of LOCAL_SETTING_RANGES), or None."""
    lo, hi, lo_closed = LOCAL_SETTING_RANGES[name]
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if numeric and ((lo <= value) if lo_closed else (lo < value)) and value <= hi:
        return None
    return f"must be a number in {'[' if lo_closed else '('}{lo:g}, {hi:g}], got {value!r}"


class ControlError(ValueError):
    """A control message that is not valid JSON of the expected shape."""


@dataclass(frozen=True, kw_only=True)
class LocalSettings:
    """Local-training settings a control message may set (None: keep the gateway's)."""

    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    lr_decay: float | None = None
    prox_mu: float | None = None
    missing_class_scale: float | None = None
    label_smoothing: float | None = None
    batch_size: int | None = None
    compression: Compression | None = None
    topk_fraction: float | None = None


@dataclass(frozen=True, kw_only=True)
class Control:
    strategy: str
    version: int | None = None
    round: int = 0
    selected: frozenset[str] | None = None
    local: LocalSettings = field(default_factory=LocalSettings)
    trigger: dict[str, Any] = field(default_factory=dict)
    refused: int = 0

    def selects(self, gateway_id: str) -> bool:
        return self.selected is None or gateway_id in self.selected

    @property
    def synchronous(self) -> bool:
        return self.strategy in ("fedavg", "fedopt")


def _int(d: dict, key: str, *, minimum: int = 0) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    top = CONTROL_BOUNDS[key]
    if type(v) is not int or not minimum <= v <= top:
        raise ControlError(f"{key!r} must be an integer in [{minimum}, {top}]")
    return v


def signing_bytes(obj: dict) -> bytes:
    """What the signature covers: the message without ``signature``, canonical JSON."""
    return json.dumps({k: v for k, v in obj.items() if k != "signature"}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode()


def _check_signature(obj: dict, keys: dict) -> None:
    signature, key_id = obj.get("signature"), obj.get("key_id")
    if not isinstance(signature, str) or not isinstance(key_id, str):
        raise ControlError("unsigned control message (this gateway verifies the aggregator's signature)")
    if key_id not in keys:
        raise ControlError(f"control message signed by key {key_id[:20]!r}, not one this gateway accepts")
    try:
        message = signing_bytes(obj)
    except ValueError:
        raise ControlError("control message holds NaN or Infinity") from None
    if not signing.verify(keys[key_id], message, signature):
        raise ControlError("control message signature does not verify")


def _check_trigger(trigger: dict) -> None:
    for k, v in trigger.items():
        if isinstance(v, str):
            if len(v) > 32:
                raise ControlError(f"trigger setting {str(k)[:32]!r} is too long")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > TRIGGER_BOUND:
            raise ControlError(f"trigger setting {str(k)[:32]!r} must be a finite number of magnitude at most "
                               f"{TRIGGER_BOUND:g}")


def _float(d: dict, key: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    problem = local_setting_problem(key, v)
    if problem:
        raise ControlError(f"{key!r} {problem}")
    return float(v)


def parse_control(data: bytes, *, verify_keys=None) -> Control:
    """Bytes -> a validated :class:`Control`; with ``verify_keys`` (one public key,
    several, or {key id: key}) only a message signed by one of them is accepted."""
    if len(data) > MAX_CONTROL_BYTES:
        raise ControlError(f"control message of {len(data)} bytes is too large")
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ControlError("control message is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise ControlError("control message is not a JSON object")
    keys = keys_by_id(verify_keys)
    if keys:
        _check_signature(obj, keys)
    if obj.get("schema", 1) != 1:
        raise ControlError(f"unsupported control schema {obj.get('schema')!r}")
    strategy = obj.get("strategy")
    if strategy not in STRATEGIES:
        raise ControlError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    selected = obj.get("selected")
    if selected is not None:
        if not isinstance(selected, list) or len(selected) > MAX_SELECTED:
            raise ControlError("'selected' must be a list of gateway ids or null")
        try:
            selected = frozenset(check_gateway_id(s) if isinstance(s, str) else _bad_id(s) for s in selected)
        except TopicError as exc:
            raise ControlError(str(exc)) from None
    local = obj.get("local")
    local = {} if local is None else local
    if not isinstance(local, dict):
        raise ControlError("'local' must be an object")
    comp = local.get("compression")
    try:
        comp = None if comp is None else Compression(comp)
    except ValueError:
        raise ControlError(f"unknown compression {comp!r}") from None
    trigger = obj.get("trigger")
    trigger = {} if trigger is None else trigger
    if not isinstance(trigger, dict):
        raise ControlError("'trigger' must be an object")
    _check_trigger(trigger)
    try:
        TriggerConfig().with_overrides(trigger)  # validate now; applied by the client
    except (TriggerConfigError, TypeError) as exc:
        raise ControlError(f"trigger settings: {exc}") from None
    return Control(
        strategy=strategy,
        version=_int(obj, "version"),
        round=_int(obj, "round") or 0,
        selected=selected,
        refused=_int(obj, "refused") or 0,
        local=LocalSettings(
            epochs=_int(local, "epochs", minimum=1),
            max_steps=_int(local, "max_steps", minimum=1),
            lr=_float(local, "lr"),
            lr_decay=_float(local, "lr_decay"),
            prox_mu=_float(local, "prox_mu"),
            missing_class_scale=_float(local, "missing_class_scale"),
            label_smoothing=_float(local, "label_smoothing"),
            batch_size=_int(local, "batch_size", minimum=1),
            compression=comp,
            topk_fraction=_float(local, "topk_fraction"),
        ),
        trigger=dict(trigger),
    )


def _bad_id(value: object) -> str:
    raise ControlError(f"gateway id {value!r} is not a string")


def encode_control(control: Control, *, signing_key: signing.Ed25519PrivateKey | None = None) -> bytes:
    """The JSON bytes of a control message (what an aggregator or a test publishes),
    signed when ``signing_key`` is given."""
    local = {
        k: (v.value if isinstance(v, Compression) else v)
        for k, v in vars(control.local).items()
        if v is not None
    }
    obj: dict[str, Any] = {"schema": 1, "strategy": control.strategy, "round": control.round}
    if control.version is not None:
        obj["version"] = control.version
    obj["selected"] = None if control.selected is None else sorted(control.selected)
    if control.refused:
        obj["refused"] = control.refused
    if local:
        obj["local"] = local
    if control.trigger:
        obj["trigger"] = control.trigger
    if signing_key is not None:
        obj["key_id"] = signing.key_id(signing_key)
        obj["signature"] = signing.sign(signing_key, signing_bytes(obj))
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
