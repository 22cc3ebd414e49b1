"""Certificate service: a small private CA for the production broker (mutual TLS).

The broker (``broker_config/production.conf``) trusts only this CA, requires a client
certificate and uses the certificate's Common Name as the MQTT username, which its ACL
(``broker_config/acl``) matches.  The naming convention is therefore part of the
security model:

=============  =======================  =====================  =========================
identity       certificate CN (= user)  extended key usage     may (per ACL)
=============  =======================  =====================  =========================
gateway ``X``  ``X`` (the gateway id)   clientAuth             write ``{p}/gw/X/#``,
                                                               read ``{p}/global/#``
aggregator     ``@aggregator``          clientAuth             write ``{p}/global/#``,
                                                               read ``{p}/gw/+/#``
broker         its host name            serverAuth (+SAN)      (server only)
=============  =======================  =====================  =========================

The aggregator's CN starts with ``@``, which a gateway id can never contain
(:func:`gateway.protocol.topics.check_gateway_id`), so no gateway certificate can ever
carry the aggregator's identity.  Broker certificates carry only serverAuth, so OpenSSL
refuses them as client certificates.

On disk (``--dir``, default ``./pki``)::

    ca.crt  ca.key (0600)  crl.pem  index.json
    issued/<bundle>/ca.crt tls.crt tls.key (0600)      bundle = gateway-<id> | aggregator
                                                                | broker-<host>
    issued/<bundle>/old/<serial>.crt                    certificates replaced by --rotate

``index.json`` records every certificate ever issued (serial, CN, validity, revocation),
so revocation survives rotation and the CRL can be rebuilt at any time.

Building certificates (``build_*``) is pure: keys, names and times in, objects out.
Only :class:`CertificateAuthority` touches files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.protocol.topics import TopicError, check_gateway_id

log = logging.getLogger(__name__)

AGGREGATOR_IDENTITY = "@aggregator"
"""CN (and so MQTT username) of the aggregator; not a valid gateway id by construction."""

DEFAULT_DIR = Path("pki")
CA_DAYS = 3650
"""Default CA lifetime (10 years); the CA key should live offline."""
LEAF_DAYS = 397
"""Default lifetime of gateway/aggregator/broker certificates (about 13 months)."""
CRL_DAYS = 180
"""Default time until the CRL's nextUpdate.  An expired CRL makes mosquitto refuse
*every* client, so refresh it (``fedgate certs crl``) well before that."""
KEY_TYPES = ("ec", "rsa")

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CRL_FILE = "crl.pem"
INDEX_FILE = "index.json"
ISSUED_DIR = "issued"
BUNDLE_CERT = "tls.crt"
BUNDLE_KEY = "tls.key"

_HOST = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")

# RFC 5280 reason codes accepted by ``revoke``
REVOCATION_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "ca-compromise": x509.ReasonFlags.ca_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
}


class CertError(Exception):
    """A certificate operation that cannot be done (missing CA, bad name, ...)."""


class IdentityKind(str, Enum):
    GATEWAY = "gateway"
    AGGREGATOR = "aggregator"
    BROKER = "broker"


@dataclass(frozen=True)
class IssuedCert:
    """One row of the CA's index: a certificate that was issued, maybe revoked."""

    bundle: str
    kind: str
    common_name: str
    serial: str  # hex, lowercase
    not_before: str  # ISO 8601, UTC
    not_after: str
    sha256: str
    revoked_at: str | None = None
    reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: dt.datetime) -> bool:
        return dt.datetime.fromisoformat(self.not_after) <= now

    def as_row(self, now: dt.datetime | None = None) -> dict:
        now = now or _utcnow()
        state = "revoked" if self.revoked else ("expired" if self.expired(now) else "valid")
        return {**asdict(self), "state": state}


# --------------------------------------------------------------------------- naming


def gateway_common_name(gateway_id: str) -> str:
    """The CN (= MQTT username) of gateway ``gateway_id``: the id itself (the ACL's %u)."""
    try:
        return check_gateway_id(gateway_id)
    except TopicError as exc:
        raise CertError(str(exc)) from None


