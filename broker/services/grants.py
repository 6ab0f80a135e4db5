"""The grant workflow over a store: load, apply a pure transition, compare-and-set, audit.

Every transition is stored together with its history entry (actor, time, comment) and written to
the audit trail; if the audit write fails, the change is undone and the error raised (no change
without an audit line). Visibility: people see their own grants; approvers, auditors and admins
see all.

Requests are checked against the inventory (stacks it lists, each stack's VPC) when the service
has one. A pending request past ``policy.pending_expiry`` reads as expired at once (reads compute
it; every transition refuses it), and ``expire_pending`` (every ``EXPIRE_INTERVAL`` seconds in
each broker) stores the expiry with its history entry and one ``grant.expired`` audit line.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog

from broker.domain import workflow as wf
from broker.domain.models import Grant, GrantState
from broker.domain.workflow import (
    Actor,
    GrantPolicy,
    GrantRequest,
    HistoryEntry,
    KnownScopes,
    Role,
    WorkflowError,
)
from broker.errors import AuditError, BrokerError, ConflictError, NotFoundError
from broker.ports import AuditSink, Clock, GrantStore, Inventory
from broker.services.notify import Notifier
from broker.services.periodic import Periodic

log = structlog.get_logger("broker.grants")
EXPIRE_INTERVAL = 30.0  # seconds between sweeps for undecided requests past their time
EXPIRE_BATCH = 1000  # pending requests looked at per sweep
Step = Callable[[Grant, datetime, datetime | None], tuple[Grant, HistoryEntry]]


@dataclass(frozen=True, slots=True)
class GrantFilter:
    username: str | None = None
    stack: str | None = None
    state: str | None = None  # any GrantState value, or "active"
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 500


def can_see_all(actor: Actor) -> bool:
    return actor.has(Role.APPROVER) or actor.has(Role.AUDITOR)


def _visible(actor: Actor, g: Grant) -> bool:
    mine = f"{g.username}@{g.domain}".casefold()
    return can_see_all(actor) or actor.name in (mine, g.requested_by.casefold())


class GrantService:
    def __init__(self, store: GrantStore, audit: AuditSink, clock: Clock,
                 policy: GrantPolicy, inventory: Callable[[], Inventory] | None = None,
                 notifier: Notifier | None = None) -> None:
        self._store = store
        self._notifier = notifier  # requests, decisions and revocations are announced
        self._audit = audit
        self._clock = clock
        self.policy = policy
        # the inventory in use now (a reload may swap it); None: requests are not checked
        self._inventory = inventory
        self._sweep = Periodic(self.expire_pending, lambda: EXPIRE_INTERVAL,
                               failed_event="grants.expire_failed", errors=(BrokerError,))

    def start(self) -> None:
        """Expire undecided requests periodically (a running broker; not the CLI)."""
        self._sweep.start()

    async def stop(self) -> None:
        await self._sweep.stop()

    async def known_scopes(self) -> KnownScopes | None:
        """The inventory's stack -> VPCs map, or None without an inventory."""
        if self._inventory is None:
            return None
        return wf.scopes_of(await self._inventory().instances())

    async def request(self, actor: Actor, req: GrantRequest,
                      groups: frozenset[str] = frozenset()) -> Grant:
        now = self._clock.now()
        grant, entry = wf.create("g-" + uuid.uuid4().hex[:16], req, actor, now, self.policy,
                                 groups, await self.known_scopes())
        await self._store.create(grant, entry)
        self._audit_entry(grant, entry, actor)
        if self._notifier is not None:
            await self._notifier.grant_changed(grant, entry)
        return grant

    async def _deadline(self, g: Grant, now: datetime,
                        history: list[HistoryEntry] | None = None) -> datetime | None:
        """When a pending request expires, if it may have by ``now`` (the history is read only
        then: a request cannot have been pending longer than it exists). Otherwise None."""
        if g.state is not GrantState.PENDING:
            return None
        created = g.created_at or g.starts_at
        if created + self.policy.pending_expiry > now:
            return None
        if history is None:
            history = await self._store.history(g.id)
        return wf.pending_since(history, created) + self.policy.pending_expiry

    async def _view(self, g: Grant, now: datetime,
                    history: list[HistoryEntry] | None = None) -> Grant:
        """The grant as readers see it: a pending request past its time reads as expired."""
        deadline = await self._deadline(g, now, history)
        if wf.state_at(g, now, deadline) is GrantState.EXPIRED and g.state is GrantState.PENDING:
            return replace(g, state=GrantState.EXPIRED)
        return g

    async def _get(self, actor: Actor, grant_id: str) -> Grant:
        g = await self._store.get(grant_id)
        if g is None or not _visible(actor, g):
            raise NotFoundError(f"no grant {grant_id}")  # never reveal others' grants exist
        return g

    async def load(self, actor: Actor, grant_id: str) -> Grant:
        return await self._view(await self._get(actor, grant_id), self._clock.now())

    async def show(self, actor: Actor, grant_id: str) -> tuple[Grant, list[HistoryEntry]]:
        g = await self._get(actor, grant_id)
        history = await self._store.history(g.id)
        return await self._view(g, self._clock.now(), history), history

    async def search(self, actor: Actor, f: GrantFilter) -> list[Grant]:
        username = f.username
        if not can_see_all(actor):
            username = actor.name.split("@", 1)[0]  # own grants only (plus those requested)
        states: list[str] | None = None
        if f.state == "active":
            states = [GrantState.APPROVED.value]
        elif f.state == "expired":  # by time (approved, pending) or stored by the sweep
            states = [GrantState.APPROVED.value, GrantState.PENDING.value,
                      GrantState.EXPIRED.value]
        elif f.state:
            states = [GrantState(f.state).value]
        rows = await self._store.search(username=username, stack=f.stack, states=states,
                                        since=f.since, until=f.until, limit=f.limit)
        now = self._clock.now()
        rows = [await self._view(g, now) for g in rows if _visible(actor, g)]
        if f.state == "active":
            return [g for g in rows if g.live_at(now)]
        if f.state:  # what each row shows is what was asked for
            return [g for g in rows if str(g.effective_state(now)) == f.state]
        return rows

    async def expire_pending(self) -> int:
        """Store the expiry of every request left undecided past its time: one history entry
        and one ``grant.expired`` audit line each (a broker that loses the compare-and-set to
        another skips it). Returns how many this call expired."""
        now = self._clock.now()
        done = 0
        for g in await self._store.search(states=[GrantState.PENDING.value], limit=EXPIRE_BATCH):
            deadline = await self._deadline(g, now)
            if deadline is None or now < deadline:
                continue
            try:
                await self._commit(wf.SYSTEM, g, *wf.expire(g, now, deadline))
            except (ConflictError, WorkflowError):
                continue  # decided, or expired by another broker, meanwhile
            done += 1
        if done:
            log.info("grants.expired", count=done)
        return done

    async def _apply(self, actor: Actor, grant_id: str, step: Step) -> Grant:
        g = await self._get(actor, grant_id)
        now = self._clock.now()
        new, entry = step(g, now, await self._deadline(g, now))
        return await self._commit(actor, g, new, entry)

    async def _commit(self, actor: Actor, g: Grant, new: Grant, entry: HistoryEntry) -> Grant:
        stored = await self._store.update(new, entry)
        try:
            self._audit_entry(stored, entry, actor)
        except AuditError:
            # undo: no change may stand without its audit line
            back = replace(g, version=stored.version)
            undo = HistoryEntry(g.id, self._clock.now(), "system", "undone-audit-failed",
                                state=str(g.state), details=wf.changes(stored, back))
            await self._store.update(back, undo)
            raise
        if self._notifier is not None:
            await self._notifier.grant_changed(stored, entry)
        return stored

    def _audit_entry(self, g: Grant, e: HistoryEntry, actor: Actor) -> None:
        fields: dict[str, Any] = {
            "grant_id": g.id, "actor": e.actor,
            # the roles the actor held at that moment (live from the directory for API callers)
            "actor_roles": sorted(r.value for r in actor.roles),
            "user": f"{g.username}@{g.domain}",
            "stacks": list(g.stack_ids), "vpc": g.vpc_id, "level": str(g.level),
            "state": str(g.state), "expires_at": g.expires_at.isoformat(), "ticket": g.ticket,
            "trigger": str(g.trigger), "comment": e.comment or None,
        }
        if e.details:
            fields["changes"] = e.details  # before -> after, as in the grant's history
        self._audit.emit(f"grant.{e.action}", **fields)

    async def update(self, actor: Actor, grant_id: str, req: GrantRequest) -> Grant:
        known = await self.known_scopes()
        return await self._apply(actor, grant_id, lambda g, now, due: wf.update(
            g, req, actor, now, self.policy, known, pending_deadline=due))

    async def change(self, actor: Actor, grant_id: str, req: GrantRequest) -> Grant:
        known = await self.known_scopes()
        return await self._apply(actor, grant_id, lambda g, now, _: wf.change(
            g, req, actor, now, self.policy, known))

    async def withdraw(self, actor: Actor, grant_id: str, comment: str = "") -> Grant:
        return await self._apply(actor, grant_id, lambda g, now, due: wf.withdraw(
            g, actor, now, comment, pending_deadline=due))

    async def approve(self, actor: Actor, grant_id: str, comment: str = "") -> Grant:
        return await self._apply(actor, grant_id, lambda g, now, due: wf.approve(
            g, actor, now, self.policy, comment, pending_deadline=due))

    async def reject(self, actor: Actor, grant_id: str, comment: str) -> Grant:
        return await self._apply(actor, grant_id, lambda g, now, due: wf.reject(
            g, actor, now, comment, pending_deadline=due))

    async def extend(self, actor: Actor, grant_id: str, until: datetime,
                     comment: str = "") -> Grant:
        """Move the end: later (extend) or earlier but not before now (shorten)."""
        return await self._apply(actor, grant_id, lambda g, now, _: wf.extend(
            g, actor, now, self.policy, until, comment))

    async def revoke(self, actor: Actor, grant_id: str, comment: str = "") -> Grant:
        return await self._apply(actor, grant_id, lambda g, now, due: wf.revoke(
            g, actor, now, comment, pending_deadline=due))
