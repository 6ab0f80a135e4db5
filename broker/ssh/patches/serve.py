"""An asyncssh server connection on an asyncio transport, not a socket: recorded ProxyJump's
inner connection over an in-memory transport pair (``broker.ssh.memlink``).

``asyncssh.run_server`` takes only a connected socket, so the inner connection would need a
socketpair: a send and a receive system call and two kernel copies per chunk each way, on the
event loop that is the bottleneck of a recorded ``scp -J`` (about 10% of its throughput). Here
the server connection is built as ``run_server`` builds it (options constructed off the loop,
``SSHServerConnection(loop, options, wait="auth")``, the options' ``waiter`` future that the
handshake completes) and given one end of a ``memlink`` pair as its transport. The stock
path (``broker.ssh.patches.server_link`` when the patches are off) is ``run_server`` on a
socketpair.
"""

from __future__ import annotations

import asyncio
from typing import Any

from asyncssh.connection import SSHServerConnection, SSHServerConnectionOptions

from broker.ssh import memlink


class MemoryEnd:
    """The server's end of an in-memory pair (``ServerEnd`` in ``broker.ssh.patches``)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    async def run_server(self, **options: Any) -> SSHServerConnection:
        """What ``asyncssh.run_server(sock, **options)`` does, on this end's transport: returns
        once the client has authenticated; raises (with the connection aborted) if not."""
        loop = asyncio.get_running_loop()
        opts = await SSHServerConnectionOptions.construct(**options)
        if self._transport.is_closing():  # a closed pair would never tell a new protocol
            raise ConnectionResetError("the other end closed before the SSH server started")
        opts.waiter = loop.create_future()
        conn = SSHServerConnection(loop, opts, wait="auth")
        self._transport.set_protocol(conn)
        conn.connection_made(self._transport)
        try:
            await opts.waiter  # the handshake failed or timed out: raises
        except BaseException:
            conn.abort()
            raise
        return conn

    def close(self) -> None:
        self._transport.close()


def memory_link(protocol: asyncio.Protocol) -> tuple[asyncio.Transport, MemoryEnd]:
    """A transport for ``protocol`` whose other end serves SSH when asked to."""
    ours, theirs = memlink.pair(asyncio.get_running_loop())
    ours.set_protocol(protocol)
    return ours, MemoryEnd(theirs)
