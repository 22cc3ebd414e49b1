"""Gateway config defaults that work in any install: the bundled model classifies unless
``model = "none"``, every path resolves against the config file's directory, the
database lives under state_dir, and ``fedgate config check`` prints what it resolved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.config import ConfigError, config_from_dict, load_config
from gateway.model.modeldir import bundled_model_dir

THREE_LINES = 'gateway.id = "gw1"\nsource.zeek_log = "conn.log"\nmqtt.enabled = false\n'


def _write(tmp_path: Path, text: str, name: str = "etc/gw.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_three_line_config_classifies_with_the_bundled_model_and_keeps_state_beside_the_file(tmp_path):
    cfg = load_config(_write(tmp_path, THREE_LINES), env={})
    etc = tmp_path / "etc"
    assert cfg.gateway.model == str(bundled_model_dir())
    assert cfg.gateway.state_dir == str(etc / "fedgate-state")
    assert cfg.database_url == f"sqlite:///{etc / 'fedgate-state' / 'gateway.db'}"
    assert cfg.source.zeek_log == str(etc / "conn.log")
    assert not any("not classified" in w for w in cfg.warnings())


@pytest.mark.parametrize("word", ["none", "None", "NONE"])
def test_model_none_turns_classification_off(tmp_path, word):
    cfg = load_config(_write(tmp_path, THREE_LINES + f'gateway.model = "{word}"\n'), env={})
    assert cfg.gateway.model is None and not cfg.fl_on
    assert any('gateway.model = "none"' in w for w in cfg.warnings())


def test_model_none_from_the_environment(tmp_path):
    cfg = load_config(_write(tmp_path, THREE_LINES), env={"FEDGATE__GATEWAY__MODEL": "none"})
    assert cfg.gateway.model is None


def test_empty_model_is_an_error_not_a_silent_default(tmp_path):
    with pytest.raises(ConfigError, match="gateway.model"):
        load_config(_write(tmp_path, THREE_LINES + 'gateway.model = ""\n'), env={})


def test_state_dir_moves_the_default_database_with_it(tmp_path):
    cfg = load_config(_write(tmp_path, THREE_LINES + 'gateway.state_dir = "../var/gw1"\n'), env={})
    assert cfg.gateway.state_dir == str(tmp_path / "var" / "gw1")
    assert cfg.gateway.database == str(tmp_path / "var" / "gw1" / "gateway.db")
    env = {"FEDGATE__GATEWAY__STATE_DIR": "/var/lib/fedgate/site1"}  # what the systemd unit sets
    cfg = load_config(_write(tmp_path, THREE_LINES), env=env)
    assert cfg.database_url == "sqlite:////var/lib/fedgate/site1/gateway.db"


@pytest.mark.parametrize("database, url", [
    ("gw.db", "sqlite:///{etc}/gw.db"),
    ("../data/gw.db", "sqlite:///{root}/data/gw.db"),
    ("sqlite:///rel/gw.db", "sqlite:///{etc}/rel/gw.db"),
    ("sqlite+pysqlite:///gw.db?timeout=5", "sqlite+pysqlite:///{etc}/gw.db?timeout=5"),
    ("sqlite:////abs/gw.db", "sqlite:////abs/gw.db"),
    ("sqlite://", "sqlite://"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("postgresql+psycopg://fedgate@db/gw", "postgresql+psycopg://fedgate@db/gw"),
])
def test_database_paths_resolve_against_the_config_file(tmp_path, database, url):
    cfg = load_config(_write(tmp_path, THREE_LINES + f'gateway.database = "{database}"\n'), env={})
    assert cfg.database_url == url.format(etc=tmp_path / "etc", root=tmp_path)


def test_every_path_key_and_archive_glob_resolves_against_the_config_file(tmp_path):
    text = THREE_LINES.replace("mqtt.enabled = false\n", "") + (
        'gateway.global_model_public_key = "keys/agg.pub"\ngateway.model = "../models/site"\n'
        'source.pcap_dir = "spool"\nsource.zeek_archive_globs = ["archive/*/conn.*.gz", "/abs/*.gz"]\n'
        'mqtt.ca_file = "tls/ca.crt"\nmqtt.cert_file = "tls/tls.crt"\nmqtt.key_file = "tls/tls.key"\n')
    cfg = load_config(_write(tmp_path, text), env={})
    etc = tmp_path / "etc"
    assert cfg.gateway.global_model_public_key == str(etc / "keys/agg.pub")
    assert cfg.gateway.model == str(tmp_path / "models/site")
    assert cfg.source.pcap_dir == str(etc / "spool")
    assert cfg.source.zeek_archive_globs == (str(etc / "archive/*/conn.*.gz"), "/abs/*.gz")
    assert (cfg.mqtt.ca_file, cfg.mqtt.key_file) == (str(etc / "tls/ca.crt"), str(etc / "tls/tls.key"))
    paths = cfg.paths()
    assert paths["gateway.model"] == (str(tmp_path / "models/site"), "read")
    assert paths["gateway.database"] == (str(etc / "fedgate-state" / "gateway.db"), "write")
    assert paths["source.zeek_archive_globs[0]"] == (str(etc / "archive/*/conn.*.gz"), "glob")
    assert any("gateway.model: " in w and "does not exist" in w for w in cfg.warnings())


def test_a_document_without_a_file_keeps_relative_paths():
    cfg = config_from_dict({"gateway": {"id": "gw1", "model": "none"}, "source": {"zeek_log": "conn.log"}})
    assert cfg.gateway.database == "fedgate-state/gateway.db" and cfg.source.zeek_log == "conn.log"


def test_config_check_prints_the_resolved_paths(tmp_path, monkeypatch):
    from gateway.cli import main

    path = _write(tmp_path, THREE_LINES)
    (tmp_path / "etc" / "conn.log").touch()
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(main, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    etc = tmp_path / "etc"
    assert "resolved paths" in result.stdout
    for shown in (str(etc / "fedgate-state"), str(etc / "fedgate-state" / "gateway.db"), str(etc / "conn.log"),
                  str(bundled_model_dir())):
        assert shown in result.stdout
    assert "bundled model" in result.stdout and "created at start" in result.stdout

    doc = json.loads(CliRunner().invoke(main, ["config", "check", "--config", str(path), "--json"]).stdout)
    assert doc["paths"]["gateway.database"] == {"path": str(etc / "fedgate-state" / "gateway.db"), "use": "write",
                                                "status": "created at start"}
    assert doc["paths"]["gateway.model"]["status"].startswith("bundled model ")
    assert doc["paths"]["source.zeek_log"]["status"] == "exists"


@pytest.mark.parametrize("database, expect", [
    ("agg.db", "{etc}/agg.db"),
    ("sqlite:///state/agg.db", "sqlite:///{etc}/state/agg.db"),
    ("postgresql+psycopg://fl@db/agg", "postgresql+psycopg://fl@db/agg"),
])
def test_aggregator_paths_resolve_against_its_config_file(tmp_path, database, expect):
    from cloud_aggregator.service import AggregatorConfig
    from gateway.model.modeldir import WEIGHTS

    path = _write(tmp_path, f'[aggregator]\ndatabase = "{database}"\nsigning_key = "keys/agg.key"\n', "etc/agg.toml")
    cfg = AggregatorConfig.from_toml(path)
    etc = tmp_path / "etc"
    assert cfg.database == expect.format(etc=etc)
    assert cfg.signing_key == str(etc / "keys/agg.key")
    assert cfg.initial_model == str(bundled_model_dir() / WEIGHTS)  # left out: the bundled weights
