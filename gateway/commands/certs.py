"""``fedgate certs``: the private CA for the production broker, and the model-signing key.

Commands parse options and call :mod:`gateway.certs`; output goes through
:mod:`gateway.output` (a table, or ``--json``).  A failed operation (no CA, bad name, a
certificate that already exists) ends with one line on stderr and exit status 1.
"""

from __future__ import annotations

from pathlib import Path

import click

from gateway import certs as svc
from gateway.output import emit_json, emit_mapping, emit_rows

DIR_OPTION = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
    default=svc.DEFAULT_DIR, show_default=True,
    help="CA directory (holds ca.key: keep it offline, backed up, 0700).",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
KEY_TYPE_OPTION = click.option(
    "--key-type", type=click.Choice(svc.KEY_TYPES), default="ec", show_default=True,
    help="ec = ECDSA P-256 (fast, small); rsa = RSA-3072 for old TLS stacks.",
)
CERT_COLUMNS = ["bundle", "common_name", "serial", "not_after", "state"]


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _issued_row(ca: svc.CertificateAuthority, issued: svc.IssuedCert) -> dict:
    bundle = ca.bundle_dir(issued.bundle)
    return {**issued.as_row(), "cert": str(bundle / svc.BUNDLE_CERT),
            "key": str(bundle / svc.BUNDLE_KEY), "ca": str(bundle / svc.CA_CERT)}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def certs() -> None:
    """Certificates for the production broker (mutual TLS) and the model-signing key.

    \b
    Identity convention (the broker's ACL relies on it):
      gateway X   CN = X            may write fedgate/v1/gw/X/#, read fedgate/v1/global/#
      aggregator  CN = @aggregator  may write fedgate/v1/global/#, read fedgate/v1/gw/+/#
      broker      CN = host name    server certificate (SAN = host names and IPs)

    \b
    Examples:
      fedgate certs init-ca --dir pki
      fedgate certs issue --broker --host mqtt.example.org --ip 10.0.0.5 --dir pki
      fedgate certs issue --aggregator --dir pki
      fedgate certs issue --gateway edge-berlin-1 --dir pki
      fedgate certs signing-key --dir pki
      fedgate certs revoke gateway-edge-berlin-1 --reason key-compromise --dir pki
      fedgate certs list --dir pki --json
      fedgate certs verify gateway-edge-berlin-1 --dir pki
    """


@certs.command("init-ca")
@DIR_OPTION
@click.option("--cn", "common_name", default="fedgate CA", show_default=True,
              help="Common Name of the CA certificate.")
@click.option("--days", type=click.IntRange(1), default=svc.CA_DAYS, show_default=True,
              help="CA validity in days.")
@KEY_TYPE_OPTION
@click.option("--force", is_flag=True,
              help="Replace an existing CA (every certificate it issued stops working).")
@JSON_OPTION
def init_ca(directory: Path, common_name: str, days: int, key_type: str, force: bool,
            as_json: bool) -> None:
    """Create the CA: ca.key (0600), ca.crt, an empty crl.pem and index.json.

    \b
    Examples:
      fedgate certs init-ca --dir /srv/fedgate/pki
      fedgate certs init-ca --dir pki --cn "ACME IoT CA" --days 7300
    """
    try:
        ca = svc.CertificateAuthority.init(directory, common_name=common_name, days=days,
                                           key_type=key_type, force=force)
    except svc.CertError as exc:
        raise _fail(exc) from None
    emit_mapping({"ca_cert": str(ca.ca_path), "ca_key": str(directory / svc.CA_KEY),
                  "not_after": ca.cert.not_valid_after_utc.isoformat(), **ca.crl_info()},
                 as_json=as_json, title="CA created")


@certs.command("issue")
@DIR_OPTION
@click.option("--gateway", "gateway_id", metavar="ID",
              help="Issue a client certificate for gateway ID (CN = ID).")
@click.option("--aggregator", is_flag=True,
              help=f"Issue the aggregator's client certificate (CN = {svc.AGGREGATOR_IDENTITY}).")
