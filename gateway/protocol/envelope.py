"""Update and global-model envelopes (DESIGN.md, "Wire protocol").

Wire format, one MQTT payload (or the reassembled chunks of one)::

    b"FGE1" | u32 big-endian header length | header (UTF-8 JSON) | body
    body = zstd(safetensors bytes)

The header is small and versioned (``schema``); ``digest`` is the sha256 of ``body``,
so the Ed25519 ``signature`` of a global model, taken over the canonical header without
the signature field, covers the weights too.  Tensors travel as safetensors (never
pickle); update deltas may be int8- or top-k-compressed (see ``compression``).

Pure: bytes and arrays in, bytes and records out.  Decoders raise
:class:`EnvelopeError` with a typed reason; :func:`gateway.protocol.validation.validate_envelope`
turns that into a returned :class:`Rejection`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

import numpy as np
import safetensors.numpy as st_numpy
import zstandard

from gateway.protocol import signing
from gateway.protocol.compression import Compression, Tensors, compress_delta, decompress_tensors
from gateway.protocol.errors import EnvelopeError, RejectReason
from gateway.protocol.topics import TopicError, check_gateway_id

MAGIC = b"FGE1"
SCHEMA_VERSION = 2  # 2 added key_id; schema 1 envelopes (no key_id) are still read
_HEADER_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 16 * 1024
MAX_METRICS = 64
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # when no model is known: a wire envelope larger than this is refused
DEFAULT_MAX_DECODED_BYTES = 256 * 1024 * 1024  # when no model is known: bound on decompressed safetensors
# header integers (versions, rounds, sample counts, sizes) fit a signed 32-bit database
# column: anything larger is refused here instead of failing the receiver's commit
MAX_HEADER_INT = 2**31 - 1
KEY_ID_CHARS = frozenset("0123456789abcdef")

# safetensors dtype tag -> numpy dtype (what safetensors.numpy can produce); the format is
# little-endian whatever the host
_ST_DTYPES = {tag: np.dtype(t).newbyteorder("<") for tag, t in {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_,
}.items()}
_ST_KEYS = {"dtype", "shape", "data_offsets"}


class Kind(str, Enum):
    UPDATE = "update"
    GLOBAL = "global"


@dataclass(frozen=True, kw_only=True)
class Header:
    """Envelope header.

    ``base_version``: for an update, the global version its delta is relative to; for a
    global model, the version it was built from.  ``version``: the global model's own
    version (``None`` for updates).  ``message_id``: unique per update (replay key).
    """

    kind: Kind
    sender: str
    message_id: str
    base_version: int
    version: int | None = None
    round: int = 0
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    compression: Compression = Compression.NONE
    payload_bytes: int = 0
    digest: str = ""
    created: float = 0.0
    signature: str | None = None
    key_id: str | None = None  # which aggregator key signed it (gateway.protocol.signing.key_id)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["compression"] = self.compression.value
        if self.schema < 2:
            d.pop("key_id")
        return d

    def signing_bytes(self) -> bytes:
        """Canonical bytes the signature covers: the header without ``signature``."""
        d = self.to_json()
        d.pop("signature")
        return json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class Envelope:
    header: Header
    tensors: Tensors  # decoded: float32 deltas for updates, weights for global models
    wire_bytes: int = 0


@dataclass(frozen=True)
class EncodedUpdate:
    data: bytes
    message_id: str
    residual: Tensors  # error-feedback state for the next upload (zeros when lossless)


# ---------------------------------------------------------------- encoding


def _compress(raw: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(raw)


def _frame(header: Header, body: bytes) -> bytes:
    hb = json.dumps(header.to_json(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(hb) > MAX_HEADER_BYTES:
        raise ValueError(f"header too large ({len(hb)} bytes); too many metrics?")
    return MAGIC + _HEADER_LEN.pack(len(hb)) + hb + body


def _clean_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"metric {k!r} is not finite: {v}")
        out[str(k)] = v
    if len(out) > MAX_METRICS:
        raise ValueError(f"at most {MAX_METRICS} metrics")
    return out


def encode_update(
    delta: Mapping[str, np.ndarray],
    *,
    sender: str,
    base_version: int,
    num_samples: int,
    round: int = 0,
    metrics: Mapping[str, float] | None = None,
    compression: Compression | str = Compression.NONE,
    residual: Mapping[str, np.ndarray] | None = None,
    topk_fraction: float = 0.01,
    message_id: str | None = None,
    created: float | None = None,
    zstd_level: int = 3,
) -> EncodedUpdate:
    """Encode a gateway's delta; returns the bytes, its message id and the new residual."""
    check_gateway_id(sender)
    compression = Compression(compression)
    packed, new_residual = compress_delta(
        delta, method=compression, residual=residual, topk_fraction=topk_fraction
    )
    raw = st_numpy.save(packed)
    body = _compress(raw, zstd_level)
    message_id = message_id or uuid.uuid4().hex
    header = Header(
        kind=Kind.UPDATE,
        sender=sender,
        message_id=message_id,
        base_version=int(base_version),
        round=int(round),
        num_samples=int(num_samples),
        metrics=_clean_metrics(metrics),
        compression=compression,
        payload_bytes=len(raw),
        digest=hashlib.sha256(body).hexdigest(),
        created=float(time.time() if created is None else created),
    )
    _check_header(header)
    return EncodedUpdate(_frame(header, body), message_id, new_residual)


