"""Static checks of the shipped broker config, ACL and deploy files: the settings the
security model depends on are there, and the files agree with each other (paths in the
compose file, identities in configs and certificates)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
import yaml

from gateway.certs import AGGREGATOR_IDENTITY, SIGNING_KEY, SIGNING_PUB, bundle_name, IdentityKind

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "broker_config" / "production.conf"
ACL = REPO / "broker_config" / "acl"
DEPLOY = REPO / "deploy"


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


# --------------------------------------------------------------------------- production.conf


def test_production_conf_has_the_security_settings():
    d = directives(CONF.read_text())
    expected = {
        "allow_anonymous": ["false"], "require_certificate": ["true"],
        "use_identity_as_username": ["true"], "tls_version": ["tlsv1.2"],
        "persistence": ["true"], "per_listener_settings": ["false"],
        "check_retain_source": ["true"], "max_qos": ["1"],
    }
    for key, value in expected.items():
        assert d.get(key) == value, key
    assert d["listener"] == ["8883"]  # one network listener, TLS; no plain port
    for key in ("cafile", "certfile", "keyfile", "crlfile", "acl_file"):
        assert len(d[key]) == 1 and d[key][0].startswith("/etc/mosquitto/fedgate/"), key
    assert d["acl_file"] == ["/etc/mosquitto/fedgate/acl"]
    # sized for model payloads, bounded per client
    assert 4 * 2**20 <= int(d["max_packet_size"][0]) <= 64 * 2**20
    assert int(d["max_queued_bytes"][0]) >= 4 * int(d["max_packet_size"][0])
    assert int(d["max_queued_messages"][0]) > 0
    # deliberately absent: see the comment in production.conf (paho resend loop)
    assert "message_size_limit" not in d


def test_every_production_setting_is_explained_by_a_comment():
    lines = CONF.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            # walk back over other directives of the same block to its comment
            j = i - 1
            while j >= 0 and lines[j].strip() and not lines[j].startswith("#"):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"line {i + 1} {line!r} has no comment"


def test_optional_loopback_listener_is_commented_out_and_loopback_only():
    text = CONF.read_text()
    assert re.search(r"^#listener 1883 127\.0\.0\.1$", text, re.M)
    assert not re.search(r"^listener 1883", text, re.M)


# --------------------------------------------------------------------------- ACL


def acl_rules() -> list[tuple[str | None, str, str, str]]:
    """(user or None for patterns, kind, access, topic) in file order."""
    rules, user = [], None
    for line in ACL.read_text().splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if parts[0] == "user":
            user = parts[1]
        elif parts[0] == "topic":
            rules.append((user, "topic", parts[1], parts[2]))
        elif parts[0] == "pattern":
            rules.append((None, "pattern", parts[1], parts[2]))
        else:
            raise AssertionError(f"unexpected ACL line {line!r}")
    return rules


def test_acl_grants_exactly_the_protocol_rights():
    rules = acl_rules()
    assert set(rules) == {
        (AGGREGATOR_IDENTITY, "topic", "write", "fedgate/v1/global/#"),
        (AGGREGATOR_IDENTITY, "topic", "read", "fedgate/v1/gw/+/#"),
        (AGGREGATOR_IDENTITY, "topic", "write", "fedgate/v1/gw/+/verdict"),  # the teacher's answers
        (None, "pattern", "write", "fedgate/v1/gw/%u/#"),
        (None, "pattern", "read", "fedgate/v1/global/#"),
        (None, "pattern", "read", "fedgate/v1/gw/%u/verdict"),  # a gateway's own answers only
    }
    # no rule for anonymous clients (topic lines before the first user line)
    assert all(user is not None for user, kind, *_ in rules if kind == "topic")
    # nobody but the aggregator writes the global topics
    writers = [r for r in rules if r[2] in ("write", "readwrite") and "global" in r[3]]
    assert [r[0] for r in writers] == [AGGREGATOR_IDENTITY]


# --------------------------------------------------------------------------- systemd units


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("name", ["fedgate-gateway@.service", "fedgate-aggregator.service"])
def test_service_units_are_hardened(name):
    svc = unit(DEPLOY / "systemd" / name)["Service"]
    assert svc["User"] not in ("", "root")
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "true", "PrivateTmp": "true",
                       "NoNewPrivileges": "true", "Restart": "on-failure",
                       "CapabilityBoundingSet": "", "AmbientCapabilities": ""}.items():
        assert svc[key] == value, key
    assert svc["ReadWritePaths"] and svc["StateDirectory"]
    assert svc["ExecStart"].startswith("/opt/fedgate/venv/bin/")


def test_gateway_template_runs_the_instance_config():
    svc = unit(DEPLOY / "systemd" / "fedgate-gateway@.service")["Service"]
    assert "--config /etc/fedgate/gateway-%i.toml" in svc["ExecStart"]
    assert "%i" in svc["StateDirectory"]


def test_live_capture_drop_in_adds_exactly_the_capture_capabilities():
    svc = unit(DEPLOY / "systemd" / "dropins" / "live-capture.conf")["Service"]
    assert set(svc["CapabilityBoundingSet"].split()) == {"CAP_NET_RAW", "CAP_NET_ADMIN"}
    assert set(svc["AmbientCapabilities"].split()) == {"CAP_NET_RAW", "CAP_NET_ADMIN"}
    assert "AF_PACKET" in svc["RestrictAddressFamilies"].split()
    assert set(svc) <= {"CapabilityBoundingSet", "AmbientCapabilities", "RestrictAddressFamilies"}


def test_mosquitto_drop_in_runs_the_production_config():
    text = (DEPLOY / "systemd" / "mosquitto.service.d" / "fedgate.conf").read_text()
    starts = re.findall(r"^ExecStart=(.*)$", text, re.M)
    assert starts == ["", "/usr/sbin/mosquitto -c /etc/mosquitto/fedgate/production.conf"]


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def mounts(service: dict) -> dict[str, str]:
    """container path -> host source (with ${FEDGATE_PKI:-./pki} at its default)."""
    out = {}
    for spec in service.get("volumes", []):
        spec = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", spec)  # variables at their defaults
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def test_compose_wires_broker_aggregator_and_two_gateways(compose):
    services = compose["services"]
    assert {"broker", "aggregator", "gateway-gw1", "gateway-gw2"} <= set(services)
    for name in ("aggregator", "gateway-gw1", "gateway-gw2"):
        assert "broker" in services[name]["depends_on"]


def test_compose_broker_mounts_what_production_conf_reads(compose):
    conf = directives(CONF.read_text())
    broker = compose["services"]["broker"]
    m = mounts(broker)
    config_path = re.search(r"mosquitto -c (\S+)", " ".join(broker["command"])).group(1)
    assert m[config_path] == "../broker_config/production.conf"
    for key in ("cafile", "certfile", "keyfile", "crlfile", "acl_file"):
        assert conf[key][0] in m, key
    assert conf["persistence_location"][0].rstrip("/") in m  # a volume: survives restarts
    assert m[conf["certfile"][0]].endswith(f"issued/{bundle_name(IdentityKind.BROKER, 'broker')}/tls.crt")


def test_compose_bind_sources_in_the_repository_exist(compose):
    for name, service in compose["services"].items():
        for target, source in mounts(service).items():
            if source.startswith(".") and "/pki" not in source:
                assert (DEPLOY / source).exists(), f"{name}: {source} -> {target}"


@pytest.mark.parametrize("gw", ["gw1", "gw2"])
def test_each_gateway_gets_its_own_certificate_and_the_public_signing_key(compose, gw):
    m = mounts(compose["services"][f"gateway-{gw}"])
    assert m["/etc/fedgate/tls"] == f"./pki/issued/{bundle_name(IdentityKind.GATEWAY, gw)}"
    assert m["/etc/fedgate/global-model.pub"] == f"./pki/signing/{SIGNING_PUB}"
    assert not any(SIGNING_KEY == Path(s).name for s in m.values())  # never the private key
    from gateway.config import load_config

    config = load_config(DEPLOY / "config" / f"gateway-{gw}.toml", env={})
    assert config.gateway.id == gw  # = the certificate CN the ACL matches
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.check_hostname) == ("broker", 8883, True)
    assert Path(config.mqtt.cert_file) == Path("/etc/fedgate/tls/tls.crt")
    assert config.gateway.global_model_public_key == "/etc/fedgate/global-model.pub"


def test_aggregator_config_loads_with_the_real_config_class(compose):
    from cloud_aggregator.service import AggregatorConfig

    config = AggregatorConfig.from_toml(DEPLOY / "config" / "aggregator.toml")
    tls = config.mqtt.tls
    assert tls is not None and tls.check_hostname and config.mqtt.port == 8883
    m = mounts(compose["services"]["aggregator"])
    assert m["/etc/fedgate/tls"] == "./pki/issued/aggregator"
    assert Path(tls.cert_file).parent == Path("/etc/fedgate/tls")
    assert config.signing_key == f"/etc/fedgate/signing/{SIGNING_KEY}"
    # global models are chunked below the broker's packet limit
    assert config.chunk_bytes < int(directives(CONF.read_text())["max_packet_size"][0])