def check_host(host: str) -> str:
    if not _HOST.fullmatch(host):  # fullmatch: "$" alone would accept "name\n"
        raise CertError(f"invalid broker host name {host!r}")
    return host.rstrip(".")


def bundle_name(kind: IdentityKind, name: str = "") -> str:
    if kind is IdentityKind.GATEWAY:
        return f"gateway-{gateway_common_name(name)}"
    if kind is IdentityKind.AGGREGATOR:
        return "aggregator"
    return f"broker-{check_host(name)}"


# --------------------------------------------------------------------------- pure builders


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def generate_key(key_type: str = "ec"):
    """A new private key: ``ec`` = P-256 (default, fast, small), ``rsa`` = RSA-3072."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise CertError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def _name(common_name: str, organization: str = "fedgate") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(now: dt.datetime | None, days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise CertError(f"validity must be at least 1 day, got {days}")
    now = now or _utcnow()
    # a little back-dating tolerates clocks of edge boxes that run slightly behind
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def build_ca_certificate(key, *, common_name: str = "fedgate CA", days: int = CA_DAYS,
                         now: dt.datetime | None = None) -> x509.Certificate:
    start, end = _validity(now, days)
    name = _name(common_name)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        # path_length=0: this CA signs leaf certificates only, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_leaf_certificate(
    *,
    ca_cert: x509.Certificate,
    ca_key,
    public_key,
    common_name: str,
    kind: IdentityKind,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int = LEAF_DAYS,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A client (gateway, aggregator) or server (broker) certificate signed by the CA."""
    start, end = _validity(now, days)
    end = min(end, ca_cert.not_valid_after_utc)  # never outlive the CA
    server = kind is IdentityKind.BROKER
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=rsa_key,  # RSA key transport; EC uses ECDHE only
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dns_names]
        for ip in ip_addresses:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise CertError(f"invalid IP address {ip!r}") from None
        if not sans:
            raise CertError("a broker certificate needs at least one host name or IP")
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def build_crl(*, ca_cert: x509.Certificate, ca_key, revoked: Iterable[IssuedCert],
              number: int, days: int = CRL_DAYS,
              now: dt.datetime | None = None) -> x509.CertificateRevocationList:
    now = now or _utcnow()
    if days < 1:
        raise CertError(f"CRL validity must be at least 1 day, got {days}")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for entry in revoked:
        revoked_cert = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry.serial, 16))
            .revocation_date(dt.datetime.fromisoformat(entry.revoked_at))
        )
        if entry.reason and entry.reason != "unspecified":
            revoked_cert = revoked_cert.add_extension(
                x509.CRLReason(REVOCATION_REASONS[entry.reason]), critical=False
            )
        builder = builder.add_revoked_certificate(revoked_cert.build())
    return builder.sign(ca_key, hashes.SHA256())