@click.option("--broker", is_flag=True, help="Issue the broker's server certificate.")
@click.option("--host", help="Broker host name clients connect to (with --broker).")
@click.option("--alt-host", "alt_hosts", multiple=True,
              help="Further broker host names for the SAN (repeatable).")
@click.option("--ip", "ips", multiple=True, help="Broker IP address for the SAN (repeatable).")
@click.option("--days", type=click.IntRange(1), default=svc.LEAF_DAYS, show_default=True,
              help="Certificate validity in days.")
@KEY_TYPE_OPTION
@click.option("--rotate", is_flag=True,
              help="Replace a still-valid certificate (then revoke the old one with "
                   "`revoke NAME --keep-latest`).")
@JSON_OPTION
def issue(directory: Path, gateway_id: str | None, aggregator: bool, broker: bool,
          host: str | None, alt_hosts: tuple[str, ...], ips: tuple[str, ...], days: int,
          key_type: str, rotate: bool, as_json: bool) -> None:
    """Issue a certificate and key into DIR/issued/<bundle>/ (tls.crt, tls.key 0600, ca.crt).

    Give exactly one of --gateway ID, --aggregator, --broker --host NAME.

    \b
    Examples:
      fedgate certs issue --gateway edge-berlin-1
      fedgate certs issue --gateway edge-berlin-1 --rotate
      fedgate certs issue --aggregator --days 365
      fedgate certs issue --broker --host mqtt.example.org --alt-host mqtt --ip 10.0.0.5
    """
    chosen = [gateway_id is not None, aggregator, broker]
    if sum(chosen) != 1:
        raise click.UsageError("give exactly one of --gateway ID, --aggregator, --broker")
    if broker and not host:
        raise click.UsageError("--broker needs --host NAME (the name clients connect to)")
    if (host or alt_hosts or ips) and not broker:
        raise click.UsageError("--host/--alt-host/--ip apply to --broker only")
    options = {"days": days, "key_type": key_type, "rotate": rotate}
    try:
        ca = svc.CertificateAuthority(directory)
        if gateway_id is not None:
            issued = ca.issue_gateway(gateway_id, **options)
        elif aggregator:
            issued = ca.issue_aggregator(**options)
        else:
            issued = ca.issue_broker(host, ip_addresses=ips, extra_hosts=alt_hosts, **options)
    except svc.CertError as exc:
        raise _fail(exc) from None
    row = _issued_row(ca, issued)
    if as_json:
        emit_json(row)
    else:
        emit_mapping({k: row[k] for k in ("bundle", "common_name", "serial", "not_after",
                                          "cert", "key", "ca")},
                     as_json=False, title=f"issued {issued.kind} certificate")


@certs.command("revoke")
@click.argument("name")
@DIR_OPTION
@click.option("--serial", help="Revoke only this certificate (hex serial, see `certs list`).")
@click.option("--keep-latest", is_flag=True,
              help="Revoke every certificate of NAME except the newest (after --rotate).")
@click.option("--reason", type=click.Choice(list(svc.REVOCATION_REASONS)),
              default="unspecified", show_default=True, help="RFC 5280 revocation reason.")
@click.option("--crl-days", type=click.IntRange(1), default=svc.CRL_DAYS, show_default=True,
              help="Validity of the rewritten CRL.")
@JSON_OPTION
def revoke(name: str, directory: Path, serial: str | None, keep_latest: bool, reason: str,
           crl_days: int, as_json: bool) -> None:
    """Revoke the certificates of bundle NAME and rewrite crl.pem.

    NAME is a bundle: gateway-<ID>, aggregator or broker-<host>.  Copy the new crl.pem
    to the broker and `systemctl reload mosquitto` (new connections are refused); restart
    it to also cut a session that is already open.

    \b
    Examples:
      fedgate certs revoke gateway-edge-berlin-1 --reason key-compromise
      fedgate certs revoke gateway-edge-berlin-1 --keep-latest --reason superseded
      fedgate certs revoke aggregator --serial 3f9a01c2...
    """
    if serial and keep_latest:
        raise click.UsageError("give --serial or --keep-latest, not both")
    try:
        ca = svc.CertificateAuthority(directory)
        revoked = ca.revoke(name, serial=serial, keep_latest=keep_latest, reason=reason,
                            crl_days=crl_days)
    except svc.CertError as exc:
        raise _fail(exc) from None
    rows = [c.as_row() for c in revoked]
    if as_json:
        emit_json({"revoked": rows, **ca.crl_info()})
        return
    emit_rows(rows, ["bundle", "common_name", "serial", "revoked_at", "reason"],
              title=f"revoked {len(rows)} certificate(s)")
    emit_mapping(ca.crl_info(), as_json=False, title="CRL")


