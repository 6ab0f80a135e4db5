"""Access decisions: which instance a selector names, and whether a live grant admits the user."""

from __future__ import annotations

from dataclasses import dataclass

from broker.domain import grants as grant_rules
from broker.domain.locks import Lock
from broker.domain.models import Decision, Grant, Instance, Principal
from broker.ports import Clock, GrantStore, Inventory, Metrics, NullMetrics
from broker.services.locks import LockGate


@dataclass(frozen=True, slots=True)
class AccessResult:
    decision: Decision
    instance: Instance | None


class AccessService:
    def __init__(self, inventory: Inventory, grants: GrantStore, clock: Clock, *,
                 metrics: Metrics | None = None, locks: LockGate | None = None) -> None:
        self._inventory = inventory
        self._locks = locks  # a locked user, target or stack: refused, naming the lock
        self._grants = grants
        self._clock = clock
        self._metrics = metrics or NullMetrics()

    @property
    def inventory(self) -> Inventory:
        return self._inventory

    def use_inventory(self, inventory: Inventory) -> None:
        """A reloaded inventory, for every decision from now on (one in progress keeps the
        instance it resolved)."""
        self._inventory = inventory

    async def decide(self, principal: Principal, target: str) -> AccessResult:
        instance = await self._inventory.resolve(target)
        if instance is None:
            self._metrics.access_decision("unknown_target")
            return AccessResult(Decision(False, "unknown target"), None)
        lock = await self._locks.lock_for(principal, instance) if self._locks else None
        if lock is not None:
            self._metrics.access_decision("deny")
            return AccessResult(Decision(False, f"locked: lock {lock.id}"), instance)
        grants = await self._grants.for_user(principal.username, principal.domain)
        decision = grant_rules.evaluate(grants, principal, instance, self._clock.now())
        self._metrics.access_decision("allow" if decision.allowed else "deny")
        return AccessResult(decision, instance)

    async def user_lock(self, principal: Principal) -> Lock | None:
        """The active lock on the user themselves, if any (the SSH menu ends the connection on
        one instead of listing nothing)."""
        return await self._locks.lock_for(principal) if self._locks else None

    async def reachable(self, principal: Principal) -> list[tuple[Instance, Grant]]:
        grants = await self._grants.for_user(principal.username, principal.domain)
        instances = await self._inventory.instances()
        if self._locks is not None:
            own, others = await self._locks.locked_instances(principal)
            if own is not None:
                return []
            instances = [i for i in instances if not any(lk.matches_instance(i) for lk in others)]
        return grant_rules.reachable(grants, principal, instances, self._clock.now())
