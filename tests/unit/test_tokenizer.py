"""Flow tokenizer: template words, tokenizer.json round trip, unknown words, versions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.flows.record import ConnRecord
from gateway.model.prompt import (
    COMPACT, COMPACT_V2, COMPACT_V3, DEFAULT_TEMPLATE, END, TEMPLATE_VERSIONS, TEMPLATES, Template, count_bucket, duration_bucket,
    bare_packet_size, get_template, host_class, per_packet_bucket, port_word, register,
)
from gateway.model.tokenizer import FlowTokenizer, TokenizerError, TokenizerVersionError, marker_token


def rec(**kw) -> ConnRecord:
    base = dict(ts=1.0, uid="C1", orig_h="192.168.1.5", orig_p=40000, resp_h="8.8.8.8", resp_p=53, proto="udp",
                service="dns", duration=0.01, orig_bytes=40, resp_bytes=80, conn_state="SF", history="Dd",
                orig_pkts=1, resp_pkts=1, orig_ip_bytes=68, resp_ip_bytes=108, missed_bytes=0,
                label="benign", detailed_label=None)
    base.update(kw)
    return ConnRecord(**base)


TRAIN = [
    rec(),
    rec(uid="C2", proto="tcp", service=None, resp_p=23, conn_state="S0", history="S", duration=None,
        orig_bytes=None, resp_bytes=None, orig_pkts=1, resp_pkts=0, label="Malicious", detailed_label="DDoS"),
    rec(uid="C3", proto="tcp", service="http", resp_p=80, conn_state="SF", history="ShADadFf",
        orig_bytes=150, resp_bytes=67212, orig_pkts=54, resp_pkts=50),
]


def test_buckets_and_classes():
    assert count_bucket(None) == "-"
    assert count_bucket(3) == "3"
    assert count_bucket(1000) == count_bucket(1010) == "q39"  # same quarter-octave
    assert count_bucket(-5) == "neg"
    assert duration_bucket(None) == "-" and duration_bucket(0.0002) == "0"
    assert duration_bucket(float("nan")) == "bad" and duration_bucket(-1.0) == "bad"
    assert port_word(80) == "80" and port_word(1000) == "wk" and port_word(40000) == "reg" and port_word(60000) == "dyn"
    assert host_class("192.168.1.1") == "priv" and host_class("8.8.8.8") == "pub"
    assert host_class("255.255.255.255") == "bcast" and host_class("224.0.0.251") == "mcast"
    assert host_class("not-an-ip") == "bad" and host_class("fe80::1") == "ll"


def test_template_has_fixed_length_and_ends_with_end():
    for r in TRAIN:
        words = COMPACT.words(r)
        assert len(words) == COMPACT.length
        assert words[-1] == END
    assert get_template("edge-compact", 1) is COMPACT
    assert get_template("edge-compact") is COMPACT_V3  # a bare name is its newest version
    assert get_template("edge-compact/v2") is COMPACT_V2 is get_template(COMPACT_V2.ident)
    assert get_template(DEFAULT_TEMPLATE) is COMPACT_V2  # what new models are built with (pinned)
    for bad in ("edge-compact/v", "edge-compact/vx", "edge-compact/v9", "/v2"):
        with pytest.raises(KeyError, match="registered"):
            get_template(bad)
    with pytest.raises(KeyError, match="registered"):
        get_template("nope")
    with pytest.raises(KeyError, match="edge-compact/v9"):
        get_template("edge-compact", 9)
    with pytest.raises(ValueError, match="already registered"):
        register(COMPACT)


def test_v2_reads_bytes_per_packet_instead_of_ip_bytes():
    download = TRAIN[2]  # 150 B in 54 packets out, 67,212 B in 50 packets back
    v1, v2 = COMPACT.words(download), COMPACT_V2.words(download)
    assert len(v2) == COMPACT_V2.length == COMPACT.length and v2[-1] == END
    assert "obp:2" in v2 and f"rbp:{count_bucket(67212 / 50)}" in v2
    assert not any(w.startswith(("oib:", "rib:")) for w in v2)
    assert [w for w in v1 if not w.startswith(("oib:", "rib:"))] == [w for w in v2 if not w.startswith(("obp:", "rbp:"))]
    # the same download seen with other totals keeps its per-packet words
    twin = download._replace(orig_bytes=151, resp_bytes=64551, orig_pkts=59, resp_pkts=48)
    assert {w for w in COMPACT_V2.words(twin) if w[:4] in ("obp:", "rbp:")} == {w for w in v2 if w[:4] in ("obp:", "rbp:")}
    assert per_packet_bucket(None, 3) == per_packet_bucket(10, 0) == per_packet_bucket(10, None) == "-"
    assert per_packet_bucket(-10, 2) == "neg" and per_packet_bucket(10, -1) == "-"
    assert per_packet_bucket(10**400, 1) == "bad" and count_bucket(float("inf")) == "bad"
    assert duration_bucket(1.797693134862316e305) == "bad"  # overflows when turned into ms (hypothesis)


def test_v3_reads_the_size_of_payload_less_packets_where_v2_read_nothing():
    # a phone's SYN (60 bytes: TCP options) and Mirai's (40 bytes, none) to port 80:
    # v2 reads them the same, v3 tells them apart
    phone = rec(proto="tcp", service=None, resp_p=80, conn_state="S0", history="S", duration=None,
                orig_bytes=None, resp_bytes=None, orig_pkts=1, resp_pkts=0, orig_ip_bytes=60, resp_ip_bytes=0)
    mirai = phone._replace(orig_ip_bytes=40)
    assert COMPACT_V2.words(phone) == COMPACT_V2.words(mirai)
    v2, v3_phone, v3_mirai = COMPACT_V2.words(phone), COMPACT_V3.words(phone), COMPACT_V3.words(mirai)
    assert "obp:b60" in v3_phone and "obp:b40" in v3_mirai
    assert len(v3_phone) == COMPACT_V3.length == COMPACT_V2.length and v3_phone[-1] == END
    assert [w for w in v3_phone if not w.startswith("obp:")] == [w for w in v2 if not w.startswith("obp:")]
    # three SYN retries with a zero payload read like one
    assert "obp:b60" in COMPACT_V3.words(phone._replace(orig_pkts=3, orig_ip_bytes=180, orig_bytes=0))
    # a flow with payload, or without IP bytes, reads exactly as in v2
    for same in (TRAIN[2], TRAIN[2]._replace(orig_ip_bytes=TRAIN[2].orig_ip_bytes + 500), phone._replace(orig_ip_bytes=None)):
        assert COMPACT_V3.words(same) == COMPACT_V2.words(same)
    assert bare_packet_size(None, 1) == bare_packet_size(60, 0) == bare_packet_size(60, None) == "-"
    assert bare_packet_size(60, -1) == "-" and bare_packet_size(-60, 1) == "neg"
    assert bare_packet_size(58, 1) == "56" and bare_packet_size(28, 1) == "28"  # to 4-byte words
    assert bare_packet_size(1500, 1) == count_bucket(1500) and bare_packet_size(10**400, 1) == "bad"


def test_an_older_template_version_still_loads(tmp_path):
    for template in (COMPACT, COMPACT_V2, COMPACT_V3):
        tok = FlowTokenizer.build(TRAIN, template)
        tok.save(tmp_path / "tokenizer.json")
        back = FlowTokenizer.load(tmp_path / "tokenizer.json")
        assert back.template is template
        np.testing.assert_array_equal(back.encode(TRAIN), tok.encode(TRAIN))


def test_unknown_words_map_to_unk_and_fast_path_matches_library():
    tok = FlowTokenizer.build(TRAIN, COMPACT)
    odd = rec(proto="sctp", service="weird", history="ZZZZZZZZZZZZZZZZZZZZZZZ", resp_p=12345, conn_state="OTH",
              orig_bytes=10**12, duration=1e9)
    ids = tok.encode([*TRAIN, odd])
    assert ids.shape == (4, COMPACT.length) and ids.dtype == np.int64
    assert (ids[3] == tok.unk_id).sum() >= 5
    assert (ids[:3] != tok.unk_id).all()
    np.testing.assert_array_equal(ids, tok.encode_with_library([*TRAIN, odd]))
    assert tok.encode([]).shape == (0, COMPACT.length)


def test_tokenizer_json_round_trip(tmp_path):
    tok = FlowTokenizer.build(TRAIN, COMPACT)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = FlowTokenizer.load(path)
    assert back.vocab == tok.vocab
    assert back.template is COMPACT
    np.testing.assert_array_equal(back.encode(TRAIN), tok.encode(TRAIN))
    # a standard tokenizers file: the library reads it on its own
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(path))
    assert hf.encode(list(COMPACT.words(TRAIN[0])), is_pretokenized=True).ids == tok.encode(TRAIN[:1])[0].tolist()
    assert marker_token(COMPACT) in hf.get_vocab()


def _rewrite_marker(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_version_mismatch_is_a_clear_error(tmp_path):
    tok = FlowTokenizer.build(TRAIN, COMPACT)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    _rewrite_marker(path, marker_token(COMPACT), "[TEMPLATE:edge-compact:v99]")
    with pytest.raises(TokenizerVersionError, match=r"tokenizer\.json.*v99.*v3"):
        FlowTokenizer.load(path)


def test_missing_unknown_or_broken_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="missing"):
        FlowTokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        FlowTokenizer.load(bad)
    tok = FlowTokenizer.build(TRAIN, COMPACT)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    _rewrite_marker(path, marker_token(COMPACT), "[TEMPLATE:someone-else:v1]")
    with pytest.raises(TokenizerError, match="unknown prompt template 'someone-else'"):
        FlowTokenizer.load(path)
    data = json.loads(tok.to_str())
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if not k.startswith("[TEMPLATE")}
    data["added_tokens"] = [t for t in data["added_tokens"] if not t["content"].startswith("[TEMPLATE")]
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="one \\[TEMPLATE"):
        FlowTokenizer.load(path)


def test_cache_is_bounded_and_consistent():
    tok = FlowTokenizer(FlowTokenizer.build(TRAIN, COMPACT).hf, COMPACT, cache_size=2)
    first = tok.encode(TRAIN * 3)
    assert len(tok._cache) <= 2
    np.testing.assert_array_equal(first, tok.encode_with_library(TRAIN * 3))


text = st.one_of(st.none(), st.text(max_size=30))
ints = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**64))
floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))


@pytest.mark.parametrize("template", [COMPACT, COMPACT_V2, COMPACT_V3], ids=lambda t: t.ident)
@settings(max_examples=150, deadline=None)
@given(proto=st.text(max_size=10), service=text, state=text, history=text, orig_h=st.text(max_size=40),
       resp_h=st.text(max_size=40), orig_p=st.integers(-1, 70000), resp_p=st.integers(-1, 70000),
       duration=floats, ob=ints, rb=ints, opk=ints, rpk=ints, oib=ints, mb=ints, lo=st.one_of(st.none(), st.booleans()))
def test_hostile_records_never_crash(template, proto, service, state, history, orig_h, resp_h, orig_p, resp_p,
                                     duration, ob, rb, opk, rpk, oib, mb, lo):
    tok = FlowTokenizer.build(TRAIN, template)
    r = ConnRecord(ts=0.0, uid="X", orig_h=orig_h, orig_p=orig_p, resp_h=resp_h, resp_p=resp_p, proto=proto,
                   service=service, duration=duration, orig_bytes=ob, resp_bytes=rb, conn_state=state,
                   history=history, orig_pkts=opk, resp_pkts=rpk, orig_ip_bytes=oib, missed_bytes=mb, local_orig=lo)
    ids = tok.encode([r])
    assert ids.shape == (1, template.length)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert ids[0, -1] == tok.vocab[END]


def test_a_second_template_can_be_registered_and_is_kept_apart():
    short = Template(name="test-short", version=3, length=2, words=lambda r: (f"p:{r.proto}", END),
                     key_fields=("proto",), description="test")
    try:
        register(short)
        tok = FlowTokenizer.build(TRAIN, short)
        assert tok.encode(TRAIN).shape == (3, 2)
        assert marker_token(short) == "[TEMPLATE:test-short:v3]"
        assert FlowTokenizer.from_hf(tok.hf).template is short
    finally:
        TEMPLATES.pop("test-short", None)
        TEMPLATE_VERSIONS.pop(("test-short", 3), None)
