"""Run the API on its own listener next to the SSH server (TLS when cert and key are given)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import structlog
from aiohttp import web

from broker.config import BrokerConfig, RoleSettings, WebSettings
from broker.ports import AuditSink, Clock, TokenStore
from broker.services.account_check import AccountChecker
from broker.services.auth import Authenticator
from broker.services.fleet import FleetWatch
from broker.services.grants import GrantService
from broker.services.live import Follow, LiveService
from broker.services.locks import LockService
from broker.services.notify import Dispatcher
from broker.services.review import ReviewService
from broker.web.api import WebContext, create_app
from broker.web.known_hosts import KnownHosts, TrustLoader
from broker.web.listener import GuardedListener
from broker.web.protocol_errors import json_errors
from broker.web.signing import SessionSigner, load_or_create_key

log = structlog.get_logger("broker.web")


class WebServer:
    def __init__(self, ctx: WebContext, settings: WebSettings,
                 on_close: Callable[[], None] | None = None) -> None:
        self._ctx = ctx
        self._settings = settings
        self._on_close = on_close
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.listener: GuardedListener | None = None  # connection limits and their counts
        self.url: str | None = None

    def reconfigure(self, roles: RoleSettings, auto_approve_groups: tuple[str, ...]) -> None:
        """Reloaded ``[roles]`` and ``[grants]`` groups, for the requests that start from now
        (the listener, TLS files and cookies stay until a restart)."""
        self._ctx.roles = roles
        self._ctx.auto_approve_groups = auto_approve_groups

    def use_locks(self, locks: LockService) -> None:
        """Serve the kill and lock routes (``broker.web.locks_api``); before ``start``."""
        self._ctx.locks = locks

    def use_notify(self, dispatcher: Dispatcher) -> None:
        """Serve the delivery log (``broker.web.notify_api``); before ``start``."""
        self._ctx.notify = dispatcher

    def use_fleet(self, watch: FleetWatch) -> None:
        """Serve the bastions' heartbeats (``broker.web.fleet_api``); before ``start``."""
        self._ctx.fleet = watch

    def use_live(self, follow: Follow) -> None:
        """Serve the live view (``broker.web.live_api``) from recordings ``follow`` opens on
        this bastion; before ``start``."""
        if self._ctx.review is not None:
            self._ctx.live = LiveService(self._ctx.review, follow, self._ctx.audit,
                                         self._ctx.clock)

    async def start(self) -> str:
        """Listen; returns the base URL actually bound (port 0 picks a free one)."""
        s = self._settings
        tls: ssl.SSLContext | None = None
        if s.cert_file and s.key_file:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            tls.load_cert_chain(s.cert_file, s.key_file)
        runner = web.AppRunner(create_app(self._ctx), access_log=None,
                               handle_signals=False, shutdown_timeout=2.0,
                               keepalive_timeout=s.keepalive_timeout_seconds)
        await runner.setup()
        server = runner.server
        assert server is not None  # noqa: S101 - set by setup()
        # aiohttp's protocol behind the limits of [web] (header/body timeouts, connection caps)
        listener = GuardedListener(s, json_errors(server))
        try:
            self._server = await asyncio.get_running_loop().create_server(
                listener, s.listen_host, s.listen_port, ssl=tls, reuse_address=True,
                ssl_handshake_timeout=s.header_timeout_seconds if tls else None)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.listener = listener
        port = 0
        for sock in self._server.sockets:
            port = int(sock.getsockname()[1])
            break
        host = s.listen_host if ":" not in s.listen_host else f"[{s.listen_host}]"
        self.url = f"{'https' if tls else 'http'}://{host}:{port}"
        log.info("web.listening", url=self.url)
        return self.url

    async def start_or_warn(self) -> str | None:
        """Start, but keep the SSH service up if the API cannot listen (port taken, bad TLS
        files): SSH access matters more, and the failure is logged and audited loudly."""
        try:
            return await self.start()
        except (OSError, ssl.SSLError) as exc:
            s = self._settings
            log.error("web.unavailable", host=s.listen_host, port=s.listen_port, error=str(exc))
            self._ctx.audit.emit("web.unavailable", listen=f"{s.listen_host}:{s.listen_port}",
                                 error=str(exc))
            return None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections; aiohttp ends the open ones below
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def web_server_for(config: BrokerConfig, grants: GrantService, authenticator: Authenticator,
                   audit: AuditSink, clock: Clock, tokens: TokenStore,
                   accounts: AccountChecker, review: ReviewService | None = None,
                   ssh_trust: TrustLoader | None = None) -> WebServer | None:
    """The API server for a broker, or None when ``[web] enabled = false``.

    API tokens and logged-out sessions live in the broker's store (shared by a fleet on
    PostgreSQL); cookies are signed with ``[web] signing_key_file`` (default STATE_DIR/web.key), which
    every bastion of a fleet must share.
    """
    if not config.web.enabled:
        return None
    ctx = WebContext(
        grants=grants, authenticator=authenticator, tokens=tokens,
        audit=audit, clock=clock, roles=config.roles, settings=config.web,
        signer=SessionSigner(load_or_create_key(config.web.signing_key_file
                                                or config.state_dir / "web.key")),
        accounts=accounts, auto_approve_groups=tuple(config.grants.auto_approve_read_only_groups),
        review=review,
        known_hosts=KnownHosts(ssh_trust, config.web.public_url) if ssh_trust else None,
    )
    return WebServer(ctx, config.web)
