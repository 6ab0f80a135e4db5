"""Recorded ProxyJump: ``ssh -J bastion TARGET`` sessions are terminated here and relayed.

A client's direct-tcpip channel to port 22 of a granted Linux target (``ssh -J``, ``scp -J``,
``sftp -J``, rsync over ``ssh -J``, VS Code Remote-SSH) is not passed through as opaque bytes:
the broker serves the inner SSH connection itself (over an in-memory transport pair, ``memlink``,
or a socketpair when the asyncssh patches are off: ``broker.ssh.patches.server_link``),
with a host certificate for the target's names signed by its host CA (users trust it with the one
``@cert-authority`` line of ``bastion-broker ca known-hosts``). The inner login needs no second
authentication: the outer connection already proved password + code, and the channel was
checked against a live grant.
Each inner session then goes through the same recorded relay as ``ssh user+target@bastion``.
Forwards inside the inner connection (``-L``/``-D``/``-W``; VS Code Remote-SSH reaches its
server so) may go only to the target's own loopback, opened from the target
(``broker.ssh.via_target``) and recorded as tunnels; remote, agent and X11 forwarding stay off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import structlog

from broker.config import BrokerConfig
from broker.domain.models import Instance, Principal
from broker.ssh import patches, via_target
from broker.ssh.keys import load_or_create_key
from broker.ssh.refusals import ForwardRefusingServer
from broker.ssh.relay import ClientSession, ConnectionSessions, RelayDeps

log = structlog.get_logger("broker.jump")

HOST_CERT_TTL = timedelta(hours=1)
CLOCK_SKEW = timedelta(minutes=5)
_keys: dict[Path, asyncssh.SSHKey] = {}
# (inner connection, links=, host=, port=) -> what connection_requested returns
# (``tunnel.open_from_target``)
Forward = Callable[..., Any]
# the id of the outer ``jump`` session carrying the inner connection, read when an inner session
# starts (the outer session is written before the channel opens, so before any inner session)
ParentId = Callable[[], str | None]


def host_ca_path(config: BrokerConfig) -> Path:
    return config.state_dir / "ca" / "host_ca"


def _key(path: Path, comment: str) -> asyncssh.SSHKey:
    if path not in _keys:
        _keys[path] = load_or_create_key(path, comment)
    return _keys[path]


def host_ca(config: BrokerConfig) -> asyncssh.SSHKey:
    """The host CA that signs the broker's stand-in host certificates (created on first use).

    Ed25519, unlike the user CA: only clients verify it, once per connection, where the CPU does
    not matter, and clients hardened to refuse NIST curves must still accept it."""
    return _key(host_ca_path(config), "bastion-broker host CA")


def jump_patterns(instances: Iterable[Instance]) -> list[str]:
    """The names the host CA vouches for: every Linux instance's id and name (``ssh -J``
    reaches Linux targets only)."""
    return sorted({n for i in instances if i.os == "linux" for n in (i.id, i.name)})


def known_hosts_line(config: BrokerConfig, patterns: list[str]) -> str:
    """The ``@cert-authority`` line users add to known_hosts to accept recorded ProxyJump."""
    pub = host_ca(config).export_public_key().decode().strip()
    return f"@cert-authority {','.join(patterns) or '*'} {pub}"


def host_certificate(config: BrokerConfig, names: list[str], now: datetime,
                     ) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
    """The broker's host key with a short certificate naming the target as the client typed it."""
    key = _key(config.host_key_path, "bastion-broker host key")
    cert = host_ca(config).generate_host_certificate(
        key, f"bastion-broker jump {names[0]}", principals=names,
        valid_after=int((now - CLOCK_SKEW).timestamp()),
        valid_before=int((now + HOST_CERT_TTL).timestamp()))
    return key, cert


