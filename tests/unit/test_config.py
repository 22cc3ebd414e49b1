"""Gateway configuration: TOML in, validated settings out, clear messages, env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import (
    ConfigError,
    GatewayConfig,
    apply_env,
    config_from_dict,
    env_overrides,
    load_config,
    parse_listen,
)

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
[gateway]
id = "gw1"
database = "state/gw.db"
model = "models/default"
global_model_public_key = "keys/aggregator.pub"
[source]
zeek_log = "logs/conn.log"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gw.toml"
    p.write_text(text)
    return p


def test_minimal_file_defaults_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), env={})
    assert cfg.gateway.id == "gw1"
    assert cfg.gateway.prefix == "fedgate/v1"
    assert cfg.database_url == f"sqlite:///{tmp_path / 'state/gw.db'}"
    assert cfg.gateway.model == str(tmp_path / "models/default")
    assert cfg.source.zeek_log == str(tmp_path / "logs/conn.log")
    assert cfg.gateway.state_dir == str(tmp_path / "fedgate-state")  # a default, relative to the file
    assert cfg.mqtt.port == 1883 and cfg.mqtt_client_id == "fedgate-gw-gw1"
    assert cfg.http.address == ("127.0.0.1", 9108)
    assert cfg.inference.alert_threshold is None and cfg.fl.strategy == "gsfs"


def test_database_url_kept_as_is(tmp_path):
    text = MINIMAL.replace('database = "state/gw.db"', 'database = "postgresql+psycopg://u:secret@db/gw"')
    cfg = load_config(write(tmp_path, text), env={})
    assert cfg.database_url == "postgresql+psycopg://u:secret@db/gw"
    shown = cfg.as_dict()
    assert "secret" not in shown["gateway"]["database"]
    assert cfg.as_dict(redact=False)["gateway"]["database"] == cfg.database_url


@pytest.mark.parametrize("name", ["gateway-gw1.toml", "gateway-gw2.toml"])
def test_deploy_configs_are_valid(name):
    cfg = load_config(REPO / "deploy" / "config" / name, env={})
    assert cfg.mqtt.port == 8883 and cfg.mqtt.ca_file == "/etc/fedgate/tls/ca.crt"
    settings_ = cfg.mqtt_settings()
    assert settings_.tls is not None and settings_.tls.cert_file == "/etc/fedgate/tls/tls.crt"


def test_example_config_is_valid():
    cfg = load_config(REPO / "deploy" / "gw.example.toml", env={})
    assert cfg.gateway.id == "gw1"
    assert cfg.warnings()  # plain MQTT and no signing key in the example: warned about


@pytest.mark.parametrize(
    "patch, key, words",
    [
        (("[source]", "[source]\nzeek_lgo = 'x'"), "source.zeek_lgo", "unknown key"),
        (("[source]", "[mqtt]\nport = 70000\n[source]"), "mqtt.port", "not a TCP port"),
        (("[source]", "[mqtt]\nport = '1883'\n[source]"), "mqtt.port", "must be an integer"),
        (("[source]", "[mqtt]\nport = true\n[source]"), "mqtt.port", "must be an integer"),
        (('id = "gw1"', 'id = "gw/1"'), "gateway.id", ""),
        (('id = "gw1"', ""), "gateway.id", "is required"),
        (('zeek_log = "logs/conn.log"', ""), "source", "at least one"),
        (("[source]", "[inference]\nalert_threshold = 1.5\n[source]"), "inference.alert_threshold", "[0, 1]"),
        (("[source]", "[inference]\nprovider = 'tpu'\n[source]"), "inference.provider", "one of"),
        (("[source]", "[fl]\nstrategy = 'fedsgd'\n[source]"), "fl.strategy", "one of"),
        (("[source]", "[fl]\nprox_mu = -1.0\n[source]"), "fl.prox_mu", "[0, 1000]"),
        (("[source]", "[fl]\nmissing_class_scale = 1.5\n[source]"), "fl.missing_class_scale", "[0, 1]"),
        (("[source]", "[fl]\nretrain_interval_s = -5.0\n[source]"), "fl.retrain_interval_s", ">= 0"),
        (("[source]", "[fl]\nlabel_smoothing = 0.9\n[source]"), "fl.label_smoothing", "[0, 0.5]"),
        (("[source]", "[http]\nlisten = 'localhost'\n[source]"), "http.listen", "host:port"),
        (("[source]", "[mqtt]\ncert_file = 'c.pem'\n[source]"), "mqtt.cert_file", "both"),
        (("[source]", "[metrics]\nport = 1\n[source]"), "metrics", "unknown section"),
        (("[source]", "[source]\nlocal_nets = ['10.0.0.0/8', 'nonsense']"), "source.local_nets[1]", "not a network"),
        (("[source]", "[flows]\nmax_connections = 0\n[source]"), "flows.max_connections", "1..100000000"),
        (("[source]", "[flows]\nfragment_timeout_s = 0\n[source]"), "flows.fragment_timeout_s", "(0, 3600]"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, patch, key, words):
    old, new = patch
    path = write(tmp_path, MINIMAL.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert err.value.key == key
    assert words in str(err.value)
    assert str(path) in str(err.value)


def test_fl_without_a_verify_key_refuses_unless_allow_unsigned(tmp_path):
    """Issue 16.1: FL on and no key to verify global models with is a configuration
    error naming the key; ``[fl] allow_unsigned = true`` (a lab) or FL off lets it start."""
    no_key = MINIMAL.replace('global_model_public_key = "keys/aggregator.pub"\n', "")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, no_key), env={})
    assert err.value.key == "gateway.global_model_public_key" and "allow_unsigned" in str(err.value)
    lab = load_config(write(tmp_path, no_key + "[fl]\nallow_unsigned = true\n"), env={})
    assert lab.fl.allow_unsigned and any("allow_unsigned" in w for w in lab.warnings())
    assert not load_config(write(tmp_path, no_key + "[fl]\nenabled = false\n"), env={}).fl_on
    assert not load_config(write(tmp_path, no_key + "[mqtt]\nenabled = false\n"), env={}).fl_on
    signed = load_config(write(tmp_path, MINIMAL), env={})
    assert signed.fl_on and not any("allow_unsigned" in w for w in signed.warnings())


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[gateway\nid="), env={})


def test_env_overrides(tmp_path):
    env = {
        "FEDGATE__MQTT__HOST": "broker",
        "FEDGATE__MQTT__PORT": "8883",
        "FEDGATE__INFERENCE__ALERT_THRESHOLD": "0.75",
        "FEDGATE__SOURCE__LOCAL_NETS": '["10.0.0.0/8"]',
        "FEDGATE_DB_URL": "postgresql+psycopg://postgres@127.0.0.1/test",
        "UNRELATED": "x",
    }
    cfg = load_config(write(tmp_path, MINIMAL), env=env)
    assert cfg.mqtt.host == "broker" and cfg.mqtt.port == 8883
    assert cfg.inference.alert_threshold == 0.75
    assert cfg.source.local_nets == ("10.0.0.0/8",)
    assert cfg.database_url == "postgresql+psycopg://postgres@127.0.0.1/test"
    assert sorted(env_overrides(env)) == sorted(
        ["mqtt.host", "mqtt.port", "inference.alert_threshold", "source.local_nets", "gateway.database"])


def test_env_override_of_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), env={"FEDGATE__MQTT__PORT": "eighty"})
    assert err.value.key == "mqtt.port"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), env={"FEDGATE__MQTT": "x"})
    assert "SECTION__KEY" in str(err.value)


def test_as_dict_round_trips_through_validation(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), env={"FEDGATE__MQTT__PASSWORD": "pw"})
    shown = cfg.as_dict()
    assert shown["mqtt"]["password"] == "***"
    again = config_from_dict(cfg.as_dict(redact=False))
    assert again.as_dict() == shown


def test_parse_listen():
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_listen("[::1]:9108") == ("::1", 9108)
    assert parse_listen(":0") == ("0.0.0.0", 0)
    for bad in ("", "host", "host:x", "h:70000"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


toml_scalars = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(section=st.sampled_from(["gateway", "source", "inference", "mqtt", "fl", "http", "flows", "bogus"]),
       key=st.sampled_from(["id", "port", "zeek_log", "alert_threshold", "listen", "batch_size", "lr",
                            "local_nets", "enabled", "max_connections", "fragment_timeout_s", "x"]),
       value=toml_scalars)
def test_hostile_values_give_config_error_or_valid_config(section, key, value):
    doc = {"gateway": {"id": "gw1"}, "source": {"zeek_log": "/tmp/conn.log"}}
    doc.setdefault(section, {})[key] = value
    try:
        cfg = config_from_dict(doc)
    except ConfigError as exc:
        assert exc.key and exc.problem
    else:
        assert isinstance(cfg, GatewayConfig)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=30), st.text(max_size=30), max_size=5))
def test_any_environment_gives_overrides_or_config_error(env):
    try:
        doc, applied = apply_env({"gateway": {"id": "gw1"}}, env)
    except ConfigError:
        return
    assert len(applied) <= len(env)
