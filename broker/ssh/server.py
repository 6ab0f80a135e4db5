"""The client-facing SSH server: one keyboard-interactive exchange, then one channel per session.

Authentication asks "Password:" then "Verification code:" in one keyboard-interactive exchange
(asyncssh never sends partial success, so the second prompt is chained from the first answer).
The target in the user name is decided at authentication; the decision is re-checked when each
session starts, and no upstream connection is opened without a live grant.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncssh
import structlog
from asyncssh.auth import KbdIntChallenge, KbdIntResponse

from broker.config import LimitsSettings, SSHSettings
from broker.domain import forwarding as fwd
from broker.domain.models import Instance, Principal
from broker.domain.ratelimit import SourceGuard
from broker.domain.selector import Selector, SelectorError, parse_selector
from broker.errors import AuditError
from broker.ports import KeyStore
from broker.services.auth import Authenticator
from broker.ssh import patches, proxy, usernames
from broker.ssh.menu import MenuSession
from broker.ssh.patches.handshakes import received_before_auth
from broker.ssh.refusals import ForwardRefusingServer
from broker.ssh.relay import ClientSession, ConnectionSessions, RelayDeps
from broker.ssh.tunnel import open_from_target, open_tunnel
from broker.ssh.via_target import TargetLinks

log = structlog.get_logger("broker.ssh")
# audit events for connections asyncssh drops over their user name, in this process
# audit events of refused and dropped connections, at a bounded rate (a flood cannot fill the disk)
_REFUSALS = usernames.RefusalLimiter()

PASSWORD_PROMPT = "Password: "  # noqa: S105 - a prompt, not a password
CODE_PROMPT = "Verification code: "
ENROL_PROMPT = "Verification code from the new authenticator: "


def enrolment_text(secret: str, uri: str) -> str:
    """Self-enrolment instructions. OpenSSH shows them escaped to ASCII and cut at about 1 KB,
    so they carry the secret and the otpauth URI, not a QR code."""
    return (f"No authenticator is enrolled for you yet. Add this key to your authenticator "
            f"app, then type the code it shows.\nKey: {secret}\n{uri}\n")


class PreKex:
    """A listener's admitted connections that have not asked to authenticate yet (key exchange
    not done), oldest first. At ``max_startups`` a new connection takes the place of the stalest
    of them, so stalled connections cannot keep real logins out; each is also closed after
    ``[ssh] kex_grace_seconds``. Connections in authentication keep the login grace.

    The stalest that has sent no more than a version line goes first: a client in the middle of
    its key exchange (its KEXINIT alone is over a KiB) is not cut for a flood's sake while
    stalled ones are left (without the asyncssh patches, which count the bytes: the stalest)."""

    PROGRESS = 256  # bytes: more than a version line (at most 255 bytes, RFC 4253)

    def __init__(self) -> None:
        self._conns: dict[BrokerConnection, None] = {}  # insertion order: oldest first

    def add(self, conn: BrokerConnection) -> None:
        self._conns[conn] = None

    def discard(self, conn: BrokerConnection) -> None:
        self._conns.pop(conn, None)

    def stalest(self) -> BrokerConnection | None:
        oldest = None
        for conn in self._conns:
            if received_before_auth(conn._conn) <= self.PROGRESS:
                return conn
            oldest = oldest or conn
        return oldest

    def __len__(self) -> int:
        return len(self._conns)


class BrokerConnection(ForwardRefusingServer):
    def __init__(self, deps: RelayDeps, authenticator: Authenticator, guard: SourceGuard,
                 keys: KeyStore, prekex: PreKex | None = None,
                 client: tuple[str, int] | None = None) -> None:
        self._deps = deps
        self._client = client  # from a PROXY protocol header (broker.ssh.proxy)
        self._auth = authenticator
        self._guard = guard
        self._counted = False  # admitted and still unauthenticated in the guard's books
        self._prekex = prekex if prekex is not None else PreKex()
        self._kex_timer: asyncio.TimerHandle | None = None  # armed until the first auth request
        self._sessions = ConnectionSessions(deps)  # open sessions to targets ([limits])
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer = "?"
        self._ip = "?"
        self._selector: Selector | None = None
        self._links: TargetLinks | None = None  # forwards from the target (user+target login)
        self._password: str | None = None
        self._phase = "password"
        self._key_fp: str | None = None  # SHA256 fingerprint of a proven registered key
        self._enrol: tuple[Principal, str] | None = None
        self._keys = keys
        self._principal: Principal | None = None
        self._instance: Instance | None = None
        self._allowed = False
        self._failures = 0
        self._max_failures = deps.config.limits.max_auth_failures_per_connection
        self._own: frozenset[tuple[str, int]] = frozenset()  # this bastion's listeners
        self._keys_offered = False  # [identity] public_keys, if the asyncssh patches are on

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        # the one place the client's address is taken: behind a load balancer the PROXY
        # header's, else the socket's; guard, audit, sessions and re-auth all use these two
        peer = self._client or conn.get_extra_info("peername")
        self._ip = str(peer[0]) if peer else "?"
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        now = time.monotonic()
        admission = self._guard.admit(self._ip, now)
        if not admission.allowed and "(max_startups)" in admission.reason:
            stalest = self._prekex.stalest()  # the new one takes the stalest pre-kex one's place
            if stalest is not None:
                stalest._drop_pre_kex("replaced by a newer connection at max_startups")
                admission = self._guard.admit(self._ip, now)
        if not admission.allowed:
            log.info("connection.refused", peer=self._peer, reason=admission.reason)
            self._audit_connection("connection.refused", admission.reason)
            conn.abort()
            return
        self._counted = True
        self._prekex.add(self)
        self._kex_timer = asyncio.get_running_loop().call_later(
            self._deps.config.ssh.kex_grace_seconds, self._kex_expired)
        self._own = own_endpoints(self._deps, conn.get_extra_info("sockname"))
        if self._deps.config.identity.public_keys:  # without the asyncssh patches: not offered
            self._keys_offered = patches.on_key_proven(conn, self._key_proven)

    def _audit_connection(self, event: str, reason: str) -> None:
        """A connection refused or dropped before it could log in, audited at a bounded rate
        across connections (the count of those left out goes with the next one)."""
        dropped = _REFUSALS.take()
        if dropped is None:
            return
        try:
            self._deps.audit.emit(event, peer=self._peer, reason=reason,
                                  suppressed=dropped or None)
        except AuditError as exc:
            log.error("audit.write_failed", event=event, error=str(exc))

    def _audit_illegal_name(self, reason: str) -> None:
        """asyncssh dropped the connection for a user name it cannot prepare (a NUL or control
        byte, invalid UTF-8, too long): audited, at a bounded rate across connections."""
        dropped = _REFUSALS.take()
        if dropped is None:
            return
        raw = patches.raw_username(self._conn)
        try:
            self._deps.audit.emit(
                "connection.refused", peer=self._peer, reason=f"illegal user name: {reason}",
                user_as_sent=usernames.escape_name(raw) if raw is not None else None,
                suppressed=dropped or None)
        except AuditError as exc:
            log.error("audit.write_failed", event="connection.refused", error=str(exc))

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self._guard.left_unauthenticated(self._ip)

    def _kex_done(self) -> None:
        """Out of the pre-kex table (and its timer): it asked to authenticate, or it closed."""
        if self._kex_timer is not None:
            self._kex_timer.cancel()
            self._kex_timer = None
        self._prekex.discard(self)

    def _drop_pre_kex(self, reason: str) -> None:
        self._kex_done()
        self._uncount()  # at once: the slot is free for the connection that replaces it
        log.info("connection.dropped_before_kex", peer=self._peer, reason=reason)
        self._audit_connection("connection.dropped", reason)
        if self._conn is not None:
            self._conn.abort()

    def _kex_expired(self) -> None:
        self._kex_timer = None
        self._drop_pre_kex("no key exchange within kex_grace_seconds")

    def auth_completed(self) -> None:
        self._uncount()

    def connection_lost(self, exc: Exception | None) -> None:
        self._kex_done()
        self._uncount()
        if isinstance(exc, asyncssh.IllegalUserName):
            self._audit_illegal_name(str(exc))
        if self._links is not None:
            self._links.close()
        if exc is not None and self._principal is None:
            log.info("connection.closed_before_auth", peer=self._peer, error=str(exc))

    def begin_auth(self, username: str) -> bool:
        self._kex_done()  # key exchange is over; the login grace runs on
        try:
            self._selector = parse_selector(username)
        except SelectorError as exc:
            self._selector = None
            log.info("auth.bad_selector", peer=self._peer, reason=str(exc))
        self._check_name(username)
        return True  # always authenticate: a bad name must look like a bad password

    def _check_name(self, username: str) -> None:
        """The name as sent next to the name asyncssh prepared (``broker.ssh.usernames``): a
        name SASLprep changed is audited, and refused (a failed login) unless configured."""
        raw = patches.raw_username(self._conn)
        why = usernames.refusal(raw, username, self._deps.config.identity.normalize_names)
        if why is None and (raw is None or raw == username.encode("utf-8")):
            return
        fields = {"peer": self._peer, "user": username,
                  "user_as_sent": usernames.escape_name(raw) if raw is not None else None}
        if why is not None:
            self._selector = None  # refused like a wrong password: same prompts, same work
            event, fields = "auth.username_refused", {**fields, "reason": why}
        else:
            event = "auth.username_normalized"
        try:
            self._deps.audit.emit(event, **fields)
        except AuditError as exc:
            self._selector = None  # fail closed: not audited, not accepted
            log.error("audit.write_failed", event=event, error=str(exc))

    # -- public key: proves possession of a registered key, then keyboard-interactive asks
    #    only for the code (asyncssh cannot send partial success, so the key "fails" once proven)
    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return self._keys_offered

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        sel = self._selector
        if sel is None or self._key_fp is not None:
            return False
        account = self._auth.account_of(sel.username, sel.domain)
        return await self._keys.has(account, key.get_fingerprint("sha256"))

    async def _key_proven(self, fp: str) -> bool:
        """A signature verified with the accepted key ``fp`` (``patches.on_key_proven``)."""
        sel = self._selector
        if sel is not None and await self._auth.reauth_allowed(
                sel.username, sel.domain, self._ip, fp):
            return await self._finish_login(
                await self._auth.login_within_window(
                    sel.username, sel.domain, None, self._peer, fp))
        self._key_fp = fp  # proven: keyboard-interactive will ask for the code only
        return False

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> KbdIntChallenge:
        self._password = None
        self._enrol = None
        if self._key_fp is not None:
            self._phase = "code-only"
            return "", "", "", [(CODE_PROMPT, False)]
        self._phase = "password"
        return "", "", "", [(PASSWORD_PROMPT, False)]

    async def validate_kbdint_response(
        self, username: str, responses: KbdIntResponse
    ) -> KbdIntChallenge:
        answer = responses[0] if len(responses) == 1 else ""
        sel = self._selector
        if self._phase == "password":
            self._password = answer
            if sel is not None and await self._auth.reauth_allowed(
                    sel.username, sel.domain, self._ip, None):
                return await self._finish_login(await self._auth.login_within_window(
                    sel.username, sel.domain, answer, self._peer, None))
            self._phase = "code"
            return "", "", "", [(CODE_PROMPT, False)]
        if self._phase == "enrol" and self._enrol is not None:
            principal, secret = self._enrol
            self._enrol = None
            return await self._finish_login(
                await self._auth.complete_enrolment(principal, secret, answer, self._peer))
        password, self._password = self._password, None
        if sel is None:
            # malformed user name: same work as a real attempt, then refuse
            await self._auth.login("\x00invalid", None, password or "x", answer, self._peer)
            return await self._finish_login(None)
        key_fp = self._key_fp if self._phase == "code-only" else None
        result = await self._auth.login(sel.username, sel.domain, password, answer,
                                        self._peer, key_fp=key_fp)
        if result.enrol_secret is not None and result.principal is not None:
            self._enrol = (result.principal, result.enrol_secret)
            self._phase = "enrol"
            text = enrolment_text(result.enrol_secret, result.enrol_uri or "")
            return "Set up your authenticator", text, "", [(ENROL_PROMPT, False)]
        return await self._finish_login(result.principal)

    async def _finish_login(self, principal: Principal | None) -> bool:
        """Count a failure (and maybe end the connection), or decide the target once."""
        if principal is None:
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
            return False
        self._principal = principal
        sel = self._selector
        if sel is not None and sel.target is not None:
            result = await self._deps.access.decide(principal, sel.target)
            self._instance = result.instance
            self._allowed = result.decision.allowed
            if not self._allowed:
                self._deps.audit.emit(
                    "access.denied", user=str(principal), target=sel.target, peer=self._peer,
                    reason=result.decision.reason,
                )
        return True

    def session_requested(self) -> tuple[asyncssh.SSHServerChannel[bytes],
                                         MenuSession | ClientSession]:
        sel = self._selector
        if self._conn is None or self._principal is None or sel is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "not authenticated")
        if sel.target is None:  # the menu; each pick takes a place in the limits then
            chan = self._conn.create_server_channel(
                encoding=None, window=self._deps.config.ssh.window_bytes,
                max_pktsize=self._deps.config.ssh.max_packet_bytes)
            return chan, MenuSession(self._deps, self._principal, self._peer, self._sessions)
        if not self._allowed or self._instance is None:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"no access to {sel.target}"
            )
        if self._instance.os == "windows":  # its port is RDP's: say what works instead
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"{sel.target} is a Windows host: no SSH session there; open an RDP tunnel "
                f"instead (ssh -N -L 13389:{self._instance.name}:3389 ...) and point the RDP "
                "client at localhost:13389")
        release = self._sessions.take(self._principal, sel.target, self._peer)
        chan = self._conn.create_server_channel(
            encoding=None,
            window=self._deps.config.ssh.window_bytes,
            max_pktsize=self._deps.config.ssh.max_packet_bytes,
        )
        return chan, ClientSession(self._deps, self._principal, self._instance, self._peer,
                                   on_close=release)


    # -- forwarding: ssh -L / -D are policy-checked tunnels; -R and streamlocal are refused ----
    # (after a ``user+target`` login, -L/-D to localhost go to the target's own loopback)
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> tuple[asyncssh.SSHTCPChannel[bytes], Any]:
        if self._conn is None or self._principal is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "not authenticated")
        if self._instance is not None and fwd.names_loopback(dest_host):
            # logged in as alice+web01: "localhost" is web01's, as with ssh straight to web01
            if self._links is None:
                self._links = TargetLinks(self._deps, self._principal, self._instance)
            return open_from_target(self._deps, self._conn, self._principal, self._peer,
                                    self._links, dest_host, dest_port)
        return open_tunnel(self._deps, self._conn, self._principal, self._peer, dest_host,
                           dest_port, self._own)


def own_endpoints(deps: RelayDeps, sockname: Any) -> frozenset[tuple[str, int]]:
    """This bastion's own listeners (SSH, web, diagnostics), which a tunnel must never reach."""
    cfg = deps.config
    own: set[tuple[str, int]] = set()
    ports = {cfg.ssh.listen_port} | ({cfg.web.listen_port} if cfg.web.enabled else set())
    if cfg.diag.enabled and cfg.diag.listen_port:  # one per worker (broker/diag/server.py)
        workers = cfg.ssh.workers or os.cpu_count() or 1
        ports |= set(range(cfg.diag.listen_port, cfg.diag.listen_port + workers))
    if sockname:
        own.add((str(sockname[0]), int(sockname[1])))
        ports.add(int(sockname[1]))
    hosts = {"127.0.0.1", "::1", "localhost", cfg.ssh.listen_host, cfg.web.listen_host,
             cfg.diag.listen_host}
    if sockname:
        hosts.add(str(sockname[0]))
    own.update((h, p) for h in hosts for p in ports if p)
    return frozenset(own)


