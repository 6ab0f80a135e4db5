"""The SQLite store on a real file: migrations, grants, TOTP and the session index."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from broker.domain.models import Grant, GrantState, Level, Trigger
from broker.errors import StoreError
from broker.ports import SessionRecord
from broker.store.sqlite import (
    MIGRATIONS,
    SqliteDatabase,
    SqliteGrantStore,
    SqliteSessionIndex,
    SqliteTotpStore,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "broker.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[SqliteDatabase]:
    d = SqliteDatabase(db_path)
    yield d
    d.close()


def make_grant(gid: str = "g1", **kw: object) -> Grant:
    g = Grant(
        id=gid,
        username="Alice",
        domain="Corp.Example.com",
        stack_ids=("stack-a", "stack-b"),
        vpc_id="vpc-1",
        level=Level.ADMIN,
        state=GrantState.APPROVED,
        starts_at=T0,
        expires_at=T0 + timedelta(hours=8),
        trigger=Trigger.INCIDENT,
        ticket="INC-1",
        reason="outage",
        requested_by="bob",
        approved_by="carol",
        created_at=T0 - timedelta(minutes=1),
    )
    return replace(g, **kw)  # type: ignore[arg-type]


def test_open_creates_dirs_wal_and_schema(db: SqliteDatabase, db_path: Path) -> None:
    assert db_path.exists()
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"grants", "totp", "sessions"} <= tables


def test_reopen_does_not_remigrate(db: SqliteDatabase, db_path: Path) -> None:
    db.conn.execute("INSERT INTO totp (user_key, secret) VALUES ('k', 's')")
    again = SqliteDatabase(db_path)
    try:
        assert again.conn.execute("SELECT secret FROM totp").fetchone()[0] == "s"
        assert again.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        again.close()


def test_unopenable_database_is_store_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-db"
    bad.write_bytes(b"this is not an sqlite file at all" * 100)
    with pytest.raises(StoreError, match="cannot open state database"):
        SqliteDatabase(bad)


async def test_grant_round_trip(db: SqliteDatabase) -> None:
    store = SqliteGrantStore(db)
    g = make_grant()
    await store.add(g)
    got = await store.get("g1")
    assert got == g
    assert got is not None
    assert got.starts_at.tzinfo is not None
    assert await store.get("nope") is None


async def test_grant_times_normalised_to_utc(db: SqliteDatabase) -> None:
    store = SqliteGrantStore(db)
    paris = timezone(timedelta(hours=1))
    g = make_grant(starts_at=datetime(2025, 3, 1, 13, 0, tzinfo=paris))
    await store.add(g)
    got = await store.get("g1")
    assert got is not None
    assert got.starts_at == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert got.starts_at.utcoffset() == timedelta(0)


async def test_grant_created_at_defaults_to_starts_at(db: SqliteDatabase) -> None:
    store = SqliteGrantStore(db)
    await store.add(make_grant(created_at=None))
    got = await store.get("g1")
    assert got is not None
    assert got.created_at == T0


async def test_duplicate_grant_id_is_store_error(db: SqliteDatabase) -> None:
    store = SqliteGrantStore(db)
    await store.add(make_grant())
    with pytest.raises(StoreError, match="cannot store grant"):
        await store.add(make_grant())


async def test_for_user_is_case_insensitive(db: SqliteDatabase) -> None:
    store = SqliteGrantStore(db)
    await store.add(make_grant("g1"))
    await store.add(make_grant("g2", username="bob"))
    await store.add(make_grant("g3", domain="other.example"))
    assert [g.id for g in await store.for_user("ALICE", "corp.EXAMPLE.com")] == ["g1"]
    assert await store.for_user("alice", "nowhere") == []


async def test_list_all_and_by_user_in_creation_order(db: SqliteDatabase) -> None:
    store = SqliteGrantStore(db)
    await store.add(make_grant("late", created_at=T0 + timedelta(hours=1)))
    await store.add(make_grant("early", created_at=T0 - timedelta(hours=1)))
    await store.add(make_grant("bobs", username="Bob", created_at=T0))
    assert [g.id for g in await store.list()] == ["early", "bobs", "late"]
    assert [g.id for g in await store.list(username="alice")] == ["early", "late"]
    assert [g.id for g in await store.list(username="BOB")] == ["bobs"]


async def test_replace_changes_state(db: SqliteDatabase) -> None:
    store = SqliteGrantStore(db)
    g = make_grant()
    await store.add(g)
    revoked = replace(g, state=GrantState.REVOKED)
    await store.replace(revoked)
    assert await store.get("g1") == replace(revoked, version=2)
    version = db.conn.execute("SELECT version FROM grants WHERE id='g1'").fetchone()[0]
    assert version == 2


async def test_replace_missing_is_store_error(db: SqliteDatabase) -> None:
    with pytest.raises(StoreError, match="grant nope not found"):
        await SqliteGrantStore(db).replace(make_grant("nope"))


async def test_grant_visible_to_second_connection(db: SqliteDatabase, db_path: Path) -> None:
    await SqliteGrantStore(db).add(make_grant())
    other = SqliteDatabase(db_path)
    try:
        assert await SqliteGrantStore(other).get("g1") == make_grant()
    finally:
        other.close()


async def test_totp_store(db: SqliteDatabase) -> None:
    s = SqliteTotpStore(db)
    assert await s.get_secret("alice@corp") is None
    assert await s.last_step("alice@corp") is None
    assert await s.advance_step("alice@corp", 1) is False  # no row, nothing to advance
    await s.set_secret("alice@corp", "SECRET1")
    assert await s.get_secret("alice@corp") == "SECRET1"
    assert await s.advance_step("alice@corp", 5) is True
    assert await s.advance_step("alice@corp", 5) is False
    assert await s.last_step("alice@corp") == 5
    await s.set_secret("alice@corp", "SECRET2")
    assert await s.get_secret("alice@corp") == "SECRET2"
    assert await s.last_step("alice@corp") is None
    assert await s.get_secret("bob@corp") is None


def session(sid: str, user: str = "alice@corp.example.com", minutes: int = 0) -> SessionRecord:
    return SessionRecord(
        id=sid,
        user=user,
        target="web01",
        login="admin",
        grant_id="g1",
        level="admin",
        kind="shell",
        command=None,
        peer="192.0.2.1:50000",
        started_at=T0 + timedelta(minutes=minutes),
        ended_at=None,
        exit_status=None,
        bytes_in=0,
        bytes_out=0,
        recording=f"/rec/{sid}.rec",
    )


async def test_session_started_and_ended(db: SqliteDatabase) -> None:
    idx = SqliteSessionIndex(db)
    rec = session("abcdef01-0000")
    await idx.started(rec)
    assert await idx.get("abcdef01-0000") == rec
    end = T0 + timedelta(minutes=5)
    await idx.ended("abcdef01-0000", end, "0", 123, 4567)
    assert await idx.get("abcdef01-0000") == replace(
        rec, ended_at=end, exit_status="0", bytes_in=123, bytes_out=4567
    )


async def test_session_get_by_unique_prefix(db: SqliteDatabase) -> None:
    idx = SqliteSessionIndex(db)
    await idx.started(session("abcdef01-0000"))
    await idx.started(session("abcdef02-0000"))
    await idx.started(session("123456aa-0000"))
    assert (await idx.get("123456")) == session("123456aa-0000")
    assert await idx.get("abcdef") is None  # ambiguous
    assert (await idx.get("abcdef02")) == session("abcdef02-0000")
    assert await idx.get("12345") is None  # prefixes under 6 characters are not accepted
    assert await idx.get("zzzzzzzz") is None


async def test_session_list_newest_first_limit_and_user(db: SqliteDatabase) -> None:
    idx = SqliteSessionIndex(db)
    await idx.started(session("s1", minutes=1))
    await idx.started(session("s3", minutes=3))
    await idx.started(session("s2", user="bob@corp.example.com", minutes=2))
    assert [r.id for r in await idx.list()] == ["s3", "s2", "s1"]
    assert [r.id for r in await idx.list(limit=2)] == ["s3", "s2"]
    assert [r.id for r in await idx.list(user="alice")] == ["s3", "s1"]
    assert [r.id for r in await idx.list(user="bob@corp.example.com")] == ["s2"]


async def test_sessions_are_stored_as_utc_text(db: SqliteDatabase) -> None:
    idx = SqliteSessionIndex(db)
    await idx.started(session("s1"))
    raw = db.conn.execute("SELECT started_at FROM sessions").fetchone()[0]
    assert raw == "2025-03-01T12:00:00.123456+00:00"