def encode_global(
    weights: Mapping[str, np.ndarray],
    *,
    sender: str,
    version: int,
    base_version: int,
    round: int = 0,
    num_samples: int = 0,
    metrics: Mapping[str, float] | None = None,
    signing_key: signing.Ed25519PrivateKey | None = None,
    message_id: str | None = None,
    created: float | None = None,
    zstd_level: int = 3,
) -> bytes:
    """Encode (and sign, when a key is given) a global model."""
    check_gateway_id(sender)
    raw = st_numpy.save({k: np.ascontiguousarray(v) for k, v in weights.items()})
    body = _compress(raw, zstd_level)
    header = Header(
        kind=Kind.GLOBAL,
        sender=sender,
        message_id=message_id or uuid.uuid4().hex,
        base_version=int(base_version),
        version=int(version),
        round=int(round),
        num_samples=int(num_samples),
        metrics=_clean_metrics(metrics),
        payload_bytes=len(raw),
        digest=hashlib.sha256(body).hexdigest(),
        created=float(time.time() if created is None else created),
    )
    _check_header(header)
    if signing_key is not None:  # the key id is signed too: it cannot be swapped for another
        header = replace(header, key_id=signing.key_id(signing_key))
        header = replace(header, signature=signing.sign(signing_key, header.signing_bytes()))
    return _frame(header, body)


# ---------------------------------------------------------------- decoding


def _schema(detail: str) -> EnvelopeError:
    return EnvelopeError(RejectReason.SCHEMA, detail)


def _int_field(d: dict, name: str, *, optional: bool = False) -> int | None:
    v = d.get(name)
    if v is None and optional:
        return None
    if type(v) is not int or not 0 <= v <= MAX_HEADER_INT:
        raise _schema(f"header field {name!r} must be an integer in [0, {MAX_HEADER_INT}]")
    return v


_HEADER_FIELDS_V1 = frozenset({
    "schema", "kind", "sender", "message_id", "base_version", "version", "round",
    "num_samples", "metrics", "compression", "payload_bytes", "digest", "created", "signature",
})
_HEADER_FIELDS = {1: _HEADER_FIELDS_V1, 2: _HEADER_FIELDS_V1 | {"key_id"}}


