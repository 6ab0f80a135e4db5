"""Composition root: the only place that picks adapters and wires them into services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import asyncssh
import structlog
from pydantic import BaseModel

from broker import runtime
from broker.audit.jsonl import JsonlAuditLog
from broker.config import BrokerConfig, load_config
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
    Database,
    Directory,
    GrantStore,
    Inventory,
    KeyStore,
    Metrics,
    NullMetrics,
    ReauthStore,
    RecordingSink,
    SessionIndex,
    ThrottleStore,
    TokenStore,
    TotpStore,
)
from broker.recordings.diskguard import DiskGuard
from broker.recordings.local import LocalRecordingSink, render_cast
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
from broker.ssh.server import configure_guard, source_guard, start_server
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

if TYPE_CHECKING:
    from broker.diag.server import DiagServer

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
    database: Database  # the connection or pool under them all (readiness, latency)
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
        database=db, closer=close,
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
        recordings=recordings, audit=audit, clock=clock, database=db, closer=db.close,
    )


def _disk_guard(config: BrokerConfig) -> DiskGuard:
    r = config.recordings
    return DiskGuard(config.recordings_dir, min_free_percent=r.min_free_percent,
                     min_free_bytes=r.min_free_bytes, critical_free_percent=r.critical_free_percent,
                     critical_free_bytes=r.critical_free_bytes)


def _metrics(config: BrokerConfig) -> Metrics:
    if not config.diag.enabled:
        return NullMetrics()
    from broker.diag.metrics import PrometheusMetrics  # prometheus-client only where it serves

    return PrometheusMetrics()


def _diag_server(b: Broker, disk: DiskGuard) -> DiagServer | None:
    """The ``[diag]`` listener of this process (None when off). With several workers, each
    takes the first free port of ``listen_port`` .. ``listen_port + workers - 1``."""
    from broker.diag.metrics import PrometheusMetrics

    c = b.config
    if not isinstance(b.metrics, PrometheusMetrics):
        return None
    from broker.diag.server import diag_server_for
    from broker.shipping.backlog import read_backlog
    from broker.workers import worker_count

    n, first = worker_count(c), c.diag.listen_port
    ports = [p for p in range(first, first + n) if p <= 65535] if n > 1 and first else None
    spool = c.shipping_spool_dir / "spool.db"
    return diag_server_for(
        c.diag, b.metrics, b.sessions, database=b.stores.database, audit_path=c.audit_path,
        directory=lambda: b._directory, throttle=b.stores.throttle,
        disk=disk.status if c.recordings.enabled else None,
        backlog=(lambda: read_backlog(spool, c.recordings_dir, c.audit_path, time.time()))
        if b.shipping.enabled else None, ports=ports)


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


def account_policy(config: BrokerConfig) -> AccountPolicy:
    limits = config.limits
    return AccountPolicy(limits.account_free_failures, limits.account_backoff_max_seconds,
                         limits.account_lock_after)


def totp_policy(config: BrokerConfig) -> TotpPolicy:
    return TotpPolicy(config.totp.self_enroll, config.totp.reauth_window_seconds,
                      config.totp.issuer)


def _enforcer_settings(config: BrokerConfig) -> dict[str, Any]:
    return {"interval": config.grants.enforce_interval_seconds,
            "warn_before": timedelta(seconds=config.grants.warn_before_seconds),
            "idle_timeout": config.ssh.session_idle_timeout_seconds}


# -- configuration reload (SIGHUP) -------------------------------------------------------------
# What a reload changes at once, per section (None: every key of it). It applies to the logins,
# sessions, tunnels and API requests that start afterwards; what already runs keeps going as it
# started. Every other key keeps its running value until a restart (config.reload_needs_restart).
LIVE_KEYS: dict[str, frozenset[str] | None] = {
    "limits": None,
    "forwarding": None,
    "grants": None,
    "roles": None,
    "inventory": None,
    "identity": frozenset({"users_file", "default_domain", "domain_aliases", "public_keys"}),
    "upstream": frozenset({"admin_login", "read_only_login", "cert_ttl_seconds",
                           "connect_timeout_seconds"}),
    "totp": frozenset({"self_enroll", "reauth_window_seconds", "issuer"}),
    "ssh": frozenset({"window_bytes", "max_packet_bytes", "session_idle_timeout_seconds"}),
    "shutdown": None,
}


def config_changes(old: BrokerConfig, new: BrokerConfig) -> list[str]:
    """The keys whose values differ, as ``section.key`` (a top-level key by its own name).
    Names only: a caller may log them, never the values (a DSN may hold a password)."""
    changed: list[str] = []
    for name in BrokerConfig.model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if a == b:
            continue
        if isinstance(a, BaseModel) and type(a) is type(b):
            changed += [f"{name}.{key}" for key in type(a).model_fields
                        if getattr(a, key) != getattr(b, key)]
        else:
            changed.append(name)
    return changed


def reloads_live(key: str) -> bool:
    """Whether a reload applies ``key`` (``section.key``) at once."""
    section, _, name = key.partition(".")
    if section not in LIVE_KEYS or not name:
        return False
    names = LIVE_KEYS[section]
    return names is None or name in names


def with_values(config: BrokerConfig, source: BrokerConfig, keys: Iterable[str]) -> BrokerConfig:
    """``config`` with the values ``source`` has for ``keys`` (``section.key``)."""
    updates: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, _, name = key.partition(".")
        updates.setdefault(section, {})[name] = getattr(getattr(source, section), name)
    return config.model_copy(update={
        section: getattr(config, section).model_copy(update=values)
        for section, values in updates.items()})


@dataclass
class ConfigSource:
    """The file a broker was started from, as last applied: the keys a reload changes hold the
    file's values of the last good reload, every other key the value the broker started with
    (so a key that needs a restart is named again at every reload until there is one)."""

    path: Path
    applied: BrokerConfig


@dataclass(frozen=True)
class Reread:
    """A config file read again and validated, with the files it names, and what it changes."""

    applied: BrokerConfig  # the next ``ConfigSource.applied``
    running: BrokerConfig  # what the broker runs with from now
    live: tuple[str, ...]  # keys changed now
    restart: tuple[str, ...]  # keys changed in the file that keep their value until a restart
    inventory: Inventory | None  # the inventory to use from now (None: keep the one in use)
    directory: Directory | None  # the static directory to use from now (None: keep it)


def reread(source: ConfigSource, running: BrokerConfig) -> Reread:
    """Read and validate the config file again, and the inventory and users files it names.
    Raises ``ConfigError`` (file, key and problem) if any of them is invalid. Blocking: a
    running broker calls it in a thread."""
    new = load_config(source.path)
    changed = config_changes(source.applied, new)
    live = tuple(k for k in changed if reloads_live(k))
    restart = tuple(k for k in changed if not reloads_live(k))
    running = with_values(running, new, live)
    inventory = None  # a static inventory file is read again even if its name is the same
    if running.inventory.backend == "static" or any(k.startswith("inventory.") for k in live):
        inventory = build_inventory(running)
    directory = build_directory(running) if running.identity.backend == "static" else None
    return Reread(with_values(source.applied, new, live), running, live, restart, inventory,
                  directory)


def _compare(old: Mapping[str, object], new: Mapping[str, object]) -> dict[str, list[str]]:
    diff = {"added": sorted(new.keys() - old.keys()), "removed": sorted(old.keys() - new.keys()),
            "changed": sorted(k for k in old.keys() & new.keys() if old[k] != new[k])}
    return {k: v for k, v in diff.items() if v}


class Broker:
    """A running broker: stores, services and the SSH listener."""

    def __init__(self, config: BrokerConfig, stores: Stores | None = None, *,
                 source: ConfigSource | None = None) -> None:
        if not config.recordings.enabled and not config.recordings.allow_unrecorded:
            raise ConfigError(
                "recordings.enabled = false requires recordings.allow_unrecorded = true "
                "(benchmarks only: sessions would not be recorded)"
            )
        self.config = config
        self.source = source  # the config file a reload reads (SIGHUP); None: no reloads
        self.stores = stores or open_stores(config, "broker")
        s = self.stores
        # monitoring ([diag]): what the services count, or nothing when it is off
        self.metrics = _metrics(config)
        s.database.observe(self.metrics)
        directory = build_directory(config)
        self._directory = directory
        inventory = build_inventory(config)
        self.access = AccessService(inventory, s.grants, s.clock, metrics=self.metrics)
        self.sealer = RecordingSealer(signing_key(config), s.audit)  # signed manifests
        disk_guard = _disk_guard(config)  # new sessions; readiness and metrics too
        self.sessions = SessionService(
            s.recordings, s.sessions, s.audit, s.clock,
            recording_enabled=config.recordings.enabled,
            on_recorded=self.sealer,
            guard=disk_guard, disk_policy=config.recordings.disk_policy,
            sync_interval=config.recordings.sync_interval_seconds,
            disk_check_interval=config.recordings.disk_check_interval_seconds,
            release_scope=patches.corked, metrics=self.metrics, render_cast=render_cast,
        )
        self.authenticator = Authenticator(
            directory, TotpSecondFactor(s.totp, s.clock), s.audit, s.throttle, s.clock,
            account_policy(config), totp_store=s.totp, totp_policy=totp_policy(config),
            reauth=s.reauth, metrics=self.metrics,
        )
        self.guard = source_guard(config.limits)  # MaxStartups and penalties, per process
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
        self.enforcer = GrantEnforcer(self.sessions, s.grants, s.audit, s.clock,
                                      **_enforcer_settings(config))

        # copies off the bastion (S3, CloudWatch Logs), in threads of their own
        self.shipping = Shipping(config.shipping, config.shipping_spool_dir,
                                 config.recordings_dir, config.audit_path, s.audit)
        self.diag = _diag_server(self, disk_guard)  # /healthz, /readyz, /metrics ([diag])
        self.diag_url: str | None = None  # its base URL once started
        self.reload = BrokerReload(self)  # SIGHUP: the config file again, applied live

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
            ssh.listen_port, reuse_port=reuse_port, guard=self.guard,
        )
        port = int(self._acceptor.get_port())
        if self.web is not None:
            self.web_url = await self.web.start_or_warn()
        if self.diag is not None:
            self.diag_url = await self.diag.start()
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
        if self.diag is not None:  # from now on, probes fail: no new sessions are sent here
            await self.diag.stop()
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


class BrokerReload:
    """``Broker.reload``: read the config file again, apply what can change live."""

    def __init__(self, broker: Broker) -> None:
        self._b = broker

    async def __call__(self) -> bool:
        b = self._b
        source = b.source
        if source is None:
            log.warning("config.reload_unavailable", reason="the broker was started without a "
                        "config file")
            return False
        try:
            r = await asyncio.to_thread(reread, source, b.config)
            details = await self._content_changes(r)
            changed = [*r.live, *details]
            # audited before it applies: no change stands without its audit line
            b.stores.audit.emit("config.reloaded", config=str(source.path), pid=os.getpid(),
                                changed=changed, needs_restart=list(r.restart),
                                **{k.rpartition(".")[2]: v for k, v in details.items()})
        except BrokerError as exc:
            self._failed(source, exc.user_message)
            return False
        self._apply(r)
        source.applied = r.applied
        log.info("config.reloaded", config=str(source.path), changed=changed)
        if r.restart:
            log.warning("config.reload_needs_restart", config=str(source.path),
                        keys=list(r.restart))
        return True

    def _failed(self, source: ConfigSource, reason: str) -> None:
        log.error("config.reload_failed", config=str(source.path), error=reason)
        try:
            self._b.stores.audit.emit("config.reload_failed", config=str(source.path),
                                      pid=os.getpid(), reason=reason)
        except AuditError as exc:
            log.error("audit.write_failed", event="config.reload_failed", error=str(exc))

    async def _content_changes(self, r: Reread) -> dict[str, dict[str, list[str]]]:
        """What changed inside the inventory and users files (instance ids, user names)."""
        b = self._b
        details: dict[str, dict[str, list[str]]] = {}
        old_inv = b.access.inventory
        if isinstance(r.inventory, StaticInventory) and isinstance(old_inv, StaticInventory):
            diff = _compare({i.id: i for i in await old_inv.instances()},
                            {i.id: i for i in await r.inventory.instances()})
            if diff:
                details["inventory.instances"] = diff
        old_dir = b._directory
        if isinstance(r.directory, StaticDirectory) and isinstance(old_dir, StaticDirectory):
            diff = _compare({u.name: u for u in old_dir.users_file.users},
                            {u.name: u for u in r.directory.users_file.users})
            if diff:
                details["identity.users"] = diff
        return details

    def _apply(self, r: Reread) -> None:
        """Swap the new immutable settings in. Synchronous: a login, session or request sees
        either all of the old configuration or all of the new."""
        b, c = self._b, r.running
        if r.inventory is not None:
            b.access.use_inventory(r.inventory)
        if r.directory is not None:
            b.authenticator.use_directory(r.directory)
            b._directory = r.directory
        b.authenticator.configure(account_policy(c), totp_policy(c))
        configure_guard(b.guard, c.limits)
        b.grants.policy = grant_policy(c.grants)
        b.enforcer.configure(**_enforcer_settings(c))
        if b.web is not None:
            b.web.reconfigure(c.roles, tuple(c.grants.auto_approve_read_only_groups))
        b.deps.config = c
        b.config = c


class Reloader:
    """SIGHUP -> reload, one at a time. A signal during a reload asks for exactly one more (the
    file may have changed after it was read); any number of signals then coalesce into it."""

    def __init__(self) -> None:
        self._reload: Callable[[], Awaitable[object]] | None = None
        self._wanted = False
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # reloads started

    def request(self) -> None:
        self._wanted = True
        if self._reload is not None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(self._reload))

    def start(self, reload: Callable[[], Awaitable[object]]) -> None:
        """Serve requests from now (one that came while the broker started runs at once)."""
        self._reload = reload
        if self._wanted:
            self.request()

    async def _run(self, reload: Callable[[], Awaitable[object]]) -> None:
        while self._wanted:
            self._wanted = False
            self.runs += 1
            try:
                await reload()
            except Exception as exc:  # a bug: logged, and the next SIGHUP still reloads
                log.error("config.reload_failed", error=repr(exc), exc_info=True)

    async def stop(self) -> None:
        self._reload = None
        if self._task is not None:
            self._task.cancel()  # a reload cut short applies nothing
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _with_reload_notices(reload: Callable[[], Awaitable[object]]
                         ) -> Callable[[], Awaitable[object]]:
    """Tell systemd a reload is under way (RELOADING=1) and when it is over (READY=1)."""

    async def notified() -> object:
        runtime.sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return await reload()
        finally:
            runtime.sd_notify("READY=1")

    return notified


async def serve(config: BrokerConfig, on_ready: Callable[[int], None] | None = None, *,
                reuse_port: bool = False, notify: bool = True,
                source: ConfigSource | None = None, worker: int | None = None) -> None:
    """Run one broker process until SIGINT/SIGTERM; SIGHUP reloads ``source`` (see
    ``broker.workers`` for several processes; ``worker`` is this one's index among them)."""
    import signal

    stop = asyncio.Event()
    reloader = Reloader()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)  # held until the broker is up
    broker = Broker(config, await connect_stores(config, "broker"), source=source)
    port = await broker.start(reuse_port=reuse_port)
    reloader.start(_with_reload_notices(broker.reload) if notify else broker.reload)
    if on_ready:
        on_ready(port)
    if notify:
        runtime.sd_notify("READY=1")
    await stop.wait()
    if notify:
        runtime.sd_notify("STOPPING=1")
    await reloader.stop()
    await broker.stop()
    if worker is None:
        log.info("broker.stopped", pid=os.getpid())
    else:  # the parent logs broker.stopped once every worker has
        log.info("worker.stopped", worker=worker, pid=os.getpid())


