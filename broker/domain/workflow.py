"""The grant workflow as pure transitions: request, update, withdraw, approve, reject, extend,
change, revoke. Each returns the new grant plus a history entry, or raises ``WorkflowError``.

Rules (from the AMS access model and what approvers expect):
- A request names stacks, the AD domain and user, the VPC, the level, a trigger, a ticket and a
  reason; it lasts 8 h by default, at most ``max_duration`` for its level, from an optional start.
- Approvers approve or reject pending requests; nobody approves their own admin request (as
  requester or as grantee); policy may require two distinct approvers for admin, and may
  auto-approve read-only requests for given groups or triggers.
- An approved grant can be extended or shortened by an approver (within the maximum, never to
  before now), revoked by an approver or by its grantee, and changed: a change that narrows access
  applies at once, a change that widens it (more stacks, another VPC, admin instead of read-only,
  longer) needs approval again. An expired grant is never extended: access needs a new request.
- Stacks must be known to the inventory and the VPC must be one of each stack's, when the caller
  passes the inventory's stack -> VPCs map (``known``); the domain never reads the inventory.
- A request left pending for ``pending_expiry`` (from the moment it last became pending) expires:
  it can no longer be approved, rejected, edited or withdrawn; ``expire`` records that once.
- Every history entry's ``details`` holds ``{"field": {"before": old, "after": new}}`` for each
  field the transition changed (field names as in the API's grant JSON).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from broker.domain.models import (
    DEFAULT_GRANT_DURATION,
    Grant,
    GrantState,
    Instance,
    Level,
    Principal,
    Trigger,
)

STACK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}$")
VPC_RE = re.compile(r"^vpc-[0-9a-zA-Z]{1,32}$")
USER_RE = re.compile(r"^[A-Za-z0-9._$-][A-Za-z0-9._$ -]{0,63}$")
DOMAIN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})+$")
MAX_TEXT = 2000
MAX_START_AHEAD = timedelta(days=30)
DEFAULT_PENDING_EXPIRY = timedelta(hours=24)
# stack ID -> the VPC IDs its instances are in, as the inventory says (see ``scopes_of``)
KnownScopes = Mapping[str, frozenset[str]]


class Role(enum.StrEnum):
    REQUESTER = "requester"
    APPROVER = "approver"
    AUDITOR = "auditor"
    ADMIN = "admin"


class WorkflowError(Exception):
    """A refused transition. ``kind`` maps to an HTTP status: invalid 400, forbidden 403,
    conflict 409 (wrong state or a concurrent change)."""

    def __init__(self, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.field = field  # the request field at fault (API: detail.field), if one is


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a person (principal key) with roles, or an operator on the bastion host."""

    name: str  # user@domain, casefolded, or "operator:NAME"
    roles: frozenset[Role]

    @classmethod
    def of(cls, principal: Principal, roles: frozenset[Role]) -> Actor:
        return cls(principal.key, roles | {Role.REQUESTER})

    def has(self, role: Role) -> bool:
        return role in self.roles or Role.ADMIN in self.roles


SYSTEM = Actor("system", frozenset())  # the broker itself (expiry of undecided requests)


@dataclass(frozen=True, slots=True)
class AutoApprove:
    """Approve a read-only request at once when the requester is in one of ``groups`` or the
    trigger is one of ``triggers`` (empty list: any)."""

    groups: tuple[str, ...] = ()
    triggers: tuple[Trigger, ...] = ()


@dataclass(frozen=True, slots=True)
class GrantPolicy:
    default_duration: timedelta = DEFAULT_GRANT_DURATION
    max_duration: dict[Level, timedelta] = field(default_factory=lambda: {
        Level.ADMIN: timedelta(hours=12), Level.READ_ONLY: timedelta(hours=24)})
    two_approvers_for_admin: bool = False
    auto_approve_read_only: tuple[AutoApprove, ...] = ()
    pending_expiry: timedelta = DEFAULT_PENDING_EXPIRY  # undecided requests expire after this