@certs.command("crl")
@DIR_OPTION
@click.option("--days", type=click.IntRange(1), default=svc.CRL_DAYS, show_default=True,
              help="Days until the CRL's nextUpdate.")
@JSON_OPTION
def crl(directory: Path, days: int, as_json: bool) -> None:
    """Re-sign crl.pem (same revocations, new nextUpdate).

    Run it well before nextUpdate (`certs list` shows it): an expired CRL makes the
    broker refuse every client.

    \b
    Examples:
      fedgate certs crl --dir pki
      fedgate certs crl --dir pki --days 90 --json
    """
    try:
        ca = svc.CertificateAuthority(directory)
        ca.write_crl(days=days)
    except svc.CertError as exc:
        raise _fail(exc) from None
    emit_mapping(ca.crl_info(), as_json=as_json, title="CRL")


@certs.command("list")
@DIR_OPTION
@JSON_OPTION
def list_(directory: Path, as_json: bool) -> None:
    """Every certificate the CA issued, with its state (valid, expired, revoked).

    \b
    Examples:
      fedgate certs list --dir pki
      fedgate certs list --dir pki --json | jq '.certificates[] | select(.state=="valid")'
    """
    try:
        ca = svc.CertificateAuthority(directory)
    except svc.CertError as exc:
        raise _fail(exc) from None
    rows = [c.as_row() for c in ca.certificates()]
    if as_json:
        emit_json({"certificates": rows, **ca.crl_info()})
        return
    emit_rows(rows, CERT_COLUMNS, title=f"certificates of {directory}")
    emit_mapping(ca.crl_info(), as_json=False, title="CRL")


@certs.command("verify")
@click.argument("target")
@DIR_OPTION
@JSON_OPTION
def verify(target: str, directory: Path, as_json: bool) -> None:
    """Check a certificate as the broker will (CA, validity, CRL, key usage, key match).

    TARGET is a bundle name (gateway-<ID>), a bundle directory (with tls.crt and
    tls.key) or a certificate file.  Exit status 1 when there is a problem: the first
    thing to run when a gateway is refused by the broker.

    \b
    Examples:
      fedgate certs verify gateway-edge-berlin-1 --dir pki
      fedgate certs verify /etc/fedgate/tls/site1 --dir pki --json
    """
    try:
        result = svc.CertificateAuthority(directory).verify(target)
    except svc.CertError as exc:
        raise _fail(exc) from None
    if as_json:
        emit_json(result)
    else:
        emit_mapping({**result, "problems": "; ".join(result["problems"]) or "none"},
                     as_json=False, title="certificate check")
    if not result["ok"]:
        raise SystemExit(1)


@certs.command("signing-key")
@DIR_OPTION
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
@JSON_OPTION
def signing_key(directory: Path, force: bool, as_json: bool) -> None:
    """Create the Ed25519 key pair that signs global models.

    Writes DIR/signing/global-model.key (0600; to the aggregator only, its
    [aggregator] signing_key) and global-model.key.pub (to every gateway, which refuses
    unsigned or wrongly signed models).

    \b
    Examples:
      fedgate certs signing-key --dir pki
      fedgate certs signing-key --dir pki --json
    """
    try:
        result = svc.create_signing_key(directory, force=force)
    except svc.CertError as exc:
        raise _fail(exc) from None
    emit_mapping(result, as_json=as_json, title="model-signing key")
