"""MQTT topic names of the fedgate wire protocol (DESIGN.md, "Wire protocol").

Pure: string building and parsing only.  The prefix is configurable (default
``fedgate/v1``); a gateway id may not contain MQTT wildcards or separators.
"""

from __future__ import annotations

import re

DEFAULT_PREFIX = "fedgate/v1"

_GATEWAY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TopicError(ValueError):
    """A prefix, gateway id or topic that does not fit the protocol."""


def check_gateway_id(gateway_id: str) -> str:
    if not _GATEWAY_ID.fullmatch(gateway_id):  # fullmatch: "$" alone lets "id\n" through
        raise TopicError(
            f"invalid gateway id {gateway_id!r}: 1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric"
        )
    return gateway_id


def check_prefix(prefix: str) -> str:
    if not prefix or prefix.startswith("/") or prefix.endswith("/") or any(
        c in prefix for c in "+#\x00"
    ):
        raise TopicError(f"invalid topic prefix {prefix!r}")
    return prefix


def gateway_update(gateway_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{check_prefix(prefix)}/gw/{check_gateway_id(gateway_id)}/update"


def gateway_status(gateway_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{check_prefix(prefix)}/gw/{check_gateway_id(gateway_id)}/status"


def gateway_alerts(gateway_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{check_prefix(prefix)}/gw/{check_gateway_id(gateway_id)}/alerts"


def gateway_escalate(gateway_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Where a gateway asks the cloud teacher about flows it is unsure of."""
    return f"{check_prefix(prefix)}/gw/{check_gateway_id(gateway_id)}/escalate"


def gateway_verdict(gateway_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Where the cloud teacher answers that gateway (MQTT 5 response topic)."""
    return f"{check_prefix(prefix)}/gw/{check_gateway_id(gateway_id)}/verdict"


def all_escalations(prefix: str = DEFAULT_PREFIX) -> str:
    """Subscription filter of the teacher: every gateway's escalation requests."""
    return f"{check_prefix(prefix)}/gw/+/escalate"


def global_model(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{check_prefix(prefix)}/global/model"


def global_control(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{check_prefix(prefix)}/global/control"


def all_updates(prefix: str = DEFAULT_PREFIX) -> str:
    """Subscription filter for every gateway's update topic."""
    return f"{check_prefix(prefix)}/gw/+/update"


def all_statuses(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{check_prefix(prefix)}/gw/+/status"


def parse_gateway_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """Split ``{prefix}/gw/{id}/{kind}`` into ``(id, kind)``; TopicError otherwise."""
    head = f"{check_prefix(prefix)}/gw/"
    if not topic.startswith(head):
        raise TopicError(f"not a gateway topic: {topic!r}")
    parts = topic[len(head):].split("/")
    if len(parts) != 2 or parts[1] not in ("update", "status", "alerts", "escalate", "verdict"):
        raise TopicError(f"not a gateway topic: {topic!r}")
    return check_gateway_id(parts[0]), parts[1]


def global_model_part(index: int, prefix: str = DEFAULT_PREFIX) -> str:
    """Retained topic of chunk ``index`` >= 1 of a chunked global model.

    Chunk 0 (or the whole, unchunked envelope) is on :func:`global_model`; retained
    messages keep only the last message per topic, so each chunk needs its own topic.
    """
    if index < 1:
        raise TopicError("chunk 0 of the global model lives on the global model topic")
    return f"{check_prefix(prefix)}/global/model/{int(index)}"


def global_model_all(prefix: str = DEFAULT_PREFIX) -> str:
    """Subscription filter for the global model and its chunk topics (``#`` includes the parent)."""
    return f"{check_prefix(prefix)}/global/model/#"
