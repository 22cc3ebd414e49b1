"""Aggregator settings: TOML parsing and keyword-only validation (no sockets)."""

from __future__ import annotations

import pytest

from cloud_aggregator.service import AggregatorConfig


def write(tmp_path, text: str):
    p = tmp_path / "agg.toml"
    p.write_text(text)
    return p


def test_from_toml_resolves_paths_and_sections(tmp_path):
    cfg = AggregatorConfig.from_toml(write(tmp_path, """
[aggregator]
database = "state/agg.db"
initial_model = "models/init.safetensors"
signing_key = "keys/agg.key"
known_senders = ["gw-a", "gw-b"]
max_staleness = 3

[mqtt]
host = "broker.example"
port = 8883
ca_file = "certs/ca.pem"
cert_file = "certs/agg.pem"
key_file = "certs/agg.key"

[strategy]
name = "fedopt"
eta = 0.02
beta1 = 0.8

[strategy.robust]
combiner = "median"
trim = 0.2

[gate]
validation_log = "data/val.log"
model_dir = "models/default"
margin = 0.02

[strategy.dp]
clip_norm = 1.0
noise_multiplier = 0.5

[local]
epochs = 2
compression = "int8"
"""))
    assert cfg.database == str(tmp_path / "state/agg.db")
    assert cfg.initial_model == str(tmp_path / "models/init.safetensors")
    assert cfg.known_senders == frozenset({"gw-a", "gw-b"}) and cfg.max_staleness == 3
    assert cfg.mqtt.tls.ca_file == str(tmp_path / "certs/ca.pem") and cfg.mqtt.tls.check_hostname
    assert cfg.mqtt.port == 8883 and cfg.mqtt.client_id == "aggregator"
    strategy = cfg.build_strategy()
    assert strategy.name == "fedopt" and strategy.inner.inner.beta1 == 0.8  # dp(robust(fedopt))
    assert strategy.inner.settings.combiner == "median" and strategy.inner.settings.trim == 0.2
    assert cfg.gate.validation_log == str(tmp_path / "data/val.log") and cfg.gate.margin == 0.02
    assert cfg.gate.model_dir == str(tmp_path / "models/default")
    assert cfg.local == {"epochs": 2, "compression": "int8"}


@pytest.mark.parametrize("text", [
    "[aggregator]\nmax_staleness = -1\n",
    "[aggregator]\nchunk_bytes = 10\n",
    "[aggregator]\nprefix = \"a/#\"\n",
    "[aggregator]\nknown_senders = [\"bad id\"]\n",
    "[aggregator]\nno_such_setting = 1\n",
    "[aggregator]\nsqlite_synchronous = \"OFF\"\n",
    "[strategy]\nname = \"fedsgd\"\n",
    "[strategy]\nname = \"gsfs\"\nrho = 2\n",
    "[local]\nepochs = 1\nflavour = 3\n",
    "[mqtt]\nport = 0\n",
    "[mqtt]\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\n",
    "[extra]\nx = 1\n",
    "[strategy.robust]\nmethod = \"median\"\n",
    "[strategy.robust]\ncombiner = \"mode\"\n",
    "[strategy.robust]\nnorm_multiple = 0.5\n",
    "[gate]\nmargin = -0.1\n",
    "[gate]\nvalidation_log = \"v.log\"\n",
    "[gate]\nmetric = \"loss\"\n",
])
def test_bad_settings_are_refused_with_an_error(tmp_path, text):
    with pytest.raises((ValueError, TypeError)):
        AggregatorConfig.from_toml(write(tmp_path, text))


def test_defaults_are_valid():
    cfg = AggregatorConfig()
    assert cfg.strategy == "gsfs" and cfg.intake_batch == 64 and cfg.mqtt.host == "127.0.0.1"
    assert cfg.robust.enabled and cfg.robust.one_vote and cfg.gate.enabled  # defences on by default


def test_evaluator_factory_is_loaded_with_its_arguments(tmp_path):
    from cloud_aggregator.service import load_evaluator

    cfg = AggregatorConfig.from_toml(write(tmp_path, """
[aggregator]
evaluator = "collections:Counter"
evaluator_args = { model_dir = "m", red = 2 }
"""))
    assert cfg.evaluator_args == {"model_dir": str(tmp_path / "m"), "red": 2}
    made = load_evaluator("collections:Counter", {"red": 2})
    assert made == {"red": 2}
    with pytest.raises(ValueError):
        load_evaluator("collections.Counter")
