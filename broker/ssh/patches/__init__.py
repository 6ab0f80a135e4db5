"""Everything in the broker that reaches into asyncssh's private internals, behind one gate.

The relay's speed comes from patches to asyncssh's per-packet path, and two features need hooks
asyncssh does not offer publicly. They live here, and nowhere else in ``broker/``:

* ``wire``: no SSH_MSG_IGNORE before every packet under AEAD ciphers, quiet packet-log hooks,
  printable-ASCII SASLprep fast path, level check before asyncssh formats log arguments,
  ``TCP_QUICKACK`` after small reads, ``corked()`` bursts in one ``writev``;
* ``gcm``: AES-GCM keyed once per key (``KeyedGCMEncryption``);
* ``datapath``: channel data framed, encrypted and opened in one pass each way;
* ``handshakes``: reads of connections still authenticating parsed in bounded slices;
* ``serve``: recorded ProxyJump's inner SSH server on an in-memory transport pair;
* ``pubkey``: a public-key login that proved its key continues with the code only;
* ``usernames``: the raw user name of a USERAUTH_REQUEST, before asyncssh's SASLprep;
* ``proxied``: the SSH server on a listener's transport after a PROXY protocol header.

``private`` lists every private asyncssh name they touch (object, attribute, why) and is the
only code that replaces any of them. ``install()`` is the gate: it installs every patch only
if ``asyncssh.__version__`` is ``TESTED_VERSION`` (pyproject pins it) and every name in that
table exists; otherwise it installs nothing, logs one ``asyncssh.patches_disabled`` warning
(found version, reason) and the broker runs on stock asyncssh: correct, only slower. The
public functions below are what the rest of the broker calls; with the gate closed each takes
asyncssh's stock path:

* ``corked()`` is an empty scope (every packet leaves with its own write, as asyncssh sends it);
* ``server_link()`` serves the ProxyJump inner connection with ``asyncssh.run_server`` on a
  socketpair (what the broker did before the in-memory pair: two system calls and kernel
  copies more per chunk);
* ``transport_server()`` returns None and ``[ssh] proxy_protocol`` is refused at start;
* ``on_key_proven()`` returns False and the broker does not offer public-key logins
  (``[identity] public_keys``): users log in with password and code.

``install(stock=True)`` forces the stock path (tests). For a broker in a subprocess (tests,
benchmarks comparing both paths), the environment variable ``BASTION_BROKER_STOCK_ASYNCSSH=1``
does the same; it is meant for nothing else. ``uninstall()`` puts asyncssh back as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any, Protocol

import asyncssh
import structlog

from broker.ssh.patches import private

TESTED_VERSION = "2.24.1"
STOCK_ENV = "BASTION_BROKER_STOCK_ASYNCSSH"
FALLBACK = ("stock asyncssh: slower relay, ProxyJump inner connections over a socketpair, "
            "no public-key logins")

_wire: ModuleType | None = None  # broker.ssh.patches.wire while the patches are installed


def problems() -> list[str]:
    """Why the gate is closed on this asyncssh; empty if the patches may be installed."""
    version = str(getattr(asyncssh, "__version__", "unknown"))
    if version != TESTED_VERSION:
        return [f"asyncssh {version} is not the tested {TESTED_VERSION}"]
    return private.missing()


def install(*, stock: bool | None = None) -> bool:
    """Install every patch, or none; True if they are in place afterwards. Idempotent.

    ``stock=True``: none (and any installed ones removed), as with the gate closed; ``None``:
    the ``BASTION_BROKER_STOCK_ASYNCSSH`` environment variable decides (tests, benchmarks)."""
    global _wire
    if stock is None:
        stock = os.environ.get(STOCK_ENV, "") not in ("", "0")
    if stock:
        reasons = [f"stock asyncssh requested ({STOCK_ENV} or install(stock=True))"]
    elif _wire is not None:
        return True
    else:
        reasons = problems()
    if not reasons:
        try:
            from broker.ssh.patches import service, usernames, wire

            wire.install()
            service.install()
            usernames.install()
        except Exception as exc:  # a private name the table does not describe well enough
            reasons = [f"installing failed: {exc!r}"]
        else:
            _wire = wire
            return True
    uninstall()
    # a logger per call: logged once per process start, under whatever configuration is current
    structlog.get_logger("broker.ssh.patches").warning(
        "asyncssh.patches_disabled", version=str(getattr(asyncssh, "__version__", "unknown")),
        tested=TESTED_VERSION, reason="; ".join(reasons), fallback=FALLBACK)
    return False


def uninstall() -> None:
    """Put asyncssh back as it was before ``install()``."""
    global _wire
    _wire = None
    private.restore()


def active() -> bool:
    """Whether the patches are installed."""
    return _wire is not None


def corked() -> AbstractContextManager[None]:
    """A scope whose packets leave in one ``writev`` per connection at its end (``wire``);
    with the patches off, an empty scope."""
    if _wire is None:
        return contextlib.nullcontext()
    cm: AbstractContextManager[None] = _wire.corked()
    return cm


class ServerEnd(Protocol):
    """The far end of a ``server_link``: an SSH server runs on it when asked."""

    async def run_server(self, **options: Any) -> asyncssh.SSHServerConnection:
        """``asyncssh.run_server``'s keyword options; returns once the client authenticated,
        raises (nothing left open but this end) if the handshake fails."""
        ...

    def close(self) -> None:
        """Close this end (after the connection, or instead of it)."""
        ...


class _SocketEnd:
    """Stock: one end of a socketpair, served by ``asyncssh.run_server``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def run_server(self, **options: Any) -> asyncssh.SSHServerConnection:
        return await asyncssh.run_server(self._sock, **options)

    def close(self) -> None:
        self._sock.close()


async def server_link(protocol: asyncio.Protocol) -> tuple[asyncio.Transport, ServerEnd]:
    """A transport for ``protocol`` joined to an end that can serve an SSH connection: an
    in-memory pair with the patches (``serve``), a socketpair and ``asyncssh.run_server``
    without them."""
    if _wire is not None:
        from broker.ssh.patches.serve import memory_link

        return memory_link(protocol)
    ours, theirs = socket.socketpair()
    try:
        transport, _ = await asyncio.get_running_loop().create_connection(
            lambda: protocol, sock=ours)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    return transport, _SocketEnd(theirs)


def transport_server() -> Callable[[asyncio.Transport, Any, bytes], object] | None:
    """What serves SSH on a listener's transport after its PROXY protocol header
    (``proxied``: ``(transport, SSHServerConnectionOptions, bytes after the header)``); None
    with the patches off (the broker then refuses ``[ssh] proxy_protocol``)."""
    if _wire is None:
        return None
    from broker.ssh.patches.proxied import serve_transport

    return serve_transport


def raw_username(conn: asyncssh.SSHServerConnection | None) -> bytes | None:
    """The user name of the connection's last USERAUTH_REQUEST as the client sent it, before
    asyncssh's SASLprep (``usernames``); None with the patches off (the broker then refuses
    any name that is not printable ASCII) or before a request."""
    if _wire is None or conn is None:
        return None
    from broker.ssh.patches.usernames import raw_username as raw

    return raw(conn)


def on_key_proven(conn: asyncssh.SSHServerConnection,
                  proven: Callable[[str], Awaitable[bool]]) -> bool:
    """After a public-key signature verified, ``proven(sha256 fingerprint)`` gives the result
    (``pubkey``). False if that cannot be done (patches off): then offer no public keys."""
    if _wire is None:
        return False
    from broker.ssh.patches.pubkey import on_key_proven as hook

    hook(conn, proven)
    return True
