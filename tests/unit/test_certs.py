"""gateway.certs and `fedgate certs`: certificate contents, the naming convention the
broker ACL relies on, key file modes, rotation, revocation (CRL) and the signing key."""

from __future__ import annotations

import datetime as dt
import json
import re
import stat

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import certs
from gateway.certs import (
    AGGREGATOR_IDENTITY,
    CertError,
    CertificateAuthority,
    gateway_common_name,
)
from gateway.cli import main
from gateway.protocol import signing

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def ca(tmp_path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "pki", now=NOW)


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls).value


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- certificate contents


def test_ca_certificate_is_a_self_signed_ca_for_leaves_only(ca):
    cert = ca.cert
    assert cert.issuer == cert.subject and cn(cert) == "fedgate CA"
    cert.verify_directly_issued_by(cert)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.ca is True and bc.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.key_cert_sign and ku.crl_sign
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= dt.timedelta(days=3650)


def test_gateway_certificate_carries_the_gateway_id_and_client_auth_only(ca):
    issued = ca.issue_gateway("edge-berlin_1.a", now=NOW)
    bundle = ca.bundle_dir(issued.bundle)
    assert issued.bundle == "gateway-edge-berlin_1.a"
    cert = load(bundle / "tls.crt")
    cert.verify_directly_issued_by(ca.cert)
    assert cn(cert) == "edge-berlin_1.a" == issued.common_name
    assert ext(cert, x509.BasicConstraints).ca is False
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = ext(cert, x509.KeyUsage)
    assert ku.digital_signature and not ku.key_cert_sign
    aki = ext(cert, x509.AuthorityKeyIdentifier).key_identifier
    assert aki == ext(ca.cert, x509.SubjectKeyIdentifier).digest
    assert format(cert.serial_number, "x") == issued.serial
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=certs.LEAF_DAYS)
    # the bundle carries the CA so a gateway gets everything from one directory
    assert (bundle / "ca.crt").read_bytes() == ca.ca_path.read_bytes()


def test_aggregator_certificate_identity(ca):
    cert = load(ca.bundle_dir(ca.issue_aggregator(now=NOW).bundle) / "tls.crt")
    assert cn(cert) == AGGREGATOR_IDENTITY == "@aggregator"
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_broker_certificate_has_san_and_server_auth_only(ca):
    issued = ca.issue_broker("mqtt.example.org", ip_addresses=["10.0.0.5", "::1"],
                             extra_hosts=["mqtt"], now=NOW)
    cert = load(ca.bundle_dir(issued.bundle) / "tls.crt")
    assert issued.bundle == "broker-mqtt.example.org" and cn(cert) == "mqtt.example.org"
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.org", "mqtt"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_rsa_keys_get_key_encipherment(ca):
    cert = load(ca.bundle_dir(ca.issue_aggregator(key_type="rsa", now=NOW).bundle) / "tls.crt")
    assert cert.public_key().key_size == 3072
    assert ext(cert, x509.KeyUsage).key_encipherment


def test_leaf_never_outlives_the_ca(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "short", days=30, now=NOW)
    cert = load(ca.bundle_dir(ca.issue_gateway("g1", days=400, now=NOW).bundle) / "tls.crt")
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


@pytest.mark.parametrize("bad", [
    {"ip_addresses": ["999.1.1.1"]},
    {"extra_hosts": ["bad host"]},
])
def test_bad_broker_names_are_refused(ca, bad):
    with pytest.raises(CertError):
        ca.issue_broker("mqtt.example.org", now=NOW, **bad)


def test_bad_validity_and_key_type_are_refused(ca):
    with pytest.raises(CertError, match="at least 1 day"):
        ca.issue_gateway("g1", days=0)
    with pytest.raises(CertError, match="unknown key type"):
        ca.issue_gateway("g1", key_type="dsa")


# --------------------------------------------------------------------------- naming (hypothesis)

GATEWAY_IDS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


@given(GATEWAY_IDS)
def test_every_valid_gateway_id_is_its_own_cn_and_never_the_aggregator(gateway_id):
    assert gateway_common_name(gateway_id) == gateway_id
    assert gateway_id != AGGREGATOR_IDENTITY


@given(st.text(max_size=80) | GATEWAY_IDS.map(lambda s: s + "\n"))
def test_hostile_gateway_ids_are_refused_or_safe_in_a_topic_level(text):
    # whatever is accepted can be substituted for %u in the ACL without changing the
    # topic structure (no separators, no wildcards, no NUL, not the aggregator's name)
    try:
        name = gateway_common_name(text)
    except CertError:
        return
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name)  # no "/+#@", no whitespace


