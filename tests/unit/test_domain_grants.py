"""grants.evaluate / reachable and Grant.live_at / effective_state."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.domain.grants import covers, evaluate, reachable
from broker.domain.models import (
    Decision,
    Grant,
    GrantState,
    Instance,
    Level,
    Principal,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
ALICE = Principal("corp.example.com", "alice", frozenset({"ops"}))
WEB01 = Instance("i-0abc123", "web01", "stack-a", "vpc-1", "10.0.1.12")
DB01 = Instance("i-0def456", "db01", "stack-b", "vpc-1", "10.0.1.13")
OTHER_VPC = Instance("i-0fff000", "web02", "stack-a", "vpc-2", "10.0.2.12")


def grant(**kw: object) -> Grant:
    base = Grant(
        id="g1",
        username="alice",
        domain="corp.example.com",
        stack_ids=("stack-a",),
        vpc_id="vpc-1",
        level=Level.READ_ONLY,
        state=GrantState.APPROVED,
        starts_at=NOW - timedelta(hours=1),
        expires_at=NOW + timedelta(hours=1),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_live_grant_allows() -> None:
    g = grant()
    d = evaluate([g], ALICE, WEB01, NOW)
    assert d == Decision(True, "granted", g)
    assert d.level is Level.READ_ONLY


def test_user_and_domain_match_case_insensitively() -> None:
    g = grant(username="ALICE", domain="Corp.Example.COM")
    assert evaluate([g], ALICE, WEB01, NOW).allowed is True
    p = Principal("CORP.EXAMPLE.COM", "Alice")
    assert evaluate([grant()], p, WEB01, NOW).allowed is True


@pytest.mark.parametrize(
    "g",
    [
        grant(username="bob"),
        grant(domain="other.example.com"),
        grant(stack_ids=("stack-z",)),
        grant(vpc_id="vpc-2"),
    ],
    ids=["other-user", "other-domain", "other-stack", "other-vpc"],
)
def test_grant_not_covering_denies(g: Grant) -> None:
    d = evaluate([g], ALICE, WEB01, NOW)
    assert d == Decision(False, "no grant covers this user, stack and VPC", None)
    assert d.level is None


def test_no_grants_denies() -> None:
    assert evaluate([], ALICE, WEB01, NOW).allowed is False


def test_same_stack_in_other_vpc_denied() -> None:
    assert evaluate([grant()], ALICE, OTHER_VPC, NOW).allowed is False


def test_multi_stack_grant_covers_each_stack() -> None:
    g = grant(stack_ids=("stack-a", "stack-b"))
    assert evaluate([g], ALICE, WEB01, NOW).grant == g
    assert evaluate([g], ALICE, DB01, NOW).grant == g
    assert covers(g, ALICE, OTHER_VPC) is False


def test_expired_exactly_at_expires_at() -> None:
    g = grant(expires_at=NOW)
    d = evaluate([g], ALICE, WEB01, NOW)
    assert d == Decision(False, "no live grant (expired)", None)
    # one microsecond before the end it is still live
    assert evaluate([g], ALICE, WEB01, NOW - timedelta(microseconds=1)).allowed is True


def test_starts_exactly_at_starts_at() -> None:
    g = grant(starts_at=NOW)
    assert evaluate([g], ALICE, WEB01, NOW).allowed is True


def test_not_yet_started() -> None:
    g = grant(starts_at=NOW + timedelta(minutes=5), expires_at=NOW + timedelta(hours=2))
    d = evaluate([g], ALICE, WEB01, NOW)
    assert d == Decision(False, "no live grant (approved, not-yet-started)", None)


@pytest.mark.parametrize(
    "state",
    [
        GrantState.REVOKED,
        GrantState.PENDING,
        GrantState.REJECTED,
        GrantState.WITHDRAWN,
        GrantState.EXPIRED,
    ],
)
def test_non_approved_states_deny(state: GrantState) -> None:
    d = evaluate([grant(state=state)], ALICE, WEB01, NOW)
    assert d == Decision(False, f"no live grant ({state})", None)


def test_denial_lists_all_states_sorted() -> None:
    gs = [
        grant(id="a", state=GrantState.REVOKED),
        grant(id="b", expires_at=NOW),
        grant(id="c", state=GrantState.PENDING),
    ]
    d = evaluate(gs, ALICE, WEB01, NOW)
    assert d.reason == "no live grant (expired, pending, revoked)"


def test_live_grant_wins_over_dead_ones() -> None:
    live = grant(id="live")
    gs = [
        grant(id="rev", state=GrantState.REVOKED, level=Level.ADMIN),
        live,
        grant(id="old", expires_at=NOW - timedelta(hours=1), level=Level.ADMIN),
    ]
    assert evaluate(gs, ALICE, WEB01, NOW).grant == live


def test_admin_beats_longer_read_only() -> None:
    ro = grant(id="ro", level=Level.READ_ONLY, expires_at=NOW + timedelta(hours=8))
    admin = grant(id="adm", level=Level.ADMIN, expires_at=NOW + timedelta(minutes=10))
    for order in ([ro, admin], [admin, ro]):
        d = evaluate(order, ALICE, WEB01, NOW)
        assert d.grant == admin
        assert d.level is Level.ADMIN


def test_same_level_latest_expiry_wins() -> None:
    short = grant(id="short", expires_at=NOW + timedelta(minutes=10))
    long = grant(id="long", expires_at=NOW + timedelta(hours=3))
    mid = grant(id="mid", expires_at=NOW + timedelta(hours=1))
    assert evaluate([short, long, mid], ALICE, WEB01, NOW).grant == long
    assert evaluate([mid, long, short], ALICE, WEB01, NOW).grant == long


def test_evaluate_accepts_a_generator() -> None:
    g = grant()
    assert evaluate((x for x in [g]), ALICE, WEB01, NOW).grant == g


def test_reachable_lists_instances_with_their_grant() -> None:
    ga = grant(id="ga", stack_ids=("stack-a",))
    gb = grant(id="gb", stack_ids=("stack-b",), level=Level.ADMIN, expires_at=NOW)  # expired
    insts = [WEB01, DB01, OTHER_VPC]
    assert reachable([ga, gb], ALICE, insts, NOW) == [(WEB01, ga)]
    assert reachable(iter([ga, gb]), ALICE, insts, NOW - timedelta(minutes=1)) == [
        (WEB01, ga),
        (DB01, gb),
    ]
    assert reachable([ga], Principal("corp.example.com", "bob"), insts, NOW) == []


def test_effective_state() -> None:
    g = grant()
    assert g.effective_state(NOW) is GrantState.APPROVED
    assert g.effective_state(g.expires_at) is GrantState.EXPIRED
    assert g.effective_state(g.expires_at + timedelta(days=1)) is GrantState.EXPIRED
    assert g.effective_state(g.starts_at - timedelta(days=1)) is GrantState.APPROVED
    revoked = grant(state=GrantState.REVOKED)
    assert revoked.effective_state(revoked.expires_at + timedelta(days=1)) is GrantState.REVOKED
    pending = grant(state=GrantState.PENDING)
    assert pending.effective_state(pending.expires_at) is GrantState.PENDING


def test_live_at_bounds() -> None:
    g = grant()
    assert g.live_at(g.starts_at) is True
    assert g.live_at(g.starts_at - timedelta(microseconds=1)) is False
    assert g.live_at(g.expires_at) is False
    assert grant(state=GrantState.PENDING).live_at(NOW) is False


def test_principal_key_and_str() -> None:
    p = Principal("Corp.Example.com", "Alice")
    assert p.key == "alice@corp.example.com"
    assert str(p) == "Alice@Corp.Example.com"


def test_login_for_level() -> None:
    assert WEB01.login_for(Level.ADMIN, "admin", "readonly") == "admin"
    assert WEB01.login_for(Level.READ_ONLY, "admin", "readonly") == "readonly"
    custom = replace(WEB01, admin_login="root", read_only_login="viewer")
    assert custom.login_for(Level.ADMIN, "admin", "readonly") == "root"
    assert custom.login_for(Level.READ_ONLY, "admin", "readonly") == "viewer"
