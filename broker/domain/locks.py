"""Locks and kill requests: the security team's brakes during an incident (pure rules, no I/O).

A lock names a user, a target (instance id or name) or a stack. While it is active (not removed,
not past its end) every live session it matches ends on every bastion, a locked user cannot log
in, and no new session or tunnel starts to a locked target or stack, as Teleport's ``tctl lock``.
A kill request names one live session; the bastion holding it ends it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.domain.durations import parse_duration
from broker.domain.models import Instance, Principal

MAX_REASON = 2000
MAX_TTL = timedelta(days=366)
LOCK_ID_RE = re.compile(r"^lk-[0-9a-f]{12}$")
TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
STACK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}$")
USER_RE = re.compile(r"^[A-Za-z0-9._$-][A-Za-z0-9._$ -]{0,63}@[A-Za-z0-9][A-Za-z0-9.-]{0,254}$")


class LockKind(enum.StrEnum):
    USER = "user"
    TARGET = "target"
    STACK = "stack"


class LockError(ValueError):
    """A lock or kill request that cannot be made as given (the message says why)."""


@dataclass(frozen=True, slots=True)
class Lock:
    id: str
    kind: LockKind
    value: str  # user@domain, instance id or name, or stack id; casefolded
    reason: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None = None  # None: until removed
    removed_at: datetime | None = None
    removed_by: str | None = None

    def active(self, now: datetime) -> bool:
        return self.removed_at is None and (self.expires_at is None or now < self.expires_at)

    def state(self, now: datetime) -> str:
        if self.removed_at is not None:
            return "removed"
        return "active" if self.active(now) else "expired"

    def matches_principal(self, principal: Principal) -> bool:
        return self.kind is LockKind.USER and self.value == principal.key

    def matches_instance(self, instance: Instance) -> bool:
        if self.kind is LockKind.TARGET:
            return self.value in (instance.id.casefold(), instance.name.casefold())
        if self.kind is LockKind.STACK:
            return self.value == instance.stack_id.casefold()
        return False

    def matches(self, principal: Principal, instance: Instance | None) -> bool:
        """Whether a session (or a login, with no instance yet) of ``principal`` is locked."""
        return self.matches_principal(principal) or (
            instance is not None and self.matches_instance(instance))

    def describe(self) -> str:
        """What the user is told (the reason is the security team's, for the user to read)."""
        return f"locked by the security team: {self.reason} (lock {self.id})"


@dataclass(frozen=True, slots=True)
class KillRequest:
    id: str
    session_id: str
    reason: str
    requested_by: str
    requested_at: datetime
    done_at: datetime | None = None

    def describe(self) -> str:
        """What the user is told (who asked stays in the audit log)."""
        return f"ended by the security team: {self.reason}"


def first_match(locks: list[Lock], principal: Principal, instance: Instance | None,
                now: datetime) -> Lock | None:
    """The oldest active lock matching, or None."""
    for lk in locks:
        if lk.active(now) and lk.matches(principal, instance):
            return lk
    return None


def check_reason(reason: str) -> str:
    """The reason as stored: required (it goes to the audit log and to the user), one line."""
    text = " ".join(reason.split())
    if not text:
        raise LockError("give a reason (it is audited and shown to the user)")
    if len(text) > MAX_REASON:
        raise LockError(f"the reason is longer than {MAX_REASON} characters")
    return text


def lock_value(kind: LockKind, value: str) -> str:
    """The lock's subject as stored (casefolded), checked for its kind."""
    v = value.strip()
    pattern = {LockKind.USER: USER_RE, LockKind.TARGET: TARGET_RE, LockKind.STACK: STACK_RE}[kind]
    if not pattern.match(v):
        what = {LockKind.USER: "user@domain", LockKind.TARGET: "an instance id or name",
                LockKind.STACK: "a stack id"}[kind]
        raise LockError(f"{kind.value}: not {what}: {v[:80]!r}")
    return v.casefold()


def parse_ttl(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``2d``, ``1w`` as a duration (within ``MAX_TTL``)."""
    ttl = parse_duration(text)
    if ttl is None:
        raise LockError(f"ttl: give a duration like 30m, 1h, 2d or 1w, not {text[:40]!r}")
    ttl = check_ttl(ttl)
    assert ttl is not None  # noqa: S101 - given one
    return ttl


def check_ttl(ttl: timedelta | None) -> timedelta | None:
    if ttl is not None and not timedelta(0) < ttl <= MAX_TTL:
        raise LockError(f"the ttl must be more than 0 and at most {MAX_TTL.days} days")
    return ttl
