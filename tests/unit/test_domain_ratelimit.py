"""SourceGuard (MaxStartups + per-source penalties) and the account backoff rule."""

from __future__ import annotations

from broker.domain.ratelimit import (
    SourceGuard,
    Tally,
    account_backoff,
    known_device,
    login_refusal,
)


def guard(**kw: object) -> SourceGuard:
    args: dict[str, object] = dict(max_startups=5, max_startups_per_source=2, penalty_after=3,
                                   penalty_window=60.0, penalty_seconds=10.0,
                                   penalty_max_seconds=40.0)
    args.update(kw)
    return SourceGuard(**args)  # type: ignore[arg-type]


def test_account_backoff_doubles_after_free_failures_up_to_max() -> None:
    assert [account_backoff(n, 3, 60) for n in range(1, 11)] == [
        0, 0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert account_backoff(10_000, 0, 60) == 60


def test_per_source_and_global_startup_caps() -> None:
    g = guard()
    assert g.admit("10.0.0.1", 0).allowed
    assert g.admit("10.0.0.1", 0).allowed
    third = g.admit("10.0.0.1", 0)
    assert not third.allowed
    assert "this address" in third.reason
    assert g.admit("10.0.0.2", 0).allowed
    assert g.admit("10.0.0.3", 0).allowed
    assert g.admit("10.0.0.3", 0).allowed
    full = g.admit("10.0.0.4", 0)
    assert not full.allowed
    assert "max_startups" in full.reason
    g.left_unauthenticated("10.0.0.1")
    assert g.unauthenticated == 4
    assert g.admit("10.0.0.4", 0).allowed


def test_penalty_starts_after_failures_in_window_and_doubles() -> None:
    g = guard()
    assert g.failed("10.0.0.9", 0).allowed
    assert g.failed("10.0.0.9", 100).allowed  # the first failure left the 60 s window
    assert g.failed("10.0.0.9", 101).allowed
    v = g.failed("10.0.0.9", 102)
    assert v.penalty_started
    assert not g.admit("10.0.0.9", 111).allowed
    assert g.admit("10.0.0.9", 112.5).allowed  # 10 s penalty over
    g.left_unauthenticated("10.0.0.9")
    for t in (113, 114, 115):
        v = g.failed("10.0.0.9", t)
    assert v.penalty_started
    assert not g.admit("10.0.0.9", 134).allowed  # second penalty: 20 s
    assert g.admit("10.0.0.9", 136).allowed


def test_exempt_networks_are_never_penalised_nor_capped_per_source() -> None:
    g = guard(exempt=["127.0.0.0/8", "::1/128"])
    for t in range(10):
        assert g.failed("127.0.0.5", t).allowed
    assert all(g.admit("127.0.0.5", 20).allowed for _ in range(4))
    assert g.admit("::1", 20).allowed
    assert not g.admit("::1", 20).allowed  # the global cap (5) still holds


def test_idle_sources_are_forgotten() -> None:
    g = guard()
    assert g.admit("10.0.0.1", 0).allowed
    g.left_unauthenticated("10.0.0.1")
    assert g.tracked_sources() == 0


# --- login_refusal: (account, source) pairs first, the account for unknown devices only --------

NOW = 1_800_000_000.0
DAY = 86400.0
CLEAN = Tally()


def tally(failures: int, *, free: int = 3, max_backoff: float = 60.0, lock_after: int = 50,
          at: float = NOW) -> Tally:
    """What the stores record after ``failures`` consecutive failures, the last at ``at``."""
    return Tally(failures, at + account_backoff(failures, free, max_backoff),
                 failures >= lock_after)


def test_failures_from_one_other_source_do_not_delay_a_known_device() -> None:
    account = tally(5)  # five failures from the attacker's address: the account backs off
    assert login_refusal(CLEAN, account, True, NOW + 0.5) is None
    assert login_refusal(CLEAN, account, False, NOW + 0.5) == (
        "throttled (account, unknown source) for 3.5 s more")
    assert login_refusal(CLEAN, account, False, NOW + 4.0) is None  # the back-off is over


def test_failures_from_many_sources_lock_the_account_for_unknown_devices_only() -> None:
    account = tally(50)  # e.g. fifty addresses, one failure each
    assert account.locked
    assert login_refusal(CLEAN, account, True, NOW + 1) is None
    assert login_refusal(CLEAN, account, False, NOW + 365 * DAY) == (
        "locked (account, unknown source) after 50 failures")


def test_an_attacker_at_the_known_address_is_still_limited_per_pair() -> None:
    pair = tally(4)  # failures from the victim's own (known) address
    assert login_refusal(pair, tally(4), True, NOW + 1) == "throttled (source) for 1.0 s more"
    assert login_refusal(pair, tally(4), True, NOW + 2.5) is None
    locked = tally(50)
    assert login_refusal(locked, CLEAN, True, NOW + 365 * DAY) == (
        "locked (source) after 50 failures")
    # the pair's rule comes first: the answer does not tell which other rule would apply
    assert login_refusal(pair, tally(50), False, NOW + 1) == "throttled (source) for 1.0 s more"


def test_free_failures_are_free_for_the_pair_and_the_account() -> None:
    assert login_refusal(tally(2), tally(2), False, NOW) is None
    assert login_refusal(tally(3), CLEAN, False, NOW) == "throttled (source) for 1.0 s more"


def test_a_known_device_is_forgotten_after_its_days() -> None:
    assert known_device(NOW, NOW, 30)
    assert known_device(NOW - 29.9 * DAY, NOW, 30)
    assert not known_device(NOW - 30 * DAY, NOW, 30)
    assert not known_device(None, NOW, 30)  # never logged in from there
    assert not known_device(NOW - 1, NOW, 0)  # known devices turned off
    assert known_device(NOW - 89 * DAY, NOW, 90)