@dataclass(frozen=True, slots=True)
class GrantRequest:
    username: str
    domain: str
    stack_ids: tuple[str, ...]
    vpc_id: str
    level: Level
    trigger: Trigger
    ticket: str
    reason: str
    duration: timedelta | None = None
    starts_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    grant_id: str
    at: datetime
    actor: str
    action: str
    comment: str = ""
    state: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _check_text(name: str, value: str, required: bool = True) -> None:
    if required and not value.strip():
        raise WorkflowError("invalid", f"{name} is required")
    if len(value) > MAX_TEXT or any(ord(c) < 0x20 and c not in "\t\n" for c in value):
        raise WorkflowError("invalid", f"{name} is too long or has control characters")


def validate_request(req: GrantRequest, now: datetime, policy: GrantPolicy) -> timedelta:
    """Check every field; returns the effective duration."""
    if not USER_RE.match(req.username) or req.username != req.username.strip():
        raise WorkflowError("invalid", "username is not a valid AD user name")
    if not DOMAIN_RE.match(req.domain):
        raise WorkflowError("invalid", "domain must be the FQDN of the trusted AD domain")
    if not req.stack_ids or len(req.stack_ids) > 50:
        raise WorkflowError("invalid", "between 1 and 50 stack IDs are required")
    for s in req.stack_ids:
        if not STACK_RE.match(s):
            raise WorkflowError("invalid", f"stack ID {s!r} is malformed")
    if len(set(req.stack_ids)) != len(req.stack_ids):
        raise WorkflowError("invalid", "stack IDs repeat")
    if not VPC_RE.match(req.vpc_id):
        raise WorkflowError("invalid", "VPC ID must look like vpc-0abc123")
    _check_text("ticket", req.ticket)
    _check_text("reason", req.reason)
    duration = req.duration if req.duration is not None else policy.default_duration
    if duration <= timedelta(0):
        raise WorkflowError("invalid", "duration must be positive")
    limit = policy.max_duration[req.level]
    if duration > limit:
        hours = limit.total_seconds() / 3600
        raise WorkflowError("invalid", f"duration exceeds the maximum for {req.level} ({hours:g} h)")
    if req.starts_at is not None:
        if req.starts_at.tzinfo is None:
            raise WorkflowError("invalid", "start time needs a time zone")
        if req.starts_at > now + MAX_START_AHEAD:
            raise WorkflowError("invalid", "start time is more than 30 days ahead")
    return duration


def _fields(g: Grant) -> dict[str, Any]:
    """The fields a history entry compares, named and shaped as in the API's grant JSON."""
    return {
        "state": str(g.state), "user": g.username, "domain": g.domain,
        "stacks": list(g.stack_ids), "vpc": g.vpc_id, "level": str(g.level),
        "starts_at": g.starts_at.isoformat(), "expires_at": g.expires_at.isoformat(),
        "trigger": str(g.trigger), "ticket": g.ticket, "reason": g.reason,
        "approved_by": [a for a in g.approved_by.split(",") if a],
    }


def changes(before: Grant, after: Grant) -> dict[str, Any]:
    """``{field: {"before": old, "after": new}}`` for every field that differs."""
    old, new = _fields(before), _fields(after)
    return {k: {"before": old[k], "after": new[k]} for k in old if old[k] != new[k]}


def _entry(old: Grant | None, g: Grant, now: datetime, actor: Actor, action: str,
           comment: str = "", **extra: Any) -> HistoryEntry:
    details = {**(changes(old, g) if old is not None else {}), **extra}
    return HistoryEntry(g.id, now, actor.name, action, comment, str(g.state), details)


def scopes_of(instances: Iterable[Instance]) -> dict[str, frozenset[str]]:
    """The stack -> VPCs map of an inventory's instances (what ``check_scope`` checks against)."""
    out: dict[str, set[str]] = {}
    for i in instances:
        out.setdefault(i.stack_id, set()).add(i.vpc_id)
    return {k: frozenset(v) for k, v in out.items()}


def check_scope(stack_ids: Sequence[str], vpc_id: str, known: KnownScopes | None) -> None:
    """Refuse stacks the inventory does not list and a VPC that is not each stack's: such a
    request could never admit a session, and an approver would approve it blind."""
    if known is None:
        return
    if not known:
        raise WorkflowError("invalid", "stacks: the inventory lists no stacks now (is it "
                            "reachable?); try again later", "stacks")
    for s in stack_ids:
        if s not in known:
            alike = sorted(k for k in known if k.casefold() == s.casefold())
            hint = f" (did you mean {alike[0]}?)" if alike else ""
            raise WorkflowError("invalid", f"stacks: unknown stack {s!r}: not in the "
                                f"inventory{hint}", "stacks")
    for s in stack_ids:
        if vpc_id not in known[s]:
            raise WorkflowError("invalid", f"vpc: {vpc_id} is not a VPC of stack {s} (its VPC: "
                                + ", ".join(sorted(known[s])) + ")", "vpc")


