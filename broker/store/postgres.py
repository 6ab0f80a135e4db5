"""The shared store: PostgreSQL through an asyncpg pool, for several broker hosts behind one VIP.

Each class implements the same Protocol as its SQLite twin in ``broker/store/sqlite.py`` with the
same observable behaviour; ``tests/contract`` runs one suite against both. Every driver or socket
failure leaves as ``StoreError`` so callers fail closed without knowing the backend. Schema
changes are the numbered ``pg_migrations``, applied at connect under an advisory lock so brokers
starting together migrate once.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from broker.domain.models import Grant, GrantState, Level, Trigger
from broker.domain.ratelimit import account_backoff
from broker.domain.workflow import HistoryEntry
from broker.errors import ConflictError, StoreError
from broker.ports import (
    ApiTokenRecord,
    Metrics,
    NullMetrics,
    ParsePublicKey,
    SessionMatch,
    SessionQuery,
    SessionRecord,
    SourceThrottleState,
    TextHit,
    TextSegment,
    ThrottleState,
    ThrottleSummary,
    ThrottleView,
    WebSessionRecord,
)
from broker.store.pg_migrations import MIGRATIONS
from broker.store.text import (
    MAX_HITS,
    STATUS_SQL,
    ascii_lower,
    check_query,
    pg_tsquery,
    pg_tsvector,
    query_words,
    snippet,
)

# pg_advisory_xact_lock key owned by the migrator ("bb-migr" in ASCII): one constant, so every
# broker version serialises on the same lock.
MIGRATION_LOCK_KEY = 0x62622D6D69677200

# What asyncpg raises for a dead server, a refused or lost connection, a closed pool, a timeout
# or a failed statement. ClientConfigurationError (bad DSN) is an InterfaceError.
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
# connect also meets a malformed DSN (bad port: ValueError or OverflowError)
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*_DRIVER_ERRORS, ValueError, OverflowError)


def load_dsn(dsn: str | None, dsn_file: Path | None) -> str:
    """The DSN from config or from a root-only file, so the password stays out of the config."""
    if dsn_file is not None:
        try:
            text = dsn_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StoreError(f"cannot read store DSN file {dsn_file}: {exc}") from exc
        if not text:
            raise StoreError(f"store DSN file {dsn_file} is empty")
        return text
    if not dsn:
        raise StoreError("store backend postgres needs dsn or dsn_file")
    return dsn


def _utc(dt: datetime) -> datetime:
    """Same normalisation as SQLite's ``_ts``: a naive datetime is local time."""
    return dt.astimezone(UTC)


