"""Signed, expiring session tokens (HMAC-SHA256) so any broker sharing STATE_DIR accepts them.

A session is stateless: the cookie carries principal, roles and the CSRF secret, signed with a key
generated once in ``STATE_DIR/web.key`` (mode 0600). Logout is recorded in the store by session
id, so a copied cookie stops working on every broker, not only on the one that logged it out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

_PREFIX = "bb1"
KEY_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_key(path: Path) -> bytes:
    """Read the signing key, creating it atomically if absent (two brokers may race here:
    ``os.link`` refuses to overwrite, so both end up with the same key)."""
    for _ in range(50):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            continue
        if len(data) >= KEY_BYTES:
            return data
        time.sleep(0.01)  # another process is still writing it
    raise OSError(f"{path}: web signing key is unreadable or too short")


class SessionSigner:
    """``bb1.<payload>.<mac>``: base64url JSON payload with ``exp`` (epoch seconds)."""

    def __init__(self, key: bytes) -> None:
        self._key = hashlib.sha256(b"bastion-broker web session\0" + key).digest()

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._key, f"{_PREFIX}.{body}".encode(), hashlib.sha256).digest())

    def sign(self, payload: dict[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{_PREFIX}.{body}.{self._mac(body)}"

    def verify(self, token: str, now: float) -> dict[str, Any] | None:
        """The payload if the signature is right and it has not expired, else None."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _PREFIX or len(token) > 4096:
            return None
        body, mac = parts[1], parts[2]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            payload = json.loads(_unb64(body))
        except (ValueError, binascii.Error):
            return None
        if not isinstance(payload, dict):
            return None
        exp = payload.get("exp")
        if not isinstance(exp, int | float) or now >= exp:
            return None
        return payload
