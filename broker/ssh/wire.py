"""Transport tuning for asyncssh: no SSH_MSG_IGNORE before every packet under AEAD ciphers.

asyncssh (2.x) sends an empty SSH_MSG_IGNORE ahead of every packet once encryption is on: the old
countermeasure against the chosen-plaintext attack on CBC mode with predictable IVs (RFC 4251,
section 9.3.1). The broker only negotiates AEAD ciphers (AES-GCM, chacha20-poly1305), whose nonces
are never predictable that way, so the extra packet protects nothing while doubling the packets,
cipher calls and socket writes on the relay's hot path (about a fifth of its CPU). OpenSSH does not
send it either. asyncssh sends MSG_IGNORE for no other reason, and has no option to turn it off, so
``install()`` wraps ``SSHConnection.send_packet`` to drop it when the negotiated cipher is AEAD;
under any other cipher the packet is still sent.
"""

from __future__ import annotations

from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE
from asyncssh.encryption import ChachaEncryption, GCMEncryption

_AEAD = (GCMEncryption, ChachaEncryption)
_original = SSHConnection.send_packet


def _send_packet(self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None) -> None:
    if pkttype == MSG_IGNORE and isinstance(getattr(self, "_send_encryption", None), _AEAD):
        return
    _original(self, pkttype, *args, handler=handler)


def install() -> None:
    """Idempotent; affects every asyncssh connection in the process (server and upstream legs)."""
    SSHConnection.send_packet = _send_packet  # type: ignore[method-assign]


def installed() -> bool:
    return SSHConnection.send_packet is _send_packet
