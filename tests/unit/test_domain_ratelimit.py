"""SourceGuard (MaxStartups + per-source penalties) and the account backoff rule."""

from __future__ import annotations

from broker.domain.ratelimit import SourceGuard, account_backoff


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
