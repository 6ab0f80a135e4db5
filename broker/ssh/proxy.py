"""The SSH listener behind a TCP load balancer: a PROXY protocol header before asyncssh.

With ``[ssh] proxy_protocol`` each accepted connection starts with a ``HeaderProtocol``: a peer
outside ``[ssh] trusted_proxies`` is closed at once; from a trusted one the header (v1 or v2)
must arrive within ``proxy_header_timeout_seconds``. Only then does asyncssh take the transport
over (``broker.ssh.patches.proxied``), with the client's address for the connection's server
object and the bytes that followed the header. No SSH byte is sent before. Without
``proxy_protocol`` none of this runs: the listener is asyncssh's own, and a PROXY header is a
failed SSH handshake.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Any

import asyncssh
import structlog

from broker.domain.proxyproto import (
    MAX_HEADER,
    Address,
    NeedMore,
    ProxyError,
    is_trusted,
    networks,
    parse,
)
from broker.errors import ConfigError
from broker.ssh import patches

log = structlog.get_logger("broker.ssh")

# the connection's server object (a ``BrokerConnection``) for a client address
ServerFactory = Callable[[Address], asyncssh.SSHServer]


class HeaderProtocol(asyncio.Protocol):
    """A connection until its PROXY header is read; then asyncssh's."""

    def __init__(self, listener: ProxyListener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._peer: Address = ("?", 0)
        self._buf = b""
        self._done = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self._peer = (str(peer[0]), int(peer[1]))
        if not is_trusted(self._peer[0], self._listener.nets):
            self._refuse("not a trusted proxy", "untrusted_peer")
            return
        self._listener.pending.add(self)
        self._timer = asyncio.get_running_loop().call_later(
            self._listener.timeout, self._refuse,
            f"no PROXY header within {self._listener.timeout:g} s", "header_timeout")

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buf += data
        result = parse(self._buf[:MAX_HEADER])
        if isinstance(result, NeedMore):
            return
        if isinstance(result, ProxyError):
            self._refuse(result.reason, "bad_header")
            return
        self._finish()
        client = result.source if not result.local and result.source else self._peer
        if self._transport is not None:
            self._listener.serve(self._transport, client, self._buf[result.length:])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done:  # the peer went away first (a balancer's plain TCP check)
            self._finish()
            self._listener.refusals["closed_before_header"] += 1
            log.debug("connection.closed_before_proxy_header", peer=_text(self._peer))

    def abort(self) -> None:
        self._refuse("the listener closed", "listener_closed")

    def _finish(self) -> None:
        self._done = True
        self._listener.pending.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, reason: str, code: str) -> None:
        if self._done:
            return
        self._finish()
        if self._transport is not None:
            self._transport.abort()
        self._listener.refused(self._peer, f"proxy protocol: {reason}", code)


# why a connection was closed before SSH: a peer outside trusted_proxies, no header in time, a
# malformed or unsupported header, a peer (a balancer's TCP check) that went away before its
# header, and connections still waiting for one when the listener closed
REFUSAL_CODES = ("untrusted_peer", "header_timeout", "bad_header", "closed_before_header",
                 "listener_closed")


def _text(peer: Address) -> str:
    return f"{peer[0]}:{peer[1]}"


class ProxyListener:
    """The listening server; what ``asyncssh.SSHAcceptor`` offers the broker (``get_port``,
    ``close``, ``wait_closed``). ``refusals`` counts closed connections in this process by a
    bounded code (``REFUSAL_CODES``: the metrics' label values; the audit has the whole reason)."""

    def __init__(self, server_factory: ServerFactory,
                 options: asyncssh.SSHServerConnectionOptions, trusted_proxies: Sequence[str],
                 header_timeout: float, on_refused: Callable[[str, str], None],
                 serve: Callable[[asyncio.Transport, Any, bytes], object]) -> None:
        self._factory = server_factory
        self._options = options
        self.nets = networks(tuple(trusted_proxies))
        self.timeout = header_timeout
        self._on_refused = on_refused
        self._serve = serve
        self._server: asyncio.Server | None = None
        self.pending: set[HeaderProtocol] = set()
        self.refusals: collections.Counter[str] = collections.Counter()

    async def listen(self, host: str, port: int, *, reuse_port: bool) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HeaderProtocol(self), host or None, port, backlog=100,
            reuse_address=True, reuse_port=reuse_port)

    def get_port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1]) if self._server else 0

    def close(self) -> None:
        """Stop accepting; connections past their header go on (as with asyncssh's)."""
        if self._server is not None:
            self._server.close()
        for proto in list(self.pending):
            proto.abort()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    def serve(self, transport: asyncio.Transport, client: Address, first: bytes) -> None:
        # the options copied with this connection's server object (asyncssh's own way)
        options = asyncssh.SSHServerConnectionOptions(
            self._options, server_factory=lambda: self._factory(client))
        self._serve(transport, options, first)

    def refused(self, peer: Address, reason: str, code: str) -> None:
        self.refusals[code] += 1
        log.info("connection.refused", peer=_text(peer), reason=reason)
        self._on_refused(_text(peer), reason)


async def start_proxy_listener(
    host: str, port: int, *, reuse_port: bool, server_factory: ServerFactory,
    trusted_proxies: Sequence[str], header_timeout: float,
    on_refused: Callable[[str, str], None], **options: Any,
) -> ProxyListener:
    """Listen with the PROXY protocol; ``options`` are ``asyncssh.create_server``'s."""
    serve = patches.transport_server()
    if serve is None:
        why = "; ".join(patches.problems()) or "stock asyncssh requested"
        raise ConfigError("[ssh] proxy_protocol needs the asyncssh patches (asyncssh "
                          f"{patches.TESTED_VERSION}), which are off: {why}")
    opts = asyncssh.SSHServerConnectionOptions(**options)  # once: each connection copies it
    listener = ProxyListener(server_factory, opts, trusted_proxies, header_timeout, on_refused,
                             serve)
    await listener.listen(host, port, reuse_port=reuse_port)
    return listener
