"""The lock rules (pure): what a lock matches, when it is active, what input it takes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.domain.locks import (
    Lock,
    LockError,
    LockKind,
    check_reason,
    first_match,
    lock_value,
    parse_ttl,
)
from broker.domain.models import Instance, Principal

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
ALICE = Principal("Corp.Example.com", "Alice")
WEB = Instance(id="i-0abc", name="Web01", stack_id="Stack-Web", vpc_id="vpc-1",
               address="10.0.0.1")


def lk(kind: LockKind, value: str, lid: str = "lk-000000000001", **kw: object) -> Lock:
    return Lock(id=lid, kind=kind, value=lock_value(kind, value), reason="r",
                created_by="op:x", created_at=T0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "value", "login", "session"), [
    (LockKind.USER, "alice@corp.example.com", True, True),
    (LockKind.USER, "ALICE@CORP.EXAMPLE.COM", True, True),
    (LockKind.USER, "alice@other.example.com", False, False),
    (LockKind.USER, "bob@corp.example.com", False, False),
    (LockKind.TARGET, "i-0abc", False, True),
    (LockKind.TARGET, "web01", False, True),
    (LockKind.TARGET, "web02", False, False),
    (LockKind.STACK, "stack-web", False, True),
    (LockKind.STACK, "stack-db", False, False),
])
def test_what_a_lock_matches(kind: LockKind, value: str, login: bool, session: bool) -> None:
    lock = lk(kind, value)
    assert lock.matches(ALICE, None) is login  # a login: no instance yet
    assert lock.matches(ALICE, WEB) is session
    assert lock.matches(Principal("corp.example.com", "carol"), WEB) is (
        session and kind is not LockKind.USER)


def test_active_until_its_end_or_removal() -> None:
    timed = lk(LockKind.USER, "alice@corp.example.com", expires_at=T0 + timedelta(hours=1))
    assert timed.active(T0 + timedelta(minutes=59)) and timed.state(T0) == "active"
    assert not timed.active(T0 + timedelta(hours=1))
    assert timed.state(T0 + timedelta(hours=1)) == "expired"
    removed = lk(LockKind.USER, "alice@corp.example.com", removed_at=T0, removed_by="op:y")
    assert not removed.active(T0 - timedelta(hours=1)) and removed.state(T0) == "removed"
    forever = lk(LockKind.STACK, "stack-web")
    assert forever.active(T0 + timedelta(days=3650))


def test_first_match_skips_inactive_and_unrelated_locks() -> None:
    locks = [
        lk(LockKind.USER, "alice@corp.example.com", "lk-000000000001", removed_at=T0),
        lk(LockKind.TARGET, "web02", "lk-000000000002"),
        lk(LockKind.STACK, "stack-web", "lk-000000000003", expires_at=T0),
        lk(LockKind.TARGET, "web01", "lk-000000000004"),
        lk(LockKind.USER, "alice@corp.example.com", "lk-000000000005"),
    ]
    got = first_match(locks, ALICE, WEB, T0 + timedelta(seconds=1))
    assert got is not None and got.id == "lk-000000000004"
    assert first_match(locks[:3], ALICE, WEB, T0 + timedelta(seconds=1)) is None
    login = first_match(locks, ALICE, None, T0)
    assert login is not None and login.id == "lk-000000000005"


@pytest.mark.parametrize(("text", "expected"), [
    ("30m", timedelta(minutes=30)), ("1h", timedelta(hours=1)), (" 2D ", timedelta(days=2)),
    ("1w", timedelta(weeks=1)), ("90s", timedelta(seconds=90)),
])
def test_ttl(text: str, expected: timedelta) -> None:
    assert parse_ttl(text) == expected


@pytest.mark.parametrize("text", ["", "1", "h", "1.5h", "-1h", "0m", "53w", "1y", "1h30m"])
def test_bad_ttl(text: str) -> None:
    with pytest.raises(LockError):
        parse_ttl(text)


def test_reason_is_required_and_one_line() -> None:
    assert check_reason("  compromised\nlaptop  ") == "compromised laptop"
    for bad in ("", "   ", "x" * 2001):
        with pytest.raises(LockError):
            check_reason(bad)


@pytest.mark.parametrize(("kind", "value"), [
    (LockKind.USER, "alice"), (LockKind.USER, "@corp"), (LockKind.TARGET, "web 01"),
    (LockKind.TARGET, ""), (LockKind.STACK, "-stack"), (LockKind.TARGET, "x" * 300),
])
def test_bad_lock_values(kind: LockKind, value: str) -> None:
    with pytest.raises(LockError):
        lock_value(kind, value)


def test_the_user_reads_the_reason_not_who_asked() -> None:
    from broker.domain.locks import KillRequest

    k = KillRequest("k-1", "s-1", "suspicious commands", "operator:mallory", T0)
    assert k.describe() == "ended by the security team: suspicious commands"
    assert "lk-000000000001" in lk(LockKind.STACK, "stack-web").describe()
