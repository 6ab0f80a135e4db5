"""Value objects shared by every layer: principals, targets, grants and access decisions."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

DEFAULT_GRANT_DURATION = timedelta(hours=8)


class Level(enum.StrEnum):
    """Access level of a grant, as in the AMS guide: admin is read/write, read-only a standard user."""

    ADMIN = "admin"
    READ_ONLY = "read-only"


class GrantState(enum.StrEnum):
    """Lifecycle of a grant; only ``APPROVED`` inside its time window admits sessions."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    REVOKED = "revoked"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"


class Trigger(enum.StrEnum):
    """Why access is needed: the access triggers of the AMS guide."""

    INCIDENT = "incident"
    SERVICE_REQUEST = "service-request"
    PATCH = "patch"
    DEPLOYMENT = "deployment"
    PROBLEM = "problem"
    ALERT = "alert"
    CHANGE_REQUEST = "change-request"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated person: the AD domain FQDN plus the sAMAccountName, compared casefolded."""

    domain: str
    username: str
    groups: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """Stable identifier used by stores (TOTP steps, grants): ``user@domain`` casefolded."""
        return f"{self.username.casefold()}@{self.domain.casefold()}"

    def __str__(self) -> str:
        return f"{self.username}@{self.domain}"


@dataclass(frozen=True, slots=True)
class Instance:
    """One reachable host of a stack, as the inventory knows it."""

    id: str
    name: str
    stack_id: str
    vpc_id: str
    address: str
    port: int = 22
    os: str = "linux"
    host_keys: tuple[str, ...] = ()
    host_ca_keys: tuple[str, ...] = ()
    admin_login: str | None = None
    read_only_login: str | None = None

    def login_for(self, level: Level, default_admin: str, default_read_only: str) -> str:
        """The target account for ``level``: per-instance override, else the configured default."""
        if level is Level.ADMIN:
            return self.admin_login or default_admin
        return self.read_only_login or default_read_only


@dataclass(frozen=True, slots=True)
class Grant:
    """A change-request-backed permission for one AD user on one or more stacks in one VPC."""

    id: str
    username: str
    domain: str
    stack_ids: tuple[str, ...]
    vpc_id: str
    level: Level
    state: GrantState
    starts_at: datetime
    expires_at: datetime
    trigger: Trigger = Trigger.SERVICE_REQUEST
    ticket: str = ""
    reason: str = ""
    requested_by: str = ""
    approved_by: str = ""
    created_at: datetime | None = None
    version: int = 1  # optimistic concurrency: a store update must name the version it read

    def live_at(self, now: datetime) -> bool:
        """Whether the grant admits sessions at ``now``: approved and inside its window."""
        return self.state is GrantState.APPROVED and self.starts_at <= now < self.expires_at

    def effective_state(self, now: datetime) -> GrantState:
        """The state a reader should see: an approved grant past its end has expired by itself."""
        if self.state is GrantState.APPROVED and now >= self.expires_at:
            return GrantState.EXPIRED
        return self.state


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of an access check. A denial is a value with a reason for the audit log only."""

    allowed: bool
    reason: str
    grant: Grant | None = None

    @property
    def level(self) -> Level | None:
        return self.grant.level if self.grant else None
