"""A public-key login that proved possession of the key, told to the broker before asyncssh
decides: registered keys replace the password, never the code.

asyncssh's public ``SSHServer.validate_public_key(username, key)`` is asked both for a client's
query (no signature yet) and for its signed request, before the signature is verified, so it
cannot tell a proven key from an offered one; and asyncssh never sends partial success, so a
key that is accepted ends authentication. The connection's own (not public)
``validate_public_key(username, key_data, msg, signature)`` runs after the signature check: it
is wrapped per connection, and once a signature verified with an accepted plain key, the
broker's callback decides the result (usually "failed", so that keyboard-interactive asks for
the code only). Without the patches (``broker.ssh.patches.on_key_proven`` returns False) the
broker does not offer public keys at all: password and code, as for everyone else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncssh
from asyncssh.public_key import decode_ssh_public_key


def on_key_proven(conn: asyncssh.SSHServerConnection,
                  proven: Callable[[str], Awaitable[bool]]) -> None:
    """Wrap ``conn``'s signature check: after asyncssh verified a signature made with a key the
    server accepts, ``proven(sha256_fingerprint)`` gives the result. A query (no signature) or
    a key that fails keeps asyncssh's answer; a certificate is refused."""
    original = conn.validate_public_key

    async def checked(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        ok = await original(username, key_data, msg, signature)
        if not (ok and msg):
            return ok  # a query (no signature) or a key the server does not accept
        try:
            fp = decode_ssh_public_key(key_data).get_fingerprint("sha256")
        except asyncssh.KeyImportError:
            return False  # e.g. a certificate: only plain registered keys count
        return await proven(fp)

    setattr(conn, "validate_public_key", checked)  # noqa: B010 - instance override
