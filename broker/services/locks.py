"""Locks and kill requests as operators and the API make them, and the checks logins and new
sessions go through.

Nothing here ends a session itself: a lock or kill request goes to the store every bastion
shares, and each bastion's enforcement loop (``broker.services.enforcement``) ends the matching
sessions it holds within its interval. Every change is audited before it is answered.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from broker.domain import locks as rules
from broker.domain.locks import KillRequest, Lock, LockError, LockKind
from broker.domain.models import Instance, Principal
from broker.errors import AuditError, BrokerError, ConflictError, NotFoundError, UsageError
from broker.ports import AuditSink, Clock, LockStore, SessionRecord
from broker.services.notify import Notifier
from broker.services.periodic import Periodic

EXPIRY_INTERVAL = 5.0  # seconds between looks for locks that reached their end
EXPIRY_BATCH = 500


class InvalidLock(UsageError):
    """A lock, ttl or reason that cannot be taken as given (the message says why)."""


def parse_ttl(text: str) -> timedelta:
    """``30m``, ``1h``, ``2d``, ``1w`` (``InvalidLock`` otherwise)."""
    try:
        return rules.parse_ttl(text)
    except LockError as exc:
        raise InvalidLock(str(exc)) from None


class LockService:
    def __init__(self, store: LockStore, audit: AuditSink, clock: Clock,
                 notifier: Notifier | None = None) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock
        self._notifier = notifier  # a new lock is announced
        self._gate = LockGate(store, clock)
        self._sweep = Periodic(self.note_expired, lambda: EXPIRY_INTERVAL,
                               failed_event="locks.expiry_failed", errors=(BrokerError,))

    def start(self) -> None:
        """Audit locks as they reach their end (a running broker; not the CLI)."""
        self._sweep.start()

    async def stop(self) -> None:
        await self._sweep.stop()

    async def note_expired(self) -> int:
        """One ``lock.expired`` audit line per lock that reached its end: the store hands each
        to one bastion only, so a fleet writes it once. Returns how many this call noted."""
        done = 0
        while True:
            batch = await self._store.note_expired(self._clock.now(), EXPIRY_BATCH)
            for n, lk in enumerate(batch):
                try:
                    self._audit.emit(
                        "lock.expired", lock_id=lk.id, kind=lk.kind.value, value=lk.value,
                        created_by=lk.created_by,
                        expires_at=lk.expires_at.isoformat() if lk.expires_at else None)
                except AuditError:
                    # not written: hand these back, so that a later pass audits them
                    await self._store.unnote_expired([x.id for x in batch[n:]])
                    raise
            done += len(batch)
            if len(batch) < EXPIRY_BATCH:
                return done

    # -- locks -------------------------------------------------------------------------------
    async def create(self, actor: str, kind: LockKind, value: str, reason: str,
                     ttl: timedelta | None) -> Lock:
        now = self._clock.now()
        try:
            ttl = rules.check_ttl(ttl)
            lock = Lock(id=f"lk-{secrets.token_hex(6)}", kind=kind,
                        value=rules.lock_value(kind, value), reason=rules.check_reason(reason),
                        created_by=actor, created_at=now,
                        expires_at=now + ttl if ttl is not None else None)
        except LockError as exc:
            raise InvalidLock(str(exc)) from None
        await self._store.add(lock)
        self._audit.emit("lock.created", user=actor, lock_id=lock.id, kind=kind.value,
                         value=lock.value, reason=lock.reason,
                         expires_at=lock.expires_at.isoformat() if lock.expires_at else None)
        if self._notifier is not None:
            await self._notifier.lock_created(lock)
        return lock

    async def remove(self, actor: str, lock_id: str) -> Lock:
        removed = await self._store.remove(lock_id.strip().lower(), actor, self._clock.now())
        if removed is None:
            raise NotFoundError(f"no active lock {lock_id}")
        self._audit.emit("lock.removed", user=actor, lock_id=removed.id,
                         kind=removed.kind.value, value=removed.value)
        return removed

    async def listing(self, *, include_inactive: bool = False) -> list[Lock]:
        return await self._store.listing(include_inactive=include_inactive,
                                         now=self._clock.now())

    async def user_lock(self, principal: Principal) -> Lock | None:
        """The active lock on ``principal`` itself, if any (web sessions and API tokens ask it
        on every request: a locked user's open console and scripts stop at once)."""
        return await self._gate.lock_for(principal)

    # -- kill requests -----------------------------------------------------------------------
    async def kill(self, actor: str, rec: SessionRecord, reason: str) -> KillRequest:
        """Ask the bastion holding live session ``rec`` to end it (audited who and why)."""
        if rec.ended_at is not None:
            raise ConflictError(f"session {rec.id} has already ended")
        try:
            text = rules.check_reason(reason)
        except LockError as exc:
            raise InvalidLock(str(exc)) from None
        req = KillRequest(id=f"k-{secrets.token_hex(6)}", session_id=rec.id, reason=text,
                          requested_by=actor, requested_at=self._clock.now())
        await self._store.request_kill(req)
        self._audit.emit("session.kill_requested", user=actor, session_id=rec.id,
                         session_user=rec.user, target=rec.target, kill_id=req.id,
                         reason=req.reason)
        return req


class LockGate:
    """What logins and new sessions ask: is this principal (or this target) locked now?

    One store read per question (a handful of rows): a lock made anywhere refuses the next
    login or session on every bastion at once. A store that cannot answer raises ``StoreError``,
    so the login or session fails closed."""

    def __init__(self, store: LockStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def lock_for(self, principal: Principal, instance: Instance | None = None
                       ) -> Lock | None:
        now = self._clock.now()
        return rules.first_match(await self._store.active(now), principal, instance, now)

    async def locked_instances(self, principal: Principal) -> tuple[Lock | None, list[Lock]]:
        """The user's own lock, if any, and the active locks on targets and stacks (to filter
        a list of instances)."""
        now = self._clock.now()
        active = await self._store.active(now)
        return (rules.first_match(active, principal, None, now),
                [lk for lk in active if lk.kind is not LockKind.USER])
