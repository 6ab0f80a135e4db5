"""The grant workflow over a store: load, apply a pure transition, compare-and-set, audit.

Every transition is stored together with its history entry (actor, time, comment) and written to
the audit trail; if the audit write fails, the change is undone and the error raised (no change
without an audit line). Visibility: people see their own grants; approvers, auditors and admins
see all.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from broker.domain import workflow as wf
from broker.domain.models import Grant, GrantState
from broker.domain.workflow import Actor, GrantPolicy, GrantRequest, HistoryEntry, Role
from broker.errors import AuditError, NotFoundError
from broker.ports import AuditSink, Clock, GrantStore


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
                 policy: GrantPolicy) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock
        self.policy = policy

    async def request(self, actor: Actor, req: GrantRequest,
                      groups: frozenset[str] = frozenset()) -> Grant:
        now = self._clock.now()
        grant, entry = wf.create("g-" + uuid.uuid4().hex[:16], req, actor, now, self.policy,
                                 groups)
        await self._store.create(grant, entry)
        self._audit_entry(grant, entry, actor)
        return grant

    async def load(self, actor: Actor, grant_id: str) -> Grant:
        g = await self._store.get(grant_id)
        if g is None or not _visible(actor, g):
            raise NotFoundError(f"no grant {grant_id}")  # never reveal others' grants exist
        return g

    async def show(self, actor: Actor, grant_id: str) -> tuple[Grant, list[HistoryEntry]]:
        g = await self.load(actor, grant_id)
        return g, await self._store.history(g.id)

    async def search(self, actor: Actor, f: GrantFilter) -> list[Grant]:
        username = f.username
        if not can_see_all(actor):
            username = actor.name.split("@", 1)[0]  # own grants only (plus those requested)
        states: list[str] | None = None
        if f.state in ("active", "expired"):
            states = [GrantState.APPROVED.value]
        elif f.state:
            states = [GrantState(f.state).value]
        rows = await self._store.search(username=username, stack=f.stack, states=states,
                                        since=f.since, until=f.until, limit=f.limit)
        now = self._clock.now()
        if f.state == "active":
            rows = [g for g in rows if g.live_at(now)]
        elif f.state == "expired":
            rows = [g for g in rows if g.effective_state(now) is GrantState.EXPIRED]
        elif f.state == GrantState.APPROVED.value:
            rows = [g for g in rows if g.effective_state(now) is GrantState.APPROVED]
        return [g for g in rows if _visible(actor, g)]

    async def _apply(self, actor: Actor, grant_id: str,
                     step: Callable[[Grant, datetime], tuple[Grant, HistoryEntry]]) -> Grant:
        g = await self.load(actor, grant_id)
        new, entry = step(g, self._clock.now())
        stored = await self._store.update(new, entry)
        try:
            self._audit_entry(stored, entry, actor)
        except AuditError:
            # undo: no change may stand without its audit line
            undo = HistoryEntry(g.id, self._clock.now(), "system", "undone-audit-failed")
            await self._store.update(replace(g, version=stored.version), undo)
            raise
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
        self._audit.emit(f"grant.{e.action}", **fields)

    async def update(self, actor: Actor, grant_id: str, req: GrantRequest) -> Grant:
        return await self._apply(actor, grant_id,
                                 lambda g, now: wf.update(g, req, actor, now, self.policy))

    async def change(self, actor: Actor, grant_id: str, req: GrantRequest) -> Grant:
        return await self._apply(actor, grant_id,
                                 lambda g, now: wf.change(g, req, actor, now, self.policy))

    async def withdraw(self, actor: Actor, grant_id: str, comment: str = "") -> Grant:
        return await self._apply(actor, grant_id,
                                 lambda g, now: wf.withdraw(g, actor, now, comment))

    async def approve(self, actor: Actor, grant_id: str, comment: str = "") -> Grant:
        return await self._apply(actor, grant_id,
                                 lambda g, now: wf.approve(g, actor, now, self.policy, comment))

    async def reject(self, actor: Actor, grant_id: str, comment: str) -> Grant:
        return await self._apply(actor, grant_id,
                                 lambda g, now: wf.reject(g, actor, now, comment))

    async def extend(self, actor: Actor, grant_id: str, until: datetime,
                     comment: str = "") -> Grant:
        return await self._apply(
            actor, grant_id, lambda g, now: wf.extend(g, actor, now, self.policy, until, comment))

    async def revoke(self, actor: Actor, grant_id: str, comment: str = "") -> Grant:
        return await self._apply(actor, grant_id,
                                 lambda g, now: wf.revoke(g, actor, now, comment))
