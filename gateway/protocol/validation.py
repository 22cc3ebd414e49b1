"""The one validation function every receiver uses (aggregator and gateways).

``validate_envelope(data, policy)`` returns the decoded :class:`Envelope` or a
:class:`Rejection` with a typed :class:`RejectReason`; it never raises on hostile bytes.
Checks run cheapest first: size, header, kind, sender, versions, replay, signature,
digest, payload, then names/shapes/dtypes and finiteness.  Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.protocol import signing
from gateway.protocol.envelope import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DECODED_BYTES,
    Envelope,
    Kind,
    decode_header,
    decode_payload,
)
from gateway.protocol.errors import EnvelopeError, RejectReason, Rejection

# tensor name -> (shape, numpy dtype name), e.g. {"head.weight": ((2, 64), "float32")}
TensorSpec = Mapping[str, tuple[tuple[int, ...], str]]


def spec_of(tensors: Mapping[str, np.ndarray], *, floating_only: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """The spec an update (delta) or global model of these weights must match."""
    return {
        k: (tuple(int(d) for d in v.shape), np.dtype(v.dtype).name)
        for k, v in tensors.items()
        if not floating_only or np.issubdtype(v.dtype, np.floating)
    }


# Size bounds that follow the model (issue 16.6): an envelope carries at most the
# model's tensors; compressed forms are smaller except top-k at fraction 1 (an int32
# index and a float32 value per element: twice float32), and zstd adds at most a few
# bytes per 128 KiB block.  The slack covers the JSON headers.
DECODED_MULTIPLE = 2
SIZE_SLACK = 64 * 1024


def spec_bytes(spec: TensorSpec) -> int:
    """Bytes of the tensors of ``spec`` in their own dtypes."""
    total = 0
    for shape, dtype in spec.values():
        n = 1
        for d in shape:
            n *= int(d)
        total += n * np.dtype(dtype).itemsize
    return total


def size_limits(spec: TensorSpec, *, kind: Kind) -> tuple[int, int]:
    """(largest wire envelope, largest decompressed payload) for ``kind`` envelopes of
    the model ``spec`` describes: an update (floating tensors as float32 deltas) may take
    ``DECODED_MULTIPLE`` x the float32 size decompressed (top-k at fraction 1); a global
    model, its own size.  Both plus ``SIZE_SLACK``; the wire adds zstd's worst case."""
    if kind is Kind.UPDATE:
        raw = DECODED_MULTIPLE * 4 * sum(int(np.prod(shape, dtype=np.int64)) for shape, _ in spec.values())
    else:
        raw = spec_bytes(spec)
    decoded = raw + SIZE_SLACK
    wire = decoded + decoded // 128 + SIZE_SLACK  # incompressible data grows by < 1/128 in zstd
    return wire, decoded


def keys_by_id(keys) -> dict[str, signing.Ed25519PublicKey]:
    """One public key, several (a rotation), or a mapping, as {key id: key}."""
    if keys is None:
        return {}
    if isinstance(keys, Mapping):
        return dict(keys)
    if isinstance(keys, signing.Ed25519PublicKey):
        keys = [keys]
    return {signing.key_id(k): k for k in keys}


@dataclass(frozen=True, kw_only=True)
class ValidationPolicy:
    """What a receiver accepts.

    kind: the envelope kind expected on this topic.
    expected: names, shapes and dtypes the tensors must have exactly (None: any).
    known_senders: accepted sender ids (None: any well-formed id).
    topic_sender: the gateway id in the topic it came on; the header must match it.
    max_bytes / max_decoded_bytes: wire and decompressed size bounds.
    current_version: the receiver's global version; updates with a base newer than it
      are ``unknown_base``; a global model older than it is ``stale_base``.
    max_staleness: updates whose base is more than this many versions old are
      ``stale_base`` (None: no limit).
    is_replay: callable (sender, message_id) -> bool for replay detection.
    verify_key: Ed25519 public key, or several (a key rotation); with any, a global model
      must carry a valid signature by one of them (the header's key_id says which; an
      envelope without key_id is tried against each).
    """

    kind: Kind = Kind.UPDATE
    expected: TensorSpec | None = None
    known_senders: frozenset[str] | None = None
    topic_sender: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    current_version: int | None = None
    max_staleness: int | None = None
    is_replay: Callable[[str, str], bool] | None = None
    verify_key: signing.Ed25519PublicKey | Sequence[signing.Ed25519PublicKey] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_keys", keys_by_id(self.verify_key))
        if self.max_bytes <= 0 or self.max_decoded_bytes <= 0:
            raise ValueError("size bounds must be positive")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0")
        if self.known_senders is not None and not isinstance(self.known_senders, frozenset):
            object.__setattr__(self, "known_senders", frozenset(self.known_senders))


