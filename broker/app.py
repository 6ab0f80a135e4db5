"""Composition root: the only place that picks adapters and wires them into services."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol

import asyncssh
import structlog

from broker import runtime
from broker.audit.jsonl import JsonlAuditLog
from broker.config import BrokerConfig
from broker.errors import AuditError, BrokerError, ConfigError, StoreError
from broker.identity.static import StaticDirectory
from broker.integrity.keys import (
    SigningKey,
    default_key_path,
    load_or_create_signing_key,
    load_signing_key,
)
from broker.integrity.manifest import RecordingSealer
from broker.inventory.static import StaticInventory
from broker.ports import (
    AuditSink,
    Clock,
    Directory,
    GrantStore,
    Inventory,
    KeyStore,
    ReauthStore,
    RecordingSink,
    SessionIndex,
    ThrottleStore,
    TokenStore,
    TotpStore,
)
from broker.recordings.diskguard import DiskGuard
from broker.recordings.local import LocalRecordingSink
from broker.recordings.repair import INTERRUPTED, Repaired, repair_interrupted
from broker.services.access import AccessService
from broker.services.auth import AccountPolicy, Authenticator, TotpPolicy, TotpSecondFactor
from broker.services.clock import SystemClock
from broker.services.enforcement import GrantEnforcer
from broker.services.grants import GrantService
from broker.services.roles import grant_policy
from broker.services.sessions import SessionService
from broker.services.totp_secrets import EncryptedTotpStore, load_key
from broker.shipping.service import Shipping
from broker.ssh import patches
from broker.ssh.ca import UserCA
from broker.ssh.jump import host_ca
from broker.ssh.keys import load_or_create_key, load_or_create_user_ca, parse_public_key
from broker.ssh.relay import RelayDeps
from broker.ssh.server import start_server
from broker.store.sqlite import (
    SqliteApiTokenStore,
    SqliteDatabase,
    SqliteGrantStore,
    SqliteKeyStore,
    SqliteReauthStore,
    SqliteSessionIndex,
    SqliteThrottleStore,
    SqliteTotpStore,
)

log = structlog.get_logger("broker.app")


@dataclass
class Stores:
    """The state a broker or the CLI works on, whichever backend holds it."""

    grants: GrantStore
    totp: TotpStore
    throttle: ThrottleStore
    keys: KeyStore
    reauth: ReauthStore
    tokens: TokenStore
    sessions: SessionIndex
    recordings: RecordingSink
    audit: AuditLog
    clock: Clock
    closer: Callable[[], Awaitable[None]]

    async def close(self) -> None:
        await self.closer()
        self.audit.close()


class AuditLog(AuditSink, Protocol):
    """The audit sink a process owns: it signs checkpoints and closes the chain at exit."""

    def checkpoint_if_due(self) -> None: ...

    def close(self) -> None: ...


class ReadOnlyAudit:
    """The audit sink of a read-only command. Such a command writes nothing; an event emitted
    here is a bug, refused loudly rather than written without a signature or dropped."""

    def emit(self, event: str, **fields: Any) -> None:
        raise AuditError(f"a read-only command tried to write the audit event {event}")

    def checkpoint_if_due(self) -> None:
        return None

    def close(self) -> None:
        return None


# who opens the stores: the broker creates keys on first start; a command that writes uses the
# keys that exist (never mints one: a new signing key would fail every earlier recording's
# verify); a command that only reads opens the embedded database read-only and writes nothing
Access = Literal["broker", "command", "read"]


def signing_key(config: BrokerConfig, *, create: bool = True) -> SigningKey:
    """The bastion's Ed25519 key for manifests and audit checkpoints."""
    path = default_key_path(config.state_dir)
    return load_or_create_signing_key(path) if create else load_signing_key(path)


def _local(config: BrokerConfig, clock: Clock, access: Access) -> tuple[RecordingSink, AuditLog]:
    recordings = LocalRecordingSink(config.recordings_dir)
    if access == "read":
        return recordings, ReadOnlyAudit()
    return recordings, JsonlAuditLog(config.audit_path, clock,
                                     signer=signing_key(config, create=access == "broker"))


def _totp_key(config: BrokerConfig, access: Access) -> bytes | None:
    if access == "read":
        return None  # secrets are neither read nor written by read-only commands
    return load_key(config.totp.key_file, config.totp_key_default_path,
                    create=access == "broker")


def open_stores(config: BrokerConfig, access: Access = "command") -> Stores:
    """The embedded SQLite store (synchronous open); see ``connect_stores`` for any backend."""
    if config.store.backend != "sqlite":
        raise ConfigError("this command opens the SQLite store only; the config names "
                          f"store backend '{config.store.backend}'")
    clock = SystemClock()
    db = SqliteDatabase(config.db_path, read_only=access == "read")
    recordings, audit = _local(config, clock, access)

    async def close() -> None:
        db.close()

    return Stores(
        grants=SqliteGrantStore(db),
        totp=_totp(SqliteTotpStore(db), _totp_key(config, access)),
        throttle=SqliteThrottleStore(db), keys=SqliteKeyStore(db, parse_public_key),
        reauth=SqliteReauthStore(db),
        tokens=SqliteApiTokenStore(db),
        sessions=SqliteSessionIndex(db), recordings=recordings, audit=audit, clock=clock,
        closer=close,
    )