def pending_since(history: Sequence[HistoryEntry], fallback: datetime) -> datetime:
    """When a pending grant last became pending: the first entry of the run of pending entries
    that ends the history (a widening change starts a new wait; an edit or a first of two
    approvals does not)."""
    since, running = fallback, False
    for e in history:
        if e.state == GrantState.PENDING.value:
            if not running:
                since, running = e.at, True
        else:
            running = False
    return since


def state_at(g: Grant, now: datetime, pending_deadline: datetime | None = None) -> GrantState:
    """The state a reader sees: ``effective_state``, and a pending request past its deadline is
    expired (before ``expire`` has stored that)."""
    if g.state is GrantState.PENDING and pending_deadline is not None and now >= pending_deadline:
        return GrantState.EXPIRED
    return g.effective_state(now)


def _is_own(g: Grant, actor: Actor) -> bool:
    grantee = f"{g.username}@{g.domain}".casefold()
    return actor.name in (grantee, g.requested_by.casefold())


def create(grant_id: str, req: GrantRequest, actor: Actor, now: datetime, policy: GrantPolicy,
           actor_groups: frozenset[str] = frozenset(), known: KnownScopes | None = None,
           ) -> tuple[Grant, HistoryEntry]:
    """A new request, pending unless policy auto-approves it."""
    if not actor.has(Role.REQUESTER):
        raise WorkflowError("forbidden", "requesting access needs the requester role")
    duration = validate_request(req, now, policy)
    check_scope(req.stack_ids, req.vpc_id, known)
    starts = max(req.starts_at or now, now)
    g = Grant(
        id=grant_id, username=req.username, domain=req.domain.lower(),
        stack_ids=tuple(req.stack_ids), vpc_id=req.vpc_id, level=req.level,
        state=GrantState.PENDING, starts_at=starts, expires_at=starts + duration,
        trigger=req.trigger, ticket=req.ticket, reason=req.reason, requested_by=actor.name,
        approved_by="", created_at=now,
    )
    if req.level is Level.READ_ONLY and _auto_approves(policy, req, actor_groups):
        g = replace(g, state=GrantState.APPROVED, approved_by="policy:auto-approve")
        return g, _entry(None, g, now, actor, "requested+auto-approved")
    return g, _entry(None, g, now, actor, "requested")


def _auto_approves(policy: GrantPolicy, req: GrantRequest, groups: frozenset[str]) -> bool:
    folded = {x.casefold() for x in groups}
    for rule in policy.auto_approve_read_only:
        group_ok = not rule.groups or any(x.casefold() in folded for x in rule.groups)
        trigger_ok = not rule.triggers or req.trigger in rule.triggers
        if group_ok and trigger_ok:
            return True
    return False


def _need_state(g: Grant, now: datetime, *states: GrantState,
                pending_deadline: datetime | None = None) -> None:
    current = state_at(g, now, pending_deadline)
    if current in states:
        return
    if current is GrantState.EXPIRED and g.state is GrantState.PENDING and pending_deadline:
        raise WorkflowError("conflict", f"request {g.id} expired at "
                            f"{pending_deadline:%Y-%m-%d %H:%M} UTC without a decision: "
                            "a new request is needed")
    raise WorkflowError("conflict", f"grant {g.id} is {current}, not "
                        + " or ".join(str(s) for s in states))


def _scope_check_needed(g: Grant, req: GrantRequest) -> bool:
    """Only a scope other than the grant's is checked again: an inventory that lost a stack
    since must not block narrowing or shortening what was granted."""
    return not set(req.stack_ids) <= set(g.stack_ids) or req.vpc_id != g.vpc_id