def _reject(reason: RejectReason, detail: str) -> Rejection:
    return Rejection(reason, detail)


def _check_tensors(tensors: Mapping[str, np.ndarray], expected: TensorSpec | None) -> Rejection | None:
    if expected is not None:
        names, want = set(tensors), set(expected)
        if names != want:
            missing, extra = sorted(want - names)[:3], sorted(names - want)[:3]
            return _reject(RejectReason.NAMES, f"missing {missing}, unexpected {extra}")
        for name, (shape, dtype) in expected.items():
            arr = tensors[name]
            if arr.shape != tuple(shape):
                return _reject(RejectReason.SHAPES, f"{name}: shape {tuple(arr.shape)} != {tuple(shape)}")
            if arr.dtype != np.dtype(dtype):
                return _reject(RejectReason.DTYPES, f"{name}: dtype {arr.dtype} != {dtype}")
    for name, arr in tensors.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return _reject(RejectReason.NON_FINITE, f"{name} holds NaN or Inf")
    return None


def validate_envelope(data: bytes, policy: ValidationPolicy) -> Envelope | Rejection:
    """Decode ``data`` and check it against ``policy``; never raises on bad input."""
    try:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return _reject(RejectReason.SCHEMA, "envelope must be bytes")
        if len(data) > policy.max_bytes:
            return _reject(RejectReason.OVERSIZE, f"{len(data)} bytes > {policy.max_bytes}")
        header, body = decode_header(bytes(data))
        if header.kind is not policy.kind:
            return _reject(RejectReason.WRONG_KIND, f"got {header.kind.value}, expected {policy.kind.value}")
        if policy.known_senders is not None and header.sender not in policy.known_senders:
            return _reject(RejectReason.UNKNOWN_SENDER, f"sender {header.sender!r} is not known")
        if policy.topic_sender is not None and header.sender != policy.topic_sender:
            return _reject(RejectReason.SENDER_MISMATCH,
                           f"header sender {header.sender!r} on topic of {policy.topic_sender!r}")
        cur = policy.current_version
        if header.kind is Kind.UPDATE and cur is not None:
            if header.base_version > cur:
                return _reject(RejectReason.UNKNOWN_BASE, f"base {header.base_version} > current {cur}")
            if policy.max_staleness is not None and cur - header.base_version > policy.max_staleness:
                return _reject(RejectReason.STALE_BASE,
                               f"base {header.base_version} is {cur - header.base_version} versions old "
                               f"(max {policy.max_staleness})")
        if header.kind is Kind.GLOBAL and cur is not None and header.version < cur:
            return _reject(RejectReason.STALE_BASE, f"global version {header.version} < current {cur}")
        if policy.is_replay is not None and policy.is_replay(header.sender, header.message_id):
            return _reject(RejectReason.REPLAY, f"{header.sender}/{header.message_id} seen before")
        keys: dict = policy._keys  # type: ignore[attr-defined]
        if keys:
            if header.signature is None:
                return _reject(RejectReason.SIGNATURE, "unsigned global model")
            if header.key_id is not None and header.key_id not in keys:
                return _reject(RejectReason.SIGNATURE, f"signed by key {header.key_id}, not one this side accepts")
            candidates = [keys[header.key_id]] if header.key_id is not None else list(keys.values())
            message = header.signing_bytes()
            if not any(signing.verify(k, message, header.signature) for k in candidates):
                return _reject(RejectReason.SIGNATURE, "signature does not verify")
        tensors = decode_payload(header, body, max_decoded_bytes=policy.max_decoded_bytes)
        problem = _check_tensors(tensors, policy.expected)
        if problem is not None:
            return problem
        return Envelope(header, tensors, len(data))
    except EnvelopeError as exc:
        return exc.as_rejection()
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:  # belt and braces
        return _reject(RejectReason.SCHEMA, f"{type(exc).__name__}: {str(exc)[:200]}")
