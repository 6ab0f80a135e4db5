"""Roles from directory groups: requester (everyone who may log in), approver, auditor, admin.

The AD backend marks configured approver/auditor groups as ``role:approver``/``role:auditor`` in
the principal's groups; the static directory lists plain group names, mapped here by config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from broker.domain.models import Level, Principal, Trigger
from broker.domain.workflow import Actor, AutoApprove, GrantPolicy, Role


class RoleSettings(Protocol):
    """What roles are read from (``[roles]`` in the config; services never import the config
    module, which belongs to the adapters and the app)."""

    @property
    def approver_groups(self) -> Sequence[str]: ...
    @property
    def auditor_groups(self) -> Sequence[str]: ...
    @property
    def admin_groups(self) -> Sequence[str]: ...


class GrantSettings(Protocol):
    """What the workflow policy is built from (``[grants]`` in the config)."""

    @property
    def default_hours(self) -> float: ...
    @property
    def max_hours_admin(self) -> float: ...
    @property
    def max_hours_read_only(self) -> float: ...
    @property
    def two_approvers_for_admin(self) -> bool: ...
    @property
    def pending_expire_hours(self) -> float: ...
    @property
    def auto_approve_read_only_groups(self) -> Sequence[str]: ...
    @property
    def auto_approve_read_only_triggers(self) -> Sequence[Trigger]: ...


def roles_of(principal: Principal, settings: RoleSettings) -> frozenset[Role]:
    groups = {g.casefold() for g in principal.groups}
    roles = {Role.REQUESTER}
    for role, names in ((Role.APPROVER, settings.approver_groups),
                        (Role.AUDITOR, settings.auditor_groups),
                        (Role.ADMIN, settings.admin_groups)):
        if f"role:{role.value}" in groups or any(n.casefold() in groups for n in names):
            roles.add(role)
    return frozenset(roles)


def actor_of(principal: Principal, settings: RoleSettings) -> Actor:
    return Actor.of(principal, roles_of(principal, settings))


def grant_policy(settings: GrantSettings) -> GrantPolicy:
    """The workflow policy from configuration."""
    from datetime import timedelta

    triggers = tuple(settings.auto_approve_read_only_triggers)
    rules: tuple[AutoApprove, ...] = ()
    if settings.auto_approve_read_only_groups:
        rules += (AutoApprove(groups=tuple(settings.auto_approve_read_only_groups)),)
    if triggers:
        rules += (AutoApprove(triggers=triggers),)
    return GrantPolicy(
        default_duration=timedelta(hours=settings.default_hours),
        max_duration={Level.ADMIN: timedelta(hours=settings.max_hours_admin),
                      Level.READ_ONLY: timedelta(hours=settings.max_hours_read_only)},
        two_approvers_for_admin=settings.two_approvers_for_admin,
        auto_approve_read_only=rules,
        pending_expiry=timedelta(hours=settings.pending_expire_hours),
    )