def update(g: Grant, req: GrantRequest, actor: Actor, now: datetime,
           policy: GrantPolicy, known: KnownScopes | None = None, *,
           pending_deadline: datetime | None = None) -> tuple[Grant, HistoryEntry]:
    """Edit a pending request (its requester, or an admin)."""
    _need_state(g, now, GrantState.PENDING, pending_deadline=pending_deadline)
    if actor.name != g.requested_by.casefold() and not actor.has(Role.ADMIN):
        raise WorkflowError("forbidden", "only the requester may update a request")
    duration = validate_request(req, now, policy)
    if _scope_check_needed(g, req):
        check_scope(req.stack_ids, req.vpc_id, known)
    starts = max(req.starts_at or now, now)
    new = replace(g, username=req.username, domain=req.domain.lower(),
                  stack_ids=tuple(req.stack_ids), vpc_id=req.vpc_id, level=req.level,
                  trigger=req.trigger, ticket=req.ticket, reason=req.reason, starts_at=starts,
                  expires_at=starts + duration, approved_by="")
    return new, _entry(g, new, now, actor, "updated")


def withdraw(g: Grant, actor: Actor, now: datetime, comment: str = "", *,
             pending_deadline: datetime | None = None) -> tuple[Grant, HistoryEntry]:
    _need_state(g, now, GrantState.PENDING, pending_deadline=pending_deadline)
    if actor.name != g.requested_by.casefold() and not actor.has(Role.ADMIN):
        raise WorkflowError("forbidden", "only the requester may withdraw a request")
    new = replace(g, state=GrantState.WITHDRAWN)
    return new, _entry(g, new, now, actor, "withdrawn", comment)


def approve(g: Grant, actor: Actor, now: datetime, policy: GrantPolicy,
            comment: str = "", *, pending_deadline: datetime | None = None,
            ) -> tuple[Grant, HistoryEntry]:
    """One approval; the grant becomes approved when enough distinct approvers agreed. The
    window starts at approval if the requested start has passed, so no time is lost waiting.
    A request past ``pending_deadline`` has expired and is refused."""
    _need_state(g, now, GrantState.PENDING, pending_deadline=pending_deadline)
    if not actor.has(Role.APPROVER):
        raise WorkflowError("forbidden", "approving needs the approver role")
    if g.level is Level.ADMIN and _is_own(g, actor):
        raise WorkflowError("forbidden", "nobody approves their own admin request")
    approvers = [a for a in g.approved_by.split(",") if a]
    if actor.name in approvers:
        raise WorkflowError("conflict", "you already approved this request")
    approvers.append(actor.name)
    needed = 2 if (g.level is Level.ADMIN and policy.two_approvers_for_admin) else 1
    if len(approvers) < needed:
        new = replace(g, approved_by=",".join(approvers))
        return new, _entry(g, new, now, actor, "approval-recorded", comment,
                           approvals=len(approvers), needed=needed)
    duration = g.expires_at - g.starts_at
    starts = max(g.starts_at, now)
    new = replace(g, state=GrantState.APPROVED, approved_by=",".join(approvers),
                  starts_at=starts, expires_at=starts + duration)
    return new, _entry(g, new, now, actor, "approved", comment)


def reject(g: Grant, actor: Actor, now: datetime, comment: str = "", *,
           pending_deadline: datetime | None = None) -> tuple[Grant, HistoryEntry]:
    _need_state(g, now, GrantState.PENDING, pending_deadline=pending_deadline)
    if not actor.has(Role.APPROVER):
        raise WorkflowError("forbidden", "rejecting needs the approver role")
    _check_text("comment", comment)
    new = replace(g, state=GrantState.REJECTED)
    return new, _entry(g, new, now, actor, "rejected", comment)


