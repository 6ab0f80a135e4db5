"""The broker's SSH user CA: one short-lived certificate per session, nothing more permitted.

The target trusts the CA (``TrustedUserCAKeys``); the certificate's principal is the target login
for the grant's level, it expires within minutes (never after the grant), and its key id names
user, grant and session so the target's own logs tie back to the recording.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncssh

CLOCK_SKEW = timedelta(seconds=60)
SESSION_KEY_ALG = "ecdsa-sha2-nistp256"


class UserCA:
    def __init__(self, key: asyncssh.SSHKey) -> None:
        self._key = key

    @property
    def public_line(self) -> str:
        return self._key.export_public_key().decode().strip()

    def issue(
        self,
        *,
        login: str,
        key_id: str,
        now: datetime,
        ttl: timedelta,
        not_after: datetime,
        permit_pty: bool,
    ) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
        """A fresh key and its certificate for ``login``.

        ECDSA P-256, like the CA (see ``keys.CA_KEY_ALG``): the target checks this key's
        signature through libcrypto, where OpenSSH's own Ed25519 code would cost more."""
        user_key = asyncssh.generate_private_key(SESSION_KEY_ALG)
        valid_before = min(now + ttl, not_after)
        cert = self._key.generate_user_certificate(
            user_key,
            key_id,
            principals=[login],
            valid_after=int((now - CLOCK_SKEW).timestamp()),
            valid_before=int(valid_before.timestamp()),
            permit_x11_forwarding=False,
            permit_agent_forwarding=False,
            permit_port_forwarding=False,
            permit_pty=permit_pty,
            permit_user_rc=False,
        )
        return user_key, cert
