"""The state a broker or a command works on, opened for what it will do with it.

The broker creates its keys on first start; a command that writes uses the keys that exist and
never mints one (a new signing key would make every earlier recording fail ``verify``); a command
that only reads opens the embedded database read-only and writes nothing at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from broker.audit.jsonl import JsonlAuditLog
from broker.config import BrokerConfig
from broker.errors import AuditError, ConfigError, StoreError
from broker.integrity.keys import (
    SigningKey,
    default_key_path,
    load_or_create_signing_key,
    load_signing_key,
)
from broker.ports import (
    AuditSink,
    Clock,
    Database,
    FleetStore,
    GrantStore,
    KeyStore,
    LockStore,
    NotificationStore,
    ReauthStore,
    RecordingSink,
    SessionIndex,
    ThrottleStore,
    TokenStore,
    TotpStore,
)
from broker.recordings.local import LocalRecordingSink
from broker.services.clock import SystemClock
from broker.services.totp_secrets import EncryptedTotpStore, load_key
from broker.ssh.keys import parse_public_key
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
from broker.store.sqlite_fleet import SqliteFleetStore
from broker.store.sqlite_locks import SqliteLockStore
from broker.store.sqlite_notify import SqliteNotificationStore


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
    locks: LockStore  # locks and kill requests (incident brakes)
    notify: NotificationStore  # the notification outbox
    fleet: FleetStore  # heartbeats; sessions of a bastion that went silent
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
                                     signer=signing_key(config, create=access == "broker"),
                                     rotate_bytes=config.audit.rotate_bytes,
                                     rotate_daily=config.audit.rotate_daily)


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
        sessions=SqliteSessionIndex(db), locks=SqliteLockStore(db),
        notify=SqliteNotificationStore(db), fleet=SqliteFleetStore(db), recordings=recordings,
        audit=audit, clock=clock,
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


async def connect_stores(config: BrokerConfig, access: Access = "command") -> Stores:
    """Open the configured store: SQLite, or a PostgreSQL pool shared by a fleet of bastions."""
    if config.store.backend == "sqlite":
        return open_stores(config, access)
    from broker.store import postgres as pg
    from broker.store.postgres_fleet import PostgresFleetStore
    from broker.store.postgres_locks import PostgresLockStore
    from broker.store.postgres_notify import PostgresNotificationStore

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
        sessions=pg.PostgresSessionIndex(db), locks=PostgresLockStore(db),
        notify=PostgresNotificationStore(db), fleet=PostgresFleetStore(db),
        recordings=recordings, audit=audit, clock=clock, database=db, closer=db.close,
    )
