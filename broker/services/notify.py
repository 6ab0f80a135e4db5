"""Notifications: events go to a durable outbox as the action happens; every broker's dispatcher
sends them from there.

``Notifier.publish`` is awaited by the action that causes the event (a grant decision, a lock,
an admin session): one insert of one row per subscribed channel, milliseconds, so nothing is
lost if the broker stops right after. It never fails the action and never makes it wait for a
receiver: a store error is logged and audited (``notify.enqueue_failed``) and the action goes
on. ``Dispatcher`` claims due rows (a lease: several brokers share the outbox), sends them
concurrently with a time limit per attempt and at most ``PER_CHANNEL`` rows of one channel at
once, so a receiver that hangs holds up only its own deliveries, and stores each outcome: sent,
pending again after a backoff (``broker.domain.notify``), or failed after ``max_attempts``
(audited ``notify.failed``). ``ExpiringSoon`` notices live grants that end soon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import structlog

from broker.domain import notify as rules
from broker.domain.locks import Lock
from broker.domain.models import Grant, GrantState, Level
from broker.domain.notify import Attempt, Delivery, Event, Subscription
from broker.domain.workflow import HistoryEntry
from broker.errors import AuditError, BrokerError
from broker.ports import AuditSink, Clock, GrantStore, NotificationSender, NotificationStore
from broker.services.periodic import Periodic

log = structlog.get_logger("broker.notify")
ENQUEUE_TIMEOUT = 5.0  # seconds an action waits for its notification rows at most
POLL_INTERVAL = 1.0  # seconds between looks for rows other processes queued (or retries due)
CONCURRENCY = 32  # sends in flight per broker process
PER_CHANNEL = 2  # rows of one channel claimed per look (in flight: fewer than twice this)
LEASE_MARGIN = timedelta(seconds=60)  # a claim outlives the send's time limit by this much
SWEEP_INTERVAL = 30.0  # seconds between looks for grants that end soon
PRUNE_INTERVAL = 3600.0  # seconds between removals of old sent/failed rows
PRUNE_BATCH = 5000  # rows deleted per statement (short transactions beside the sends)
SWEEP_BATCH = 5000  # grants ending within the window looked at per sweep
ADMIN_SESSION_KINDS = frozenset({"shell", "exec", "subsystem", "jump"})  # not each tunnel


def _ids(prefix: str) -> Iterator[str]:
    while True:
        yield f"{prefix}-{secrets.token_hex(8)}"


def grant_data(g: Grant, actor: str, comment: str | None = None) -> dict[str, Any]:
    return rules.grant_data(
        grant_id=g.id, user=f"{g.username}@{g.domain}", stacks=g.stack_ids, vpc=g.vpc_id,
        level=str(g.level), state=str(g.state), starts_at=g.starts_at, expires_at=g.expires_at,
        ticket=g.ticket, trigger=str(g.trigger), reason=g.reason,
        requested_by=g.requested_by, actor=actor, comment=comment)


class Notifier:
    """Turns what happened into outbox rows, one per channel that subscribes to it."""

    def __init__(self, store: NotificationStore, audit: AuditSink, clock: Clock,
                 subscriptions: Sequence[Subscription],
                 wake: Callable[[], None] | None = None) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock
        self.subscriptions = tuple(subscriptions)
        self._wake = wake  # this process's dispatcher, to send at once rather than next poll

    def event(self, name: str, data: Mapping[str, Any], dedupe: str | None = None) -> Event:
        return Event(next(_ids("ev")), name, self._clock.now(), dict(data), dedupe)

    async def publish(self, ev: Event, *, only: str | None = None) -> int:
        """Queue ``ev`` for its channels (``only``: that channel, whatever it subscribes to);
        returns the rows queued. Never raises (see the module docstring)."""
        rows = rules.deliveries_for(ev, self.subscriptions, self._clock.now(), _ids("dl"),
                                    only=only)
        if not rows:
            return 0
        try:
            n = await asyncio.wait_for(self._store.enqueue(rows), ENQUEUE_TIMEOUT)
        except (BrokerError, TimeoutError) as exc:
            error = str(exc)[:300] or "the store did not answer in time"
            log.error("notify.enqueue_failed", notification=ev.name, event_id=ev.id, error=error)
            try:
                self._audit.emit("notify.enqueue_failed", notification=ev.name, event_id=ev.id,
                                 channels=[r.channel for r in rows], error=error)
            except AuditError as aexc:
                log.error("audit.write_failed", event="notify.enqueue_failed", error=str(aexc))
            return 0
        if n and self._wake is not None:
            self._wake()
        return n

    # -- the events, from what the services decided ------------------------------------------------
    async def grant_changed(self, g: Grant, entry: HistoryEntry) -> None:
        name = rules.grant_event_name(entry.action, str(g.state))
        if name is not None:
            await self.publish(self.event(name, grant_data(g, entry.actor, entry.comment)))

    async def admin_session(self, *, session_id: str, user: str, target: str,
                            target_name: str, stack: str, login: str, kind: str, peer: str,
                            grant: Grant, parent_id: str | None) -> None:
        """A top-level admin session (not each tunnel, not the sessions inside a jump)."""
        if grant.level is not Level.ADMIN or parent_id is not None \
                or kind not in ADMIN_SESSION_KINDS:
            return
        await self.publish(self.event("session.admin_started", {
            "session_id": session_id, "user": user, "target": target,
            "target_name": target_name, "stack": stack, "login": login, "kind": kind,
            "peer": peer, "grant_id": grant.id, "level": str(grant.level),
            "ticket": grant.ticket}))

    async def lock_created(self, lock: Lock) -> None:
        await self.publish(self.event("lock.created", {
            "lock_id": lock.id, "kind": lock.kind.value, "value": lock.value,
            "reason": lock.reason, "created_by": lock.created_by,
            "expires_at": lock.expires_at.isoformat() if lock.expires_at else None}))

    async def test(self, channel: str, by: str) -> int:
        """``notify test``: one test event to ``channel``."""
        return await self.publish(self.event(rules.TEST_EVENT, {"channel": channel, "by": by}),
                                  only=channel)


class ExpiringSoon:
    """Every ``SWEEP_INTERVAL`` seconds: live grants that end within ``window`` are announced,
    once per grant and end time (the dedupe key: several brokers notice each one, an extension
    announces the new end again)."""

    def __init__(self, grants: GrantStore, notifier: Notifier, clock: Clock,
                 window: timedelta, interval: float = SWEEP_INTERVAL) -> None:
        self._grants = grants
        self._notifier = notifier
        self._clock = clock
        self.window = window
        self._loop = Periodic(self.sweep, lambda: interval,
                              failed_event="notify.expiring_sweep_failed", errors=(BrokerError,))

    def start(self) -> None:
        if any("grant.expiring" in s.events for s in self._notifier.subscriptions):
            self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def sweep(self) -> int:
        """Queue the announcements due now; returns how many grants were new to the outbox."""
        now = self._clock.now()
        done = 0
        # only those ending within the window: however many grants are live, none is missed
        # unless more than SWEEP_BATCH end within one window
        for g in await self._grants.search(states=[GrantState.APPROVED.value], since=now,
                                           expires_before=now + self.window, limit=SWEEP_BATCH):
            if not g.live_at(now):
                continue
            n = self._notifier
            ev = n.event("grant.expiring", grant_data(g, "system"),
                         dedupe=rules.expiring_key(g.id, g.expires_at))
            if await n.publish(ev):
                done += 1
        return done


class Dispatcher:
    """Sends the outbox's due rows for the channels this broker has (see the module docstring).
    ``clock`` and ``rand`` are injectable so tests know when each retry is due."""

    def __init__(self, store: NotificationStore, senders: Mapping[str, NotificationSender],
                 audit: AuditSink, clock: Clock, *, max_attempts: int, timeout: float,
                 rand: Callable[[], float] = random.random, concurrency: int = CONCURRENCY,
                 per_channel: int = PER_CHANNEL, poll: float = POLL_INTERVAL,
                 keep: timedelta = timedelta(days=30)) -> None:
        self._store = store
        self.keep = keep  # the delivery log keeps sent and failed rows this long
        self._pruned_at: float | None = None  # monotonic time of the last prune
        self._senders = dict(senders)
        self._audit = audit
        self._clock = clock
        self.max_attempts = max_attempts
        self.timeout = timeout
        self._rand = rand
        self._concurrency = concurrency
        self._per_channel = per_channel
        self._poll = poll
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self._inflight: dict[str, int] = {}  # channel -> sends running
        self._tasks: dict[asyncio.Task[None], Delivery] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # outcomes waiting to be stored: written together, one trip to the store for a batch,
        # so a burst of sends does not queue a write each in front of the actions' inserts
        self._outcomes: list[tuple[Delivery, rules.Outcome]] = []
        self._outcome_ready = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    @property
    def channels(self) -> list[str]:
        return list(self._senders)

    def in_flight(self, channel: str) -> int:
        """Sends to ``channel`` running now."""
        return self._inflight.get(channel, 0)

    def wake(self) -> None:
        """Look at the outbox now (a row was queued here, or a send finished)."""
        self._wakeup.set()

    def start(self) -> None:
        if self._senders:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run())
            self._flusher = loop.create_task(self._flush_loop())

    async def stop(self) -> None:
        """Stop claiming; sends in flight are cancelled (their rows' leases run out and another
        broker, or this one after a restart, sends them again)."""
        for task in (self._task, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._flusher = None
        cut = dict(self._tasks)
        for t in cut:
            t.cancel()
        if cut:
            await asyncio.gather(*cut, return_exceptions=True)
        await self._flush()  # what ended before the stop is stored as it ended
        now = self._clock.now()
        for d in cut.values():  # handed back at once rather than when the lease ends
            with contextlib.suppress(BrokerError):
                await self._store.finish(d.id, self.owner, rules.Outcome(
                    "pending", now, "the broker stopped during the attempt", None), now)

    async def drain(self) -> None:
        """Wait for the sends in flight (tests and the CLI)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                await self.fill()
            except BrokerError as exc:
                log.error("notify.claim_failed", error=str(exc)[:300])
            now = time.monotonic()
            if self._pruned_at is None or now - self._pruned_at >= PRUNE_INTERVAL:
                self._pruned_at = now
                try:
                    await self.prune()
                except BrokerError as exc:
                    log.error("notify.prune_failed", error=str(exc)[:300])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._poll)

    async def prune(self) -> int:
        """Remove sent and failed rows older than ``keep`` (any broker may: a row deleted twice
        is deleted once); returns how many."""
        before, done = self._clock.now() - self.keep, 0
        while True:
            n = await self._store.prune(before, PRUNE_BATCH)
            done += n
            if n < PRUNE_BATCH:
                if done:
                    log.info("notify.pruned", rows=done, before=before.isoformat())
                return done

    async def fill(self) -> int:
        """Claim as many due rows as there are free slots and start sending them."""
        free = self._concurrency - len(self._tasks)
        channels = [c for c in self._senders if self._inflight.get(c, 0) < self._per_channel]
        if free <= 0 or not channels:
            return 0
        now = self._clock.now()
        lease = now + timedelta(seconds=self.timeout) + LEASE_MARGIN
        rows = await self._store.claim(now, self.owner, lease, channels, free, self._per_channel)
        for d in rows:
            self._inflight[d.channel] = self._inflight.get(d.channel, 0) + 1
            task = asyncio.get_running_loop().create_task(self._deliver(d))
            self._tasks[task] = d
            task.add_done_callback(self._done(d.channel))
        return len(rows)

    def _done(self, channel: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._tasks.pop(task, None)
            self._inflight[channel] -= 1
            self.wake()  # a slot is free: more of the backlog may go
        return done

    async def _attempt(self, d: Delivery) -> Attempt:
        sender = self._senders[d.channel]
        try:
            return await asyncio.wait_for(sender.send(d), self.timeout)
        except TimeoutError:
            return Attempt(ok=False, retry=True, error=f"no answer within {self.timeout:g} s")
        except Exception as exc:  # a sender's bug must not end the dispatcher
            log.error("notify.sender_failed", channel=d.channel, delivery=d.id,
                      error=f"{type(exc).__name__}: {exc}"[:300])
            return Attempt(ok=False, retry=True, error=f"{type(exc).__name__}"[:300])

    async def _deliver(self, d: Delivery) -> None:
        result = await self._attempt(d)
        now = self._clock.now()
        self._outcomes.append((d, rules.after_attempt(d.attempts, self.max_attempts, result,
                                                      now, self._rand())))
        self._outcome_ready.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._outcome_ready.wait()
            self._outcome_ready.clear()
            await self._flush()

    async def _flush(self) -> None:
        batch, self._outcomes = self._outcomes, []
        if not batch:
            return
        try:
            stored = await self._store.finish_many(
                self.owner, [(d.id, o) for d, o in batch], self._clock.now())
        except BrokerError as exc:  # the leases run out; the rows are tried again
            log.error("notify.finish_failed", deliveries=len(batch), error=str(exc)[:300])
            return
        for d, outcome in batch:
            self._report(d, outcome, d.id in stored)

    def _report(self, d: Delivery, outcome: rules.Outcome, stored: bool) -> None:
        fields = {"delivery": d.id, "channel": d.channel, "notification": d.event,
                  "event_id": d.event_id, "attempts": d.attempts}
        if not stored:
            log.warning("notify.lease_lost", **fields)
        elif outcome.status == "sent":
            log.debug("notify.sent", status=outcome.http_status, **fields)
        elif outcome.status == "failed":
            log.error("notify.failed", error=outcome.error, status=outcome.http_status, **fields)
            try:
                self._audit.emit("notify.failed", error=outcome.error,
                                 http_status=outcome.http_status, **fields)
            except AuditError as exc:
                log.error("audit.write_failed", event="notify.failed", error=str(exc))
        else:
            log.warning("notify.retry", error=outcome.error, status=outcome.http_status,
                        next_attempt_at=outcome.next_attempt_at.isoformat(), **fields)

    async def deliveries(self, status: str | None = None, limit: int = 100) -> list[Delivery]:
        return await self._store.listing(status=status, limit=limit)


def subscriptions_of(channels: Sequence[tuple[str, Sequence[str]]]) -> list[Subscription]:
    return [Subscription(name, frozenset(events)) for name, events in channels]
