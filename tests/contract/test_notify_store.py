"""The ``NotificationStore`` contract on SQLite and PostgreSQL: the outbox as brokers share it
(insert-or-ignore on the dedupe key, claims with a lease that two connections never both get,
outcomes only from the lease holder, the delivery log)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta

from broker.domain.notify import Delivery, Event, Outcome, Subscription, deliveries_for
from broker.ports import NotificationStore
from broker.store.postgres_notify import PostgresNotificationStore
from broker.store.sqlite_notify import SqliteNotificationStore
from tests.contract.conftest import StoreBundle

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
SUBS = [Subscription("hook-a", frozenset({"grant.requested"})),
        Subscription("hook-b", frozenset({"grant.requested", "lock.created"})),
        Subscription("mail", frozenset({"lock.created"}))]
_ids = itertools.count(1)


def outbox_of(b: StoreBundle) -> NotificationStore:
    return (SqliteNotificationStore(b.db) if b.backend == "sqlite"
            else PostgresNotificationStore(b.db))


def rows(name: str = "grant.requested", at: datetime = T0, dedupe: str | None = None
         ) -> list[Delivery]:
    ev = Event(f"ev-{next(_ids):04d}", name, at, {"user": "alice@corp.example.com"}, dedupe)
    return deliveries_for(ev, SUBS, at, (f"dl-{next(_ids):06d}" for _ in SUBS))


async def test_rows_round_trip_and_the_log_is_newest_first(stores: StoreBundle) -> None:
    s = outbox_of(stores)
    first, second = rows(), rows("lock.created", T0 + timedelta(seconds=1))
    assert [d.channel for d in first] == ["hook-a", "hook-b"]
    assert await s.enqueue(first) == 2
    assert await s.enqueue(second) == 2
    log = await s.listing()
    assert [d.id for d in log] == [d.id for d in [*first, *second]][::-1]
    assert log[-1] == first[0]  # every field as stored, times in UTC
    assert log[-1].created_at.utcoffset() == timedelta(0)
    assert log[-1].event_json()["data"] == {"user": "alice@corp.example.com"}
    assert [d.id for d in await s.listing(limit=1)] == [second[-1].id]
    assert await s.listing(status="sent") == []


async def test_a_dedupe_key_is_enqueued_once_across_connections(stores: StoreBundle) -> None:
    s, other = outbox_of(stores), outbox_of(await stores.twin())
    key = "grant.expiring:g-1:2025-03-01T12:30:00+00:00"
    assert await s.enqueue(rows("grant.requested", dedupe=key)) == 2
    assert await other.enqueue(rows("grant.requested", dedupe=key)) == 0  # another broker
    assert len(await s.listing()) == 2
    assert await s.enqueue([]) == 0


async def test_claims_lease_due_rows_once_and_only_known_channels(stores: StoreBundle) -> None:
    s, other = outbox_of(stores), outbox_of(await stores.twin())
    batch = rows() + rows(at=T0 + timedelta(minutes=5))  # the second pair is not due yet
    await s.enqueue(batch)
    lease = T0 + timedelta(seconds=40)
    got, got_other = await asyncio.gather(
        s.claim(T0, "b1", lease, ["hook-a", "hook-b"], 10, 10),
        other.claim(T0, "b2", lease, ["hook-a", "hook-b"], 10, 10))
    assert sorted(d.id for d in got + got_other) == sorted(d.id for d in batch[:2])
    assert all(d.attempts == 1 for d in got + got_other)
    assert await s.claim(T0 + timedelta(seconds=39), "b3", lease, ["hook-a", "hook-b"],
                         10, 10) == []
    # the lease ran out (its holder died): another takes it, and the dead one's outcome is void
    later = T0 + timedelta(minutes=6)
    again = await other.claim(later, "b3", later + timedelta(seconds=40), ["hook-a"], 10, 10)
    assert sorted(d.id for d in again) == sorted(d.id for d in batch if d.channel == "hook-a")
    first = next(d for d in again if d.id == batch[0].id)
    assert first.attempts == 2
    holder = "b1" if batch[0].id in {d.id for d in got} else "b2"
    ok = Outcome("sent", later, None, 200)
    assert not await s.finish(batch[0].id, holder, ok, later)
    assert await s.finish(batch[0].id, "b3", ok, later)
    assert not await s.finish(batch[0].id, "b3", ok, later)  # once
    [sent] = await s.listing(status="sent")
    assert (sent.id, sent.last_status, sent.sent_at, sent.attempts) == (batch[0].id, 200,
                                                                       later, 2)


async def test_a_retry_waits_for_its_time_and_a_failure_is_final(stores: StoreBundle) -> None:
    s = outbox_of(stores)
    [a, b] = rows()
    await s.enqueue([a, b])
    [ca, cb] = sorted(await s.claim(T0, "b1", T0 + timedelta(seconds=40), ["hook-a", "hook-b"],
                                    10, 10), key=lambda d: d.channel)
    retry_at = T0 + timedelta(seconds=7)
    assert await s.finish(ca.id, "b1", Outcome("pending", retry_at, "HTTP 500", 500), T0)
    assert await s.finish(cb.id, "b1", Outcome("failed", T0, "HTTP 404", 404), T0)
    assert await s.claim(T0 + timedelta(seconds=6), "b1", T0 + timedelta(minutes=1),
                         ["hook-a", "hook-b"], 10, 10) == []
    [again] = await s.claim(retry_at, "b1", T0 + timedelta(minutes=1), ["hook-a", "hook-b"],
                            10, 10)
    assert (again.id, again.attempts, again.last_error, again.last_status) == (
        a.id, 2, "HTTP 500", 500)
    [failed] = await s.listing(status="failed")
    assert (failed.id, failed.last_error, failed.sent_at) == (b.id, "HTTP 404", None)


async def test_claim_limit_and_order(stores: StoreBundle) -> None:
    s = outbox_of(stores)
    batches = [rows(at=T0 + timedelta(seconds=i)) for i in range(3)]
    for batch in reversed(batches):
        await s.enqueue(batch)
    got = await s.claim(T0 + timedelta(minutes=1), "b1", T0 + timedelta(minutes=2), ["hook-a"],
                        2, 10)
    assert [d.id for d in got] == [batches[0][0].id, batches[1][0].id]
    assert await s.claim(T0, "b1", T0, [], 10, 10) == []


async def test_at_most_per_channel_rows_of_one_channel_per_claim(stores: StoreBundle) -> None:
    s = outbox_of(stores)
    batches = [rows(at=T0 + timedelta(seconds=i)) for i in range(4)]
    for batch in batches:
        await s.enqueue(batch)
    now, lease = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    got = await s.claim(now, "b1", lease, ["hook-a", "hook-b"], 10, 2)
    assert sorted((d.channel, d.created_at) for d in got) == sorted(
        (ch, T0 + timedelta(seconds=i)) for ch in ("hook-a", "hook-b") for i in (0, 1))
    rest = await s.claim(now, "b2", lease, ["hook-a", "hook-b"], 10, 10)
    assert len(rest) == 4 and not {d.id for d in rest} & {d.id for d in got}


async def test_outcomes_in_one_write_only_for_the_lease_holder(stores: StoreBundle) -> None:
    s, other = outbox_of(stores), outbox_of(await stores.twin())
    batch = rows() + rows(at=T0 + timedelta(seconds=1))
    await s.enqueue(batch)
    lease = T0 + timedelta(minutes=2)
    mine = await s.claim(T0 + timedelta(minutes=1), "b1", lease, ["hook-a"], 10, 10)
    theirs = await other.claim(T0 + timedelta(minutes=1), "b2", lease, ["hook-b"], 10, 10)
    now = T0 + timedelta(minutes=1, seconds=1)
    retry = now + timedelta(seconds=5)
    outcomes = [(mine[0].id, Outcome("sent", now, None, 204)),
                (mine[1].id, Outcome("pending", retry, "HTTP 503", 503)),
                (theirs[0].id, Outcome("failed", now, "not mine", 400))]
    assert await s.finish_many("b1", outcomes, now) == {mine[0].id, mine[1].id}
    assert await s.finish_many("b1", [], now) == set()
    got = {d.id: d for d in await s.listing()}
    assert (got[mine[0].id].status, got[mine[0].id].sent_at, got[mine[0].id].last_status) == (
        "sent", now, 204)
    assert (got[mine[1].id].status, got[mine[1].id].next_attempt_at,
            got[mine[1].id].last_error) == ("pending", retry, "HTTP 503")
    assert got[theirs[0].id].status == "pending" and got[theirs[0].id].last_error is None
    # the retried row is free to claim when due, the sent one never again
    again = await other.claim(retry, "b2", retry + timedelta(minutes=1), ["hook-a"], 10, 10)
    assert [d.id for d in again] == [mine[1].id]


async def test_prune_deletes_old_sent_and_failed_rows_never_pending_ones(
        stores: StoreBundle) -> None:
    s = outbox_of(stores)
    old, recent, waiting = rows(), rows(at=T0 + timedelta(days=40)), rows()
    for batch in (old, recent):
        await s.enqueue(batch)
    [a, b] = await s.claim(T0, "b1", T0 + timedelta(minutes=1), ["hook-a", "hook-b"], 2, 1)
    assert {a.id, b.id} == {d.id for d in old}
    await s.finish(a.id, "b1", Outcome("sent", T0, None, 200), T0)
    await s.finish(b.id, "b1", Outcome("failed", T0, "HTTP 404", 404), T0)
    later = T0 + timedelta(days=40)
    [c, d] = await s.claim(later, "b1", later + timedelta(minutes=1), ["hook-a", "hook-b"],
                           2, 1)
    await s.finish(c.id, "b1", Outcome("sent", later, None, 200), later)
    await s.finish(d.id, "b1", Outcome("sent", later, None, 200), later)
    assert {c.id, d.id} == {x.id for x in recent}
    await s.enqueue(waiting)  # created long ago, still pending
    assert await s.prune(T0 + timedelta(days=30), 1) == 1  # in batches
    assert await s.prune(T0 + timedelta(days=30), 10) == 1
    assert await s.prune(T0 + timedelta(days=30), 10) == 0
    left = {x.id for x in await s.listing(limit=100)}
    assert left == {c.id, d.id} | {x.id for x in waiting}  # recent and pending rows stay
