"""Grant evaluation: the single pure function that says whether a principal may reach an instance."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from broker.domain.models import Decision, Grant, Instance, Level, Principal


def _matches_principal(grant: Grant, principal: Principal) -> bool:
    return (
        grant.username.casefold() == principal.username.casefold()
        and grant.domain.casefold() == principal.domain.casefold()
    )


def covers(grant: Grant, principal: Principal, instance: Instance) -> bool:
    """A grant covers an instance when user, domain, stack and VPC all match (time not checked)."""
    return (
        _matches_principal(grant, principal)
        and instance.stack_id in grant.stack_ids
        and grant.vpc_id == instance.vpc_id
    )


def evaluate(
    grants: Iterable[Grant], principal: Principal, instance: Instance, now: datetime
) -> Decision:
    """Pick the grant that admits ``principal`` to ``instance`` at ``now``, or explain the denial.

    With several live grants the highest level wins, then the one that lasts longest, so that a
    session's deadline is as late as the user's rights allow.
    """
    candidates = [g for g in grants if covers(g, principal, instance)]
    if not candidates:
        return Decision(False, "no grant covers this user, stack and VPC")
    live = [g for g in candidates if g.live_at(now)]
    if not live:
        states = sorted({str(g.effective_state(now)) for g in candidates})
        if any(g.live_at(g.starts_at) and now < g.starts_at for g in candidates):
            states.append("not-yet-started")
        return Decision(False, "no live grant (" + ", ".join(states) + ")")
    best = max(live, key=lambda g: (g.level is Level.ADMIN, g.expires_at))
    return Decision(True, "granted", best)


def reachable(
    grants: Iterable[Grant], principal: Principal, instances: Iterable[Instance], now: datetime
) -> list[tuple[Instance, Grant]]:
    """Instances the principal may reach now, with the grant that admits each (for the menu)."""
    grant_list = list(grants)
    out: list[tuple[Instance, Grant]] = []
    for inst in instances:
        d = evaluate(grant_list, principal, inst, now)
        if d.allowed and d.grant is not None:
            out.append((inst, d.grant))
    return out
