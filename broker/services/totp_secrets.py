"""TOTP secrets encrypted at rest (AES-256-GCM, the account name as associated data).

The associated data binds a ciphertext to its account, so copying one user's row onto another's
does not give a working secret. Rows written before encryption (plain base32) are still read and
are re-encrypted at the next enrolment or reset.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import ConfigError, StoreError
from broker.ports import TotpStore

PREFIX = "v1:"
ENV_KEY = "BASTION_BROKER_TOTP_KEY"
CREDENTIAL_NAME = "totp-key"


def _decode_key(text: str, origin: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{origin}: TOTP key is not base64") from None
    if len(key) != 32:
        raise ConfigError(f"{origin}: TOTP key must be 32 bytes (base64 of 32 random bytes)")
    return key


def load_key(key_file: Path | None, default_path: Path, *, create: bool = True) -> bytes:
    """The key from, in order: the environment, a systemd credential, ``key_file``, or a key
    generated once at ``default_path`` (mode 0600; only with ``create``: the broker creates
    keys, commands do not)."""
    if os.environ.get(ENV_KEY):
        return _decode_key(os.environ[ENV_KEY], f"${ENV_KEY}")
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / CREDENTIAL_NAME).exists():
        path = Path(cred_dir) / CREDENTIAL_NAME
        return _decode_key(path.read_text(), f"systemd credential {CREDENTIAL_NAME}")
    path = key_file or default_path
    if path.exists():
        try:
            return _decode_key(path.read_text(), str(path))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read TOTP key: {exc.strerror}") from None
    if key_file is not None:
        raise ConfigError(f"{key_file}: TOTP key file not found")
    if not create:
        raise ConfigError(f"{path}: no TOTP key (the broker creates it when it first starts: "
                          "run serve once)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    try:
        os.link(tmp, path)  # complete file or nothing; never replaces a key another process made
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return _decode_key(path.read_text(), str(path))


class EncryptedTotpStore:
    """A ``TotpStore`` that seals secrets before they reach the inner store."""

    def __init__(self, inner: TotpStore, key: bytes) -> None:
        self._inner = inner
        self._aead = AESGCM(key)

    def seal(self, user_key: str, secret: str) -> str:
        nonce = os.urandom(12)
        ct = self._aead.encrypt(nonce, secret.encode(), user_key.encode())
        return PREFIX + base64.b64encode(nonce + ct).decode()

    def unseal(self, user_key: str, stored: str) -> str:
        if not stored.startswith(PREFIX):
            return stored  # legacy plain row
        try:
            blob = base64.b64decode(stored[len(PREFIX):])
            return self._aead.decrypt(blob[:12], blob[12:], user_key.encode()).decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise StoreError(f"TOTP secret of {user_key} does not decrypt (wrong key?)") from None

    async def get_secret(self, user_key: str) -> str | None:
        stored = await self._inner.get_secret(user_key)
        return None if stored is None else self.unseal(user_key, stored)

    async def set_secret(self, user_key: str, secret: str) -> None:
        await self._inner.set_secret(user_key, self.seal(user_key, secret))

    async def last_step(self, user_key: str) -> int | None:
        return await self._inner.last_step(user_key)

    async def advance_step(self, user_key: str, step: int) -> bool:
        return await self._inner.advance_step(user_key, step)
