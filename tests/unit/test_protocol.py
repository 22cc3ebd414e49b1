"""Envelope codec, compression, chunking and signing: round trips and hand-checked values."""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest

from gateway.protocol import chunking, signing
from gateway.protocol.compression import (
    Compression,
    compress_delta,
    decompress_tensors,
    quantize_int8,
    topk_select,
)
from gateway.protocol.envelope import (
    Kind,
    decode_envelope,
    decode_header,
    encode_global,
    encode_update,
    raw_float32_bytes,
)
from gateway.protocol.errors import EnvelopeError, RejectReason


def small_delta() -> dict[str, np.ndarray]:
    return {
        "layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 10,
        "layer.bias": np.array([-1.0, 0.5, 2.0], dtype=np.float32),
    }


def test_update_round_trip_keeps_header_and_tensors():
    enc = encode_update(small_delta(), sender="gw-1", base_version=4, num_samples=120, round=2,
                        metrics={"f1": 0.75}, created=1000.0)
    env = decode_envelope(enc.data)
    h = env.header
    assert (h.kind, h.sender, h.base_version, h.version, h.round, h.num_samples) == (
        Kind.UPDATE, "gw-1", 4, None, 2, 120)
    assert h.metrics == {"f1": 0.75} and h.created == 1000.0 and h.message_id == enc.message_id
    for k, v in small_delta().items():
        np.testing.assert_array_equal(env.tensors[k], v)
    # the header digest is the sha256 of the compressed body
    header, body = decode_header(enc.data)
    assert header.digest == hashlib.sha256(body).hexdigest()


def test_int8_quantisation_hand_values():
    q, scale = quantize_int8(np.array([-2.54, 0.0, 1.27], np.float32))
    assert scale == pytest.approx(0.02)
    assert q.tolist() == [-127, 0, 64]  # 1.27/0.02 = 63.5 -> rint -> 64
    zq, zs = quantize_int8(np.zeros(3, np.float32))
    assert zs == 0 and zq.tolist() == [0, 0, 0]


def test_topk_keeps_largest_magnitudes():
    idx, vals = topk_select(np.array([0.1, -5.0, 0.2, 3.0], np.float32), 0.5)
    assert idx.tolist() == [1, 3] and vals.tolist() == [-5.0, 3.0]


def test_error_feedback_residual_carries_what_was_dropped():
    delta = {"w": np.array([1.0, 0.1, -0.2, 4.0], np.float32)}
    packed, residual = compress_delta(delta, method=Compression.TOPK, topk_fraction=0.5)
    sent = decompress_tensors(packed, Compression.TOPK, max_elements=100)["w"]
    assert sent.tolist() == [1.0, 0.0, 0.0, 4.0]
    np.testing.assert_allclose(residual["w"], [0.0, 0.1, -0.2, 0.0], atol=1e-7)
    # next round: an all-zero delta sends what the residual held
    packed2, residual2 = compress_delta({"w": np.zeros(4, np.float32)}, method=Compression.TOPK,
                                        residual=residual, topk_fraction=0.5)
    sent2 = decompress_tensors(packed2, Compression.TOPK, max_elements=100)["w"]
    np.testing.assert_allclose(sent + sent2, delta["w"], atol=1e-7)
    np.testing.assert_allclose(residual2["w"], 0, atol=1e-7)


