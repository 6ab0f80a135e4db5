"""The client-facing SSH server: one keyboard-interactive exchange, then one channel per session.

Authentication asks "Password:" then "Verification code:" in one keyboard-interactive exchange
(asyncssh never sends partial success, so the second prompt is chained from the first answer).
The target in the user name is decided at authentication; the decision is re-checked when each
session starts, and no upstream connection is opened without a live grant.
"""

from __future__ import annotations

import asyncio
import time

import asyncssh
import structlog
from asyncssh.auth import KbdIntChallenge, KbdIntResponse

from broker.config import LimitsSettings
from broker.domain.models import Instance, Principal
from broker.domain.ratelimit import SourceGuard
from broker.domain.selector import Selector, SelectorError, parse_selector
from broker.services.auth import Authenticator
from broker.ssh.menu import MenuSession
from broker.ssh.relay import ClientSession, RelayDeps

log = structlog.get_logger("broker.ssh")

PASSWORD_PROMPT = "Password: "  # noqa: S105 - a prompt, not a password
CODE_PROMPT = "Verification code: "


class BrokerConnection(asyncssh.SSHServer):
    def __init__(self, deps: RelayDeps, authenticator: Authenticator, guard: SourceGuard) -> None:
        self._deps = deps
        self._auth = authenticator
        self._guard = guard
        self._counted = False  # admitted and still unauthenticated in the guard's books
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer = "?"
        self._ip = "?"
        self._selector: Selector | None = None
        self._password: str | None = None
        self._principal: Principal | None = None
        self._instance: Instance | None = None
        self._allowed = False
        self._failures = 0
        self._max_failures = deps.config.limits.max_auth_failures_per_connection

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self._ip = str(peer[0]) if peer else "?"
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        admission = self._guard.admit(self._ip, time.monotonic())
        if not admission.allowed:
            log.info("connection.refused", peer=self._peer, reason=admission.reason)
            conn.abort()
            return
        self._counted = True

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self._guard.left_unauthenticated(self._ip)

    def auth_completed(self) -> None:
        self._uncount()

    def connection_lost(self, exc: Exception | None) -> None:
        self._uncount()
        if exc is not None and self._principal is None:
            log.info("connection.closed_before_auth", peer=self._peer, error=str(exc))

    def begin_auth(self, username: str) -> bool:
        try:
            self._selector = parse_selector(username)
        except SelectorError as exc:
            self._selector = None
            log.info("auth.bad_selector", peer=self._peer, reason=str(exc))
        return True  # always authenticate: a bad name must look like a bad password

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> KbdIntChallenge:
        self._password = None
        return "", "", "", [(PASSWORD_PROMPT, False)]

    async def validate_kbdint_response(
        self, username: str, responses: KbdIntResponse
    ) -> KbdIntChallenge:
        if self._password is None:
            self._password = responses[0] if len(responses) == 1 else ""
            return "", "", "", [(CODE_PROMPT, False)]
        code = responses[0] if len(responses) == 1 else ""
        password, self._password = self._password, None
        ok = await self._login(password, code)
        if not ok:
            self._failures += 1
            verdict = self._guard.failed(self._ip, time.monotonic())
            if verdict.penalty_started:
                self._deps.audit.emit("source.penalised", peer=self._ip, reason=verdict.reason)
            if self._failures >= self._max_failures and self._conn is not None:
                conn = self._conn
                asyncio.get_running_loop().call_later(
                    0.05, conn.disconnect, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                    "Too many authentication failures",
                )
        return ok

    async def _login(self, password: str, code: str) -> bool:
        sel = self._selector
        if sel is None:
            # malformed user name: same work as a real attempt, then refuse
            await self._auth.login("\x00invalid", None, password or "x", code, self._peer)
            return False
        principal = await self._auth.login(sel.username, sel.domain, password, code, self._peer)
        if principal is None:
            return False
        self._principal = principal
        if sel.target is not None:
            result = await self._deps.access.decide(principal, sel.target)
            self._instance = result.instance
            self._allowed = result.decision.allowed
            if not self._allowed:
                self._deps.audit.emit(
                    "access.denied", user=str(principal), target=sel.target, peer=self._peer,
                    reason=result.decision.reason,
                )
        return True

    def session_requested(self) -> MenuSession | tuple[
            asyncssh.SSHServerChannel[bytes], ClientSession]:
        sel = self._selector
        if self._conn is None or self._principal is None or sel is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "not authenticated")
        if sel.target is None:
            return MenuSession(self._deps.access, self._principal)
        if not self._allowed or self._instance is None:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"no access to {sel.target}"
            )
        chan = self._conn.create_server_channel(
            encoding=None,
            window=self._deps.config.ssh.window_bytes,
            max_pktsize=self._deps.config.ssh.max_packet_bytes,
        )
        return chan, ClientSession(self._deps, self._principal, self._instance, self._peer)


def source_guard(limits: LimitsSettings) -> SourceGuard:
    return SourceGuard(
        max_startups=limits.max_startups,
        max_startups_per_source=limits.max_startups_per_source,
        penalty_after=limits.source_penalty_after,
        penalty_window=limits.source_penalty_window_seconds,
        penalty_seconds=limits.source_penalty_seconds,
        penalty_max_seconds=limits.source_penalty_max_seconds,
        exempt=limits.penalty_exempt,
    )


async def start_server(
    deps: RelayDeps, authenticator: Authenticator, host_key: asyncssh.SSHKey,
    host: str, port: int,
) -> asyncssh.SSHAcceptor:
    ssh = deps.config.ssh
    guard = source_guard(deps.config.limits)
    return await asyncssh.create_server(
        lambda: BrokerConnection(deps, authenticator, guard),
        host,
        port,
        server_host_keys=[host_key],
        kex_algs=ssh.kex_algs,
        encryption_algs=ssh.ciphers,
        mac_algs=ssh.macs,
        compression_algs=["none"],
        login_timeout=ssh.login_grace_seconds,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_pty=True,
        line_editor=False,  # the target's PTY does line editing; the broker relays raw bytes
        keepalive_interval=60,
        server_version="bastion-broker",
        reuse_address=True,
    )