def _parse_header(d: object) -> Header:
    if not isinstance(d, dict):
        raise _schema("header is not a JSON object")
    schema = d.get("schema")
    if type(schema) is not int or schema not in _HEADER_FIELDS:
        raise _schema(f"unsupported schema {str(schema)[:20]!r} (this side reads {sorted(_HEADER_FIELDS)})")
    fields = _HEADER_FIELDS[schema]
    if set(d) != fields:
        raise _schema(f"header fields differ: missing {sorted(fields - set(d))}, "
                      f"unexpected {sorted(set(d) - fields)[:5]}")
    try:
        kind = Kind(d["kind"])
        compression = Compression(d["compression"])
    except (ValueError, TypeError):
        raise _schema("unknown kind or compression") from None
    sender, message_id, digest = d["sender"], d["message_id"], d["digest"]
    if not isinstance(sender, str):
        raise _schema("sender must be a string")
    try:
        check_gateway_id(sender)
    except TopicError as exc:
        raise _schema(str(exc)) from None
    if not isinstance(message_id, str) or not 1 <= len(message_id) <= 64 or not message_id.isascii():
        raise _schema("message_id must be 1-64 ASCII characters")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _schema("digest must be 64 lowercase hex characters")
    created = d["created"]
    if type(created) not in (int, float) or not math.isfinite(created):
        raise _schema("created must be a finite number")
    metrics = d["metrics"]
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise _schema("metrics must be an object of at most 64 numbers")
    for k, v in metrics.items():
        if type(v) not in (int, float) or not math.isfinite(v):
            raise _schema(f"metric {k!r} must be a finite number")
    signature = d["signature"]
    if signature is not None and (not isinstance(signature, str) or len(signature) > 200):
        raise _schema("signature must be a short base64 string or null")
    key_id = d.get("key_id")
    if key_id is not None and (not isinstance(key_id, str) or len(key_id) != 16 or not set(key_id) <= KEY_ID_CHARS):
        raise _schema("key_id must be 16 lowercase hex characters or null")
    header = Header(
        schema=schema,
        key_id=key_id,
        kind=kind,
        sender=sender,
        message_id=message_id,
        base_version=_int_field(d, "base_version"),
        version=_int_field(d, "version", optional=True),
        round=_int_field(d, "round"),
        num_samples=_int_field(d, "num_samples"),
        metrics={k: float(v) for k, v in metrics.items()},
        compression=compression,
        payload_bytes=_int_field(d, "payload_bytes"),
        digest=digest,
        created=float(created),
        signature=signature,
    )
    _check_header(header)
    return header


def _check_header(h: Header) -> None:
    if h.kind is Kind.GLOBAL and (h.version is None or h.compression is not Compression.NONE):
        raise _schema("a global model needs a version and no lossy compression")
    if h.kind is Kind.UPDATE and h.version is not None:
        raise _schema("an update carries base_version, not version")