def test_int8_error_feedback_sums_to_truth_over_rounds():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=1000).astype(np.float32)
    residual, total = None, np.zeros_like(truth)
    for _ in range(5):
        enc = encode_update({"w": truth}, sender="g", base_version=0, num_samples=1,
                            compression="int8", residual=residual)
        total += decode_envelope(enc.data).tensors["w"]
        residual = enc.residual
    # what arrived plus what is still held equals what was meant to be sent
    np.testing.assert_allclose(total + residual["w"], 5 * truth, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,fraction,min_ratio", [("int8", 0.01, 3.9), ("topk", 0.01, 20.0)])
def test_compressed_updates_are_smaller_than_raw_float32(method, fraction, min_ratio):
    rng = np.random.default_rng(1)
    delta = {f"t{i}": rng.normal(size=(64, 256)).astype(np.float32) for i in range(4)}
    raw = raw_float32_bytes(delta)
    enc = encode_update(delta, sender="g", base_version=0, num_samples=1, compression=method,
                        topk_fraction=fraction)
    assert raw / len(enc.data) >= min_ratio


def test_global_model_signature_round_trip_and_tamper(tmp_path):
    key = signing.generate_private_key()
    data = encode_global(small_delta(), sender="aggregator", version=7, base_version=6, signing_key=key)
    header, _ = decode_header(data)
    assert header.version == 7 and header.signature
    assert signing.verify(key.public_key(), header.signing_bytes(), header.signature)
    other = signing.generate_private_key().public_key()
    assert not signing.verify(other, header.signing_bytes(), header.signature)
    assert not signing.verify(key.public_key(), header.signing_bytes(), "not base64!!")
    # keys: private written 0600, both load back
    priv = signing.save_private_key(key, tmp_path / "k" / "agg.key")
    pub = signing.save_public_key(key, tmp_path / "agg.pub")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert signing.key_id(signing.load_private_key(priv)) == signing.key_id(signing.load_public_key(pub))


def test_global_rejects_lossy_compression_header():
    with pytest.raises(TypeError):
        encode_global(small_delta(), sender="a", version=1, base_version=0, compression="int8")


def test_chunking_round_trip_out_of_order_with_duplicates():
    data = os.urandom(10_000)
    frames = chunking.split_message(data, max_chunk_bytes=1500, message_id="m1")
    assert len(frames) > 5 and all(len(f) <= 1500 for f in frames)
    r = chunking.Reassembler(clock=lambda: 0.0)
    order = list(reversed(frames)) + [frames[0]]
    results = [r.add(chunking.parse_chunk(f), source="gw")[0] for f in order]
    whole = [x for x in results if x is not None]
    assert whole == [data] and len(r) == 0


def test_small_message_is_not_chunked():
    assert chunking.split_message(b"x" * 2000, max_chunk_bytes=2000) == [b"x" * 2000]


def test_reassembler_expires_incomplete_messages_on_its_clock():
    now = [0.0]
    r = chunking.Reassembler(clock=lambda: now[0], timeout_s=10)
    frames = chunking.split_message(os.urandom(5000), max_chunk_bytes=1200, message_id="m2")
    r.add(chunking.parse_chunk(frames[0]), source="gw")
    now[0] = 5
    assert r.expire() == []
    now[0] = 11
    (gone,) = r.expire()
    assert (gone.source, gone.message_id, gone.have, gone.count) == ("gw", "m2", 1, len(frames))
    assert len(r) == 0


def test_reassembler_rejects_corrupted_chunk_data():
    frames = chunking.split_message(os.urandom(5000), max_chunk_bytes=1200, message_id="m3")
    r = chunking.Reassembler(clock=lambda: 0.0)
    for f in frames[:-1]:
        r.add(chunking.parse_chunk(f), source="gw")
    last = chunking.parse_chunk(frames[-1])
    tampered = chunking.Chunk(last.message_id, last.index, last.count, last.size, last.digest,
                              bytes([last.data[0] ^ 1]) + last.data[1:])
    with pytest.raises(EnvelopeError) as err:
        r.add(tampered, source="gw")
    assert err.value.reason is RejectReason.DIGEST


def test_reassembler_bounds_pending_messages():
    r = chunking.Reassembler(clock=lambda: 0.0, max_messages=2)
    evicted = []
    for mid in ("a", "b", "c"):
        frames = chunking.split_message(os.urandom(3000), max_chunk_bytes=1100, message_id=mid)
        evicted += r.add(chunking.parse_chunk(frames[0]), source="gw")[1]
    assert [e.message_id for e in evicted] == ["a"] and len(r) == 2


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=20_000), st.integers(1024, 5000), st.randoms(use_true_random=False))
def test_split_and_reassemble_any_message_in_any_order(data, max_chunk, rnd):
    frames = chunking.split_message(data, max_chunk_bytes=max_chunk, message_id="m")
    assert all(len(f) <= max_chunk for f in frames)
    if len(frames) == 1:
        assert frames[0] == data
        return
    rnd.shuffle(frames)
    r = chunking.Reassembler(clock=lambda: 0.0)
    out = [r.add(chunking.parse_chunk(f), source="s")[0] for f in frames + frames[:2]]  # with duplicates
    assert [o for o in out if o is not None] == [data] and len(r) == 0
