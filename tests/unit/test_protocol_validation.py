"""validate_envelope: one test per rejection reason, and hostile inputs via hypothesis."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy as st_numpy
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol import chunking, signing
from gateway.protocol.envelope import _HEADER_FIELDS as HEADER_FIELDS
from gateway.protocol.envelope import MAGIC, Envelope, Kind, decode_header, encode_global, encode_update
from gateway.protocol.errors import EnvelopeError, RejectReason, Rejection
from gateway.protocol.validation import ValidationPolicy, spec_of, validate_envelope

DELTA = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
SPEC = spec_of(DELTA)
KEY = signing.generate_private_key()


def policy(**kw) -> ValidationPolicy:
    base = dict(expected=SPEC, known_senders=frozenset({"gw1", "gw2"}), current_version=5, max_staleness=2)
    base.update(kw)
    return ValidationPolicy(**base)


def update(**kw) -> bytes:
    args = dict(sender="gw1", base_version=5, num_samples=10)
    args.update(kw)
    delta = args.pop("delta", DELTA)
    return encode_update(delta, **args).data


def rebuild(data: bytes, mutate) -> bytes:
    """Re-frame an envelope after ``mutate(header_dict)``."""
    hlen = struct.unpack_from(">I", data, 4)[0]
    header = json.loads(data[8:8 + hlen])
    mutate(header)
    hb = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(hb)) + hb + data[8 + hlen:]


def reason(result) -> RejectReason | None:
    return result.reason if isinstance(result, Rejection) else None


def test_valid_update_is_accepted():
    result = validate_envelope(update(), policy())
    assert isinstance(result, Envelope) and result.header.sender == "gw1"


@pytest.mark.parametrize(
    "data,pol,expected",
    [
        (b"garbage", policy(), RejectReason.SCHEMA),
        (update(sender="gw9"), policy(), RejectReason.UNKNOWN_SENDER),
        (update(sender="gw2"), policy(topic_sender="gw1"), RejectReason.SENDER_MISMATCH),
        (update(delta={"w": DELTA["w"], "x": DELTA["b"]}), policy(), RejectReason.NAMES),
        (update(delta={"w": np.ones((3, 4), np.float32), "b": DELTA["b"]}), policy(), RejectReason.SHAPES),
        (update(delta={"w": DELTA["w"], "b": DELTA["b"]}),
         policy(expected={"w": ((4, 3), "float32"), "b": ((3,), "float64")}), RejectReason.DTYPES),
        (update(delta={"w": np.full((4, 3), np.nan, np.float32), "b": DELTA["b"]}), policy(),
         RejectReason.NON_FINITE),
        (update(delta={"w": np.full((4, 3), np.inf, np.float32), "b": DELTA["b"]}), policy(),
         RejectReason.NON_FINITE),
        (update(), policy(max_bytes=100), RejectReason.OVERSIZE),
        (update(base_version=2), policy(), RejectReason.STALE_BASE),
        (update(base_version=6), policy(), RejectReason.UNKNOWN_BASE),
        (update(message_id="seen"), policy(is_replay=lambda s, m: (s, m) == ("gw1", "seen")), RejectReason.REPLAY),
        (encode_global(DELTA, sender="aggregator", version=5, base_version=4), policy(), RejectReason.WRONG_KIND),
    ],
    ids=lambda v: v.value if isinstance(v, RejectReason) else None,
)
def test_each_rejection_reason(data, pol, expected):
    assert reason(validate_envelope(data, pol)) is expected


def test_bad_digest_rejected():
    data = update()
    flipped = data[:-1] + bytes([data[-1] ^ 0xFF])
    assert reason(validate_envelope(flipped, policy())) is RejectReason.DIGEST


def test_decompression_bomb_rejected_as_oversize():
    data = update(delta={"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)})
    assert reason(validate_envelope(data, policy(max_decoded_bytes=64))) is RejectReason.OVERSIZE


def test_header_field_tampering_breaks_schema_or_digest():
    data = update()
    assert reason(validate_envelope(rebuild(data, lambda h: h.update(schema=99)), policy())) is RejectReason.SCHEMA
    assert reason(validate_envelope(rebuild(data, lambda h: h.pop("round")), policy())) is RejectReason.SCHEMA
    assert reason(validate_envelope(rebuild(data, lambda h: h.update(num_samples=-1)), policy())) is RejectReason.SCHEMA
    assert reason(validate_envelope(rebuild(data, lambda h: h.update(num_samples=True)), policy())) is RejectReason.SCHEMA
    assert reason(validate_envelope(rebuild(data, lambda h: h.update(digest="0" * 64)), policy())) is RejectReason.DIGEST


def test_pickle_payload_is_never_loaded():
    import pickle

    body = zstandard.ZstdCompressor().compress(pickle.dumps({"w": [1, 2, 3]}))
    import hashlib

    data = rebuild(update(), lambda h: h.update(digest=hashlib.sha256(body).hexdigest(), payload_bytes=len(
        zstandard.ZstdDecompressor().decompress(body))))
    hlen = struct.unpack_from(">I", data, 4)[0]
    data = data[:8 + hlen] + body
    assert reason(validate_envelope(data, policy())) is RejectReason.SCHEMA


def test_signature_required_and_checked_for_global_models():
    signed = encode_global(DELTA, sender="aggregator", version=6, base_version=5, signing_key=KEY)
    unsigned = encode_global(DELTA, sender="aggregator", version=6, base_version=5)
    gpol = dict(kind=Kind.GLOBAL, expected=SPEC, current_version=5, verify_key=KEY.public_key())
    assert isinstance(validate_envelope(signed, ValidationPolicy(**gpol)), Envelope)
    assert reason(validate_envelope(unsigned, ValidationPolicy(**gpol))) is RejectReason.SIGNATURE
    forged = rebuild(signed, lambda h: h.update(version=60))  # signature no longer covers it
    assert reason(validate_envelope(forged, ValidationPolicy(**gpol))) is RejectReason.SIGNATURE
    old = encode_global(DELTA, sender="aggregator", version=4, base_version=3, signing_key=KEY)
    assert reason(validate_envelope(old, ValidationPolicy(**gpol))) is RejectReason.STALE_BASE


def test_chunk_never_completing_is_an_incomplete_chunk_expiry():
    now = [0.0]
    r = chunking.Reassembler(clock=lambda: now[0], timeout_s=1)
    frames = chunking.split_message(update(delta={"w": np.random.rand(4, 3).astype(np.float32),
                                                  "b": DELTA["b"]}) * 10, max_chunk_bytes=1024)
    r.add(chunking.parse_chunk(frames[0]), source="gw1")
    now[0] = 2
    assert len(r.expire()) == 1


def test_policy_validates_its_settings():
    with pytest.raises(ValueError):
        ValidationPolicy(max_bytes=0)
    with pytest.raises(ValueError):
        ValidationPolicy(max_staleness=-1)


# ---------------------------------------------------------------- hostile inputs

HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HOSTILE
@given(st.binary(max_size=4096))
def test_random_bytes_never_raise(data):
    result = validate_envelope(data, policy())
    assert isinstance(result, Rejection)


@HOSTILE
@given(st.binary(max_size=2048))
def test_random_bytes_behind_magic_never_raise(data):
    assert isinstance(validate_envelope(MAGIC + data, policy()), Rejection)


@HOSTILE
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_single_byte_mutations_are_rejected_or_identical(pos, value):
    original = update()
    body_start = 8 + struct.unpack_from(">I", original, 4)[0]
    data = bytearray(original)
    pos %= len(data)
    changed = data[pos] != value
    data[pos] = value
    result = validate_envelope(bytes(data), policy())
    if changed and pos >= body_start:
        assert reason(result) is RejectReason.DIGEST  # any body byte: the digest catches it
    elif changed:
        # a header byte: refused by the framing/schema/sender/version checks, or (e.g. a
        # changed digit of `created`) an equally valid header whose tensors are intact
        if isinstance(result, Envelope):
            np.testing.assert_array_equal(result.tensors["w"], DELTA["w"])
        else:
            assert isinstance(result, Rejection)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)


@HOSTILE
@given(st.sampled_from(sorted(HEADER_FIELDS)), json_values)
def test_mutated_header_fields_never_raise(field, value):
    data = rebuild(update(), lambda h: h.__setitem__(field, value))
    result = validate_envelope(data, policy())
    assert isinstance(result, (Rejection, Envelope))


def _hostile_safetensors(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


safetensor_headers = st.dictionaries(
    st.text(max_size=8),
    st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "I8", "I32", "I64", "BF16", "X"]),
        "shape": st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4),
        "data_offsets": st.lists(st.integers(min_value=-5, max_value=2**40), min_size=0, max_size=3),
    }),
    max_size=3,
)


@HOSTILE
@given(safetensor_headers, st.binary(max_size=256))
def test_hostile_safetensors_payload_never_raises(header, blob):
    import hashlib

    raw = _hostile_safetensors(header, blob)
    body = zstandard.ZstdCompressor().compress(raw)
    base = update()
    hlen = struct.unpack_from(">I", base, 4)[0]
    framed = rebuild(base, lambda h: h.update(digest=hashlib.sha256(body).hexdigest(), payload_bytes=len(raw)))
    hlen = struct.unpack_from(">I", framed, 4)[0]
    result = validate_envelope(framed[:8 + hlen] + body, policy())
    assert isinstance(result, Rejection)


@HOSTILE
@given(st.binary(max_size=512))
def test_hostile_chunks_raise_only_typed_errors(data):
    r = chunking.Reassembler(clock=lambda: 0.0)
    for frame in (data, chunking.CHUNK_MAGIC + data):
        try:
            r.add(chunking.parse_chunk(frame), source="x")
        except EnvelopeError:
            pass


@HOSTILE
@given(st.sampled_from(["int8", "topk"]), st.binary(max_size=64))
def test_hostile_compressed_parts_never_raise(method, blob):
    import hashlib

    n = len(blob) // 4
    parts = {"i:w": np.frombuffer(blob[: 4 * n], np.int32).copy() if method == "topk" else None}
    if method == "topk":
        tensors = {"i:w": parts["i:w"], "v:w": np.zeros(n, np.float32), "n:w": np.array([4, 3], np.int64)}
    else:
        tensors = {"q:w": np.frombuffer(blob, np.int8).copy(), "s:w": np.array(np.nan if blob[:1] == b"\0" else 1.0, np.float32)}
    raw = st_numpy.save(tensors)
    body = zstandard.ZstdCompressor().compress(raw)
    framed = rebuild(update(), lambda h: h.update(digest=hashlib.sha256(body).hexdigest(), payload_bytes=len(raw),
                                                   compression=method))
    hlen = struct.unpack_from(">I", framed, 4)[0]
    assert isinstance(validate_envelope(framed[:8 + hlen] + body, policy()), Rejection)


_DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.int32, np.int64, np.uint8, np.bool_])
_TENSORS = st.dictionaries(
    st.text(alphabet="abcdefgh._0123", min_size=1, max_size=12),
    st.tuples(_DTYPES, st.lists(st.integers(0, 5), max_size=3)),
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(_TENSORS, st.integers(0, 2**32 - 1))
def test_payload_reader_matches_the_safetensors_loader(spec, seed):
    """Our one-pass reader returns exactly what safetensors' own loader returns."""
    from gateway.protocol.envelope import _load_safetensors

    rng = np.random.default_rng(seed)
    tensors = {name: np.asarray(rng.normal(size=shape) * 100).astype(dtype) for name, (dtype, shape) in spec.items()}
    raw = st_numpy.save(tensors)
    ours, theirs = _load_safetensors(raw), st_numpy.load(raw)
    assert set(ours) == set(theirs)
    for name, arr in theirs.items():
        assert ours[name].dtype == arr.dtype and ours[name].shape == arr.shape
        np.testing.assert_array_equal(ours[name], arr)