class _ClosedTotp:
    """TOTP secrets are not opened by read-only commands (they need no key to list sessions)."""

    async def _refuse(self) -> Any:
        raise StoreError("TOTP secrets are not available to a read-only command")

    async def get_secret(self, user_key: str) -> str | None:
        return await self._refuse()  # type: ignore[no-any-return]

    async def set_secret(self, user_key: str, secret: str) -> None:
        await self._refuse()

    async def last_step(self, user_key: str) -> int | None:
        return await self._refuse()  # type: ignore[no-any-return]

    async def advance_step(self, user_key: str, step: int) -> bool:
        return await self._refuse()  # type: ignore[no-any-return]


def _totp(inner: TotpStore, key: bytes | None) -> TotpStore:
    return _ClosedTotp() if key is None else EncryptedTotpStore(inner, key)


async def connect_stores(config: BrokerConfig, access: Access = "command", *,
                         read_only: bool = False) -> Stores:
    """Open the configured store: SQLite, or a PostgreSQL pool shared by a fleet of bastions.
    ``read_only`` is ``access="read"`` (commands that only look)."""
    if read_only:
        access = "read"
    if config.store.backend == "sqlite":
        return open_stores(config, access)
    from broker.store import postgres as pg

    st = config.store
    totp_key = _totp_key(config, access)
    clock = SystemClock()
    recordings, audit = _local(config, clock, access)
    db = await pg.PostgresDatabase.connect(pg.load_dsn(st.dsn, st.dsn_file), st.pool_min,
                                           st.pool_max)
    return Stores(
        grants=pg.PostgresGrantStore(db),
        totp=_totp(pg.PostgresTotpStore(db), totp_key),
        throttle=pg.PostgresThrottleStore(db), keys=pg.PostgresKeyStore(db, parse_public_key),
        reauth=pg.PostgresReauthStore(db), tokens=pg.PostgresApiTokenStore(db),
        sessions=pg.PostgresSessionIndex(db),
        recordings=recordings, audit=audit, clock=clock, closer=db.close,
    )


def _disk_guard(config: BrokerConfig) -> DiskGuard:
    r = config.recordings
    return DiskGuard(config.recordings_dir, min_free_percent=r.min_free_percent,
                     min_free_bytes=r.min_free_bytes, critical_free_percent=r.critical_free_percent,
                     critical_free_bytes=r.critical_free_bytes)


def build_directory(config: BrokerConfig) -> Directory:
    ident = config.identity
    if ident.backend == "ad" and ident.ad is not None:
        from broker.identity.ldap import ADDirectory

        return ADDirectory(ident.ad)
    return StaticDirectory.from_file(ident.users_file, ident.default_domain,
                                     ident.domain_aliases)


def build_inventory(config: BrokerConfig) -> Inventory:
    if config.inventory.backend == "aws" and config.inventory.aws is not None:
        from broker.inventory.aws import AwsInventory

        return AwsInventory(config.inventory.aws)
    return StaticInventory.from_file(config.inventory.file)


