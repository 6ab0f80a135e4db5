"""A TCP connection opened *from a target*: a direct-tcpip channel on the broker's own SSH
connection to that target, presented as an asyncio transport.

Inside a recorded ProxyJump connection, ``localhost`` is the target (``ssh -J bastion -L
8080:localhost:8080 web01``, VS Code Remote-SSH's SOCKS proxy to its server). The broker cannot
dial the target's loopback itself, so it asks the target's sshd to, as an OpenSSH bastion's user
would: over a connection of its own with a certificate that permits port forwarding (and
nothing else: no PTY, no agent, no X11) for this one channel. The tunnel code then relays it
like any TCP connection it dialled (same session record, flow control, enforcement).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncssh

from broker.domain.models import Grant, Instance, Principal
from broker.ssh import upstream
from broker.ssh.relay import RelayDeps


class ChannelTransport(asyncio.Transport):
    """The transport face of one direct-tcpip channel; owns the connection it runs on."""

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        super().__init__({"peername": None, "socket": None})
        self._conn = conn
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None

    def attach(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan

    # -- writing --------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write(bytes(data) if type(data) is not bytes else data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self._chan.get_write_buffer_size() if self._chan is not None else 0

    # -- reading --------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if self._chan is not None:
            self._chan.pause_reading()

    def resume_reading(self) -> None:
        if self._chan is not None:
            self._chan.resume_reading()

    def is_reading(self) -> bool:
        return self._chan is not None and not self._chan.is_closing()

    # -- closing (the protocol is fixed: the channel's session feeds it) ---------------------
    def is_closing(self) -> bool:
        return self._chan is None or self._chan.is_closing()

    def close(self) -> None:
        if self._chan is not None:
            self._chan.close()  # -> connection_lost -> the connection closes

    def abort(self) -> None:
        if self._chan is not None:
            self._chan.abort()
        self._conn.abort()


class _Channel(asyncssh.SSHTCPSession[bytes]):
    """The channel's callbacks, handed to the tunnel's protocol as a socket's would be."""

    def __init__(self, transport: ChannelTransport, proto: asyncio.Protocol) -> None:
        self._t = transport
        self._proto = proto

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._t.attach(chan)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._proto.data_received(data)

    def eof_received(self) -> bool:
        return bool(self._proto.eof_received())

    def pause_writing(self) -> None:
        self._proto.pause_writing()

    def resume_writing(self) -> None:
        self._proto.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._t._conn.close()
        self._proto.connection_lost(exc)


async def dial(deps: RelayDeps, principal: Principal, instance: Instance, grant: Grant,
               host: str, port: int, proto: asyncio.Protocol) -> ChannelTransport:
    """Connect to ``instance`` as the grant's login and open a channel to its ``host:port``.

    Raises ``UpstreamError`` (cannot reach or log in to the target) or ``asyncssh.Error`` /
    ``OSError`` (the target refused the channel)."""
    login = instance.login_for(grant.level, deps.config.upstream.admin_login,
                               deps.config.upstream.read_only_login)
    key, cert = deps.ca.issue(
        login=login, key_id=f"user={principal} grant={grant.id} forward={host}:{port}",
        now=deps.clock.now(), ttl=timedelta(seconds=deps.config.upstream.cert_ttl_seconds),
        not_after=grant.expires_at, permit_pty=False, permit_port_forwarding=True)
    conn = await upstream.connect(instance, login, key, cert, deps.config.upstream)
    transport = ChannelTransport(conn)
    try:
        await conn.create_connection(
            lambda: _Channel(transport, proto), host, port,
            window=deps.config.ssh.window_bytes, max_pktsize=deps.config.ssh.max_packet_bytes)
    except BaseException:
        conn.abort()
        raise
    return transport
