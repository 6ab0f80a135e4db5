"""Live enforcement: sessions end when their grant stops being live, and users are warned first.

Every broker process re-reads the grants of its live sessions every ``interval`` seconds (one
batched query), so a revoke or an expiry ends sessions within that interval on every bastion that
shares the store, and an extension moves the deadline of live sessions without reconnecting.
With an idle timeout, a session with no byte either way for that long ends too (checked first,
and without the store, so it still applies while the store is down).

The same pass reads the incident brakes from the store (``LockStore``): a kill request for a
session this bastion holds, or an active lock matching its user, target or stack, ends it with
the reason shown to the user (before the grants are looked at: those sessions need no grant read).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

import structlog

from broker.domain import locks as lock_rules
from broker.domain.models import Grant, GrantState
from broker.errors import BrokerError
from broker.ports import AuditSink, Clock, LockStore
from broker.services.periodic import Periodic
from broker.services.sessions import LiveSession, SessionService

log = structlog.get_logger("broker.enforcement")
# sessions the relay carries (ProxyJump's inner ones included); tunnels have their own idle timer
# ([forwarding] idle_timeout_seconds), and a jump's outer channel lives as long as its inner ones
IDLE_KINDS = frozenset({"shell", "exec", "subsystem"})


class GrantReader(Protocol):
    async def get_many(self, grant_ids: list[str]) -> dict[str, Grant]: ...


def _why_not_live(g: Grant | None, now: datetime) -> str:
    if g is None:
        return "grant deleted"
    state = g.effective_state(now)
    if state is GrantState.APPROVED and now < g.starts_at:
        return "grant not started"
    return f"grant {state}"


class GrantEnforcer:
    def __init__(self, sessions: SessionService, grants: GrantReader, audit: AuditSink,
                 clock: Clock, *, interval: float, warn_before: timedelta,
                 idle_timeout: float = 0.0, locks: LockStore | None = None) -> None:
        self._sessions = sessions
        self._locks = locks
        self._idle_timeout = idle_timeout  # seconds; 0 = never
        self._grants = grants
        self._audit = audit
        self._clock = clock
        self._interval = interval
        self._warn_before = warn_before
        # the store down (BrokerError): sessions are kept (their grants were live), next tick
        self._loop = Periodic(self.check_once, lambda: self._interval,
                              failed_event="enforcement.check_failed", errors=(BrokerError,))

    def configure(self, *, interval: float, warn_before: timedelta, idle_timeout: float) -> None:
        """Reloaded settings: the next check uses them (sessions already warned stay warned)."""
        self._interval = interval
        self._warn_before = warn_before
        self._idle_timeout = idle_timeout

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def check_once(self) -> None:
        live = [s for s in self._sessions.live.values() if s.control is not None]
        if self._idle_timeout > 0:
            live = [s for s in live if not self._ended_idle(s)]
        if self._locks is not None and live:
            try:
                live = await self._brakes(live, self._locks)
            except BrokerError as exc:  # the grants are still checked below
                log.error("enforcement.locks_failed", error=str(exc)[:300])
        if not live:
            return
        grants = await self._grants.get_many(sorted({s.request.grant.id for s in live}))
        now = self._clock.now()
        for s in live:
            self._check(s, grants.get(s.request.grant.id), now)

    async def _brakes(self, live: list[LiveSession], store: LockStore) -> list[LiveSession]:
        """End the sessions a kill request or an active lock names; returns the others."""
        now = self._clock.now()
        active = await store.active(now)
        kills: dict[str, list[lock_rules.KillRequest]] = {}
        for k in await store.pending_kills([s.id for s in live]):
            kills.setdefault(k.session_id, []).append(k)  # oldest first: its reason is shown
        rest: list[LiveSession] = []
        done: list[str] = []
        for s in live:
            control = s.control
            if control is None or s.closed:
                continue
            req, who = s.request, str(s.request.principal)
            asked = kills.get(s.id)
            if asked:
                kill = asked[0]
                self._audit.emit("session.killed", session_id=s.id, user=who,
                                 target=req.instance.id, grant_id=req.grant.id,
                                 by=kill.requested_by, reason=kill.reason, kill_id=kill.id,
                                 **({"also": [k.id for k in asked[1:]]} if asked[1:] else {}))
                control.terminate(kill.describe())
                done += [k.id for k in asked]
                continue
            lock = lock_rules.first_match(active, req.principal, req.instance, now)
            if lock is not None:
                self._audit.emit("session.terminated", session_id=s.id, user=who,
                                 target=req.instance.id, grant_id=req.grant.id,
                                 reason=f"lock {lock.id}", lock_id=lock.id,
                                 lock_reason=lock.reason, by=lock.created_by)
                control.terminate(lock.describe())
                continue
            rest.append(s)
        for kill_id in done:
            await store.kill_done(kill_id, now)
        return rest

    def _ended_idle(self, s: LiveSession) -> bool:
        if s.request.kind not in IDLE_KINDS:
            return False
        idle = s.idle_seconds()  # the clock that stamped its activity: never mixed with another
        if s.closed or s.control is None or idle < self._idle_timeout:
            return False
        self._audit.emit("session.terminated", session_id=s.id, user=str(s.request.principal),
                         target=s.request.instance.id, grant_id=s.request.grant.id,
                         reason="idle timeout", idle_s=round(idle, 1))
        s.control.terminate("idle timeout")
        return True

    def _check(self, s: LiveSession, g: Grant | None, now: datetime) -> None:
        control = s.control
        if control is None or s.closed:
            return
        if g is None or not g.live_at(now):
            reason = _why_not_live(g, now)
            self._audit.emit("session.terminated", session_id=s.id, user=str(s.request.principal),
                             target=s.request.instance.id, grant_id=s.request.grant.id,
                             reason=reason)
            control.terminate(reason)
            return
        if g.expires_at != s.deadline:
            if g.expires_at > s.deadline:
                s.warned = False  # extended: warn again before the new end
            self._audit.emit("session.deadline_moved", session_id=s.id,
                             grant_id=g.id, deadline=g.expires_at.isoformat(),
                             previous=s.deadline.isoformat())
            s.deadline = g.expires_at
        left = s.deadline - now
        if not s.warned and left <= self._warn_before:
            s.warned = True
            minutes = max(1, round(left.total_seconds() / 60))
            control.notify(
                f"bastion-broker: your access to {s.request.instance.name} ends at "
                f"{s.deadline:%H:%M} UTC (in about {minutes} min); ask an approver to extend "
                f"grant {g.id} if you need longer")
            self._audit.emit("session.warned", session_id=s.id, grant_id=g.id,
                             deadline=s.deadline.isoformat())