def extend(g: Grant, actor: Actor, now: datetime, policy: GrantPolicy, until: datetime,
           comment: str = "") -> tuple[Grant, HistoryEntry]:
    """Move the end of an approved grant, later ("extended") or earlier, never before now
    (recorded as "changed"); live sessions follow without reconnecting. An expired grant stays
    expired: its user makes a new request, which approvers see as such."""
    if g.effective_state(now) is GrantState.EXPIRED:
        raise WorkflowError("conflict", f"grant {g.id} expired at {g.expires_at:%Y-%m-%d %H:%M} "
                            "UTC and cannot be extended: a new request is needed "
                            "(bastion-broker grant request)")
    _need_state(g, now, GrantState.APPROVED)
    if not actor.has(Role.APPROVER):
        raise WorkflowError("forbidden", "extending or shortening needs the approver role")
    if until.tzinfo is None:
        raise WorkflowError("invalid", "until: the end time needs a time zone", "until")
    if until == g.expires_at:
        raise WorkflowError("invalid", "until: the grant already ends then", "until")
    if until < g.expires_at:  # shortening narrows access: no four-eyes rule, no maximum
        if until <= now:
            raise WorkflowError("invalid", "until: the new end is not in the future; to end "
                                "access now, revoke the grant", "until")
        if until <= g.starts_at:
            raise WorkflowError("invalid", "until: the new end is not after the grant's start",
                                "until")
        new = replace(g, expires_at=until)
        return new, _entry(g, new, now, actor, "changed", comment)
    if g.level is Level.ADMIN and _is_own(g, actor):
        raise WorkflowError("forbidden", "nobody extends their own admin grant")
    limit = policy.max_duration[g.level]
    if until - max(g.starts_at, now) > limit:
        hours = limit.total_seconds() / 3600
        raise WorkflowError("invalid", f"until: an extension may not exceed {hours:g} h from "
                            "now", "until")
    new = replace(g, expires_at=until)
    return new, _entry(g, new, now, actor, "extended", comment)


def revoke(g: Grant, actor: Actor, now: datetime, comment: str = "", *,
           pending_deadline: datetime | None = None) -> tuple[Grant, HistoryEntry]:
    """End access now: approvers and admins, or the grantee giving access up."""
    _need_state(g, now, GrantState.APPROVED, GrantState.PENDING,
                pending_deadline=pending_deadline)
    grantee = f"{g.username}@{g.domain}".casefold()
    if not actor.has(Role.APPROVER) and actor.name != grantee:
        raise WorkflowError("forbidden", "revoking needs the approver role (or being the grantee)")
    new = replace(g, state=GrantState.REVOKED)
    return new, _entry(g, new, now, actor, "revoked", comment)


def expire(g: Grant, now: datetime, pending_deadline: datetime) -> tuple[Grant, HistoryEntry]:
    """Store that a request got no decision in time (the periodic sweep; once per grant: the
    store's compare-and-set lets one broker win)."""
    if g.state is not GrantState.PENDING or now < pending_deadline:
        raise WorkflowError("conflict", f"grant {g.id} is not a pending request past its time")
    new = replace(g, state=GrantState.EXPIRED)
    return new, _entry(g, new, now, SYSTEM, "expired",
                       f"no decision by {pending_deadline:%Y-%m-%d %H:%M} UTC")


def change(g: Grant, req: GrantRequest, actor: Actor, now: datetime,
           policy: GrantPolicy, known: KnownScopes | None = None) -> tuple[Grant, HistoryEntry]:
    """Change an approved grant. Narrowing applies at once; widening returns it to pending."""
    _need_state(g, now, GrantState.APPROVED)
    if actor.name != g.requested_by.casefold() and not actor.has(Role.APPROVER):
        raise WorkflowError("forbidden", "only the requester or an approver may change a grant")
    if (req.username.casefold(), req.domain.casefold()) != (g.username.casefold(),
                                                             g.domain.casefold()):
        raise WorkflowError("invalid", "a grant's user and domain cannot change: request anew")
    duration = validate_request(req, now, policy)
    if _scope_check_needed(g, req):
        check_scope(req.stack_ids, req.vpc_id, known)
    until = max(g.starts_at, now) + duration
    widens = (
        not set(req.stack_ids) <= set(g.stack_ids)
        or req.vpc_id != g.vpc_id
        or (req.level is Level.ADMIN and g.level is Level.READ_ONLY)
        or until > g.expires_at
    )
    new = replace(g, stack_ids=tuple(req.stack_ids), vpc_id=req.vpc_id, level=req.level,
                  trigger=req.trigger, ticket=req.ticket, reason=req.reason,
                  expires_at=until if widens else min(until, g.expires_at))
    if widens:
        new = replace(new, state=GrantState.PENDING, approved_by="")
        return new, _entry(g, new, now, actor, "changed-needs-approval")
    return new, _entry(g, new, now, actor, "changed")
