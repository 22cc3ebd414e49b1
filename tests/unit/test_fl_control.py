"""Control message parsing: valid messages round-trip, hostile ones raise ControlError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.fl.control import (
    LOCAL_SETTING_RANGES,
    Control,
    ControlError,
    LocalSettings,
    encode_control,
    local_setting_problem,
    parse_control,
)
from gateway.protocol import signing
from gateway.protocol.compression import Compression


def test_round_trip():
    c = Control(strategy="fedavg", version=3, round=4, selected=frozenset({"gw-a", "gw-b"}),
                local=LocalSettings(epochs=2, lr=0.01, lr_decay=0.8, prox_mu=0.0, compression=Compression.INT8),
                trigger={"tau": 0.05})
    back = parse_control(encode_control(c))
    assert back == c
    assert back.synchronous and back.selects("gw-a") and not back.selects("gw-c")


def test_minimal_message_keeps_defaults():
    c = parse_control(b'{"strategy": "gsfs"}')
    assert c.version is None and c.round == 0 and c.selected is None and c.selects("anyone")
    assert c.local == LocalSettings() and c.trigger == {} and not c.synchronous


def test_prox_mu_zero_is_allowed_and_kept():
    assert parse_control(b'{"strategy": "fedavg", "local": {"prox_mu": 0}}').local.prox_mu == 0.0
    assert parse_control(b'{"strategy": "fedavg", "local": {"prox_mu": 0.5}}').local.prox_mu == 0.5


def test_label_smoothing_zero_is_allowed_and_kept():
    assert parse_control(b'{"strategy": "gsfs", "local": {"label_smoothing": 0}}').local.label_smoothing == 0.0
    assert parse_control(b'{"strategy": "gsfs", "local": {"label_smoothing": 0.1}}').local.label_smoothing == 0.1


def test_missing_class_scale_takes_the_closed_unit_interval():
    for v in (0, 0.5, 1):
        raw = json.dumps({"strategy": "gsfs", "local": {"missing_class_scale": v}}).encode()
        assert parse_control(raw).local.missing_class_scale == float(v)


@pytest.mark.parametrize("name", sorted(LOCAL_SETTING_RANGES))
def test_local_setting_ranges_at_their_edges(name):
    lo, hi, lo_closed = LOCAL_SETTING_RANGES[name]
    assert local_setting_problem(name, hi) is None
    assert local_setting_problem(name, (lo + hi) / 2) is None
    assert (local_setting_problem(name, lo) is None) is lo_closed
    for bad in (hi * 1.001 + 1e-9, lo - 1e-9, float("nan"), float("inf"), True, "0.1", None):
        assert local_setting_problem(name, bad) is not None, bad


@given(name=st.sampled_from(sorted(LOCAL_SETTING_RANGES)), value=st.floats(allow_nan=True, allow_infinity=True))
def test_control_and_settings_agree_on_every_local_value(name, value):
    """The control topic accepts exactly the values the shared range table accepts."""
    raw = json.dumps({"strategy": "gsfs", "local": {name: value}}).encode()
    if local_setting_problem(name, value) is None:
        assert getattr(parse_control(raw).local, name) == value
    else:
        with pytest.raises(ControlError, match=name):
            parse_control(raw)


def test_unknown_top_level_keys_are_ignored():
    assert parse_control(b'{"strategy": "gsfs", "future": 1}').strategy == "gsfs"


@pytest.mark.parametrize(
    "obj",
    [
        {"strategy": "sgd"},
        {},
        {"strategy": "gsfs", "schema": 2},
        {"strategy": "gsfs", "round": -1},
        {"strategy": "gsfs", "round": 1.5},
        {"strategy": "gsfs", "version": True},
        {"strategy": "gsfs", "selected": "gw-a"},
        {"strategy": "gsfs", "selected": ["bad/id"]},
        {"strategy": "gsfs", "selected": [3]},
        {"strategy": "gsfs", "local": {"lr": 0}},
        {"strategy": "gsfs", "local": {"lr": float("inf")}},
        {"strategy": "gsfs", "local": {"epochs": 0}},
        {"strategy": "gsfs", "local": {"lr_decay": 0}},
        {"strategy": "gsfs", "local": {"lr_decay": 1.5}},
        {"strategy": "gsfs", "local": {"prox_mu": -0.1}},
        {"strategy": "gsfs", "local": {"prox_mu": 1e9}},
        {"strategy": "gsfs", "local": {"prox_mu": "1"}},
        {"strategy": "gsfs", "local": {"missing_class_scale": -0.5}},
        {"strategy": "gsfs", "local": {"missing_class_scale": 1.01}},
        {"strategy": "gsfs", "local": {"missing_class_scale": None, "lr": "x"}},
        {"strategy": "gsfs", "local": {"missing_class_scale": True}},
        {"strategy": "gsfs", "local": {"label_smoothing": 0.6}},
        {"strategy": "gsfs", "local": {"label_smoothing": -0.1}},
        {"strategy": "gsfs", "local": {"compression": "gzip"}},
        {"strategy": "gsfs", "local": []},
        {"strategy": "gsfs", "trigger": {"ema": 1.5}},
        {"strategy": "gsfs", "trigger": {"nope": 1}},
        {"strategy": "gsfs", "trigger": [1]},
        [1, 2],
    ],
)
def test_bad_messages(obj):
    with pytest.raises(ControlError):
        parse_control(json.dumps(obj).encode())


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"{", b"null", b"x" * 70_000])
def test_not_json(raw):
    with pytest.raises(ControlError):
        parse_control(raw)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["strategy", "round", "version", "selected", "local", "trigger", "x"]), inner, max_size=5),
    max_leaves=12,
).map(lambda o: json.dumps(o).encode()))
def test_hostile_input_only_raises_control_error(raw):
    try:
        c = parse_control(raw)
    except ControlError:
        return
    assert c.strategy in ("gsfs", "fedavg", "fedopt")


# ---------------------------------------------------------------- signed and bounded (issue 16.6)

KEY = signing.generate_private_key()
OTHER = signing.generate_private_key()


def test_control_messages_are_signed_and_verified():
    c = Control(strategy="fedavg", version=3, round=2, refused=1, local=LocalSettings(epochs=2))
    signed = encode_control(c, signing_key=KEY)
    assert parse_control(signed, verify_keys=KEY.public_key()) == c
    assert parse_control(signed, verify_keys=[OTHER.public_key(), KEY.public_key()]) == c  # a rotation
    for bad, why in ((encode_control(c), "unsigned"), (encode_control(c, signing_key=OTHER), "not one this"),
                     (signed.replace(b'"round":2', b'"round":1'), "does not verify"),
                     (signed.replace(b'"epochs":2', b'"epochs":200'), "does not verify")):
        with pytest.raises(ControlError, match=why):
            parse_control(bad, verify_keys=KEY.public_key())
    assert parse_control(encode_control(c)) == c  # a gateway without keys (lab) reads it unsigned


@pytest.mark.parametrize("obj", [
    {"strategy": "gsfs", "version": 2**31}, {"strategy": "gsfs", "round": 2**40}, {"strategy": "gsfs", "refused": -1},
    {"strategy": "gsfs", "local": {"epochs": 10**6}}, {"strategy": "gsfs", "local": {"max_steps": 10**9}},
    {"strategy": "gsfs", "local": {"batch_size": 10**6}}, {"strategy": "gsfs", "trigger": {"warmup": 10**9}},
    {"strategy": "gsfs", "trigger": {"tau": 1e300}}, {"strategy": "gsfs", "trigger": {"k": "x" * 100}},
    {"strategy": "fedavg", "selected": [f"gw{i}" for i in range(10_001)]},
])
def test_every_control_value_is_bounded(obj):
    with pytest.raises(ControlError):
        parse_control(json.dumps(obj).encode())