def run(config: BrokerConfig, on_ready: Callable[[int], None] | None = None, *,
        config_path: Path | None = None) -> int:
    """The broker with ``[ssh] workers`` processes (one per core with 0). With ``config_path``
    (the file ``config`` was loaded from), SIGHUP reloads it; with several workers the parent
    passes SIGHUP on to each of them."""
    from broker.workers import run_workers, worker_count

    source = ConfigSource(config_path, config) if config_path is not None else None
    if worker_count(config) == 1:
        runtime.run_loop(serve(config, on_ready, source=source), config.ssh.event_loop)
        return 0

    def serve_worker(worker_config: BrokerConfig, index: int,
                     ready: Callable[[int], None]) -> None:
        runtime.run_loop(serve(worker_config, ready, reuse_port=True, notify=False,
                               source=source, worker=index), worker_config.ssh.event_loop)

    return run_workers(config, serve_worker, lambda: prepare_state(config), on_ready,
                       reread=None if source is None else _parent_reread(source))


def _parent_reread(source: ConfigSource) -> Callable[[BrokerConfig], BrokerConfig]:
    """The workers parent's reload: its own copy of the configuration, for a worker it starts
    later. Each running worker reloads itself (and logs and audits the outcome); the parent
    says nothing and raises ``ConfigError`` for an invalid file."""

    def parent_reread(running: BrokerConfig) -> BrokerConfig:
        r = reread(source, running)
        source.applied = r.applied
        return r.running

    return parent_reread


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
