"""The notifier and dispatcher over the real SQLite outbox, sending with the real webhook sender
to real aiohttp receivers on 127.0.0.1 (``tests.notify_receiver``). Only the clock is the
test's, so a retry is due when the test says, and the jitter is fixed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.audit.jsonl import JsonlAuditLog
from broker.domain.models import Grant, GrantState, Level
from broker.domain.notify import Attempt, Subscription
from broker.domain.workflow import HistoryEntry
from broker.notify.webhook import ClientSessions, WebhookSender
from broker.ports import NotificationSender
from broker.services.notify import PER_CHANNEL, Dispatcher, ExpiringSoon, Notifier
from broker.store.sqlite import SqliteDatabase, SqliteGrantStore
from broker.store.sqlite_notify import SqliteNotificationStore
from tests.notify_receiver import Receiver, until

SECRET = b"whsec-test-0123456789"
ALL = frozenset({"grant.requested", "grant.expiring", "lock.created"})


class Clock:
    def __init__(self) -> None:
        self.t = datetime.now(UTC).replace(microsecond=0)

    def now(self) -> datetime:
        return self.t

    def monotonic(self) -> float:
        return self.t.timestamp()

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@dataclass
class Rig:
    db: SqliteDatabase
    store: SqliteNotificationStore
    audit_path: Path
    audit: JsonlAuditLog
    clock: Clock
    receiver: Receiver
    http: ClientSessions

    def dispatcher(self, channels: dict[str, str], *, timeout: float = 5.0,
                   max_attempts: int = 8) -> tuple[Notifier, Dispatcher]:
        """``channels``: name -> receiver path kind (ok, flaky, gone, hang) or a full URL."""
        senders: dict[str, NotificationSender] = {
            name: WebhookSender(name, kind if "://" in kind else f"{self.receiver.url}/{kind}/{name}",
                                SECRET, "json", self.http, timeout)
            for name, kind in channels.items()}
        d = Dispatcher(self.store, senders, self.audit, self.clock, max_attempts=max_attempts,
                       timeout=timeout, rand=lambda: 0.0, poll=0.05)
        n = Notifier(self.store, self.audit, self.clock,
                     [Subscription(c, ALL) for c in channels], wake=d.wake)
        return n, d

    def audit_events(self, name: str) -> list[dict[str, object]]:
        return [e for e in map(json.loads, self.audit_path.read_text().splitlines())
                if e["event"] == name]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    db = SqliteDatabase(tmp_path / "broker.db")
    clock = Clock()
    audit = JsonlAuditLog(tmp_path / "audit.jsonl", clock)
    receiver = await Receiver(secret=SECRET).start()
    http = ClientSessions()
    try:
        yield Rig(db, SqliteNotificationStore(db), tmp_path / "audit.jsonl", audit, clock,
                  receiver, http)
    finally:
        await http.close()
        await receiver.stop()
        audit.close()
        db.close()


async def _status(rig: Rig, status: str, count: int) -> None:
    async def done() -> bool:
        return len(await rig.store.listing(status=status)) >= count
    await until(done, 10, f"{count} {status}")


async def test_a_signed_delivery_and_its_log(rig: Rig) -> None:
    n, d = rig.dispatcher({"hook": "ok"})
    d.start()
    try:
        ev = n.event("lock.created", {"lock_id": "lk-1", "kind": "user", "value": "bob@corp",
                                      "reason": "stolen laptop", "created_by": "op:root"})
        assert await n.publish(ev) == 1
        [got] = await rig.receiver.wait_for("hook", 1)
        await _status(rig, "sent", 1)
    finally:
        await d.stop()
    assert got.signed_ok is True
    [row] = await rig.store.listing()
    assert got.headers["X-Bastion-Event"] == "lock.created"
    assert got.headers["X-Bastion-Delivery"] == row.id
    assert got.json["id"] == ev.id and got.json["delivery"] == row.id
    assert got.json["data"]["reason"] == "stolen laptop"
    assert (row.status, row.attempts, row.last_status, row.sent_at) == ("sent", 1, 200,
                                                                      rig.clock.now())


async def test_a_500_is_tried_again_after_the_backoff_then_sent(rig: Rig) -> None:
    n, d = rig.dispatcher({"flaky": "flaky"})
    d.start()
    try:
        await n.publish(n.event("grant.requested", {"user": "alice@corp"}))
        await rig.receiver.wait_for("flaky", 1)
        await asyncio.sleep(0.3)  # several polls: nothing is due before the backoff ends
        [row] = await rig.store.listing()
        assert (row.status, row.attempts, row.last_status, row.last_error) == (
            "pending", 1, 500, "HTTP 500")
        assert row.next_attempt_at == rig.clock.now() + timedelta(seconds=2.5)  # rand 0
        assert len(rig.receiver.got["flaky"]) == 1
        rig.clock.advance(2.5)
        first, second = await rig.receiver.wait_for("flaky", 2)
        await _status(rig, "sent", 1)
    finally:
        await d.stop()
    assert first.headers["X-Bastion-Delivery"] == second.headers["X-Bastion-Delivery"]
    [row] = await rig.store.listing()
    assert (row.status, row.attempts, row.last_status) == ("sent", 2, 200)


async def test_a_4xx_fails_at_once_and_is_audited(rig: Rig) -> None:
    n, d = rig.dispatcher({"gone": "gone"})
    d.start()
    try:
        await n.publish(n.event("grant.requested", {"user": "alice@corp"}))
        await _status(rig, "failed", 1)
    finally:
        await d.stop()
    [row] = await rig.store.listing()
    assert (row.attempts, row.last_status, row.last_error) == (1, 404, "HTTP 404")
    [audited] = rig.audit_events("notify.failed")
    assert (audited["channel"], audited["delivery"], audited["http_status"]) == (
        "gone", row.id, 404)


async def test_unreachable_gives_up_after_max_attempts(rig: Rig) -> None:
    closed = await Receiver().start()
    await closed.stop()  # nothing listens there now
    n, d = rig.dispatcher({"down": f"{closed.url}/ok/down/secret-token"}, max_attempts=3)
    d.start()
    try:
        await n.publish(n.event("grant.requested", {"user": "alice@corp"}))
        for k in (1, 2):  # attempt k ended: wait for its retry time, then let it come
            async def ended(k: int = k) -> bool:
                r = (await rig.store.listing())[0]
                return r.attempts == k and r.next_attempt_at > rig.clock.now()
            await until(ended, 10, f"attempt {k}")
            rig.clock.t = (await rig.store.listing())[0].next_attempt_at
        await _status(rig, "failed", 1)
    finally:
        await d.stop()
    [row] = await rig.store.listing()
    assert row.attempts == 3 and row.last_status is None
    assert row.last_error is not None and "ClientConnectorError" in row.last_error
    assert "secret-token" not in row.last_error  # the URL's path is not in the log
    assert len(rig.audit_events("notify.failed")) == 1


async def test_a_hanging_receiver_holds_up_only_its_own_channel(rig: Rig) -> None:
    n, d = rig.dispatcher({"stuck": "hang", "a": "ok", "b": "ok", "c": "ok"}, timeout=1.0)
    d.start()
    try:
        for i in range(20):
            await n.publish(n.event("grant.requested", {"user": f"u{i}@corp"}))
        for name in "abc":
            await rig.receiver.wait_for(name, 20, within=5)
        assert 1 <= rig.receiver.hanging < 2 * PER_CHANNEL
        await _status(rig, "sent", 60)
        # the hanging sends end at the per-attempt limit, to be tried again later
        async def timed_out() -> bool:
            assert d.in_flight("stuck") < 2 * PER_CHANNEL
            return sum(r.last_error == "no answer within 1 s"
                       for r in await rig.store.listing(status="pending")) >= PER_CHANNEL
        await until(timed_out, 10, "the hanging sends' time limit")
    finally:
        await d.stop()
    assert {r.channel for r in await rig.store.listing(status="sent")} == set("abc")
    assert {r.channel for r in await rig.store.listing(status="pending")} == {"stuck"}


async def test_stopping_hands_back_what_was_in_flight_and_a_restart_sends_it(rig: Rig) -> None:
    n, d = rig.dispatcher({"x": "hang"}, timeout=30)
    d.start()
    await n.publish(n.event("grant.requested", {"user": "alice@corp"}))
    await rig.receiver.wait_for("x", 1)
    await d.stop()
    [row] = await rig.store.listing()
    assert (row.status, row.last_error) == ("pending", "the broker stopped during the attempt")
    assert row.next_attempt_at == rig.clock.now()
    _, again = rig.dispatcher({"x": "ok"})  # the receiver is fixed; the broker starts again
    again.start()
    try:
        await _status(rig, "sent", 1)
    finally:
        await again.stop()
    assert [r.attempts for r in await rig.store.listing()] == [2]


async def test_a_store_that_fails_never_fails_the_action(rig: Rig) -> None:
    n, _ = rig.dispatcher({"hook": "ok"})
    rig.db.conn.close()  # every insert now fails
    assert await n.publish(n.event("grant.requested", {"user": "alice@corp"})) == 0
    [audited] = rig.audit_events("notify.enqueue_failed")
    assert audited["notification"] == "grant.requested" and audited["channels"] == ["hook"]
    assert "cannot queue notification" in str(audited["error"])


async def test_no_channels_no_rows(rig: Rig) -> None:
    n = Notifier(rig.store, rig.audit, rig.clock, [])
    assert await n.publish(n.event("grant.requested", {})) == 0
    assert await rig.store.listing() == []


def _grant(gid: str, now: datetime, ends_in: timedelta) -> Grant:
    return Grant(id=gid, username="alice", domain="corp.example.com", stack_ids=("stack-web",),
                 vpc_id="vpc-0demo", level=Level.ADMIN, state=GrantState.APPROVED,
                 starts_at=now - timedelta(hours=1), expires_at=now + ends_in, ticket="INC-1",
                 reason="r", requested_by="alice", created_at=now - timedelta(hours=1))


async def test_expiring_soon_once_per_grant_and_end_across_brokers(rig: Rig) -> None:
    grants = SqliteGrantStore(rig.db)
    now = rig.clock.now()
    for g in (_grant("g-soon", now, timedelta(minutes=20)),
              _grant("g-later", now, timedelta(minutes=65)),
              _grant("g-over", now, timedelta(minutes=-1))):
        await grants.create(g, HistoryEntry(g.id, now, "alice", "requested", "", "approved"))
    n, _ = rig.dispatcher({"hook": "ok"})
    n2, _ = rig.dispatcher({"hook": "ok"})  # a second broker of the same store
    sweep = ExpiringSoon(grants, n, rig.clock, timedelta(minutes=30))
    other = ExpiringSoon(grants, n2, rig.clock, timedelta(minutes=30))
    assert await sweep.sweep() == 1
    assert await other.sweep() == 0 and await sweep.sweep() == 0
    [row] = await rig.store.listing()
    assert (row.event, row.event_json()["data"]["grant_id"]) == ("grant.expiring", "g-soon")
    # an extension moves the end: announced again when the new end comes near
    soon = await grants.get("g-soon")
    assert soon is not None
    await grants.update(replace(soon, expires_at=now + timedelta(hours=1)),
                        HistoryEntry(soon.id, now, "approver", "extended", "", "approved"))
    assert await sweep.sweep() == 0
    rig.clock.advance(40 * 60)
    assert await sweep.sweep() == 2  # g-soon's new end, and g-later's
    assert len(await rig.store.listing()) == 3


async def test_expiring_soon_finds_an_old_grant_behind_many_newer_ones(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep asks the store for grants ending within the window, not for the newest ones:
    an old grant about to end is found behind any number of newer, longer ones."""
    import broker.services.notify as service
    monkeypatch.setattr(service, "SWEEP_BATCH", 3)
    grants = SqliteGrantStore(rig.db)
    now = rig.clock.now()
    old = _grant("g-old", now, timedelta(minutes=10))
    await grants.create(replace(old, created_at=now - timedelta(days=2)),
                        HistoryEntry(old.id, now, "alice", "requested", "", "approved"))
    for i in range(5):
        g = _grant(f"g-new-{i}", now, timedelta(hours=6))
        await grants.create(g, HistoryEntry(g.id, now, "alice", "requested", "", "approved"))
    n, _ = rig.dispatcher({"hook": "ok"})
    assert await ExpiringSoon(grants, n, rig.clock, timedelta(minutes=30)).sweep() == 1
    [row] = await rig.store.listing()
    assert row.event_json()["data"]["grant_id"] == "g-old"