@settings(max_examples=80)
@given(st.text(max_size=300) | st.from_regex(r"\A[a-z0-9]{1,10}\Z").map(lambda s: s + "\n"))
def test_hostile_host_names_are_refused_or_dns_like(text):
    try:
        host = certs.check_host(text)
    except CertError:
        return
    assert host and all(c.isascii() and (c.isalnum() or c in "-_.") for c in host)


# --------------------------------------------------------------------------- files


def test_secret_files_are_0600_and_the_ca_dir_0700(ca):
    issued = ca.issue_gateway("g1", now=NOW)
    assert mode(ca.directory) == 0o700
    assert mode(ca.directory / "ca.key") == 0o600
    assert mode(ca.bundle_dir(issued.bundle) / "tls.key") == 0o600
    assert mode(ca.bundle_dir(issued.bundle) / "tls.crt") == 0o644
    assert not list(ca.directory.rglob(".*"))  # no temporary files left behind


def test_missing_ca_and_second_init_are_clear_errors(tmp_path, ca):
    with pytest.raises(CertError, match="init-ca"):
        CertificateAuthority(tmp_path / "nowhere")
    with pytest.raises(CertError, match="already exists"):
        CertificateAuthority.init(ca.directory)


def test_force_init_replaces_the_ca_and_forgets_its_certificates(ca):
    ca.issue_gateway("g1", now=NOW)
    new = CertificateAuthority.init(ca.directory, force=True, now=NOW)
    assert new.cert.serial_number != ca.cert.serial_number
    assert new.certificates() == []
    assert not (ca.directory / "issued").exists()


# --------------------------------------------------------------------------- rotation, revocation


def test_issuing_twice_needs_rotate_and_keeps_the_old_certificate(ca):
    first = ca.issue_gateway("g1", now=NOW)
    with pytest.raises(CertError, match="--rotate"):
        ca.issue_gateway("g1", now=NOW)
    second = ca.issue_gateway("g1", rotate=True, now=NOW)
    assert second.serial != first.serial
    bundle = ca.bundle_dir("gateway-g1")
    assert load(bundle / "tls.crt").serial_number == int(second.serial, 16)
    assert load(bundle / "old" / f"{first.serial}.crt").serial_number == int(first.serial, 16)
    # a fresh instance reads the same index
    assert [c.serial for c in CertificateAuthority(ca.directory).certificates()] == [
        first.serial, second.serial]


def test_an_expired_certificate_can_be_reissued_without_rotate(ca):
    old = ca.issue_gateway("g1", days=1, now=NOW - dt.timedelta(days=10))
    assert old.as_row(NOW)["state"] == "expired"
    assert ca.issue_gateway("g1", now=NOW).serial != old.serial


def crl_serials(ca) -> dict[int, x509.ReasonFlags | None]:
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())
    out = {}
    for r in crl:
        try:
            out[r.serial_number] = r.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            out[r.serial_number] = None
    return out


def test_new_ca_has_an_empty_valid_crl(ca):
    assert crl_serials(ca) == {}
    info = ca.crl_info()
    assert info["crl_number"] == 1 and info["crl_entries"] == 0
    assert info["next_update"] == (NOW + dt.timedelta(days=certs.CRL_DAYS)).isoformat()


def test_revoke_after_rotation_keeps_the_latest(ca):
    first = ca.issue_gateway("g1", now=NOW)
    second = ca.issue_gateway("g1", rotate=True, now=NOW)
    other = ca.issue_gateway("g2", now=NOW)
    revoked = ca.revoke("gateway-g1", keep_latest=True, reason="superseded", now=NOW)
    assert [r.serial for r in revoked] == [first.serial]
    assert crl_serials(ca) == {int(first.serial, 16): x509.ReasonFlags.superseded}
    states = {c.serial: c.as_row(NOW)["state"] for c in ca.certificates()}
    assert states == {first.serial: "revoked", second.serial: "valid", other.serial: "valid"}
    assert ca.crl_info()["crl_number"] == 2


