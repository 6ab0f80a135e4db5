"""PostgreSQL-only behaviour: versioned migrations under an advisory lock, outages as StoreError.

The contract suite covers semantics shared with SQLite; these cover what only a networked server
can do: several brokers migrating at once, and the server going away and coming back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from broker.errors import StoreError
from broker.ports import SessionRecord
from broker.ssh.keys import parse_public_key
from broker.store.pg_migrations import MIGRATIONS
from broker.store.postgres import (
    PostgresDatabase,
    PostgresGrantStore,
    PostgresKeyStore,
    PostgresReauthStore,
    PostgresSessionIndex,
    PostgresThrottleStore,
    PostgresTotpStore,
    load_dsn,
)
from tests.contract.pgserver import PgServer, free_port
from tests.contract.test_store_contract import make_grant, make_session

pytestmark = pytest.mark.postgres

ALL_VERSIONS = list(range(1, len(MIGRATIONS) + 1))
TABLES = {"grants", "grant_history", "totp", "sessions", "auth_throttle", "user_keys",
          "reauth_windows", "schema_migrations", "api_tokens", "web_sessions_revoked",
          "auth_source_throttle", "auth_known_devices", "web_sessions", "session_text",
          "locks", "session_kills", "notify_outbox", "bastions"}


async def _tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r[0] for r in rows}
    finally:
        await conn.close()


async def test_migrations_applied_once_and_idempotent(pg_empty_database: str) -> None:
    assert await _tables(pg_empty_database) == set()
    db = await PostgresDatabase.connect(pg_empty_database)
    try:
        assert await db.versions() == ALL_VERSIONS
        assert await db.migrate() == []  # nothing left to do
    finally:
        await db.close()
    db = await PostgresDatabase.connect(pg_empty_database)  # a restart migrates nothing
    try:
        assert await db.versions() == ALL_VERSIONS
    finally:
        await db.close()
    assert await _tables(pg_empty_database) == TABLES


async def test_concurrent_connects_migrate_once(pg_empty_database: str) -> None:
    """Brokers starting together: without the advisory lock, racing CREATE TABLEs would fail."""
    dbs = await asyncio.gather(*[PostgresDatabase.connect(pg_empty_database, max_size=2)
                                 for _ in range(6)])
    try:
        for db in dbs:
            assert await db.versions() == ALL_VERSIONS
        # every process can use the schema straight away
        await PostgresGrantStore(dbs[0]).add(make_grant())
        assert await PostgresGrantStore(dbs[-1]).get("g1") == make_grant()
    finally:
        await asyncio.gather(*[db.close() for db in dbs])


async def test_connect_failures_are_store_errors(pg_server: PgServer) -> None:
    bad = [
        pg_server.dsn("no_such_database"),
        f"postgresql://no_such_role@127.0.0.1:{pg_server.port}/postgres",
        f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",  # nothing listens
        "postgresql://postgres@127.0.0.1:99999/postgres",  # invalid port
    ]
    for dsn in bad:
        with pytest.raises(StoreError):
            await PostgresDatabase.connect(dsn, connect_timeout=30)


def test_load_dsn(tmp_path: Path) -> None:
    f = tmp_path / "dsn"
    f.write_text("postgresql://broker:s3cret@db.internal/broker\n")
    assert load_dsn(None, f) == "postgresql://broker:s3cret@db.internal/broker"
    assert load_dsn("postgresql://x@y/z", None) == "postgresql://x@y/z"
    assert load_dsn("postgresql://ignored@y/z", f).startswith("postgresql://broker:")
    with pytest.raises(StoreError):
        load_dsn(None, None)
    with pytest.raises(StoreError):
        load_dsn(None, tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(StoreError):
        load_dsn(None, tmp_path / "empty")


async def _exercise(db: PostgresDatabase, n: int) -> None:
    """One call of every store; raises whatever the store raises."""
    await PostgresGrantStore(db).get("g1")
    await PostgresTotpStore(db).advance_step("alice@corp", n)
    await PostgresThrottleStore(db).failed("alice", 1.0, 3, 60.0, 10)
    await PostgresSessionIndex(db).list(user="alice")
    await PostgresKeyStore(db, parse_public_key).listing()
    await PostgresReauthStore(db).valid("alice", "10.0.0.1", "k", 0.0)


async def test_server_outage_is_store_error_and_pool_recovers(restartable_pg: PgServer) -> None:
    db = await PostgresDatabase.connect(restartable_pg.dsn(), min_size=2, max_size=4,
                                        connect_timeout=5, acquire_timeout=10)
    try:
        await PostgresSessionIndex(db).started(make_session("sess-000001"))
        await _exercise(db, 1)
        await asyncio.to_thread(restartable_pg.stop, "fast")
        calls = [
            PostgresGrantStore(db).get("g1"),
            PostgresGrantStore(db).add(make_grant("g2")),
            PostgresTotpStore(db).advance_step("alice@corp", 2),
            PostgresThrottleStore(db).failed("alice", 1.0, 3, 60.0, 10),
            PostgresSessionIndex(db).get("sess-0000"),
            PostgresSessionIndex(db).started(make_session("sess-000002")),
            PostgresKeyStore(db, parse_public_key).has("alice", "SHA256:x"),
            PostgresReauthStore(db).remember("alice", "10.0.0.1", "k", 100.0),
        ]
        for call in calls:
            with pytest.raises(StoreError) as info:
                await call
            assert not isinstance(info.value, asyncpg.PostgresError)
        # a broker starting during the outage fails closed too
        with pytest.raises(StoreError):
            await PostgresDatabase.connect(restartable_pg.dsn(), connect_timeout=5)

        await asyncio.to_thread(restartable_pg.start)
        await _exercise(db, 3)  # the pool replaced its dead connections by itself
        got = await PostgresSessionIndex(db).get("sess-000001")
        assert isinstance(got, SessionRecord)
        assert await PostgresTotpStore(db).last_step("alice@corp") is None  # no secret set
    finally:
        await db.close()