def _like_prefix(text: str) -> str:
    """A LIKE pattern matching ``text`` literally as a prefix (same escaping as SQLite)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


# SQLite's LIKE ignores case for ASCII letters only; ILIKE under the "C" collation lowercases
# ASCII only, so prefix lookups match the same rows on both backends whatever the DB locale.
_SESSIONS_OF_USER = (
    "SELECT * FROM sessions WHERE user_name = $1 OR user_name ILIKE $2 COLLATE \"C\" ESCAPE '\\'"
    " ORDER BY started_at DESC, seq DESC LIMIT $3"
)


class PostgresDatabase:
    """Owns the asyncpg pool; ``connect`` also brings the schema up to date."""

    def __init__(self, pool: Any, acquire_timeout: float) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        self._metrics: Metrics = NullMetrics()

    @classmethod
    async def connect(
        cls, dsn: str, min_size: int = 1, max_size: int = 10, *,
        connect_timeout: float = 10.0, command_timeout: float = 30.0,
        acquire_timeout: float = 30.0,
    ) -> PostgresDatabase:
        """Open the pool and migrate. Timeouts are finite so a hung server fails closed."""
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, timeout=connect_timeout,
                command_timeout=command_timeout,
            )
        except _CONNECT_ERRORS as exc:
            raise StoreError(f"cannot connect to the PostgreSQL store: {exc}") from exc
        db = cls(pool, acquire_timeout)
        try:
            await db.migrate()
        except BaseException:
            await db.close()
            raise
        return db

    @contextlib.asynccontextmanager
    async def acquire(self, what: str) -> AsyncIterator[Any]:
        """A pooled connection; driver errors inside the block become ``StoreError(what: ...)``."""
        started = time.perf_counter()
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                yield conn
        except _DRIVER_ERRORS as exc:
            raise StoreError(f"{what}: {exc}") from exc
        finally:  # the wait for a pooled connection included: what the caller waited
            self._metrics.store_call(time.perf_counter() - started)

    def observe(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def ping(self) -> None:
        """``SELECT 1`` on a pooled connection (waiting for one, as a login would)."""
        async with self.acquire("the PostgreSQL store does not answer") as conn:
            await conn.fetchval("SELECT 1")

    async def migrate(self) -> list[int]:
        """Apply the missing migrations in one transaction; returns the versions applied.

        The transaction-scoped advisory lock is taken before anything else, including creating
        ``schema_migrations``, so concurrent starters queue and the later ones find nothing to do.
        """
        applied: list[int] = []
        async with (
            self.acquire("cannot migrate the PostgreSQL store") as conn,
            conn.transaction(),
        ):
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for n, script in enumerate(MIGRATIONS, start=1):
                if n in done:
                    continue
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", n)
                applied.append(n)
        return applied

    async def versions(self) -> builtins.list[int]:
        """Applied migration versions, ascending (for ``doctor``-style checks and tests)."""
        async with self.acquire("cannot read schema version") as conn:
            rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [int(r["version"]) for r in rows]

    async def close(self, grace: float = 10.0) -> None:
        """Close the pool; connections still busy after ``grace`` seconds are terminated."""
        try:
            await asyncio.wait_for(self._pool.close(), grace)
        except _DRIVER_ERRORS:
            self._pool.terminate()


def _grant_from_row(r: Any) -> Grant:
    return Grant(
        id=r["id"], username=r["username"], domain=r["domain"],
        stack_ids=tuple(r["stack_ids"]), vpc_id=r["vpc_id"],
        level=Level(r["level"]), state=GrantState(r["state"]),
        starts_at=r["starts_at"], expires_at=r["expires_at"],
        trigger=Trigger(r["trigger"]), ticket=r["ticket"], reason=r["reason"],
        requested_by=r["requested_by"], approved_by=r["approved_by"],
        created_at=r["created_at"], version=int(r["version"]),
    )


# Values for both: $1 id, then the columns in PostgresGrantStore._row order.
_GRANT_INSERT = (
    "INSERT INTO grants (id, username, username_key, domain, domain_key, stack_ids, vpc_id,"
    " level, state, starts_at, expires_at, trigger, ticket, reason, requested_by, approved_by,"
    " created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)"
)
_GRANT_UPDATE = (
    "UPDATE grants SET (username, username_key, domain, domain_key, stack_ids, vpc_id, level,"
    " state, starts_at, expires_at, trigger, ticket, reason, requested_by, approved_by,"
    " created_at) = ($2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17),"
    " version = version + 1 WHERE id = $1"
)


class PostgresGrantStore:
    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    @staticmethod
    def _row(g: Grant) -> tuple[object, ...]:
        """Parameters $2.. of the grant statements; keys are casefolded here, as in SQLite."""
        return (
            g.username, g.username.casefold(), g.domain, g.domain.casefold(),
            list(g.stack_ids), g.vpc_id, str(g.level), str(g.state),
            _utc(g.starts_at), _utc(g.expires_at), str(g.trigger), g.ticket, g.reason,
            g.requested_by, g.approved_by, _utc(g.created_at or g.starts_at),
        )

    async def add(self, grant: Grant) -> None:
        async with self._db.acquire("cannot store grant") as conn:
            await conn.execute(
                _GRANT_INSERT, grant.id, *self._row(grant),
            )

    async def replace(self, grant: Grant) -> None:
        async with self._db.acquire("cannot update grant") as conn:
            status = await conn.execute(
                _GRANT_UPDATE, grant.id, *self._row(grant),
            )
        if status != "UPDATE 1":
            raise StoreError(f"grant {grant.id} not found")

    async def get(self, grant_id: str) -> Grant | None:
        async with self._db.acquire("cannot read grant") as conn:
            r = await conn.fetchrow("SELECT * FROM grants WHERE id = $1", grant_id)
        return _grant_from_row(r) if r else None

    async def get_many(self, grant_ids: builtins.list[str]) -> dict[str, Grant]:
        async with self._db.acquire("cannot read grants") as conn:
            rows = await conn.fetch("SELECT * FROM grants WHERE id = ANY($1::text[])", grant_ids)
        return {r["id"]: _grant_from_row(r) for r in rows}

    @staticmethod
    async def _history(conn: Any, e: HistoryEntry) -> None:
        await conn.execute(
            "INSERT INTO grant_history (grant_id, at, actor, action, comment, state, details)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
            e.grant_id, _utc(e.at), e.actor, e.action, e.comment, e.state,
            json.dumps(e.details, sort_keys=True),
        )

    async def create(self, grant: Grant, entry: HistoryEntry) -> None:
        """A new grant and its first history entry, atomically."""
        async with self._db.acquire("cannot store grant") as conn, conn.transaction():
            await conn.execute(
                _GRANT_INSERT, grant.id, *self._row(grant),
            )
            await self._history(conn, entry)

    async def update(self, grant: Grant, entry: HistoryEntry) -> Grant:
        """Store ``grant`` if the stored version is still ``grant.version`` (compare-and-set);
        returns it with the new version, or raises ConflictError (also for an unknown id)."""
        async with self._db.acquire("cannot update grant") as conn, conn.transaction():
            status = await conn.execute(
                _GRANT_UPDATE + " AND version = $18", grant.id, *self._row(grant), grant.version,
            )
            if status != "UPDATE 1":
                raise ConflictError(
                    f"grant {grant.id} was changed by someone else meanwhile; reload and retry")
            await self._history(conn, entry)
        return replace(grant, version=grant.version + 1)

    async def history(self, grant_id: str) -> builtins.list[HistoryEntry]:
        async with self._db.acquire("cannot read grant history") as conn:
            rows = await conn.fetch(
                "SELECT * FROM grant_history WHERE grant_id = $1 ORDER BY seq", grant_id
            )
        return [HistoryEntry(r["grant_id"], r["at"], r["actor"], r["action"], r["comment"],
                             r["state"], json.loads(r["details"]))
                for r in rows]

    async def search(self, *, username: str | None = None, stack: str | None = None,
                     states: builtins.list[str] | None = None, since: datetime | None = None,
                     until: datetime | None = None, expires_before: datetime | None = None,
                     limit: int = 500) -> builtins.list[Grant]:
        """Filtered listing, newest first. ``states`` are stored states (expired is derived).

        One static statement: an unset filter is a NULL parameter that disables its condition.
        """
        async with self._db.acquire("cannot search grants") as conn:
            rows = await conn.fetch(
                "SELECT * FROM grants WHERE ($1::text IS NULL OR username_key = $1)"
                " AND ($2::text IS NULL OR $2 = ANY(stack_ids))"
                " AND ($3::text[] IS NULL OR state = ANY($3))"
                " AND ($4::timestamptz IS NULL OR expires_at >= $4)"
                " AND ($5::timestamptz IS NULL OR starts_at <= $5)"
                " AND ($7::timestamptz IS NULL OR expires_at < $7)"
                " ORDER BY created_at DESC, seq DESC LIMIT $6",
                username.casefold() if username else None, stack or None, states or None,
                _utc(since) if since else None, _utc(until) if until else None,
                limit if limit >= 0 else None,
                _utc(expires_before) if expires_before else None,
            )
        return [_grant_from_row(r) for r in rows]

    async def for_user(self, username: str, domain: str) -> list[Grant]:
        async with self._db.acquire("cannot read grants") as conn:
            rows = await conn.fetch(
                "SELECT * FROM grants WHERE username_key = $1 AND domain_key = $2 ORDER BY seq",
                username.casefold(), domain.casefold(),
            )
        return [_grant_from_row(r) for r in rows]

    async def list(self, *, username: str | None = None) -> builtins.list[Grant]:
        async with self._db.acquire("cannot read grants") as conn:
            if username:
                rows = await conn.fetch(
                    "SELECT * FROM grants WHERE username_key = $1 ORDER BY created_at, seq",
                    username.casefold(),
                )
            else:
                rows = await conn.fetch("SELECT * FROM grants ORDER BY created_at, seq")
        return [_grant_from_row(r) for r in rows]


class PostgresTotpStore:
    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def get_secret(self, user_key: str) -> str | None:
        async with self._db.acquire("cannot read TOTP secret") as conn:
            v = await conn.fetchval("SELECT secret FROM totp WHERE user_key = $1", user_key)
        return str(v) if v is not None else None

    async def set_secret(self, user_key: str, secret: str) -> None:
        async with self._db.acquire("cannot store TOTP secret") as conn:
            await conn.execute(
                "INSERT INTO totp (user_key, secret, last_step) VALUES ($1, $2, NULL)"
                " ON CONFLICT (user_key) DO UPDATE SET secret = excluded.secret, last_step = NULL",
                user_key, secret,
            )

    async def last_step(self, user_key: str) -> int | None:
        async with self._db.acquire("cannot read TOTP step") as conn:
            v = await conn.fetchval("SELECT last_step FROM totp WHERE user_key = $1", user_key)
        return int(v) if v is not None else None

    async def advance_step(self, user_key: str, step: int) -> bool:
        """One conditional UPDATE: under READ COMMITTED, racers re-check the WHERE after the
        winner commits, so a code is accepted once across all brokers."""
        async with self._db.acquire("cannot record TOTP step") as conn:
            status = await conn.execute(
                "UPDATE totp SET last_step = $2"
                " WHERE user_key = $1 AND (last_step IS NULL OR last_step < $2)",
                user_key, step,
            )
        return bool(status == "UPDATE 1")


class PostgresThrottleStore:
    """Per-account failure counters shared by every broker host."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def state(self, account: str) -> ThrottleState:
        async with self._db.acquire("cannot read throttle state") as conn:
            r = await conn.fetchrow(
                "SELECT failures, next_allowed, locked FROM auth_throttle WHERE account = $1",
                account,
            )
        if r is None:
            return ThrottleState(account, 0, 0.0, False)
        return ThrottleState(account, int(r[0]), float(r[1]), bool(r[2]))

    async def failed(self, account: str, now: float, free: int, max_backoff: float,
                     lock_after: int) -> ThrottleState:
        """The upsert increments and row-locks in one statement, so concurrent failures get
        distinct counts; the backoff is then set in the same transaction with the domain's
        ``account_backoff`` (one rule for both backends, not a copy of it in SQL)."""
        async with self._db.acquire("cannot record failed login") as conn, conn.transaction():
            failures = int(await conn.fetchval(
                "INSERT INTO auth_throttle AS t (account, failures, next_allowed, locked,"
                " last_failure) VALUES ($1, 1, $2, false, $2)"
                " ON CONFLICT (account) DO UPDATE SET failures = t.failures + 1"
                " RETURNING failures",
                account, now,
            ))
            wait = account_backoff(failures, free, max_backoff)
            locked = failures >= lock_after
            await conn.execute(
                "UPDATE auth_throttle SET next_allowed = $2, locked = $3, last_failure = $4"
                " WHERE account = $1",
                account, now + wait, locked, now,
            )
        return ThrottleState(account, failures, now + wait, locked)

    async def succeeded(self, account: str) -> None:
        async with self._db.acquire("cannot reset throttle") as conn:
            await conn.execute(
                "DELETE FROM auth_throttle WHERE account = $1 AND NOT locked", account
            )

    async def view(self, account: str, source: str, key_fp: str | None) -> ThrottleView:
        async with self._db.acquire("cannot read throttle state") as conn:
            r = await conn.fetchrow(
                "SELECT a.failures AS af, a.next_allowed AS an, a.locked AS al,"
                " p.failures AS pf, p.next_allowed AS pn, p.locked AS pl,"
                " (SELECT last_success FROM auth_known_devices"
                "  WHERE account = $1 AND device = 'ip:' || $2) AS ip_seen,"
                " (SELECT last_success FROM auth_known_devices"
                "  WHERE account = $1 AND device = 'key:' || $3::text) AS key_seen"
                " FROM (SELECT 1) AS one"
                " LEFT JOIN auth_throttle a ON a.account = $1"
                " LEFT JOIN auth_source_throttle p ON p.account = $1 AND p.source = $2",
                account, source, key_fp or "",
            )
        acc = (ThrottleState(account, int(r["af"]), float(r["an"]), bool(r["al"]))
               if r["af"] is not None else ThrottleState(account, 0, 0.0, False))
        ip_seen, key_seen = r["ip_seen"], r["key_seen"]
        pair = SourceThrottleState(
            account, source, int(r["pf"]) if r["pf"] is not None else 0,
            float(r["pn"]) if r["pn"] is not None else 0.0, bool(r["pl"]),
            float(ip_seen) if ip_seen is not None else None)
        return ThrottleView(acc, pair, float(key_seen) if key_fp and key_seen is not None
                            else None)

    async def source_failed(self, account: str, source: str, now: float, free: int,
                            max_backoff: float, lock_after: int) -> SourceThrottleState:
        """As ``failed``, for the (account, source) pair."""
        async with self._db.acquire("cannot record failed login") as conn, conn.transaction():
            failures = int(await conn.fetchval(
                "INSERT INTO auth_source_throttle AS t (account, source, failures, next_allowed,"
                " locked, last_failure) VALUES ($1, $2, 1, $3, false, $3)"
                " ON CONFLICT (account, source) DO UPDATE SET failures = t.failures + 1"
                " RETURNING failures",
                account, source, now,
            ))
            wait = account_backoff(failures, free, max_backoff)
            locked = failures >= lock_after
            await conn.execute(
                "UPDATE auth_source_throttle SET next_allowed = $3, locked = $4,"
                " last_failure = $5 WHERE account = $1 AND source = $2",
                account, source, now + wait, locked, now,
            )
            seen = await conn.fetchval(
                "SELECT last_success FROM auth_known_devices WHERE account = $1"
                " AND device = 'ip:' || $2::text", account, source)
        return SourceThrottleState(account, source, failures, now + wait, locked,
                                   float(seen) if seen is not None else None)

    async def login_succeeded(self, account: str, source: str, key_fp: str | None, now: float,
                              forget_before: float) -> None:
        devices = [f"ip:{source}"] + ([f"key:{key_fp}"] if key_fp else [])
        async with self._db.acquire("cannot record login") as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM auth_throttle WHERE account = $1 AND NOT locked", account)
            await conn.execute(
                "DELETE FROM auth_source_throttle WHERE account = $1 AND source = $2"
                " AND NOT locked", account, source)
            await conn.execute(
                "DELETE FROM auth_known_devices WHERE account = $1 AND last_success < $2",
                account, forget_before)
            await conn.executemany(
                "INSERT INTO auth_known_devices AS k (account, device, last_success)"
                " VALUES ($1, $2, $3) ON CONFLICT (account, device) DO UPDATE SET"
                " last_success = greatest(k.last_success, excluded.last_success)",
                [(account, d, now) for d in devices],
            )

    async def source_listing(self) -> list[SourceThrottleState]:
        async with self._db.acquire("cannot list throttle state") as conn:
            rows = await conn.fetch(
                "SELECT t.account, t.source, t.failures, t.next_allowed, t.locked,"
                " k.last_success FROM auth_source_throttle t LEFT JOIN auth_known_devices k"
                " ON k.account = t.account AND k.device = 'ip:' || t.source"
                " ORDER BY t.locked DESC, t.failures DESC, t.account, t.source"
            )
        return [SourceThrottleState(r[0], r[1], int(r[2]), float(r[3]), bool(r[4]),
                                    float(r[5]) if r[5] is not None else None) for r in rows]

    async def unlock(self, account: str) -> bool:
        async with self._db.acquire("cannot unlock account") as conn, conn.transaction():
            status = await conn.execute("DELETE FROM auth_throttle WHERE account = $1", account)
            pairs = await conn.execute(
                "DELETE FROM auth_source_throttle WHERE account = $1", account)
        return bool(status != "DELETE 0" or pairs != "DELETE 0")

    async def listing(self) -> list[ThrottleState]:
        async with self._db.acquire("cannot list throttle state") as conn:
            rows = await conn.fetch(
                "SELECT account, failures, next_allowed, locked FROM auth_throttle"
                " ORDER BY locked DESC, failures DESC, account"
            )
        return [ThrottleState(r[0], int(r[1]), float(r[2]), bool(r[3])) for r in rows]

    async def summary(self, now: float) -> ThrottleSummary:
        async with self._db.acquire("cannot count throttle state") as conn:
            r = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE locked) AS locked,"
                " count(*) FILTER (WHERE NOT locked AND next_allowed > $1) AS throttled"
                " FROM auth_throttle", now)
        return ThrottleSummary(int(r["locked"]), int(r["throttled"]))


