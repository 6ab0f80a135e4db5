"""The ``LockStore`` contract on SQLite and PostgreSQL: locks and kill requests, as one bastion
writes them and another (a second connection, as a second broker process) reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.domain.locks import KillRequest, Lock, LockKind
from broker.errors import StoreError
from broker.ports import LockStore
from broker.store.postgres_locks import PostgresLockStore
from broker.store.sqlite_locks import SqliteLockStore
from tests.contract.conftest import StoreBundle

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def locks_of(b: StoreBundle) -> LockStore:
    return SqliteLockStore(b.db) if b.backend == "sqlite" else PostgresLockStore(b.db)


def lock(lid: str, kind: LockKind = LockKind.USER, value: str = "alice@corp.example.com",
         at: datetime = T0, ttl: timedelta | None = None) -> Lock:
    return Lock(id=lid, kind=kind, value=value, reason=f"incident {lid}", created_by="op:x",
                created_at=at, expires_at=at + ttl if ttl else None)


async def test_active_locks_round_trip_in_creation_order(stores: StoreBundle) -> None:
    s = locks_of(stores)
    await s.add(lock("lk-000000000002", LockKind.TARGET, "web-1", at=T0 + timedelta(seconds=1)))
    await s.add(lock("lk-000000000001", ttl=timedelta(hours=1)))
    await s.add(lock("lk-000000000003", LockKind.STACK, "stack-a", at=T0 + timedelta(seconds=2)))
    got = await s.active(T0 + timedelta(minutes=5))
    assert [lk.id for lk in got] == ["lk-000000000001", "lk-000000000002", "lk-000000000003"]
    first = got[0]
    assert first == lock("lk-000000000001", ttl=timedelta(hours=1))
    assert first.created_at.utcoffset() == timedelta(0)
    assert got[1].kind is LockKind.TARGET and got[1].expires_at is None


async def test_a_lock_past_its_end_is_not_active_but_listed(stores: StoreBundle) -> None:
    s = locks_of(stores)
    await s.add(lock("lk-00000000000a", ttl=timedelta(minutes=10)))
    assert [lk.id for lk in await s.active(T0 + timedelta(minutes=9))] == ["lk-00000000000a"]
    later = T0 + timedelta(minutes=10)  # the end itself is outside
    assert await s.active(later) == []
    assert await s.listing(include_inactive=False, now=later) == []
    every = await s.listing(include_inactive=True, now=later)
    assert [(lk.id, lk.state(later)) for lk in every] == [("lk-00000000000a", "expired")]
    assert await s.remove("lk-00000000000a", "op:y", later) is None  # expired: nothing to remove


async def test_remove_once_and_another_connection_sees_it(stores: StoreBundle) -> None:
    s = locks_of(stores)
    other = locks_of(await stores.twin())
    await s.add(lock("lk-00000000000b"))
    assert [lk.id for lk in await other.active(T0)] == ["lk-00000000000b"]
    now = T0 + timedelta(minutes=1)
    removed = await other.remove("lk-00000000000b", "op:y", now)
    assert removed is not None
    assert (removed.removed_by, removed.removed_at, removed.state(now)) == ("op:y", now, "removed")
    assert await s.remove("lk-00000000000b", "op:z", now) is None
    assert await s.remove("lk-unknown", "op:z", now) is None
    assert await s.active(now) == []
    [listed] = await s.listing(include_inactive=True, now=now)
    assert listed.removed_by == "op:y"


async def test_duplicate_lock_id_is_a_store_error(stores: StoreBundle) -> None:
    s = locks_of(stores)
    await s.add(lock("lk-00000000000c"))
    with pytest.raises(StoreError):
        await s.add(lock("lk-00000000000c"))


async def test_kill_requests_pending_per_session_and_done_once(stores: StoreBundle) -> None:
    s = locks_of(stores)
    other = locks_of(await stores.twin())
    for i, sid in enumerate(("s-1", "s-2", "s-1")):
        await s.request_kill(KillRequest(id=f"k-{i}", session_id=sid, reason=f"why {i}",
                                         requested_by="op:x",
                                         requested_at=T0 + timedelta(seconds=10 - i)))
    got = await other.pending_kills(["s-1", "s-9"])
    assert [(k.id, k.session_id) for k in got] == [("k-2", "s-1"), ("k-0", "s-1")]
    assert got[0].requested_at == T0 + timedelta(seconds=8) and got[0].done_at is None
    assert await other.pending_kills([]) == []
    assert await other.kill_done("k-2", T0 + timedelta(minutes=1)) is True
    assert await s.kill_done("k-2", T0 + timedelta(minutes=2)) is False  # the other did it
    assert [k.id for k in await s.pending_kills(["s-1", "s-2"])] == ["k-1", "k-0"]


async def test_pending_kills_of_many_sessions(stores: StoreBundle) -> None:
    """A bastion with more live sessions than SQLite binds in one statement."""
    s = locks_of(stores)
    await s.request_kill(KillRequest(id="k-x", session_id="s-1999", reason="r",
                                     requested_by="op:x", requested_at=T0))
    got = await s.pending_kills([f"s-{i}" for i in range(2000)])
    assert [k.id for k in got] == ["k-x"]


async def test_an_expired_lock_is_noted_once_across_bastions(stores: StoreBundle) -> None:
    s = locks_of(stores)
    other = locks_of(await stores.twin())
    await s.add(lock("lk-0000000000e1", ttl=timedelta(minutes=5)))
    await s.add(lock("lk-0000000000e2", ttl=timedelta(minutes=10)))
    await s.add(lock("lk-0000000000e3"))  # no end: never noted
    await s.add(lock("lk-0000000000e4", ttl=timedelta(minutes=1)))
    await s.remove("lk-0000000000e4", "op:y", T0)  # removed before its end: not an expiry
    assert await s.note_expired(T0 + timedelta(minutes=4), 10) == []
    at = T0 + timedelta(minutes=5)  # the end itself counts
    assert [lk.id for lk in await other.note_expired(at, 10)] == ["lk-0000000000e1"]
    assert await s.note_expired(at, 10) == []  # the other bastion took it
    late = T0 + timedelta(hours=1)
    assert [lk.id for lk in await s.note_expired(late, 10)] == ["lk-0000000000e2"]
    await s.unnote_expired(["lk-0000000000e2"])  # its audit line failed: handed back
    assert [lk.id for lk in await other.note_expired(late, 1)] == ["lk-0000000000e2"]
    assert await other.note_expired(late, 10) == []