class Broker:
    """A running broker: stores, services and the SSH listener."""

    def __init__(self, config: BrokerConfig, stores: Stores | None = None) -> None:
        if not config.recordings.enabled and not config.recordings.allow_unrecorded:
            raise ConfigError(
                "recordings.enabled = false requires recordings.allow_unrecorded = true "
                "(benchmarks only: sessions would not be recorded)"
            )
        self.config = config
        self.stores = stores or open_stores(config, "broker")
        s = self.stores
        directory = build_directory(config)
        self._directory = directory
        inventory = build_inventory(config)
        self.access = AccessService(inventory, s.grants, s.clock)
        self.sealer = RecordingSealer(signing_key(config), s.audit)  # signed manifests
        self.sessions = SessionService(
            s.recordings, s.sessions, s.audit, s.clock,
            recording_enabled=config.recordings.enabled,
            on_recorded=self.sealer,
            guard=_disk_guard(config), disk_policy=config.recordings.disk_policy,
            sync_interval=config.recordings.sync_interval_seconds,
            disk_check_interval=config.recordings.disk_check_interval_seconds,
            release_scope=patches.corked,
        )
        limits = config.limits
        self.authenticator = Authenticator(
            directory, TotpSecondFactor(s.totp, s.clock), s.audit, s.throttle, s.clock,
            AccountPolicy(limits.account_free_failures, limits.account_backoff_max_seconds,
                          limits.account_lock_after),
            totp_store=s.totp,
            totp_policy=TotpPolicy(config.totp.self_enroll, config.totp.reauth_window_seconds,
                                   config.totp.issuer),
            reauth=s.reauth,
        )
        self.ca = UserCA(load_or_create_user_ca(config.ca_key_path))
        self.host_key = load_or_create_key(config.host_key_path, "bastion-broker host key")
        host_ca(config)  # created now, so `ca known-hosts` can print it before the first jump
        self.grants = GrantService(s.grants, s.audit, s.clock, grant_policy(config.grants))
        self.deps = RelayDeps(config, self.access, self.sessions, self.ca, s.audit, s.clock)
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self.repaired: list[Repaired] = []  # recordings repaired at start (crash recovery)
        from broker.web.server import web_server_for  # aiohttp only where a server runs

        self.web = web_server_for(config, self.grants, self.authenticator, s.audit, s.clock,
                                  s.tokens)
        self.web_url: str | None = None  # the API's base URL once started
        self.enforcer = GrantEnforcer(
            self.sessions, s.grants, s.audit, s.clock,
            interval=config.grants.enforce_interval_seconds,
            warn_before=timedelta(seconds=config.grants.warn_before_seconds),
            idle_timeout=config.ssh.session_idle_timeout_seconds,
        )

        # copies off the bastion (S3, CloudWatch Logs), in threads of their own
        self.shipping = Shipping(config.shipping, config.shipping_spool_dir,
                                 config.recordings_dir, config.audit_path, s.audit)

    async def start(self, *, reuse_port: bool = False) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        ssh = self.config.ssh
        # recordings a killed broker left open: cut, closed, session.end (before new sessions)
        self.repaired = await repair_interrupted(self.config.recordings_dir, self.stores.sessions,
                                                 self.stores.audit, self.stores.clock)
        for r in self.repaired:  # a crash-repaired recording gets its signed manifest too
            if r.path is not None:
                await self.sealer.seal_interrupted(r.session_id, r.path, self.stores.clock.now(),
                                                   INTERRUPTED)
        patches.install()
        self._acceptor = await start_server(
            self.deps, self.authenticator, self.stores.keys, self.host_key, ssh.listen_host,
            ssh.listen_port, reuse_port=reuse_port,
        )
        port = int(self._acceptor.get_port())
        if self.web is not None:
            self.web_url = await self.web.start_or_warn()
        self.enforcer.start()
        self._checkpoints = asyncio.create_task(self._sign_audit_periodically())
        self.sessions.start_maintenance()
        self.shipping.start()
        self.stores.audit.emit("broker.start", listen=f"{ssh.listen_host}:{port}")
        log.info("broker.listening", host=ssh.listen_host, port=port)
        return port

    async def _sign_audit_periodically(self) -> None:
        """Sign audit events that have waited a while (quiet times), not only every N events."""
        while True:
            await asyncio.sleep(5)
            try:
                self.stores.audit.checkpoint_if_due()
            except BrokerError as exc:
                log.error("audit.checkpoint_failed", error=str(exc))

    async def stop(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            self._checkpoints = None
        if self.web is not None:
            await self.web.stop()
        await self.enforcer.stop()
        if self._acceptor is not None:
            self._acceptor.close()
        # SIGTERM: users told, sessions drained or ended, recordings closed, within the grace
        await self.sessions.shutdown(self.config.shutdown.grace_seconds)
        await self.sessions.stop_maintenance()
        if self._acceptor is not None:
            await self._acceptor.wait_closed()
            self._acceptor = None
        await self.sessions.drain()
        await self.sealer.drain()  # manifests of the sessions that just ended
        self.stores.audit.emit("broker.stop", live_sessions=len(self.sessions.live))
        await self.shipping.stop()
        close = getattr(self._directory, "close", None)
        if close is not None:
            close()
        await self.stores.close()


async def serve(config: BrokerConfig, on_ready: Callable[[int], None] | None = None, *,
                reuse_port: bool = False, notify: bool = True) -> None:
    """Run one broker process until SIGINT/SIGTERM (see ``broker.workers`` for several)."""
    import signal

    broker = Broker(config, await connect_stores(config, "broker"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await broker.start(reuse_port=reuse_port)
    if on_ready:
        on_ready(port)
    if notify:
        runtime.sd_notify("READY=1")
    await stop.wait()
    if notify:
        runtime.sd_notify("STOPPING=1")
    await broker.stop()


def run(config: BrokerConfig, on_ready: Callable[[int], None] | None = None) -> int:
    """The broker with ``[ssh] workers`` processes (one per core with 0)."""
    from broker.workers import run_workers, worker_count

    if worker_count(config) == 1:
        runtime.run_loop(serve(config, on_ready), config.ssh.event_loop)
        return 0
    return run_workers(config, _serve_worker, lambda: prepare_state(config), on_ready)


def _serve_worker(config: BrokerConfig, on_ready: Callable[[int], None]) -> None:
    runtime.run_loop(serve(config, on_ready=on_ready, reuse_port=True, notify=False),
                     config.ssh.event_loop)


def prepare_state(config: BrokerConfig) -> None:
    """Create keys and migrate the embedded store once, before workers race to do it."""
    from broker.services.totp_secrets import load_key

    load_or_create_key(config.host_key_path, "bastion-broker host key")
    load_or_create_user_ca(config.ca_key_path)
    host_ca(config)
    signing_key(config)
    load_key(config.totp.key_file, config.totp_key_default_path)
    if config.store.backend == "sqlite":
        asyncio.run(open_stores(config, "broker").close())