class PostgresKeyStore:
    def __init__(self, db: PostgresDatabase, parse: ParsePublicKey) -> None:
        self._db = db
        self._parse = parse

    async def add(self, account: str, public_key: str, comment: str) -> str:
        line, fp = self._parse(public_key)
        async with self._db.acquire("cannot store SSH key") as conn:
            # re-adding a key refreshes comment and date, like SQLite's INSERT OR REPLACE
            await conn.execute(
                "INSERT INTO user_keys (account, fingerprint, public_key, comment, added_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account, fingerprint) DO UPDATE SET"
                " public_key = excluded.public_key, comment = excluded.comment,"
                " added_at = excluded.added_at",
                account, fp, line, comment, datetime.now(UTC),
            )
        return fp

    async def has(self, account: str, fingerprint: str) -> bool:
        async with self._db.acquire("cannot read SSH keys") as conn:
            v = await conn.fetchval(
                "SELECT 1 FROM user_keys WHERE account = $1 AND fingerprint = $2",
                account, fingerprint,
            )
        return v is not None

    async def remove(self, account: str, fingerprint: str) -> bool:
        async with self._db.acquire("cannot remove SSH key") as conn:
            status = await conn.execute(
                "DELETE FROM user_keys WHERE account = $1 AND fingerprint = $2",
                account, fingerprint,
            )
        return bool(status == "DELETE 1")

    async def listing(self, account: str | None = None) -> list[tuple[str, str, str]]:
        async with self._db.acquire("cannot list SSH keys") as conn:
            if account:
                rows = await conn.fetch(
                    "SELECT account, fingerprint, comment FROM user_keys WHERE account = $1"
                    " ORDER BY added_at", account,
                )
            else:
                rows = await conn.fetch(
                    "SELECT account, fingerprint, comment FROM user_keys"
                    " ORDER BY account, added_at"
                )
        return [(r[0], r[1], r[2]) for r in rows]


