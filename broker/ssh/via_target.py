"""A TCP connection opened *from a target*: a direct-tcpip channel on the broker's own SSH
connection to that target, presented as an asyncio transport.

Inside a recorded ProxyJump connection, ``localhost`` is the target (``ssh -J bastion -L
8080:localhost:8080 web01``, VS Code Remote-SSH's SOCKS proxy to its server). The broker cannot
dial the target's loopback itself, so it asks the target's sshd to, as an OpenSSH bastion's user
would: over a connection of its own with a certificate that permits port forwarding (and
nothing else: no PTY, no agent, no X11). One such connection per client connection (and login)
carries all its forwards: a browser's six connections to a forwarded web app cost one SSH
handshake with the target, not six; it closes with the client connection. The tunnel code
relays each channel like any TCP connection it dialled (same session record, flow control,
enforcement).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncssh

from broker.domain.models import Grant, Instance, Principal
from broker.errors import UpstreamError
from broker.ssh import upstream
from broker.ssh.relay import RelayDeps


class ChannelTransport(asyncio.Transport):
    """The transport face of one direct-tcpip channel (not of the connection it runs on)."""

    def __init__(self) -> None:
        super().__init__({"peername": None, "socket": None})
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
        self._proto.connection_lost(exc)


class TargetLinks:
    """The forwarding connections of one client connection to one target, one per login:
    opened by the first forward, reused by the next ones, closed by ``close``."""

    def __init__(self, deps: RelayDeps, principal: Principal, instance: Instance) -> None:
        self._deps = deps
        self._principal = principal
        self.instance = instance
        self._conns: dict[str, asyncio.Task[asyncssh.SSHClientConnection]] = {}
        self._closed = False

    async def open(self, grant: Grant, host: str, port: int,
                   proto: asyncio.Protocol) -> ChannelTransport:
        """A channel to the target's ``host:port`` for ``proto``, as the grant's login.

        Raises ``UpstreamError`` (cannot reach or log in to the target) or ``asyncssh.Error`` /
        ``OSError`` (the target refused the channel)."""
        conn = await self._connection(grant)
        transport = ChannelTransport()
        config = self._deps.config.ssh
        await conn.create_connection(lambda: _Channel(transport, proto), host, port,
                                     window=config.window_bytes,
                                     max_pktsize=config.max_packet_bytes)
        return transport

    async def _connection(self, grant: Grant) -> asyncssh.SSHClientConnection:
        if self._closed:
            raise UpstreamError("the client connection is closing")
        up = self._deps.config.upstream
        login = self.instance.login_for(grant.level, up.admin_login, up.read_only_login)
        task = self._conns.get(login)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None
                                             or task.result().is_closed())):
            task = asyncio.ensure_future(self._connect(login, grant))
            self._conns[login] = task
        return await asyncio.shield(task)  # one waiter giving up does not cancel the others

    async def _connect(self, login: str, grant: Grant) -> asyncssh.SSHClientConnection:
        deps = self._deps
        key, cert = deps.ca.issue(
            login=login, key_id=f"user={self._principal} grant={grant.id} forwards",
            now=deps.clock.now(), ttl=timedelta(seconds=deps.config.upstream.cert_ttl_seconds),
            not_after=grant.expires_at, permit_pty=False, permit_port_forwarding=True)
        conn = await upstream.connect(self.instance, login, key, cert, deps.config.upstream)
        if self._closed:  # the client went away while this was connecting
            conn.close()
            raise UpstreamError("the client connection is closing")
        return conn

    def close(self) -> None:
        """End every forwarding connection (and so the forwards on it)."""
        self._closed = True
        for task in self._conns.values():
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                task.result().close()
        self._conns.clear()
