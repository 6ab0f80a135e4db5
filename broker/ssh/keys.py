"""Keys generated once and persisted: the broker's host key and its user CA."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from broker.errors import ConfigError

# Certificate authorities are created as ECDSA P-256, not Ed25519: sshd checks a certificate's CA
# signature each time it decodes the certificate, several times per login (pre-auth child and
# monitor), and OpenSSH 9.2 (Debian 12) verifies Ed25519 with its bundled reference code, where
# P-256 goes through libcrypto. Measured on such a target: 45 ms of sshd CPU per certificate login
# with an Ed25519 CA, 31 ms with a P-256 CA (the same as a plain key). A CA that exists keeps its
# type; an operator may supply any CA key (``[upstream] ca_key``), e.g. an Ed25519 one for targets
# hardened to refuse NIST curves (session keys follow the CA's type: ``ca.UserCA``).
CA_KEY_ALG = "ecdsa-sha2-nistp256"


def load_or_create_key(path: Path, comment: str, alg: str = "ssh-ed25519") -> asyncssh.SSHKey:
    """Load an OpenSSH private key, creating one of type ``alg`` (mode 0600) on first start."""
    if path.exists():
        try:
            return asyncssh.read_private_key(path)
        except (OSError, asyncssh.KeyImportError) as exc:
            raise ConfigError(f"{path}: cannot read private key: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = asyncssh.generate_private_key(alg, comment=comment)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    try:
        os.link(tmp, path)  # never replaces: two processes starting at once keep one key
    except FileExistsError:
        return load_or_create_key(path, comment, alg)
    finally:
        tmp.unlink()
    pub = path.with_name(path.name + ".pub")
    pub_tmp = pub.with_name(f"{pub.name}.{os.getpid()}.tmp")
    pub_tmp.write_bytes(key.export_public_key())
    pub_tmp.replace(pub)
    return key


def load_or_create_user_ca(path: Path) -> asyncssh.SSHKey:
    """The broker's user CA key (``CA_KEY_ALG`` when it is created here)."""
    return load_or_create_key(path, "bastion-broker user CA", CA_KEY_ALG)


def parse_public_key(line: str) -> tuple[str, str]:
    """An OpenSSH public key line as (normalised line, SHA256 fingerprint); StoreError if it is
    not a key (raised here so every store and the CLI refuse the same input the same way)."""
    from broker.errors import StoreError

    try:
        key = asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise StoreError(f"not an SSH public key: {exc}") from None
    return key.export_public_key().decode().strip(), key.get_fingerprint("sha256")


def read_public_key(path: Path, what: str) -> str:
    """The OpenSSH public key line of the private key at ``path`` (from its ``.pub``, else from
    the key itself), without ever creating one: read-only commands must not mint keys that
    the running broker does not use."""
    pub = path.with_name(path.name + ".pub")
    try:
        if pub.exists():
            return asyncssh.import_public_key(pub.read_bytes()).export_public_key().decode().strip()
        if path.exists():
            return asyncssh.read_private_key(path).export_public_key().decode().strip()
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from None
    raise ConfigError(f"{path}: {what} does not exist yet (the broker creates it when it "
                      "first starts: run serve once)")