class PostgresReauthStore:
    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def remember(self, account: str, ip: str, key_fp: str, until: float) -> None:
        """Upsert the window and prune windows over a day old, as SQLite does."""
        async with self._db.acquire("cannot store re-auth window") as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO reauth_windows (account, ip, key_fp, valid_until)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (account, ip, key_fp)"
                " DO UPDATE SET valid_until = excluded.valid_until",
                account, ip, key_fp, until,
            )
            await conn.execute(
                "DELETE FROM reauth_windows WHERE valid_until < $1", until - 86400
            )

    async def valid(self, account: str, ip: str, key_fp: str, now: float) -> bool:
        async with self._db.acquire("cannot read re-auth window") as conn:
            v = await conn.fetchval(
                "SELECT 1 FROM reauth_windows WHERE account = $1 AND ip = $2 AND key_fp = $3"
                " AND valid_until > $4",
                account, ip, key_fp, now,
            )
        return v is not None


def _session_from_row(r: Any) -> SessionRecord:
    return SessionRecord(
        id=r["id"], user=r["user_name"], target=r["target"], login=r["login"],
        grant_id=r["grant_id"], level=r["level"], kind=r["kind"], command=r["command"],
        peer=r["peer"], started_at=r["started_at"], ended_at=r["ended_at"],
        exit_status=r["exit_status"], bytes_in=int(r["bytes_in"]), bytes_out=int(r["bytes_out"]),
        recording=r["recording"], target_name=r["target_name"], stack=r["stack"],
        parent_id=r["parent_id"], bastion=r["bastion"],
    )