class Broken:
    """A sender with a bug: it raises instead of returning an ``Attempt``."""

    async def send(self, delivery: object) -> Attempt:
        raise RuntimeError("bug")


async def test_a_sender_that_raises_is_a_failed_attempt_not_a_dead_dispatcher(rig: Rig) -> None:
    ok = WebhookSender("ok", f"{rig.receiver.url}/ok/ok", SECRET, "json", rig.http, 5.0)
    d = Dispatcher(rig.store, {"broken": Broken(), "ok": ok}, rig.audit, rig.clock,
                   max_attempts=8, timeout=5.0, rand=lambda: 0.0, poll=0.05)
    n = Notifier(rig.store, rig.audit, rig.clock,
                 [Subscription(c, ALL) for c in ("broken", "ok")], wake=d.wake)
    d.start()
    try:
        await n.publish(n.event("grant.requested", {"user": "alice@corp"}))
        await _status(rig, "sent", 1)

        async def noted() -> bool:
            return any(r.last_error == "RuntimeError"
                       for r in await rig.store.listing(status="pending"))
        await until(noted, 10, "the broken sender's attempt")
        await n.publish(n.event("grant.requested", {"user": "bob@corp"}))
        await _status(rig, "sent", 2)  # still sending
    finally:
        await d.stop()


async def test_the_log_keeps_sent_rows_for_keep_days_then_prunes_them(rig: Rig) -> None:
    n, d = rig.dispatcher({"hook": "ok"})
    d.keep = timedelta(days=30)
    d.start()
    try:
        await n.publish(n.event("lock.created", {"lock_id": "lk-2", "kind": "user",
                                                 "value": "bob@corp", "reason": "r",
                                                 "created_by": "op:root"}))
        await _status(rig, "sent", 1)
    finally:
        await d.stop()
    rig.clock.advance(29 * 86400)
    assert await d.prune() == 0
    rig.clock.advance(2 * 86400)
    assert await d.prune() == 1
    assert await rig.store.listing() == []
