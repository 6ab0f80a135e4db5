"""The ``FleetStore`` contract on SQLite and PostgreSQL: heartbeats, the open sessions of
bastions gone silent, and the one conditional update that decides who closes each."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from broker.ports import FleetStore
from broker.store.postgres_fleet import PostgresFleetStore
from broker.store.sqlite_fleet import SqliteFleetStore
from tests.contract.conftest import StoreBundle
from tests.contract.test_store_contract import T0, make_session


def fleet_of(b: StoreBundle) -> FleetStore:
    return SqliteFleetStore(b.db) if b.backend == "sqlite" else PostgresFleetStore(b.db)


async def test_heartbeats_round_trip(stores: StoreBundle) -> None:
    f = fleet_of(stores)
    await f.beat("b2", T0, T0)
    await f.beat("b1", T0 + timedelta(seconds=5), T0)
    await f.beat("b1", T0 + timedelta(seconds=15), T0 + timedelta(seconds=10))  # restarted
    got = {b.name: b for b in await f.bastions()}
    assert list(got) == ["b1", "b2"]
    assert (got["b1"].started_at, got["b1"].seen_at) == (T0 + timedelta(seconds=10),
                                                         T0 + timedelta(seconds=15))
    assert got["b2"].seen_at == T0 and got["b2"].seen_at.utcoffset() == timedelta(0)
    await stores.sessions.started(make_session("s-1", bastion="b1"))
    await stores.sessions.started(make_session("s-2", bastion="b1"))
    await stores.sessions.started(make_session("s-3", bastion="b2"))
    await stores.sessions.ended("s-3", T0, "0", 0, 0)
    assert [(b.name, b.live_sessions) for b in await f.bastions()] == [("b1", 2), ("b2", 0)]


async def test_only_open_sessions_of_silent_bastions_are_stranded(stores: StoreBundle) -> None:
    f, idx = fleet_of(stores), stores.sessions
    await f.beat("dead", T0, T0)
    await f.beat("alive", T0 + timedelta(minutes=10), T0)
    await f.beat("me", T0, T0)  # silent too, but it is the one asking
    for sid, bastion, minute in (("s-dead-2", "dead", 2), ("s-dead-1", "dead", 1),
                                 ("s-alive", "alive", 1), ("s-me", "me", 1),
                                 ("s-old", "", 1), ("s-ended", "dead", 0)):
        await idx.started(make_session(sid, started=T0 - timedelta(minutes=10 - minute),
                                       bastion=bastion))
    await idx.ended("s-ended", T0, "0", 1, 2)
    since = T0 + timedelta(minutes=5)
    got = await f.stranded(since, "me", 10)
    assert [(r.id, seen) for r, seen in got] == [("s-dead-1", T0), ("s-dead-2", T0)]
    assert got[0][0].bastion == "dead"
    assert [r.id for r, _ in await f.stranded(since, "me", 1)] == ["s-dead-1"]
    assert await f.stranded(T0, "me", 10) == []  # seen at T0 is not before T0


async def test_one_of_several_closers_wins_and_a_failed_audit_reopens(
        stores: StoreBundle) -> None:
    f, idx = fleet_of(stores), stores.sessions
    twin = fleet_of(await stores.twin())
    await idx.started(make_session("s-1", bastion="dead"))
    results = await asyncio.gather(*(s.close_stranded("s-1", "dead", T0, "lost")
                                     for s in (f, twin, f, twin)))
    assert sorted(results) == [False, False, False, True]
    rec = await idx.get("s-1")
    assert rec is not None and (rec.ended_at, rec.exit_status) == (T0, "lost")
    assert await f.close_stranded("s-1", "dead", T0, "lost") is False
    await f.reopen_stranded("s-1", "lost")
    rec = await idx.get("s-1")
    assert rec is not None and (rec.ended_at, rec.exit_status) == (None, None)
    # the row moved on meanwhile (its own bastion ended it): never reopened, never closed
    await idx.ended("s-1", T0, "0", 1, 2)
    await f.reopen_stranded("s-1", "lost")
    assert await f.close_stranded("s-1", "dead", T0, "lost") is False
    rec = await idx.get("s-1")
    assert rec is not None and rec.exit_status == "0"
    assert await f.close_stranded("s-1", "other", T0, "lost") is False