def test_revoke_all_of_a_bundle_and_by_serial(ca):
    a = ca.issue_gateway("g1", now=NOW)
    b = ca.issue_aggregator(now=NOW)
    assert [r.serial for r in ca.revoke("gateway-g1", reason="key-compromise", now=NOW)] == [a.serial]
    assert [r.serial for r in ca.revoke("aggregator", serial=b.serial.upper(), now=NOW)] == [b.serial]
    assert crl_serials(ca) == {int(a.serial, 16): x509.ReasonFlags.key_compromise,
                               int(b.serial, 16): None}
    # revoking again changes nothing but still re-signs the CRL
    assert ca.revoke("gateway-g1", now=NOW) == []
    assert len(crl_serials(ca)) == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"bundle": "gateway-nobody"}, "no certificate issued"),
    ({"bundle": "gateway-g1", "serial": "abc"}, "no certificate with serial"),
    ({"bundle": "gateway-g1", "reason": "because"}, "unknown reason"),
])
def test_revoke_errors(ca, kwargs, match):
    ca.issue_gateway("g1", now=NOW)
    with pytest.raises(CertError, match=match):
        ca.revoke(**kwargs)


# --------------------------------------------------------------------------- signing key


def test_signing_key_pair_via_the_protocol_signing_module(tmp_path):
    info = certs.create_signing_key(tmp_path / "pki")
    private = signing.load_private_key(info["private_key"])
    public = signing.load_public_key(info["public_key"])
    assert mode(tmp_path / "pki" / "signing" / "global-model.key") == 0o600
    assert info["key_id"] == signing.key_id(public)
    assert signing.verify(public, b"model header", signing.sign(private, b"model header"))
    with pytest.raises(CertError, match="--force"):
        certs.create_signing_key(tmp_path / "pki")
    again = certs.create_signing_key(tmp_path / "pki", force=True)
    assert again["key_id"] != info["key_id"]


# --------------------------------------------------------------------------- CLI


def run(*args):
    return CliRunner().invoke(main, ["certs", *args], catch_exceptions=False)


def test_cli_end_to_end_json(tmp_path):
    d = str(tmp_path / "pki")
    assert json.loads(run("init-ca", "--dir", d, "--json").output)["crl_number"] == 1
    gw = json.loads(run("issue", "--gateway", "gw1", "--dir", d, "--json").output)
    assert gw["common_name"] == "gw1" and gw["state"] == "valid"
    broker = json.loads(run("issue", "--broker", "--host", "localhost", "--ip", "127.0.0.1",
                            "--dir", d, "--json").output)
    assert broker["bundle"] == "broker-localhost"
    again = run("issue", "--gateway", "gw1", "--dir", d)
    assert again.exit_code == 1 and "--rotate" in again.output
    revoked = json.loads(run("revoke", "gateway-gw1", "--dir", d, "--json").output)
    assert [r["serial"] for r in revoked["revoked"]] == [gw["serial"]]
    listed = json.loads(run("list", "--dir", d, "--json").output)
    assert {c["bundle"]: c["state"] for c in listed["certificates"]} == {
        "gateway-gw1": "revoked", "broker-localhost": "valid"}
    assert listed["crl_entries"] == 1
    crl = json.loads(run("crl", "--dir", d, "--days", "30", "--json").output)
    assert crl["crl_number"] == revoked["crl_number"] + 1
    key = json.loads(run("signing-key", "--dir", d, "--json").output)
    assert len(key["key_id"]) == 16


@pytest.mark.parametrize("args", [
    ["issue"],
    ["issue", "--gateway", "g", "--aggregator"],
    ["issue", "--broker"],
    ["issue", "--aggregator", "--ip", "1.2.3.4"],
    ["revoke", "x", "--serial", "1", "--keep-latest"],
])
def test_cli_usage_errors(tmp_path, args):
    result = run(*args, "--dir", str(tmp_path))
    assert result.exit_code == 2, result.output


def test_cli_errors_are_one_line_not_tracebacks(tmp_path):
    result = run("issue", "--gateway", "g1", "--dir", str(tmp_path / "none"))
    assert result.exit_code == 1
    assert "init-ca" in result.output and "Traceback" not in result.output
    run("init-ca", "--dir", str(tmp_path / "pki"))
    bad = run("issue", "--gateway", "a/b", "--dir", str(tmp_path / "pki"))
    assert bad.exit_code == 1 and "invalid gateway id" in bad.output


@pytest.mark.parametrize("cmd", ["init-ca", "issue", "revoke", "crl", "list", "signing-key", "verify"])
def test_every_command_has_help_with_examples(cmd):
    result = run(cmd, "--help")
    assert result.exit_code == 0 and "Examples:" in result.output