def describe(cert: x509.Certificate, *, bundle: str, kind: IdentityKind) -> IssuedCert:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return IssuedCert(
        bundle=bundle,
        kind=kind.value,
        common_name=str(cn),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key) -> bytes:
    # unencrypted PKCS#8: mosquitto and paho read it without a passphrase prompt; the
    # file mode (0600) and a dedicated service user protect it
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --------------------------------------------------------------------------- file helpers


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file in the same directory, created with ``mode`` from the
    start and renamed into place: readers never see a partial file, and a secret is
    never world-readable for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private(path: Path, data: bytes) -> None:
    """A secret (private key): mode 0600."""
    _atomic_write(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """A certificate, CRL or index: mode 0644."""
    _atomic_write(path, data, 0o644)


# --------------------------------------------------------------------------- the CA on disk


class CertificateAuthority:
    """A CA directory created by :meth:`init`; issues, rotates and revokes certificates."""

    def __init__(self, directory: Path | str = DEFAULT_DIR):
        self.directory = Path(directory)
        cert_path, key_path = self.directory / CA_CERT, self.directory / CA_KEY
        if not cert_path.is_file() or not key_path.is_file():
            raise CertError(
                f"no CA in {self.directory} (expected {CA_CERT} and {CA_KEY}); "
                f"run `fedgate certs init-ca --dir {self.directory}` first"
            )
        try:
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            self.key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise CertError(f"unreadable CA in {self.directory}: {exc}") from None
        if _public_bytes(self.key.public_key()) != _public_bytes(self.cert.public_key()):
            raise CertError(f"{key_path} is not the key of {cert_path}")
        if os.stat(key_path).st_mode & 0o077:
            log.warning("%s is readable by group or others; chmod 0600 it", key_path)

    # ---- creation

    @classmethod
    def init(cls, directory: Path | str = DEFAULT_DIR, *, common_name: str = "fedgate CA",
             days: int = CA_DAYS, key_type: str = "ec", crl_days: int = CRL_DAYS,
             now: dt.datetime | None = None, force: bool = False) -> "CertificateAuthority":
        """Create a CA (key, self-signed certificate, empty CRL, empty index)."""
        directory = Path(directory)
        if (directory / CA_KEY).exists() and not force:
            raise CertError(f"a CA already exists in {directory}; pass force=True (--force) "
                            "to replace it, which invalidates every certificate it issued")
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = generate_key(key_type)
        cert = build_ca_certificate(key, common_name=common_name, days=days, now=now)
        write_private(directory / CA_KEY, pem_key(key))
        write_public(directory / CA_CERT, pem_cert(cert))
        if force and (directory / ISSUED_DIR).exists():
            shutil.rmtree(directory / ISSUED_DIR)
        cls._save_index(directory, {"crl_number": 0, "certificates": []})
        ca = cls(directory)
        ca.write_crl(days=crl_days, now=now)  # mosquitto's crlfile must exist from day one
        return ca

    # ---- index

    @property
    def index_path(self) -> Path:
        return self.directory / INDEX_FILE

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL_FILE

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_CERT

    def _load_index(self) -> dict:
        # a missing or damaged index is an error, never an empty one: the CRL is rebuilt
        # from it, and an empty index would silently un-revoke every certificate
        try:
            index = json.loads(self.index_path.read_text())
            rows = index["certificates"]
            for row in rows:
                entry = IssuedCert(**row)
                int(entry.serial, 16)
                for when in (entry.not_before, entry.not_after, entry.revoked_at):
                    if when is not None:
                        dt.datetime.fromisoformat(when)
                if entry.reason is not None and entry.reason not in REVOCATION_REASONS:
                    raise ValueError(f"unknown revocation reason {entry.reason!r}")
            int(index.get("crl_number", 0))
        except FileNotFoundError:
            raise CertError(f"{self.index_path} is missing; restore it from the CA backup "
                            "(revocations are recorded there)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CertError(f"{self.index_path} is damaged ({type(exc).__name__}: {exc}); "
                            "restore it from the CA backup") from None
        return index

    @staticmethod
    def _save_index(directory: Path, index: dict) -> None:
        write_public(directory / INDEX_FILE, json.dumps(index, indent=2).encode())

    def certificates(self) -> list[IssuedCert]:
        return [IssuedCert(**row) for row in self._load_index()["certificates"]]

    def bundle_dir(self, bundle: str) -> Path:
        return self.directory / ISSUED_DIR / bundle

    # ---- issuing

    def issue_gateway(self, gateway_id: str, **options) -> IssuedCert:
        """Certificate for gateway ``gateway_id`` (CN = the id, clientAuth)."""
        cn = gateway_common_name(gateway_id)
        return self._issue(IdentityKind.GATEWAY, bundle_name(IdentityKind.GATEWAY, cn), cn,
                           **options)

    def issue_aggregator(self, **options) -> IssuedCert:
        """Certificate for the aggregator (CN = ``@aggregator``, clientAuth)."""
        return self._issue(IdentityKind.AGGREGATOR, bundle_name(IdentityKind.AGGREGATOR),
                           AGGREGATOR_IDENTITY, **options)

    def issue_broker(self, host: str, *, ip_addresses: Sequence[str] = (),
                     extra_hosts: Sequence[str] = (), **options) -> IssuedCert:
        """Server certificate for the broker: CN = ``host``, SAN = hosts + IPs, serverAuth."""
        host = check_host(host)
        hosts = [host, *(check_host(h) for h in extra_hosts)]
        return self._issue(IdentityKind.BROKER, bundle_name(IdentityKind.BROKER, host), host,
                           dns_names=hosts, ip_addresses=ip_addresses, **options)

    def _issue(self, kind: IdentityKind, bundle: str, common_name: str, *,
               dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = (),
               days: int = LEAF_DAYS, key_type: str = "ec", rotate: bool = False,
               now: dt.datetime | None = None) -> IssuedCert:
        now = now or _utcnow()
        current = [c for c in self.certificates()
                   if c.bundle == bundle and not c.revoked and not c.expired(now)]
        if current and not rotate:
            raise CertError(
                f"{bundle} already has a valid certificate (serial {current[-1].serial}); "
                "use --rotate to issue a replacement, then revoke the old one"
            )
        key = generate_key(key_type)
        cert = build_leaf_certificate(
            ca_cert=self.cert, ca_key=self.key, public_key=key.public_key(),
            common_name=common_name, kind=kind, dns_names=dns_names,
            ip_addresses=ip_addresses, days=days, now=now,
        )
        target = self.bundle_dir(bundle)
        old_cert = target / BUNDLE_CERT
        if old_cert.exists():
            # keep the replaced certificate for the record; its key is of no further use
            old = x509.load_pem_x509_certificate(old_cert.read_bytes())
            write_public(target / "old" / f"{format(old.serial_number, 'x')}.crt",
                         old_cert.read_bytes())
        target.mkdir(parents=True, exist_ok=True)
        write_private(target / BUNDLE_KEY, pem_key(key))
        write_public(target / BUNDLE_CERT, pem_cert(cert))
        write_public(target / CA_CERT, pem_cert(self.cert))
        issued = describe(cert, bundle=bundle, kind=kind)
        index = self._load_index()
        index["certificates"].append(asdict(issued))
        self._save_index(self.directory, index)
        return issued

    # ---- revocation

    def revoke(self, bundle: str, *, serial: str | None = None, keep_latest: bool = False,
               reason: str = "unspecified", crl_days: int = CRL_DAYS,
               now: dt.datetime | None = None) -> list[IssuedCert]:
        """Revoke certificates of ``bundle`` (all unrevoked ones, one ``serial``, or all but
        the newest with ``keep_latest``) and rewrite the CRL.  Returns what was revoked."""
        if reason not in REVOCATION_REASONS:
            raise CertError(f"unknown reason {reason!r}; choose one of "
                            f"{', '.join(REVOCATION_REASONS)}")
        now = now or _utcnow()
        index = self._load_index()
        rows = index["certificates"]
        candidates = [i for i, r in enumerate(rows) if r["bundle"] == bundle]
        if not candidates:
            known = sorted({r["bundle"] for r in rows})
            raise CertError(f"no certificate issued for {bundle!r}; known: "
                            f"{', '.join(known) or 'none'}")
        if serial is not None:
            serial = serial.lower().removeprefix("0x").replace(":", "")
            candidates = [i for i in candidates if rows[i]["serial"] == serial]
            if not candidates:
                raise CertError(f"{bundle} has no certificate with serial {serial}")
        elif keep_latest:
            candidates = candidates[:-1]
        revoked = []
        for i in candidates:
            if rows[i]["revoked_at"] is None:
                rows[i]["revoked_at"] = now.isoformat()
                rows[i]["reason"] = reason
                revoked.append(IssuedCert(**rows[i]))
        self._save_index(self.directory, index)
        self.write_crl(days=crl_days, now=now)
        return revoked

    def write_crl(self, *, days: int = CRL_DAYS, now: dt.datetime | None = None) -> Path:
        """(Re)sign the CRL from the index; run it periodically, before nextUpdate."""
        index = self._load_index()
        index["crl_number"] = int(index.get("crl_number", 0)) + 1
        crl = build_crl(
            ca_cert=self.cert, ca_key=self.key,
            revoked=[c for c in self.certificates() if c.revoked],
            number=index["crl_number"], days=days, now=now,
        )
        write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        self._save_index(self.directory, index)
        return self.crl_path

    def verify(self, path: Path | str, *, now: dt.datetime | None = None) -> dict:
        """Check a certificate the way the broker will: signed by this CA, within its
        validity, not on the current crl.pem, the right key usage, and (for a bundle
        directory) that tls.key belongs to tls.crt.  Returns the findings; ``ok`` is
        True when there is no problem."""
        path = Path(path)
        if not path.is_dir() and not path.is_file():
            candidate = self.bundle_dir(str(path))
            path = candidate if candidate.is_dir() else path
        cert_path = path / BUNDLE_CERT if path.is_dir() else path
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CertError(f"cannot read a certificate from {cert_path}: {exc}") from None
        now = now or _utcnow()
        problems: list[str] = []
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            problems.append("not issued by this CA")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            problems.append(f"outside its validity ({cert.not_valid_before_utc.isoformat()} .. "
                            f"{cert.not_valid_after_utc.isoformat()})")
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            problems.append("revoked (listed in crl.pem)")
        if crl.next_update_utc is not None and crl.next_update_utc < now:
            problems.append("crl.pem is past its nextUpdate: the broker refuses everyone")
        try:
            usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            usages = []
        usage = ("client" if ExtendedKeyUsageOID.CLIENT_AUTH in usages else
                 "server" if ExtendedKeyUsageOID.SERVER_AUTH in usages else "none")
        if usage == "none":
            problems.append("no clientAuth/serverAuth extended key usage")
        key_path = path / BUNDLE_KEY if path.is_dir() else None
        if key_path is not None:
            try:
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
                    problems.append(f"{BUNDLE_KEY} is not the key of {BUNDLE_CERT}")
                elif os.stat(key_path).st_mode & 0o077:
                    problems.append(f"{BUNDLE_KEY} is readable by group or others")
            except (OSError, ValueError, TypeError) as exc:
                problems.append(f"cannot read {BUNDLE_KEY}: {exc}")
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return {
            "certificate": str(cert_path),
            "common_name": str(cn[0].value) if cn else None,
            "serial": format(cert.serial_number, "x"),
            "usage": usage,
            "not_after": cert.not_valid_after_utc.isoformat(),
            "ok": not problems,
            "problems": problems,
        }

    def crl_info(self) -> dict:
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return {
            "crl": str(self.crl_path),
            "crl_number": crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number,
            "crl_entries": len(crl),
            "last_update": crl.last_update_utc.isoformat(),
            "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
        }


# --------------------------------------------------------------------------- model signing

SIGNING_DIR = "signing"
SIGNING_KEY = "global-model.key"
SIGNING_PUB = SIGNING_KEY + ".pub"  # <key>.pub: the aggregator service's convention


def create_signing_key(directory: Path | str = DEFAULT_DIR, *, force: bool = False) -> dict:
    """The Ed25519 key pair the aggregator signs global models with (via
    :mod:`gateway.protocol.signing`, the one Ed25519 implementation).  The private key
    (0600) goes to the aggregator only; the public key to every gateway."""
    from gateway.protocol import signing

    target = Path(directory) / SIGNING_DIR
    private, public = target / SIGNING_KEY, target / SIGNING_PUB
    if private.exists() and not force:
        raise CertError(f"{private} exists; pass --force to replace it (gateways will then "
                        "reject models signed with the new key until they get the new "
                        f"{SIGNING_PUB})")
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(target, 0o700)
    key = signing.generate_private_key()
    signing.save_private_key(key, private)
    signing.save_public_key(key, public)
    return {"private_key": str(private), "public_key": str(public),
            "key_id": signing.key_id(key)}
