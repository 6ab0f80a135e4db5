"""GroupCache: expiry, off switch and bound (pure logic; the AD tests cover its use)."""

from __future__ import annotations

import pytest

from broker.identity import group_cache
from broker.identity.group_cache import GroupCache, GroupFacts

FACTS = GroupFacts("ops", ("CN=parent,DC=x",))


def test_entries_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(group_cache.time, "monotonic", lambda: now[0])
    c = GroupCache(ttl=10)
    c.put("corp", "cn=ops", FACTS)
    assert c.get("corp", "cn=ops") == FACTS
    assert c.get("other", "cn=ops") is None  # per domain
    now[0] = 109.9
    assert c.get("corp", "cn=ops") == FACTS
    now[0] = 110.0
    assert c.get("corp", "cn=ops") is None


def test_zero_ttl_keeps_nothing() -> None:
    c = GroupCache(ttl=0)
    c.put("corp", "cn=ops", FACTS)
    assert not c.enabled and c.get("corp", "cn=ops") is None


def test_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(group_cache.time, "monotonic", lambda: now[0])
    c = GroupCache(ttl=5, max_entries=3)
    for i in range(3):
        c.put("corp", f"g{i}", FACTS)
    now[0] = 6.0  # all three expired: the next put drops them
    c.put("corp", "fresh", FACTS)
    assert [c.get("corp", f"g{i}") for i in range(3)] == [None, None, None]
    for i in range(10):
        c.put("corp", f"n{i}", FACTS)
        assert len(c._entries) <= 3
    assert c.get("corp", "n9") == FACTS
