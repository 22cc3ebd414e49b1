"""Typed rejection reasons of the wire protocol.

Every envelope or chunk a receiver refuses gets exactly one :class:`RejectReason`; the
receiver logs it and counts it per reason, and keeps running.  Pure module.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class RejectReason(str, Enum):
    SCHEMA = "schema"  # not an envelope, bad header, corrupt payload
    WRONG_KIND = "wrong_kind"  # a global model where an update was expected, or back
    UNKNOWN_SENDER = "unknown_sender"
    SENDER_MISMATCH = "sender_mismatch"  # header sender differs from the topic's gateway id
    NAMES = "names"
    SHAPES = "shapes"
    DTYPES = "dtypes"
    NON_FINITE = "non_finite"
    OVERSIZE = "oversize"
    DIGEST = "digest"
    SIGNATURE = "signature"
    STALE_BASE = "stale_base"  # base version older than the staleness the receiver allows
    UNKNOWN_BASE = "unknown_base"  # base version newer than anything the receiver published
    REPLAY = "replay"  # (sender, message id) seen before
    INCOMPLETE_CHUNK = "incomplete_chunk"  # a chunked message that never completed
    NORM = "norm"  # an update's L2 norm is beyond any sane bound for this model
    QOS0 = "qos0"  # an update or status sent at QoS 0 (no flow control: refused unread)
    CONTROL = "control"  # a control message that is unsigned, badly signed or out of range


@dataclass(frozen=True)
class Rejection:
    """Why a message was refused; returned (not raised) by ``validate_envelope``."""

    reason: RejectReason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


class EnvelopeError(ValueError):
    """Raised by the low-level decoders; carries the typed reason."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    def as_rejection(self) -> Rejection:
        return Rejection(self.reason, self.detail)