def decode_header(data: bytes) -> tuple[Header, bytes]:
    """Split a wire envelope into its parsed header and its (still compressed) body."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _schema("envelope must be bytes")
    data = bytes(data)
    if len(data) < len(MAGIC) + _HEADER_LEN.size or not data.startswith(MAGIC):
        raise _schema("not a fedgate envelope (bad magic)")
    (hlen,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _HEADER_LEN.size
    if hlen > MAX_HEADER_BYTES or start + hlen > len(data):
        raise _schema(f"header length {hlen} out of range")
    try:
        obj = json.loads(data[start:start + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _schema("header is not valid UTF-8 JSON") from None
    return _parse_header(obj), data[start + hlen:]


def _load_safetensors(raw: bytes) -> Tensors:
    """Parse a safetensors payload into read-only numpy views of ``raw``, checking its
    framing on the way (bounds, dtypes, shapes, sizes, no gaps or overlaps).

    One pass of our own instead of checks followed by the Rust loader: the checks already
    read every field the loader would, and building the arrays with ``np.frombuffer`` from
    the checked spans halves the cost of taking in a small update (the aggregator's hot path).
    """
    if len(raw) < 8:
        raise _schema("payload too short for safetensors")
    (n,) = struct.unpack_from("<Q", raw, 0)
    if n > min(len(raw) - 8, 8 * 1024 * 1024):
        raise _schema("safetensors header length out of range")
    try:
        meta = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _schema("safetensors header is not JSON") from None
    if not isinstance(meta, dict):
        raise _schema("safetensors header is not an object")
    base, data_len = 8 + n, len(raw) - 8 - n
    entries = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.keys() != _ST_KEYS:
            raise _schema(f"safetensors entry {name[:40]!r} malformed")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        np_dtype = _ST_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if np_dtype is None:
            raise EnvelopeError(RejectReason.DTYPES, f"tensor {name[:40]!r} has dtype {str(dtype)[:10]!r}")
        if not isinstance(shape, list) or len(shape) > 8:
            raise EnvelopeError(RejectReason.SHAPES, f"tensor {name[:40]!r} has a bad shape")
        count = 1
        for s in shape:
            if type(s) is not int or s < 0:
                raise EnvelopeError(RejectReason.SHAPES, f"tensor {name[:40]!r} has a bad shape")
            count *= s
        if (not isinstance(offs, list) or len(offs) != 2 or type(offs[0]) is not int
                or type(offs[1]) is not int or not 0 <= offs[0] <= offs[1] <= data_len):
            raise _schema(f"tensor {name[:40]!r} has bad data offsets")
        if count * np_dtype.itemsize != offs[1] - offs[0]:
            raise _schema(f"tensor {name[:40]!r}: size does not match shape")
        entries.append((offs[0], offs[1], name, np_dtype, shape, count))
    entries.sort(key=lambda e: (e[0], e[1]))
    pos = 0
    for b, e, *_ in entries:
        if b != pos:
            raise _schema("safetensors data has gaps or overlaps")
        pos = e
    if pos != data_len:
        raise _schema("safetensors data length mismatch")
    return {name: np.frombuffer(raw, dtype=np_dtype, count=count, offset=base + b).reshape(shape)
            for b, _e, name, np_dtype, shape, count in entries}


def decompress_body(body: bytes, *, max_decoded_bytes: int) -> bytes:
    """zstd-decompress with a hard output bound (no decompression bombs)."""
    try:
        announced = zstandard.frame_content_size(body)
        if announced > max_decoded_bytes:
            raise EnvelopeError(RejectReason.OVERSIZE, f"payload announces {announced} bytes")
        if announced >= 0:  # size in the frame header: one exact allocation, the fast path
            raw = zstandard.ZstdDecompressor().decompress(body)
        else:
            raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read(max_decoded_bytes + 1)
    except zstandard.ZstdError as exc:
        raise _schema(f"payload is not valid zstd: {exc}") from None
    if len(raw) > max_decoded_bytes:
        raise EnvelopeError(RejectReason.OVERSIZE, f"payload decompresses beyond {max_decoded_bytes} bytes")
    if zstd_frame_length(body) != len(body):  # libzstd reads one frame and ignores the rest
        raise _schema("bytes after the zstd frame")
    return raw


def zstd_frame_length(data: bytes) -> int:
    """Length of the zstd frame at the start of ``data``, read from its block headers
    (RFC 8878 section 3.1.1) without decompressing; :class:`EnvelopeError` when it is
    not a whole zstd frame."""
    try:
        pos = zstandard.frame_header_size(data)
    except zstandard.ZstdError:
        raise _schema("payload is not a zstd frame") from None
    if len(data) < 5 or data[:4] != b"\x28\xb5\x2f\xfd":
        raise _schema("payload is not a zstd frame (skippable or unknown magic)")
    checksum = bool(data[4] & 0x04)
    while True:
        if pos + 3 > len(data):
            raise _schema("zstd frame truncated")
        block = int.from_bytes(data[pos:pos + 3], "little")
        pos += 3
        kind, size = (block >> 1) & 3, block >> 3
        if kind == 3:
            raise _schema("zstd block of the reserved type")
        pos += 1 if kind == 1 else size  # RLE blocks carry one byte
        if block & 1:  # last block
            break
    pos += 4 if checksum else 0
    if pos > len(data):
        raise _schema("zstd frame truncated")
    return pos


def decode_payload(header: Header, body: bytes, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Tensors:
    """Check the digest, decompress, parse safetensors, undo delta compression."""
    if hashlib.sha256(body).hexdigest() != header.digest:
        raise EnvelopeError(RejectReason.DIGEST, "payload sha256 does not match the header")
    if header.payload_bytes > max_decoded_bytes:
        raise EnvelopeError(RejectReason.OVERSIZE, f"payload of {header.payload_bytes} bytes announced")
    raw = decompress_body(body, max_decoded_bytes=max_decoded_bytes)
    if len(raw) != header.payload_bytes:
        raise _schema("decompressed size differs from the header's payload_bytes")
    packed = _load_safetensors(raw)
    return decompress_tensors(packed, header.compression, max_elements=max_decoded_bytes // 4)


def decode_envelope(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Envelope:
    """Decode without policy checks (no sender, signature or shape expectations)."""
    if len(data) > max_bytes:
        raise EnvelopeError(RejectReason.OVERSIZE, f"envelope of {len(data)} bytes exceeds {max_bytes}")
    header, body = decode_header(data)
    return Envelope(header, decode_payload(header, body, max_decoded_bytes=max_decoded_bytes), len(data))


def raw_float32_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    """Size of the same tensors as raw float32 (the baseline compression is compared with)."""
    return sum(int(np.asarray(v).size) * 4 for v in tensors.values())
