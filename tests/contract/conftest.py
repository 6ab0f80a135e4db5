"""Fixtures for the store contract suite: one bundle of every store per backend.

``stores`` is parametrized over "sqlite" (a temp file) and "postgres" (a real PostgreSQL 15 server
started once per session; each test gets its own database cloned from a migrated template, so
tests never see each other's rows). ``stores.twin()`` opens a second, independent connection to
the same data, as a second broker process would, for the concurrency cases.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import pytest

from broker.ports import (
    GrantStore,
    KeyStore,
    ReauthStore,
    SessionIndex,
    ThrottleStore,
    TokenStore,
    TotpStore,
)
from broker.ssh.keys import parse_public_key
from broker.store.postgres import (
    PostgresApiTokenStore,
    PostgresDatabase,
    PostgresGrantStore,
    PostgresKeyStore,
    PostgresReauthStore,
    PostgresSessionIndex,
    PostgresThrottleStore,
    PostgresTotpStore,
)
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
from tests.contract.pgserver import PgServer

TEMPLATE_DB = "bb_template"
_db_names = itertools.count(1)


class ContractGrantStore(GrantStore, Protocol):
    """Everything both grant stores offer (the port now includes the workflow's needs)."""


@dataclass
class StoreBundle:
    """Every store of one backend over one database; ``db`` is the backend's database object."""

    backend: str
    db: Any
    grants: ContractGrantStore
    totp: TotpStore
    throttle: ThrottleStore
    sessions: SessionIndex
    keys: KeyStore
    reauth: ReauthStore
    tokens: TokenStore
    twin: Callable[[], Awaitable[StoreBundle]] = field(repr=False)


def _sqlite_bundle(path: Path, closers: list[Callable[[], Awaitable[None]]]) -> StoreBundle:
    db = SqliteDatabase(path)

    async def close() -> None:
        db.close()

    async def twin() -> StoreBundle:
        return _sqlite_bundle(path, closers)

    closers.append(close)
    return StoreBundle(
        "sqlite", db, SqliteGrantStore(db), SqliteTotpStore(db), SqliteThrottleStore(db),
        SqliteSessionIndex(db), SqliteKeyStore(db, parse_public_key), SqliteReauthStore(db),
        SqliteApiTokenStore(db), twin,
    )


async def _postgres_bundle(dsn: str, closers: list[Callable[[], Awaitable[None]]]) -> StoreBundle:
    db = await PostgresDatabase.connect(dsn, min_size=1, max_size=10)

    async def twin() -> StoreBundle:
        return await _postgres_bundle(dsn, closers)

    closers.append(db.close)
    return StoreBundle(
        "postgres", db, PostgresGrantStore(db), PostgresTotpStore(db), PostgresThrottleStore(db),
        PostgresSessionIndex(db), PostgresKeyStore(db, parse_public_key), PostgresReauthStore(db),
        PostgresApiTokenStore(db), twin,
    )


async def _build_template(server: PgServer) -> None:
    admin = await asyncpg.connect(server.dsn(), timeout=60)
    try:
        await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await admin.close()
    db = await PostgresDatabase.connect(server.dsn(TEMPLATE_DB), min_size=1, max_size=1)
    await db.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL 15 server for the session, with a migrated template database."""
    try:
        server = PgServer()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        server.start()
        asyncio.run(_build_template(server))
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def pg_database(pg_server: PgServer) -> AsyncIterator[str]:
    """DSN of a fresh, migrated database for this test."""
    name = await _create_database(pg_server, TEMPLATE_DB)
    yield pg_server.dsn(name)
    await _drop_database(pg_server, name)


@pytest.fixture
async def pg_empty_database(pg_server: PgServer) -> AsyncIterator[str]:
    """DSN of a fresh database with no schema at all."""
    name = await _create_database(pg_server, "template0")
    yield pg_server.dsn(name)
    await _drop_database(pg_server, name)


async def _create_database(server: PgServer, template: str) -> str:
    name = f"t_{next(_db_names)}"
    admin = await asyncpg.connect(server.dsn(), timeout=60)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await admin.close()
    return name


async def _drop_database(server: PgServer, name: str) -> None:
    """Each clone costs ~8 MB of disk; FORCE ends connections a failed test left behind."""
    admin = await asyncpg.connect(server.dsn(), timeout=60)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name; synchronous so the session server starts outside any event loop."""
    if request.param == "postgres":
        request.getfixturevalue("pg_server")
    return str(request.param)


@pytest.fixture
async def stores(backend: str, request: pytest.FixtureRequest,
                 tmp_path: Path) -> AsyncIterator[StoreBundle]:
    closers: list[Callable[[], Awaitable[None]]] = []
    server: PgServer | None = None
    name = ""
    try:
        if backend == "sqlite":
            bundle = _sqlite_bundle(tmp_path / "broker.db", closers)
        else:
            server = request.getfixturevalue("pg_server")
            name = await _create_database(server, TEMPLATE_DB)
            bundle = await _postgres_bundle(server.dsn(name), closers)
        yield bundle
    finally:
        for close in reversed(closers):
            await close()
        if server is not None and name:
            await _drop_database(server, name)


@pytest.fixture
def restartable_pg() -> Iterator[PgServer]:
    """A server of its own, for tests that stop and restart it."""
    try:
        server = PgServer()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.destroy()
