"""The user name of a USERAUTH_REQUEST as the client sent it, before asyncssh's SASLprep.

asyncssh decodes and prepares the name (RFC 4013) inside its handler and hands the server only
the result, or drops the connection if the name cannot be prepared. The broker must audit what
was typed and refuse names that preparation changes (``broker.ssh.usernames``), so the handler
is wrapped: the raw bytes, read from a copy of the payload, are kept on the connection
(``_bb_raw_username``), and asyncssh's own handler gets the packet untouched.
``patches.raw_username(conn)`` reads them; with the gate closed it returns None and the broker
falls back to refusing any name that is not printable ASCII.
"""

from __future__ import annotations

import contextlib
from typing import Any

from asyncssh import connection as _connection
from asyncssh.constants import MSG_USERAUTH_REQUEST
from asyncssh.packet import PacketDecodeError, SSHPacket

from broker.ssh.patches.private import replace_item


def _process_userauth_request(self: Any, pkttype: int, pktid: int, packet: Any) -> Any:
    if self.is_server():
        # read from a copy: asyncssh's handler gets the packet untouched (a public-key
        # signature covers the payload it consumed, packet type byte included)
        with contextlib.suppress(PacketDecodeError):  # asyncssh's handler reports it
            self._bb_raw_username = SSHPacket(packet.get_remaining_payload()).get_string()
    return _ORIGINAL(self, pkttype, pktid, packet)


_ORIGINAL = _connection.SSHConnection._packet_handlers[MSG_USERAUTH_REQUEST]


def raw_username(conn: Any) -> bytes | None:
    """The raw name of the connection's last USERAUTH_REQUEST (None before one)."""
    raw = getattr(conn, "_bb_raw_username", None)
    return raw if isinstance(raw, bytes) else None


def install() -> None:
    """Only through ``broker.ssh.patches.install()`` (the version gate)."""
    replace_item(_connection.SSHConnection, "_packet_handlers", MSG_USERAUTH_REQUEST,
                 _process_userauth_request)


def installed() -> bool:
    return (_connection.SSHConnection._packet_handlers[MSG_USERAUTH_REQUEST]
            is _process_userauth_request)
