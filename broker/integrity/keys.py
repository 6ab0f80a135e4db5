"""The bastion's Ed25519 signing key: generated once into the state dir (mode 0600).

The public half sits beside it (``.pub``, PEM) so that ``verify`` needs no access to the secret,
and so it can be copied to wherever recordings are checked later. A signature names the key by
``key_id`` (first 16 hex digits of the SHA-256 of the raw public key) so a signature made by
another key is reported as such, not just as "invalid".
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.errors import ConfigError

KEY_NAME = "integrity_ed25519_key"


def default_key_path(state_dir: Path) -> Path:
    return state_dir / KEY_NAME


def public_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + ".pub")


def key_id_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class VerifyKey:
    """A public key that checks signatures."""

    def __init__(self, public: Ed25519PublicKey) -> None:
        self._public = public
        self.key_id = key_id_of(public)

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            self._public.verify(signature, data)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """The private key; only ``sign`` and ``key_id`` leave this object."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = VerifyKey(private.public_key())
        self.key_id = self.public.key_id

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def __repr__(self) -> str:  # never print key material
        return f"SigningKey(key_id={self.key_id})"


def _write_public(key_path: Path, private: Ed25519PrivateKey) -> None:
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = public_path(key_path)
    tmp = pub.with_name(f"{pub.name}.{os.getpid()}.tmp")
    tmp.write_bytes(pem)
    os.chmod(tmp, 0o644)
    tmp.replace(pub)


def load_signing_key(path: Path) -> SigningKey:
    """The existing key; ``ConfigError`` when there is none. Commands use this: only the broker
    creates keys, so a command run against a copied or damaged state directory cannot mint a
    key that would make every earlier recording fail ``verify``."""
    if not path.exists():
        raise ConfigError(f"{path}: no signing key (the broker creates it when it first "
                          "starts: run serve once)")
    return load_or_create_signing_key(path, create_public=False)


def load_or_create_signing_key(path: Path, *, create_public: bool = True) -> SigningKey:
    """Load the key, creating it on first start; two processes starting at once keep one key."""
    if path.exists():
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot read the signing key: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise ConfigError(f"{path}: the signing key is not an Ed25519 key")
        if create_public and not public_path(path).exists():
            _write_public(path, private)
        return SigningKey(private)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        try:
            os.link(tmp, path)  # never replaces an existing key
        except FileExistsError:
            return load_or_create_signing_key(path)
        finally:
            tmp.unlink()
        _write_public(path, private)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the signing key: {exc.strerror}") from None
    return SigningKey(private)


def load_verify_key(path: Path) -> VerifyKey:
    """A public key from a PEM file (the ``.pub`` beside the signing key, or a copy of it)."""
    try:
        public = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no public signing key here (the broker creates it on its "
                          "first start)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read the public signing key: {exc}") from None
    if not isinstance(public, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return VerifyKey(public)
