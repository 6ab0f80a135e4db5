"""Pure parts of the flood limits: session places per connection and per user, and the guard's
refusal at max_startups that lets a new connection take the stalest pre-kex one's place."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from broker.config import LimitsSettings
from broker.ssh.relay import SessionLimitError, SessionSlots
from broker.ssh.server import BrokerConnection, PreKex, source_guard


def test_sessions_per_connection_and_per_user_are_counted_and_given_back() -> None:
    limits = LimitsSettings(max_sessions_per_connection=2, max_sessions_per_user=3)
    slots = SessionSlots()
    a1 = slots.take("alice", 0, limits)
    slots.take("alice", 1, limits)
    with pytest.raises(SessionLimitError, match=r"on this connection \(at most 2\)"):
        slots.take("alice", 2, limits)
    slots.take("alice", 0, limits)  # another connection of hers
    with pytest.raises(SessionLimitError, match=r"of alice at once \(at most 3\)"):
        slots.take("alice", 0, limits)
    slots.take("bob", 0, limits)  # others are not affected
    a1()
    a1()  # a second release gives nothing back twice
    assert slots.open_for("alice") == 2
    slots.take("alice", 0, limits)
    with pytest.raises(SessionLimitError):
        slots.take("alice", 0, limits)


def test_the_guard_says_when_max_startups_is_what_refused() -> None:
    # BrokerConnection makes way for a new connection only when this is the reason
    guard = source_guard(LimitsSettings(max_startups=2, max_startups_per_source=1))
    assert guard.admit("10.0.0.1", 0.0).allowed
    assert "(max_startups)" not in guard.admit("10.0.0.1", 0.0).reason  # per source
    assert guard.admit("10.0.0.2", 0.0).allowed
    assert "(max_startups)" in guard.admit("10.0.0.3", 0.0).reason


def _conn(received: int | None) -> BrokerConnection:
    conn = object.__new__(BrokerConnection)  # only what PreKex reads
    raw = SimpleNamespace()
    if received is not None:
        raw._bb_total = received  # what the handshake pump counts (patches/handshakes.py)
    conn._conn = raw  # type: ignore[assignment]
    return conn


def test_the_stalest_pre_kex_connection_that_sent_no_more_than_a_version_line_goes_first() -> None:
    table = PreKex()
    in_kex, silent, banner = _conn(1500), _conn(None), _conn(21)
    for c in (in_kex, silent, banner):
        table.add(c)
    assert table.stalest() is silent  # older than it, but in the middle of a key exchange
    table.discard(silent)
    assert table.stalest() is banner
    table.discard(banner)
    assert table.stalest() is in_kex  # none stalled left: the stalest of all
    table.discard(in_kex)
    assert table.stalest() is None