class JumpServer(ForwardRefusingServer):
    """The inner connection: no authentication of its own, sessions relayed and recorded."""

    _principal: Principal
    _instance: Instance

    def __init__(self, deps: RelayDeps, principal: Principal, instance: Instance,
                 peer: str, forward: Forward, parent: ParentId) -> None:
        self._deps = deps
        self._parent = parent
        self._principal = principal
        self._instance = instance
        self._peer = peer
        self._forward = forward
        self._links = via_target.TargetLinks(deps, principal, instance)
        self._conn: asyncssh.SSHServerConnection | None = None
        self._sessions = ConnectionSessions(deps)  # [limits] max_sessions_per_*

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        self._links.close()  # forwards from the target end with the inner connection

    def begin_auth(self, username: str) -> bool:
        return False  # the outer connection authenticated the user; the grant was checked

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[bytes], ClientSession]:
        if self._conn is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "not ready")
        release = self._sessions.take(self._principal, self._instance.id, self._peer)
        chan = self._conn.create_server_channel(
            encoding=None, window=self._deps.config.ssh.window_bytes,
            max_pktsize=self._deps.config.ssh.max_packet_bytes)
        return chan, ClientSession(self._deps, self._principal, self._instance, self._peer,
                                   on_close=release, parent_id=self._parent())

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        """``ssh -L``/``-D``/``-W`` inside this connection: the target's own loopback only."""
        if self._conn is None:
            return False
        return self._forward(self._conn, links=self._links, host=dest_host, port=dest_port)


async def start_inner(deps: RelayDeps, principal: Principal, instance: Instance, peer: str,
                      names: list[str], protocol: asyncio.Protocol, forward: Forward,
                      parent: ParentId, failed: Callable[[str], None],
                      ) -> tuple[asyncio.Transport, asyncio.Task[None]]:
    """A transport for ``protocol`` (the tunnel's end) whose other end serves the inner SSH
    connection in the background (``patches.server_link``: an in-memory pair, or a socketpair
    on stock asyncssh); ``forward`` answers its direct-tcpip requests, ``parent`` names the
    outer session for the inner ones.

    An inner connection that the client ends (disconnect, or its side closed) is closed
    gracefully, so the tunnel sees an orderly end ("closed by client"); ``failed(reason)`` is
    told first when it ended otherwise (say, the login grace ran out)."""
    ssh = deps.config.ssh
    key, cert = host_certificate(deps.config, names, deps.clock.now())
    transport, end = await patches.server_link(protocol)

    async def run() -> None:
        conn: asyncssh.SSHServerConnection | None = None
        clean = False
        try:
            conn = await end.run_server(
                server_factory=lambda: JumpServer(deps, principal, instance, peer, forward,
                                                  parent),
                server_host_keys=[(key, cert)], kex_algs=ssh.kex_algs,
                encryption_algs=ssh.ciphers, mac_algs=ssh.macs, compression_algs=["none"],
                login_timeout=ssh.login_grace_seconds, agent_forwarding=False,
                x11_forwarding=False, allow_pty=True, line_editor=False,
                server_version="bastion-broker")
            await conn.wait_closed()
            clean = True
        except (OSError, asyncssh.Error) as exc:
            log.info("jump.inner_ended", user=str(principal), target=instance.id,
                     error=str(exc))
            if not _client_ended(exc):
                failed(str(exc) or type(exc).__name__)
        finally:
            # after an orderly end the transport closes itself: aborting it as well would
            # reach the tunnel as a reset (it did: jump connections read "target error")
            if conn is not None and not clean:
                conn.abort()
            end.close()

    return transport, asyncio.get_running_loop().create_task(run())


def _client_ended(exc: Exception) -> bool:
    """The client went away (its connection lost, or a disconnect it sent), not a failure."""
    if isinstance(exc, asyncssh.ConnectionLost):
        return "timeout" not in str(exc).lower()  # asyncssh's login timeout is one too
    if isinstance(exc, ConnectionError):
        return True
    return isinstance(exc, asyncssh.DisconnectError) and exc.code == asyncssh.DISC_BY_APPLICATION
