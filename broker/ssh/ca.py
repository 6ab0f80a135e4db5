"""The broker's SSH user CA: one short-lived certificate per session, nothing more permitted.

The target trusts the CA (``TrustedUserCAKeys``); the certificate's principal is the target login
for the grant's level, it expires within minutes (never after the grant), and its key id names
user, grant and session so the target's own logs tie back to the recording.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncssh

CLOCK_SKEW = timedelta(seconds=60)
# Session keys take the CA's type: a P-256 CA (the default for new installs, see
# ``keys.CA_KEY_ALG``) gets P-256 keys, checked by the target through libcrypto; an Ed25519 CA
# (older installs, or targets hardened to refuse NIST curves) keeps Ed25519 keys, so an upgrade
# never offers a target a key type it was not offered before. Other CA types: Ed25519.
_SESSION_KEY_ALGS = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                     "ecdsa-sha2-nistp521")


class UserCA:
    def __init__(self, key: asyncssh.SSHKey) -> None:
        self._key = key
        alg = key.algorithm.decode()
        self.session_key_alg = alg if alg in _SESSION_KEY_ALGS else "ssh-ed25519"

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
        permit_port_forwarding: bool = False,
    ) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
        """A fresh key (of ``session_key_alg``) and its certificate for ``login``; port
        forwarding only for the connection that carries a forward from the target."""
        user_key = asyncssh.generate_private_key(self.session_key_alg)
        valid_before = min(now + ttl, not_after)
        cert = self._key.generate_user_certificate(
            user_key,
            key_id,
            principals=[login],
            valid_after=int((now - CLOCK_SKEW).timestamp()),
            valid_before=int(valid_before.timestamp()),
            permit_x11_forwarding=False,
            permit_agent_forwarding=False,
            permit_port_forwarding=permit_port_forwarding,
            permit_pty=permit_pty,
            permit_user_rc=False,
        )
        return user_key, cert
