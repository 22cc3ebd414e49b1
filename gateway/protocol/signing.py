"""Ed25519 signatures of global models (``cryptography``).

The aggregator signs the canonical header of every global-model envelope (the header
carries the payload's sha256, so the signature covers the weights); gateways verify
with the aggregator's public key before loading.  Key files are PEM; private keys are
written with mode 0600 (the only file I/O of gateway.protocol, kept to these helpers).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "generate_private_key",
    "save_private_key",
    "load_private_key",
    "save_public_key",
    "load_public_key",
    "public_key_bytes",
    "public_key_from_bytes",
    "key_id",
    "sign",
    "verify",
]


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike) -> Path:
    """Write an unencrypted PKCS8 PEM readable by the owner only (0600)."""
    path = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # create with 0600 from the start: no window where the key is world-readable
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)
    return path


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def save_public_key(key: Ed25519PublicKey | Ed25519PrivateKey, path: str | os.PathLike) -> Path:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short fingerprint (16 hex chars of sha256 of the raw public key)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return hashlib.sha256(public_key_bytes(key)).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    """Signature as base64 text (it travels in the JSON header)."""
    return base64.b64encode(key.sign(message)).decode("ascii")


def verify(key: Ed25519PublicKey, message: bytes, signature_b64: str) -> bool:
    try:
        raw = base64.b64decode(signature_b64.encode("ascii"), validate=True)
        key.verify(raw, message)
    except (InvalidSignature, ValueError, UnicodeEncodeError):
        return False
    return True
