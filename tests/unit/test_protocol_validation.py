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
from gateway.protocol.envelope import SCHEMA_VERSION
from gateway.protocol.envelope import _HEADER_FIELDS as FIELDS_BY_SCHEMA
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
@given(st.sampled_from(sorted(FIELDS_BY_SCHEMA[SCHEMA_VERSION])), json_values)
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


# ---------------------------------------------------------------- intake hardening (issue 16.6)


def with_body(data: bytes, body: bytes) -> bytes:
    """``data``'s header over another body, digest made to match."""
    import hashlib

    hlen = struct.unpack_from(">I", data, 4)[0]
    return rebuild(data[:8 + hlen], lambda h: h.update(digest=hashlib.sha256(body).hexdigest())) + body


def test_bytes_after_the_zstd_frame_are_rejected():
    good = update()
    hlen = struct.unpack_from(">I", good, 4)[0]
    body = good[8 + hlen:]
    assert isinstance(validate_envelope(with_body(good, body), policy()), Envelope)
    for tail in (b"x", b"\x00" * 100, body):  # junk, padding, a second frame
        result = validate_envelope(with_body(good, body + tail), policy())
        assert reason(result) is RejectReason.SCHEMA and "after the zstd frame" in result.detail
    for cut in (1, 3, len(body) // 2):  # a frame cut short never passes either
        assert reason(validate_envelope(with_body(good, body[:-cut]), policy())) is RejectReason.SCHEMA


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([{}, {"write_checksum": True}, {"write_content_size": False}]))
def test_zstd_frame_length_is_exact(raw, kw):
    from gateway.protocol.envelope import zstd_frame_length

    frame = zstandard.ZstdCompressor(**kw).compress(raw)
    assert zstd_frame_length(frame) == len(frame)
    streamed = zstandard.ZstdCompressor(**kw).compressobj()
    frame = streamed.compress(raw) + streamed.flush()
    assert zstd_frame_length(frame) == len(frame)
    for cut in range(1, min(len(frame), 8)):
        with pytest.raises(EnvelopeError):
            zstd_frame_length(frame[:-cut])


@pytest.mark.parametrize("field, value", [("num_samples", 2**31), ("base_version", 2**40), ("round", 2**53),
                                          ("payload_bytes", 2**31)])
def test_header_integers_beyond_a_database_column_are_rejected(field, value):
    result = validate_envelope(rebuild(update(), lambda h: h.update({field: value})), policy())
    assert reason(result) is RejectReason.SCHEMA and field in result.detail


def test_headers_carry_the_key_id_and_any_configured_key_verifies():
    old, new = signing.generate_private_key(), signing.generate_private_key()
    signed_new = encode_global(DELTA, sender="aggregator", version=6, base_version=5, signing_key=new)
    header, _ = decode_header(signed_new)
    assert header.key_id == signing.key_id(new) and header.schema == 2
    rotation = dict(kind=Kind.GLOBAL, expected=SPEC, current_version=5)
    assert isinstance(validate_envelope(signed_new, ValidationPolicy(**rotation, verify_key=[old.public_key(),
                                                                                            new.public_key()])),
                      Envelope)
    result = validate_envelope(signed_new, ValidationPolicy(**rotation, verify_key=old.public_key()))
    assert reason(result) is RejectReason.SIGNATURE and "not one this side accepts" in result.detail
    swapped = rebuild(signed_new, lambda h: h.update(key_id=signing.key_id(old)))  # the key id is signed
    assert reason(validate_envelope(swapped, ValidationPolicy(**rotation, verify_key=[old.public_key(),
                                                                                    new.public_key()]))) \
        is RejectReason.SIGNATURE
    # a schema-1 global (no key_id, from an aggregator not yet upgraded) is tried against every key
    v1 = rebuild(encode_global(DELTA, sender="aggregator", version=6, base_version=5),
                 lambda h: (h.pop("key_id"), h.update(schema=1)))
    h1, _ = decode_header(v1)
    from dataclasses import replace

    v1_signed = rebuild(v1, lambda h: h.update(signature=signing.sign(old, replace(h1).signing_bytes())))
    assert isinstance(validate_envelope(v1_signed, ValidationPolicy(**rotation, verify_key=[new.public_key(),
                                                                                           old.public_key()])),
                      Envelope)


def test_size_bounds_follow_the_model():
    from gateway.protocol.validation import SIZE_SLACK, size_limits

    spec = spec_of({"w": np.zeros((1000, 100), np.float32), "ids": np.zeros(10, np.int64)})
    wire, decoded = size_limits(spec_of({"w": np.zeros((1000, 100), np.float32)}), kind=Kind.UPDATE)
    assert decoded == 2 * 400_000 + SIZE_SLACK and decoded < wire < decoded * 1.01 + 2 * SIZE_SLACK
    g_wire, g_decoded = size_limits(spec, kind=Kind.GLOBAL)
    assert g_decoded == 400_000 + 80 + SIZE_SLACK
    small = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    wire, decoded = size_limits(spec_of(small), kind=Kind.UPDATE)
    big = update(delta={"w": np.random.rand(4, 3).astype(np.float32), "b": np.zeros(3, np.float32),
                        "x": np.random.rand(60_000).astype(np.float32)})  # 4x the model's float32 size
    pol = policy(expected=None, max_bytes=wire, max_decoded_bytes=decoded)
    assert reason(validate_envelope(big, pol)) is RejectReason.OVERSIZE
    assert isinstance(validate_envelope(update(compression="topk", topk_fraction=1.0), policy(
        max_bytes=wire, max_decoded_bytes=decoded)), Envelope)  # the largest honest form fits


def test_a_failed_or_disagreeing_chunk_set_is_dropped_and_senders_are_capped():
    r = chunking.Reassembler(clock=lambda: 0.0, max_messages=8, max_per_source=2, max_message_bytes=10_000)
    data = np.random.default_rng(0).bytes(3000)
    frames = chunking.split_message(data, max_chunk_bytes=1024, message_id="m1")
    r.add(chunking.parse_chunk(frames[0]), source="a")
    liar = chunking.split_message(data[:2500], max_chunk_bytes=1024, message_id="m1")  # same id, other size
    with pytest.raises(EnvelopeError):
        r.add(chunking.parse_chunk(liar[1]), source="a")
    assert len(r) == 0  # the whole set went
    r.add(chunking.parse_chunk(chunking.split_message(data, max_chunk_bytes=1024, message_id="b1")[0]), source="b")
    evicted = []
    for i in range(5):  # "a" opens many sets: only its own oldest go
        _, gone = r.add(chunking.parse_chunk(chunking.split_message(data, max_chunk_bytes=1024,
                                                                    message_id=f"a{i}")[0]), source="a")
        evicted += gone
    assert sorted(k for k in r.pending_keys()) == [("a", "a3"), ("a", "a4"), ("b", "b1")]
    assert {e.source for e in evicted} == {"a"}
    huge = chunking.split_message(np.random.default_rng(1).bytes(20_000), max_chunk_bytes=1024, message_id="h")
    with pytest.raises(EnvelopeError) as err:
        r.add(chunking.parse_chunk(huge[0]), source="b")
    assert err.value.reason is RejectReason.OVERSIZE
