"""The SSH server taking over a connection whose PROXY protocol header was read
(``broker.ssh.proxy``): built as ``asyncssh.create_server``'s connection factory builds it
(``SSHServerConnection(loop, options)``), given the listener's transport, and fed the bytes
that came after the header. asyncssh offers this only for a socket (``run_server``), which
uvloop's transports do not hand back; the stock path has no PROXY protocol."""

from __future__ import annotations

import asyncio

from asyncssh.connection import SSHServerConnection, SSHServerConnectionOptions


def serve_transport(transport: asyncio.Transport, options: SSHServerConnectionOptions,
                    first: bytes) -> SSHServerConnection:
    conn = SSHServerConnection(asyncio.get_running_loop(), options)
    transport.set_protocol(conn)
    conn.connection_made(transport)
    if first:
        conn.data_received(first)
    return conn
