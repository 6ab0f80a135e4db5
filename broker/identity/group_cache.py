"""What Active Directory said about a group (its CN and parent groups), kept for a short while.

A login resolves nested groups by walking ``memberOf`` upwards, one LDAP search per level. The
user's own entry (direct groups, account state) is read fresh at every login, but the groups
above it change rarely and are the same for most users: asking the DC again at every login
costs it (and ldap3, which is pure Python) a search per level per login. Like SSSD's entry
cache, but short (``[identity.ad] group_cache_seconds``, 0 turns it off): removing a user from
a group takes effect at once; removing a *group* from a parent group takes up to that long.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GroupFacts:
    """One group as the DC described it; ``cn`` is "" when the DN was not a group it returned."""

    cn: str
    parents: tuple[str, ...]  # parent group DNs as the DC spelt them


class GroupCache:
    """(domain, normalised group DN) -> GroupFacts, each for ``ttl`` seconds; thread-safe (the
    directory's worker threads share it) and bounded (``max_entries``)."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[float, GroupFacts]] = {}

    @property
    def enabled(self) -> bool:
        return self._ttl > 0

    def get(self, domain: str, key: str) -> GroupFacts | None:
        if not self.enabled:
            return None
        with self._lock:
            hit = self._entries.get((domain, key))
            if hit is None:
                return None
            if hit[0] <= time.monotonic():
                del self._entries[(domain, key)]
                return None
            return hit[1]

    def put(self, domain: str, key: str, facts: GroupFacts) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if len(self._entries) >= self._max:  # all fresh: start over rather than grow
                    self._entries.clear()
            self._entries[(domain, key)] = (now + self._ttl, facts)
