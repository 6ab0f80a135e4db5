"""What monitoring needs from every store backend: a cheap ping (readiness), a report of every
call's duration (latency metrics) and the count of locked and throttled accounts. Each test runs
on SQLite and on PostgreSQL alike; the outage case needs a server of its own."""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import StoreError
from broker.ports import NullMetrics, ThrottleSummary
from broker.store.postgres import PostgresDatabase, PostgresGrantStore
from tests.contract.conftest import StoreBundle
from tests.contract.pgserver import PgServer
from tests.contract.test_store_contract import make_grant


class CallTimes(NullMetrics):
    """Records what a store reports (the observer side of the Database port)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def store_call(self, seconds: float) -> None:
        self.seconds.append(seconds)


async def test_ping_answers_and_fails_closed_once_the_database_is_closed(
    stores: StoreBundle,
) -> None:
    await stores.db.ping()
    twin = await stores.twin()
    await twin.db.ping()
    if stores.backend == "sqlite":
        twin.db.close()
    else:
        await twin.db.close()
    with pytest.raises(StoreError):
        await twin.db.ping()
    await stores.db.ping()  # the other connection is not affected


async def test_every_store_call_reports_its_duration(stores: StoreBundle) -> None:
    times = CallTimes()
    stores.db.observe(times)
    assert await stores.grants.get("nope") is None
    await stores.grants.add(make_grant("g1"))
    await stores.throttle.failed("alice@corp", 100.0, 3, 60.0, 10)
    await stores.sessions.list(limit=5)
    assert len(times.seconds) == 4
    assert all(0 <= s < 10 for s in times.seconds)
    with pytest.raises(StoreError):  # a failed call is reported too
        await stores.grants.add(make_grant("g1"))
    assert len(times.seconds) == 5


async def test_throttle_summary_counts_locked_and_backed_off_accounts(
    stores: StoreBundle,
) -> None:
    t = stores.throttle
    assert await t.summary(1000.0) == ThrottleSummary(0, 0)
    for _ in range(3):  # locked after 3
        await t.failed("locked@corp", 1000.0, 0, 60.0, 3)
    await t.failed("slow@corp", 1000.0, 0, 60.0, 50)  # backs off: next try after 1000 + 1
    await t.failed("free@corp", 1000.0, 5, 60.0, 50)  # within its free failures: no back-off
    s = await t.summary(1000.0)
    assert (s.locked, s.throttled) == (1, 1)
    later = await t.summary(1000.0 + 3600)  # the back-off is over; the lock is not
    assert (later.locked, later.throttled) == (1, 0)
    assert await t.unlock("locked@corp")
    done = await t.summary(1000.0 + 3600)
    assert (done.locked, done.throttled) == (0, 0)


@pytest.mark.postgres
async def test_postgres_ping_fails_during_an_outage_and_recovers(
    restartable_pg: PgServer,
) -> None:
    db = await PostgresDatabase.connect(restartable_pg.dsn(), min_size=1, max_size=2,
                                        connect_timeout=5, acquire_timeout=5)
    try:
        await db.ping()
        await asyncio.to_thread(restartable_pg.stop, "fast")
        with pytest.raises(StoreError):
            await asyncio.wait_for(db.ping(), 30)
        await asyncio.to_thread(restartable_pg.start)
        await db.ping()
        assert await PostgresGrantStore(db).get("g1") is None
    finally:
        await db.close()