def _guard_limits(limits: LimitsSettings) -> dict[str, Any]:
    return {
        "max_startups": limits.max_startups,
        "max_startups_per_source": limits.max_startups_per_source,
        "penalty_after": limits.source_penalty_after,
        "penalty_window": limits.source_penalty_window_seconds,
        "penalty_seconds": limits.source_penalty_seconds,
        "penalty_max_seconds": limits.source_penalty_max_seconds,
        "exempt": limits.penalty_exempt,
    }


def source_guard(limits: LimitsSettings) -> SourceGuard:
    return SourceGuard(**_guard_limits(limits))


def configure_guard(guard: SourceGuard, limits: LimitsSettings) -> None:
    """``[limits]`` again (a reload): the guard keeps its counts and penalties."""
    guard.configure(**_guard_limits(limits))


async def start_server(
    deps: RelayDeps, authenticator: Authenticator, keys: KeyStore, host_key: asyncssh.SSHKey,
    host: str, port: int, *, reuse_port: bool = False, guard: SourceGuard | None = None,
) -> asyncssh.SSHAcceptor | proxy.ProxyListener:
    """The listener. ``guard`` (default: one from ``[limits]``) is shared by every connection;
    pass one to change its limits later (``configure_guard``)."""
    ssh = deps.config.ssh
    guard = guard or source_guard(deps.config.limits)
    prekex = PreKex()
    options = _server_options(ssh, host_key)
    if ssh.proxy_protocol:  # behind a load balancer; the default path below is untouched
        def refused(peer: str, reason: str) -> None:
            _audit_refusal(deps, peer, reason)

        return await proxy.start_proxy_listener(
            host, port, reuse_port=reuse_port,
            server_factory=lambda client: BrokerConnection(deps, authenticator, guard, keys,
                                                           prekex, client),
            trusted_proxies=ssh.trusted_proxies,
            header_timeout=ssh.proxy_header_timeout_seconds, on_refused=refused, **options)
    return await asyncssh.create_server(
        lambda: BrokerConnection(deps, authenticator, guard, keys, prekex),
        host,
        port,
        reuse_address=True,
        reuse_port=reuse_port,
        **options,
    )


def _server_options(ssh: SSHSettings, host_key: asyncssh.SSHKey) -> dict[str, Any]:
    return dict(
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
    )


def _audit_refusal(deps: RelayDeps, peer: str, reason: str) -> None:
    """A connection the PROXY protocol listener closed, audited at the refusals' bounded rate."""
    dropped = _REFUSALS.take()
    if dropped is None:
        return
    try:
        deps.audit.emit("connection.refused", peer=peer, reason=reason,
                        suppressed=dropped or None)
    except AuditError as exc:
        log.error("audit.write_failed", event="connection.refused", error=str(exc))