# --------------------------------------------------------------------------- damaged CA directory


def test_missing_index_is_an_error_not_an_empty_crl(ca):
    issued = ca.issue_gateway("g1", now=NOW)
    ca.revoke(issued.bundle, now=NOW)
    ca.index_path.unlink()
    with pytest.raises(CertError, match="missing"):
        ca.write_crl()
    # the last CRL still lists the revoked certificate
    assert int(issued.serial, 16) in crl_serials(ca)


def test_key_that_does_not_match_the_ca_certificate_is_refused(ca, tmp_path):
    other = CertificateAuthority.init(tmp_path / "other", now=NOW)
    (ca.directory / "ca.key").write_bytes((other.directory / "ca.key").read_bytes())
    with pytest.raises(CertError, match="is not the key of"):
        CertificateAuthority(ca.directory)
    (ca.directory / "ca.key").write_bytes(b"garbage")
    with pytest.raises(CertError, match="unreadable CA"):
        CertificateAuthority(ca.directory)


def test_group_readable_ca_key_is_logged(ca, caplog):
    (ca.directory / "ca.key").chmod(0o640)
    with caplog.at_level("WARNING", logger="gateway.certs"):
        CertificateAuthority(ca.directory)
    assert "readable by group or others" in caplog.text


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    JSONISH.map(json.dumps),
    st.lists(st.fixed_dictionaries({
        "bundle": st.text(max_size=10), "kind": st.text(max_size=10),
        "common_name": st.text(max_size=10), "serial": st.text(max_size=12),
        "not_before": st.text(max_size=30), "not_after": st.text(max_size=30),
        "sha256": st.text(max_size=5),
        "revoked_at": st.none() | st.text(max_size=30), "reason": st.none() | st.text(max_size=15),
    }), max_size=3).map(lambda rows: json.dumps({"crl_number": 1, "certificates": rows})),
))
def test_hostile_index_contents_give_a_clear_error_or_work(tmp_path_factory, text):
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "ca", now=NOW)
    ca.index_path.write_text(text)
    try:
        rows = ca.certificates()
        ca.write_crl(now=NOW)  # whatever loads must also make a CRL
    except CertError as exc:
        assert str(ca.index_path) in str(exc)
        return
    assert isinstance(rows, list)


# --------------------------------------------------------------------------- verify


def test_verify_reports_what_the_broker_would_refuse(ca, tmp_path):
    good = ca.issue_gateway("g1", now=NOW)
    assert ca.verify(good.bundle, now=NOW)["ok"]
    assert ca.verify(ca.bundle_dir(good.bundle), now=NOW)["usage"] == "client"
    broker = ca.issue_broker("mqtt.example.org", now=NOW)
    assert ca.verify(ca.bundle_dir(broker.bundle) / "tls.crt", now=NOW)["usage"] == "server"

    late = NOW + dt.timedelta(days=certs.LEAF_DAYS + 1)
    assert any("validity" in p for p in ca.verify(good.bundle, now=late)["problems"])

    other = CertificateAuthority.init(tmp_path / "other", now=NOW)
    stranger = other.issue_gateway("g1", now=NOW)
    assert "not issued by this CA" in ca.verify(other.bundle_dir(stranger.bundle), now=NOW)["problems"]

    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "tls.crt").write_bytes((ca.bundle_dir(good.bundle) / "tls.crt").read_bytes())
    certs.write_private(swapped / "tls.key", (other.bundle_dir(stranger.bundle) / "tls.key").read_bytes())
    assert "tls.key is not the key of tls.crt" in ca.verify(swapped, now=NOW)["problems"]

    ca.revoke(good.bundle, now=NOW)
    assert "revoked (listed in crl.pem)" in ca.verify(good.bundle, now=NOW)["problems"]
    with pytest.raises(CertError, match="cannot read"):
        ca.verify(tmp_path / "nothing-here.crt")


def test_cli_verify_exit_status(tmp_path):
    d = str(tmp_path / "pki")
    run("init-ca", "--dir", d)
    run("issue", "--gateway", "gw1", "--dir", d)
    ok = run("verify", "gateway-gw1", "--dir", d, "--json")
    assert ok.exit_code == 0 and json.loads(ok.output)["ok"] is True
    run("revoke", "gateway-gw1", "--dir", d)
    bad = run("verify", "gateway-gw1", "--dir", d)
    assert bad.exit_code == 1 and "revoked" in bad.output
