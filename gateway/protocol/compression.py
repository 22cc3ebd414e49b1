"""Lossy compression of model deltas (int8 per-tensor scale, top-k) with error feedback.

Pure numpy.  ``compress_delta`` turns a delta into the tensors that travel in the
payload; ``decompress_tensors`` turns them back into float32 deltas and refuses
anything inconsistent with an :class:`EnvelopeError`.  Error feedback: what a lossy
method drops this time is returned as a residual and added to the next delta, so over
several uploads nothing is lost for good.  The residual goes in and out as a value.

Payload tensor names (the name of the delta tensor after the colon):
  none  ``name``                       float32 as is
  int8  ``q:name`` int8, ``s:name`` float32 scalar scale (value = q * scale)
  topk  ``i:name`` int32 flat indices, ``v:name`` float32 values, ``n:name`` int64 shape
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

import numpy as np

from gateway.protocol.errors import EnvelopeError, RejectReason

Tensors = dict[str, np.ndarray]


class Compression(str, Enum):
    NONE = "none"
    INT8 = "int8"
    TOPK = "topk"


def quantize_int8(values: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Symmetric per-tensor int8: scale = max|x| / 127 (0 for an all-zero tensor)."""
    x = np.asarray(values, dtype=np.float32)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    scale = np.float32(peak / 127.0) if peak > 0 else np.float32(0.0)
    if scale == 0:
        return np.zeros(x.shape, dtype=np.int8), scale
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: float) -> np.ndarray:
    return q.astype(np.float32) * np.float32(scale)


def topk_select(values: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (int32, ascending) and values of the ceil(fraction*size) largest |x|."""
    flat = np.asarray(values, dtype=np.float32).ravel()
    if flat.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    k = max(1, min(flat.size, int(np.ceil(fraction * flat.size))))
    if k == flat.size:
        idx = np.arange(flat.size)
    else:
        idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:])
    return idx.astype(np.int32), flat[idx].astype(np.float32)


def compress_delta(
    delta: Mapping[str, np.ndarray],
    *,
    method: Compression = Compression.NONE,
    residual: Mapping[str, np.ndarray] | None = None,
    topk_fraction: float = 0.01,
) -> tuple[Tensors, Tensors]:
    """Return (payload tensors, new residual).

    The residual of a lossless method is all zeros; for int8/top-k it is what the
    receiver will not see of ``delta + residual``.
    """
    method = Compression(method)
    if not 0 < topk_fraction <= 1:
        raise ValueError("topk_fraction must be in (0, 1]")
    packed: Tensors = {}
    new_residual: Tensors = {}
    for name, value in delta.items():
        corrected = np.asarray(value, dtype=np.float32)
        if residual is not None and name in residual:
            corrected = corrected + np.asarray(residual[name], dtype=np.float32)
        if method is Compression.NONE:
            packed[name] = np.ascontiguousarray(corrected)
            new_residual[name] = np.zeros_like(corrected)
        elif method is Compression.INT8:
            q, scale = quantize_int8(corrected)
            packed["q:" + name] = q
            packed["s:" + name] = np.asarray(scale, dtype=np.float32)
            new_residual[name] = corrected - dequantize_int8(q, scale)
        else:
            idx, vals = topk_select(corrected, topk_fraction)
            packed["i:" + name] = idx
            packed["v:" + name] = vals
            packed["n:" + name] = np.asarray(corrected.shape, dtype=np.int64)
            sent = np.zeros(corrected.size, np.float32)
            sent[idx] = vals
            new_residual[name] = corrected - sent.reshape(corrected.shape)
    return packed, new_residual


def _bad(detail: str) -> EnvelopeError:
    return EnvelopeError(RejectReason.SCHEMA, detail)


def decompress_tensors(
    packed: Mapping[str, np.ndarray], method: Compression, *, max_elements: int
) -> Tensors:
    """Invert :func:`compress_delta`; ``max_elements`` bounds what top-k may allocate."""
    method = Compression(method)
    if method is Compression.NONE:
        return dict(packed)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in packed.items():
        tag, sep, name = key.partition(":")
        if not sep or not name or len(tag) != 1:
            raise _bad(f"tensor {key!r} is not a {method.value} payload name")
        groups.setdefault(name, {})[tag] = arr
    out: Tensors = {}
    total = 0
    for name, parts in groups.items():
        if method is Compression.INT8:
            if set(parts) != {"q", "s"}:
                raise _bad(f"int8 tensor {name!r} needs q: and s: parts, got {sorted(parts)}")
            q, s = parts["q"], parts["s"]
            if q.dtype != np.int8 or s.dtype != np.float32 or s.shape != ():
                raise EnvelopeError(RejectReason.DTYPES, f"int8 tensor {name!r}: bad part dtypes")
            if not np.isfinite(s) or s < 0:
                raise EnvelopeError(RejectReason.NON_FINITE, f"int8 scale of {name!r} is {s}")
            out[name] = dequantize_int8(q, float(s))
        else:
            if set(parts) != {"i", "v", "n"}:
                raise _bad(f"top-k tensor {name!r} needs i:, v:, n: parts, got {sorted(parts)}")
            idx, vals, shape = parts["i"], parts["v"], parts["n"]
            if idx.dtype != np.int32 or vals.dtype != np.float32 or shape.dtype != np.int64:
                raise EnvelopeError(RejectReason.DTYPES, f"top-k tensor {name!r}: bad part dtypes")
            if idx.ndim != 1 or vals.shape != idx.shape or shape.ndim != 1 or shape.size > 8:
                raise EnvelopeError(RejectReason.SHAPES, f"top-k tensor {name!r}: bad part shapes")
            dims = [int(d) for d in shape]
            if any(d < 0 for d in dims):
                raise EnvelopeError(RejectReason.SHAPES, f"top-k tensor {name!r}: negative dim")
            size = 1
            for d in dims:
                size *= d
                if size > max_elements:
                    raise EnvelopeError(RejectReason.OVERSIZE, f"top-k tensor {name!r} too large")
            total += size
            if total > max_elements:
                raise EnvelopeError(RejectReason.OVERSIZE, "top-k tensors too large in total")
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size):
                raise EnvelopeError(RejectReason.SHAPES, f"top-k tensor {name!r}: index out of range")
            dense = np.zeros(size, np.float32)
            dense[idx] = vals
            out[name] = dense.reshape(dims)
    return out