class _Params:
    """Positional parameters of a statement built from optional parts: ``p(value)`` is its
    ``$n``."""

    def __init__(self) -> None:
        self.values: builtins.list[object] = []

    def __call__(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


# the user's local part in lower case (ASCII), as the sessions_user_key index has it
_USER_KEY = "lower(split_part(user_name, '@', 1) COLLATE \"C\")"


def _session_filters(q: SessionQuery, p: _Params) -> builtins.list[str]:
    """``SessionQuery``'s filters as conditions on ``sessions`` (ANDed), as in SQLite's
    ``_session_filters``: ASCII case folding through the ``lower(x COLLATE "C")`` indexes, the
    user's "any domain" match through the indexed local part, ids in byte order. Only
    conditions PostgreSQL's statistics can estimate: a guess of a few rows for a user with a
    tenth of the sessions made it check every one of them in the text index before sorting."""
    where: builtins.list[str] = []
    if q.user and "@" in q.user:
        where.append(f"user_name = {p(q.user)}")
    elif q.user:  # any domain, ASCII case-insensitive; a user without one: exactly
        where.append(f"{_USER_KEY} = {p(ascii_lower(q.user))}"
                     f" AND (strpos(user_name, '@') > 0 OR user_name = {p(q.user)})")
    if q.target:
        key = p(ascii_lower(q.target))
        where.append(f'(lower(target COLLATE "C") = {key}'
                     f' OR lower(target_name COLLATE "C") = {key})')
    for column, value in (("stack", q.stack), ("grant_id", q.grant_id), ("kind", q.kind),
                          ("parent_id", q.parent_id)):
        if value is not None:
            where.append(f"{column} = {p(value)}")
    grant_where = [f"{column} = {p(value)}"
                   for column, value in (("ticket", q.ticket), ("trigger", q.trigger))
                   if value is not None]
    if grant_where:
        where.append("grant_id IN (SELECT id FROM grants WHERE "  # noqa: S608
                     + " AND ".join(grant_where) + ")")
    if q.status is not None:
        where.append(STATUS_SQL[q.status])
    if q.since is not None:
        where.append(f"(ended_at IS NULL OR ended_at >= {p(_utc(q.since))})")
    if q.until is not None:
        where.append(f"started_at < {p(_utc(q.until))}")
    if q.top_level:
        where.append("parent_id IS NULL")
    if q.after is not None:
        where.append(f'(started_at, id COLLATE "C") < ({p(_utc(q.after[0]))}, {p(q.after[1])})')
    return where


# the first hits of each session, one session at a time: for a common word, its segments in
# order until enough match (the GIN index would list the word's every segment first)
_HITS = (
    "SELECT s.id AS session_id, h.t, h.source, h.body FROM unnest($1::text[]) AS s (id)"
    " CROSS JOIN LATERAL (SELECT seq, t, source, body FROM session_text"
    " WHERE session_id = s.id AND tsv @@ $2::tsquery ORDER BY seq LIMIT $3) AS h"
)


class PostgresSessionIndex:
    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def started(self, rec: SessionRecord) -> None:
        async with self._db.acquire("cannot index session") as conn:
            await conn.execute(
                "INSERT INTO sessions (id, user_name, target, login, grant_id, level, kind,"
                " command, peer, started_at, recording, target_name, stack, parent_id, bastion)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15)",
                rec.id, rec.user, rec.target, rec.login, rec.grant_id, rec.level, rec.kind,
                rec.command, rec.peer, _utc(rec.started_at), rec.recording, rec.target_name,
                rec.stack, rec.parent_id, rec.bastion,
            )

    async def ended(
        self, session_id: str, ended_at: datetime, exit_status: str | None,
        bytes_in: int, bytes_out: int,
    ) -> None:
        async with self._db.acquire("cannot update session") as conn:
            await conn.execute(
                "UPDATE sessions SET ended_at = $2, exit_status = $3, bytes_in = $4,"
                " bytes_out = $5 WHERE id = $1",
                session_id, _utc(ended_at), exit_status, bytes_in, bytes_out,
            )

    @staticmethod
    async def _by_prefix(conn: Any, prefix: str, limit: int) -> builtins.list[Any]:
        """Through the ``lower(id)`` index (the range of ids starting with the lowercased
        prefix), then ILIKE under "C" for SQLite's rule (ASCII case only)."""
        if not prefix:
            return list(await conn.fetch(
                'SELECT * FROM sessions ORDER BY id COLLATE "C" LIMIT $1', limit))
        key = ascii_lower(prefix)
        return list(await conn.fetch(
            'SELECT * FROM sessions WHERE lower(id COLLATE "C") >= $1'
            ' AND lower(id COLLATE "C") < $2 AND id ILIKE $3 COLLATE "C" ESCAPE \'\\\''
            ' ORDER BY id COLLATE "C" LIMIT $4',
            key, key[:-1] + chr(ord(key[-1]) + 1), _like_prefix(prefix), limit))

    async def get(self, session_id: str) -> SessionRecord | None:
        async with self._db.acquire("cannot read session") as conn:
            r = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1", session_id)
            if r is None and len(session_id) >= 6:
                # accept a unique prefix, as git does for commits
                rows = await self._by_prefix(conn, session_id, 2)
                r = rows[0] if len(rows) == 1 else None
        return _session_from_row(r) if r else None

    async def by_prefix(self, prefix: str, limit: int = 10) -> builtins.list[SessionRecord]:
        async with self._db.acquire("cannot read sessions") as conn:
            rows = await self._by_prefix(conn, prefix, max(limit, 0))
        return [_session_from_row(r) for r in rows]

    async def list(self, *, user: str | None = None,
                   limit: int = 100) -> builtins.list[SessionRecord]:
        rows: Sequence[Any]
        cap = limit if limit >= 0 else None  # SQLite reads a negative LIMIT as no limit
        async with self._db.acquire("cannot list sessions") as conn:
            if user:
                # "alice" matches alice@any-domain; "alice@corp.example.com" matches exactly
                rows = await conn.fetch(_SESSIONS_OF_USER, user, _like_prefix(user + "@"), cap)
            else:
                rows = await conn.fetch(
                    "SELECT * FROM sessions ORDER BY started_at DESC, seq DESC LIMIT $1", cap
                )
        return [_session_from_row(r) for r in rows]

    async def search(self, q: SessionQuery) -> builtins.list[SessionMatch]:
        """One statement; PostgreSQL's planner knows how common each word is (the tsvector
        statistics), so it picks between the text index and reading sessions newest first."""
        check_query(q)
        words = query_words(q.text)
        if q.limit <= 0 or words == []:
            return []
        p = _Params()
        where = _session_filters(q, p)
        tsquery = pg_tsquery(words) if words else None
        if tsquery is not None:
            where.append("id IN (SELECT session_id FROM session_text"  # noqa: S608
                         f" WHERE tsv @@ {p(tsquery)}::tsquery)")
        sql = ("SELECT * FROM sessions"  # noqa: S608 (conditions from _session_filters)
               + (" WHERE " + " AND ".join(where) if where else "")
               + f' ORDER BY started_at DESC, id COLLATE "C" DESC LIMIT {p(q.limit)}')
        async with self._db.acquire("cannot search sessions") as conn:
            rows = await conn.fetch(sql, *p.values)
            if tsquery is None or not rows or words is None:
                return [SessionMatch(_session_from_row(r)) for r in rows]
            hits = await self._hits(conn, [r["id"] for r in rows], tsquery, words, MAX_HITS)
        return [SessionMatch(_session_from_row(r), tuple(hits.get(r["id"], ()))) for r in rows]

    @staticmethod
    async def _hits(conn: Any, ids: builtins.list[str], tsquery: str,
                    words: builtins.list[builtins.list[str]],
                    limit: int) -> dict[str, builtins.list[TextHit]]:
        out: dict[str, builtins.list[TextHit]] = {}
        for r in await conn.fetch(_HITS, ids, tsquery, limit):
            out.setdefault(r["session_id"], []).append(
                TextHit(float(r["t"]), r["source"], snippet(r["body"], words)))
        return out

    async def index_text(self, session_id: str, segments: Sequence[TextSegment]) -> None:
        """Replace the session's segments in one transaction, numbered in ``t`` order. NUL
        characters are dropped (PostgreSQL's text cannot hold them)."""
        ordered = sorted(segments, key=lambda s: s.t)
        rows = [(session_id, n, s.t, s.source, s.text.replace("\x00", ""),
                 pg_tsvector(s.text)) for n, s in enumerate(ordered)]
        async with self._db.acquire("cannot index session text") as conn, conn.transaction():
            await conn.execute("DELETE FROM session_text WHERE session_id = $1", session_id)
            await conn.executemany(
                "INSERT INTO session_text (session_id, seq, t, source, body, tsv)"
                " VALUES ($1, $2, $3, $4, $5, $6::tsvector)", rows)

    async def text_hits(self, session_id: str, text: str,
                        limit: int = 200) -> builtins.list[TextHit]:
        words = query_words(text)
        if not words or limit <= 0:
            return []
        async with self._db.acquire("cannot search session text") as conn:
            hits = await self._hits(conn, [session_id], pg_tsquery(words), words, limit)
        return hits.get(session_id, [])

    async def per_day(self, since: datetime) -> builtins.list[tuple[str, int]]:
        async with self._db.acquire("cannot count sessions") as conn:
            rows = await conn.fetch(
                "SELECT to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, count(*)"
                " FROM sessions WHERE started_at >= $1 GROUP BY day ORDER BY day", _utc(since))
        return [(r[0], int(r[1])) for r in rows]

    async def live_count(self) -> int:
        async with self._db.acquire("cannot count sessions") as conn:
            return int(await conn.fetchval(
                "SELECT count(*) FROM sessions WHERE ended_at IS NULL"))


def _token_from_row(r: Any) -> ApiTokenRecord:
    return ApiTokenRecord(
        id=r["id"], owner=r["owner"], name=r["name"], scopes=tuple(json.loads(r["scopes"])),
        roles=tuple(json.loads(r["roles"])), groups=tuple(json.loads(r["groups"])),
        created_at=r["created_at"], expires_at=r["expires_at"], revoked_at=r["revoked_at"],
    )


class PostgresApiTokenStore:
    """API tokens (hashed) and logged-out web sessions, shared by every bastion of a fleet."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def add(self, rec: ApiTokenRecord, token_hash: str) -> None:
        async with self._db.acquire("cannot store API token") as conn:
            await conn.execute(
                "INSERT INTO api_tokens (id, token_hash, owner, name, scopes, roles, groups,"
                " created_at, expires_at) VALUES ($1,$2,$3,$4,$5::jsonb,$6::jsonb,$7::jsonb,$8,$9)",
                rec.id, token_hash, rec.owner, rec.name, json.dumps(list(rec.scopes)),
                json.dumps(list(rec.roles)), json.dumps(list(rec.groups)), rec.created_at,
                rec.expires_at,
            )

    async def by_hash(self, token_hash: str) -> ApiTokenRecord | None:
        async with self._db.acquire("cannot read API token") as conn:
            r = await conn.fetchrow("SELECT * FROM api_tokens WHERE token_hash = $1", token_hash)
        return _token_from_row(r) if r else None

    async def listing(self, owner: str | None = None) -> builtins.list[ApiTokenRecord]:
        async with self._db.acquire("cannot list API tokens") as conn:
            rows = await conn.fetch(
                "SELECT * FROM api_tokens WHERE $1::text IS NULL OR owner = $1"
                " ORDER BY created_at, id", owner)
        return [_token_from_row(r) for r in rows]

    async def revoke(self, token_id: str, owner: str | None, now: datetime) -> bool:
        async with self._db.acquire("cannot revoke API token") as conn:
            status = await conn.execute(
                "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2"
                " AND ($3::text IS NULL OR owner = $3) AND revoked_at IS NULL",
                now, token_id, owner)
        return bool(status.endswith(" 1"))

    async def start_session(self, rec: WebSessionRecord) -> None:
        async with self._db.acquire("cannot store web session") as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO web_sessions (sid, owner, peer, created_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                rec.sid, rec.owner, rec.peer, rec.created_at, rec.expires_at)
            await conn.execute("DELETE FROM web_sessions WHERE expires_at < $1",
                               rec.created_at - timedelta(days=2))

    async def session_active(self, sid: str, now: datetime) -> bool:
        async with self._db.acquire("cannot read web session") as conn:
            v = await conn.fetchval(
                "SELECT 1 FROM web_sessions s WHERE s.sid = $1 AND s.ended_at IS NULL"
                " AND s.expires_at > $2 AND NOT EXISTS"
                " (SELECT 1 FROM web_sessions_revoked r WHERE r.sid = s.sid)", sid, now)
        return v is not None

    async def sessions(self, owner: str | None = None, *,
                       now: datetime) -> builtins.list[WebSessionRecord]:
        async with self._db.acquire("cannot list web sessions") as conn:
            rows = await conn.fetch(
                "SELECT * FROM web_sessions s WHERE ($1::text IS NULL OR s.owner = $1)"
                " AND s.ended_at IS NULL AND s.expires_at > $2 AND NOT EXISTS"
                " (SELECT 1 FROM web_sessions_revoked r WHERE r.sid = s.sid)"
                " ORDER BY s.created_at, s.sid", owner, now)
        return [WebSessionRecord(sid=r["sid"], owner=r["owner"], peer=r["peer"],
                                 created_at=r["created_at"], expires_at=r["expires_at"],
                                 ended_at=r["ended_at"]) for r in rows]

    async def revoke_session(self, sid: str, now: datetime) -> bool:
        async with self._db.acquire("cannot end web session") as conn, conn.transaction():
            expires = await conn.fetchval(
                "UPDATE web_sessions SET ended_at = $2 WHERE sid = $1 AND ended_at IS NULL"
                " AND expires_at > $2 RETURNING expires_at", sid, now)
            if expires is None:
                return False
            await conn.execute(
                "INSERT INTO web_sessions_revoked (sid, expires) VALUES ($1, $2)"
                " ON CONFLICT (sid) DO NOTHING", sid, expires.timestamp())
        return True

    async def end_session(self, sid: str, expires: float) -> None:
        async with self._db.acquire("cannot end web session") as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO web_sessions_revoked (sid, expires) VALUES ($1, $2)"
                " ON CONFLICT (sid) DO NOTHING", sid, expires)
            await conn.execute("DELETE FROM web_sessions_revoked WHERE expires < $1",
                               expires - 2 * 86400)

    async def session_ended(self, sid: str) -> bool:
        async with self._db.acquire("cannot read web session") as conn:
            v = await conn.fetchval("SELECT 1 FROM web_sessions_revoked WHERE sid = $1", sid)
        return v is not None
