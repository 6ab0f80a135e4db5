"""AccountChecker (the directory re-asked, answers kept at most recheck_seconds) and
AccountEnforcer (live SSH sessions of accounts the directory refuses end), with an injected clock
and a fake directory that counts its lookups."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from broker.domain.models import Grant, GrantState, Instance, Level, Principal, Trigger
from broker.ports import AuthOutcome
from broker.services.account_check import AccountChecker, AccountEnforcer, directory_failed
from broker.services.sessions import LiveSession, SessionRequest

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
DOMAIN = "corp.example.com"


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> datetime:
        return self.t

    def monotonic(self) -> float:
        return (self.t - T0).total_seconds()

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


class Directory:
    """Accounts by name: groups, or a refusal reason; ``down`` answers as an unreachable DC."""

    def __init__(self) -> None:
        self.accounts: dict[str, frozenset[str] | str] = {}
        self.lookups: list[str] = []
        self.down = False
        self.gate: asyncio.Event | None = None

    def canonical_domain(self, domain: str | None) -> str | None:
        return DOMAIN

    async def authenticate(self, username: str, domain: str | None, password: str) -> AuthOutcome:
        raise AssertionError("never called")

    async def lookup(self, username: str, domain: str | None) -> AuthOutcome:
        self.lookups.append(username)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            return AuthOutcome(None, "directory unavailable: ldaps://dc1: connect: refused")
        a = self.accounts.get(username, "unknown user")
        if isinstance(a, str):
            return AuthOutcome(None, a)
        return AuthOutcome(Principal(DOMAIN, username, a), "account ok")


def checker(recheck: float = 60) -> tuple[AccountChecker, Directory, Clock]:
    d, c = Directory(), Clock()
    return AccountChecker(d, c, recheck_seconds=recheck), d, c


async def test_answers_are_kept_for_at_most_recheck_seconds() -> None:
    ch, d, clock = checker(60)
    d.accounts["alice"] = frozenset({"approvers"})
    for _ in range(5):
        assert (await ch.check("alice", DOMAIN)).principal is not None
    assert d.lookups == ["alice"]  # one lookup for many uses
    d.accounts["alice"] = "account disabled"
    clock.advance(59)
    assert (await ch.check("Alice", DOMAIN.upper())).principal is not None  # same account, cached
    clock.advance(1)
    out = await ch.check("alice", DOMAIN)
    assert out.principal is None and out.reason == "account disabled"
    assert d.lookups == ["alice", "alice"]


async def test_groups_come_from_the_latest_answer() -> None:
    ch, d, clock = checker(10)
    d.accounts["alice"] = frozenset({"approvers", "dev"})
    assert (await ch.check("alice", DOMAIN)).principal.groups == {"approvers", "dev"}  # type: ignore[union-attr]
    d.accounts["alice"] = frozenset({"dev"})
    clock.advance(10)
    assert (await ch.check("alice", DOMAIN)).principal.groups == {"dev"}  # type: ignore[union-attr]


async def test_zero_asks_at_every_use_and_a_clock_going_back_asks_again() -> None:
    ch, d, _ = checker(0)
    d.accounts["bob"] = frozenset()
    await ch.check("bob", DOMAIN)
    await ch.check("bob", DOMAIN)
    assert len(d.lookups) == 2
    ch2, d2, clock2 = checker(60)
    d2.accounts["bob"] = frozenset()
    await ch2.check("bob", DOMAIN)
    clock2.advance(-5)  # a clock stepped back never stretches an answer's life
    await ch2.check("bob", DOMAIN)
    assert len(d2.lookups) == 2


async def test_a_directory_that_cannot_answer_is_not_cached() -> None:
    ch, d, _ = checker(60)
    d.accounts["alice"] = frozenset()
    d.down = True
    out = await ch.check("alice", DOMAIN)
    assert out.principal is None and directory_failed(out)
    d.down = False
    assert (await ch.check("alice", DOMAIN)).principal is not None  # asked again at once
    assert len(d.lookups) == 2
    assert not directory_failed(AuthOutcome(None, "account disabled"))


async def test_concurrent_checks_share_one_lookup() -> None:
    ch, d, _ = checker(60)
    d.accounts["alice"] = frozenset()
    d.gate = asyncio.Event()
    tasks = [asyncio.create_task(ch.check("alice", DOMAIN)) for _ in range(10)]
    await asyncio.sleep(0)
    d.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r.principal is not None for r in results)
    assert d.lookups == ["alice"]


async def test_a_new_directory_forgets_every_answer() -> None:
    ch, d, _ = checker(60)
    d.accounts["alice"] = frozenset()
    await ch.check("alice", DOMAIN)
    d2 = Directory()
    ch.use_directory(d2)
    assert (await ch.check("alice", DOMAIN)).principal is None  # the new one does not know her
    assert d2.lookups == ["alice"]


# -- live SSH sessions ---------------------------------------------------------------------------
class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def emit(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))


class Control:
    def __init__(self) -> None:
        self.ended: list[str] = []

    def notify(self, text: str) -> None:
        return None

    def terminate(self, reason: str) -> None:
        self.ended.append(reason)


class NullWriter:
    location = ""

    def write(self, kind: bytes, data: bytes) -> None:
        return None

    def close(self) -> None:
        return None


class Sessions:
    def __init__(self) -> None:
        self.live: dict[str, LiveSession] = {}

    def add(self, sid: str, user: str, clock: Clock) -> Control:
        g = Grant("g-" + sid, user, DOMAIN, ("stack-a",), "vpc-0a", Level.READ_ONLY,
                  GrantState.APPROVED, T0, T0 + timedelta(hours=8), Trigger.INCIDENT)
        inst = Instance("i-1", "web01", "stack-a", "vpc-0a", "10.0.0.1")
        req = SessionRequest(Principal(DOMAIN, user), inst, g, "ro", "shell", None, "xterm",
                             80, 24, "peer")
        s = LiveSession(sid, req, NullWriter(), T0, monotonic=clock.monotonic)
        s.control = c = Control()
        self.live[sid] = s
        return c


async def test_sessions_of_a_disabled_account_end_within_the_interval() -> None:
    ch, d, clock = checker(60)
    d.accounts.update(alice=frozenset(), bob=frozenset())
    sessions, audit = Sessions(), Audit()
    a1, a2, b1 = (sessions.add("s-a1", "alice", clock), sessions.add("s-a2", "alice", clock),
                  sessions.add("s-b1", "bob", clock))
    enf = AccountEnforcer(sessions, ch, audit, interval=1.0)  # type: ignore[arg-type]
    assert await enf.check_once() == 0
    assert sorted(d.lookups) == ["alice", "bob"]  # one per user, not one per session
    d.accounts["alice"] = "account disabled"
    for _ in range(59):  # every second, as the broker runs it: the answer is still cached
        clock.advance(1)
        assert await enf.check_once() == 0
    assert len(d.lookups) == 2
    clock.advance(1)
    assert await enf.check_once() == 2
    assert a1.ended == a2.ended == ["account no longer allowed: account disabled"]
    assert b1.ended == []
    ended = [f for e, f in audit.events if e == "session.terminated"]
    assert {f["session_id"] for f in ended} == {"s-a1", "s-a2"}
    assert all(f["reason"] == "account no longer allowed: account disabled" for f in ended)
    assert len(d.lookups) == 4  # alice and bob once more, once each


async def test_an_unreachable_directory_keeps_sessions() -> None:
    ch, d, clock = checker(60)
    d.accounts["alice"] = frozenset()
    sessions, audit = Sessions(), Audit()
    a1 = sessions.add("s-a1", "alice", clock)
    enf = AccountEnforcer(sessions, ch, audit, interval=1.0)  # type: ignore[arg-type]
    d.down = True
    assert await enf.check_once() == 0
    assert a1.ended == [] and audit.events == []
    d.down = False
    d.accounts["alice"] = "not in a required group"
    assert await enf.check_once() == 1  # nothing was cached while it was down
    assert a1.ended == ["account no longer allowed: not in a required group"]


async def test_the_enforcer_loop_runs_and_stops() -> None:
    ch, d, clock = checker(0)
    d.accounts["alice"] = "account expired"
    sessions, audit = Sessions(), Audit()
    a1 = sessions.add("s-a1", "alice", clock)
    enf = AccountEnforcer(sessions, ch, audit, interval=0.01)  # type: ignore[arg-type]
    enf.start()
    for _ in range(200):
        if a1.ended:
            break
        await asyncio.sleep(0.01)
    await enf.stop()
    assert a1.ended == ["account no longer allowed: account expired"]
