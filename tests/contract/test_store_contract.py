"""One contract for every store backend: each test runs on SQLite and on PostgreSQL alike.

A backend that passes may replace another without the services noticing. Concurrency cases use
two store objects on the same data (two connections or pools), as two broker processes would.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import asyncssh
import pytest

from broker.domain.models import Grant, GrantState, Level, Trigger
from broker.domain.ratelimit import account_backoff
from broker.domain.workflow import HistoryEntry
from broker.errors import ConflictError, StoreError
from broker.ports import SessionRecord, SourceThrottleState, ThrottleState, ThrottleView
from tests.contract.conftest import StoreBundle

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
CET = timezone(timedelta(hours=1))


def make_grant(gid: str = "g1", **kw: object) -> Grant:
    g = Grant(
        id=gid, username="Alice", domain="Corp.Example.com", stack_ids=("stack-a", "stack-b"),
        vpc_id="vpc-1", level=Level.ADMIN, state=GrantState.APPROVED, starts_at=T0,
        expires_at=T0 + timedelta(hours=8), trigger=Trigger.INCIDENT, ticket="INC-1",
        reason="outage", requested_by="bob", approved_by="carol",
        created_at=T0 - timedelta(minutes=1),
    )
    return replace(g, **kw)  # type: ignore[arg-type]


def make_session(sid: str, user: str = "alice@corp.example.com",
                 started: datetime = T0, **kw: object) -> SessionRecord:
    r = SessionRecord(
        id=sid, user=user, target="web-1", login="ec2-user", grant_id="g1", level="admin",
        kind="shell", command=None, peer="10.0.0.5:50000", started_at=started, ended_at=None,
        exit_status=None, bytes_in=0, bytes_out=0, recording=f"/rec/{sid}.cast",
    )
    return replace(r, **kw)  # type: ignore[arg-type]


def ssh_key() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()


def _is_utc(dt: datetime | None) -> bool:
    return dt is not None and dt.utcoffset() == timedelta(0)


# --- grants ---------------------------------------------------------------------------------

async def test_grant_round_trip(stores: StoreBundle) -> None:
    g = make_grant()
    await stores.grants.add(g)
    got = await stores.grants.get("g1")
    assert got == g  # version 1
    assert got is not None
    assert isinstance(got.stack_ids, tuple)
    assert all(_is_utc(d) for d in (got.starts_at, got.expires_at, got.created_at))
    assert got.starts_at.microsecond == 123456
    assert await stores.grants.get("nope") is None


async def test_grant_defaults_and_timezones(stores: StoreBundle) -> None:
    g = make_grant(created_at=None, starts_at=T0.astimezone(CET), stack_ids=())
    await stores.grants.add(g)
    got = await stores.grants.get("g1")
    assert got is not None
    assert got.created_at == T0 and _is_utc(got.created_at)  # defaults to starts_at
    assert got.starts_at == T0 and _is_utc(got.starts_at)
    assert got.stack_ids == ()


async def test_grant_duplicate_id_is_store_error(stores: StoreBundle) -> None:
    await stores.grants.add(make_grant())
    with pytest.raises(StoreError):
        await stores.grants.add(make_grant(username="mallory"))
    got = await stores.grants.get("g1")
    assert got is not None and got.username == "Alice"


async def test_grants_for_user_is_case_insensitive(stores: StoreBundle) -> None:
    await stores.grants.add(make_grant("g1"))
    await stores.grants.add(make_grant("g2", domain="other.example.com"))
    await stores.grants.add(make_grant("g3", username="bob"))
    await stores.grants.add(make_grant("g4", username="ÄLICE"))
    got = await stores.grants.for_user("ALICE", "corp.EXAMPLE.com")
    assert [g.id for g in got] == ["g1"]
    assert [g.id for g in await stores.grants.for_user("älice", "corp.example.com")] == ["g4"]
    assert await stores.grants.for_user("alice", "nowhere") == []


async def test_grants_list_order_and_filter(stores: StoreBundle) -> None:
    for i, (gid, user) in enumerate([("g3", "alice"), ("g1", "bob"), ("g2", "Alice")]):
        # created out of id order: the listing follows created_at
        await stores.grants.add(make_grant(gid, username=user,
                                           created_at=T0 + timedelta(seconds=10 - i)))
    assert [g.id for g in await stores.grants.list()] == ["g2", "g1", "g3"]
    assert [g.id for g in await stores.grants.list(username="")] == ["g2", "g1", "g3"]
    assert [g.id for g in await stores.grants.list(username="ALICE")] == ["g2", "g3"]
    assert await stores.grants.list(username="carol") == []


async def test_grant_replace(stores: StoreBundle) -> None:
    g = make_grant()
    await stores.grants.add(g)
    revoked = replace(g, state=GrantState.REVOKED, expires_at=T0 + timedelta(hours=1),
                      stack_ids=("stack-c",), username="ALICE")
    await stores.grants.replace(revoked)
    assert await stores.grants.get("g1") == replace(revoked, version=2)
    assert [x.id for x in await stores.grants.for_user("alice", "corp.example.com")] == ["g1"]
    await stores.grants.replace(revoked)  # unconditional overwrite, still bumps the version
    assert await stores.grants.get("g1") == replace(revoked, version=3)
    with pytest.raises(StoreError):
        await stores.grants.replace(make_grant("missing"))
    assert await stores.grants.get("missing") is None


# --- grant workflow: create/update with history, search ------------------------------------

def entry(gid: str, action: str, at: datetime = T0, **details: object) -> HistoryEntry:
    return HistoryEntry(gid, at, "carol@corp", action, f"{action} it", "approved", dict(details))


async def test_grant_create_update_history(stores: StoreBundle) -> None:
    gs = stores.grants
    g = make_grant(state=GrantState.PENDING)
    first = entry("g1", "request", at=T0.astimezone(CET), stacks=["a", "b"], n=1, ok=True)
    await gs.create(g, first)
    assert await gs.get("g1") == g
    with pytest.raises(StoreError):
        await gs.create(g, entry("g1", "request"))  # duplicate id: nothing half-written
    assert len(await gs.history("g1")) == 1
    approved = await gs.update(replace(g, state=GrantState.APPROVED, approved_by="carol"),
                               entry("g1", "approve", at=T0 + timedelta(seconds=1)))
    assert approved.version == 2
    assert await gs.get("g1") == approved
    hist = await gs.history("g1")
    assert [h.action for h in hist] == ["request", "approve"]
    assert hist[0] == replace(first, at=T0)
    assert _is_utc(hist[0].at)
    assert hist[0].details == {"n": 1, "ok": True, "stacks": ["a", "b"]}
    assert await gs.history("nope") == []


async def test_grant_update_is_compare_and_set(stores: StoreBundle) -> None:
    gs, other = stores.grants, (await stores.twin()).grants
    g = make_grant()
    await gs.create(g, entry("g1", "request"))
    v2 = await other.update(replace(g, reason="mine"), entry("g1", "change"))
    with pytest.raises(ConflictError):  # stale version 1
        await gs.update(replace(g, reason="theirs"), entry("g1", "change"))
    assert (await gs.get("g1")) == v2
    assert [h.action for h in await gs.history("g1")] == ["request", "change"]  # no orphan
    with pytest.raises(ConflictError):
        await gs.update(make_grant("missing"), entry("missing", "change"))
    assert await gs.history("missing") == []
    # racing updates from one version: exactly one wins
    results = await asyncio.gather(
        *[(gs if i % 2 else other).update(replace(v2, ticket=f"T{i}"), entry("g1", f"r{i}"))
          for i in range(6)],
        return_exceptions=True,
    )
    assert sum(isinstance(r, Grant) for r in results) == 1
    assert sum(isinstance(r, ConflictError) for r in results) == 5
    final = await gs.get("g1")
    assert final is not None and final.version == 3
    assert len(await gs.history("g1")) == 3


async def test_grant_get_many(stores: StoreBundle) -> None:
    for gid in ("g1", "g2", "g3"):
        await stores.grants.add(make_grant(gid))
    got = await stores.grants.get_many(["g3", "g1", "nope", "g1"])
    assert sorted(got) == ["g1", "g3"] and got["g3"] == make_grant("g3")
    assert await stores.grants.get_many([]) == {}
    many = [f"x{i}" for i in range(1200)]  # SQLite chunks its IN lists
    assert await stores.grants.get_many(many) == {}


async def test_grant_search(stores: StoreBundle) -> None:
    gs = stores.grants
    specs = [
        ("g1", "alice", ("web", "db"), GrantState.APPROVED, 0),
        ("g2", "Alice", ("db",), GrantState.PENDING, 1),
        ("g3", "bob", ("web",), GrantState.REVOKED, 2),
        ("g4", "bob", ("webby",), GrantState.APPROVED, 3),
    ]
    for gid, user, stacks, state, h in specs:
        await gs.add(make_grant(gid, username=user, stack_ids=stacks, state=state,
                                starts_at=T0 + timedelta(hours=h),
                                expires_at=T0 + timedelta(hours=h + 1),
                                created_at=T0 + timedelta(minutes=h)))

    async def ids(**kw: object) -> list[str]:
        return [g.id for g in await gs.search(**kw)]  # type: ignore[arg-type]

    assert await ids() == ["g4", "g3", "g2", "g1"]  # newest first
    assert await ids(username="ALICE") == ["g2", "g1"]
    assert await ids(stack="web") == ["g3", "g1"]  # whole stack ids, not substrings
    assert await ids(stack="we") == []
    assert await ids(states=["approved", "pending"]) == ["g4", "g2", "g1"]
    assert await ids(states=[]) == ["g4", "g3", "g2", "g1"]
    assert await ids(since=T0 + timedelta(hours=2)) == ["g4", "g3", "g2"]  # expires_at >= since
    assert await ids(until=(T0 + timedelta(hours=1)).astimezone(CET)) == ["g2", "g1"]
    assert await ids(expires_before=T0 + timedelta(hours=3)) == ["g2", "g1"]  # strictly before
    assert await ids(since=T0 + timedelta(hours=2), expires_before=T0 + timedelta(hours=4)) == [
        "g3", "g2"]
    assert await ids(username="bob", stack="web", states=["revoked"]) == ["g3"]
    assert await ids(limit=2) == ["g4", "g3"]
    assert await ids(limit=0) == []


# --- TOTP -----------------------------------------------------------------------------------

async def test_totp_secret_and_steps(stores: StoreBundle) -> None:
    t = stores.totp
    assert await t.get_secret("alice@corp") is None
    assert await t.last_step("alice@corp") is None
    assert await t.advance_step("alice@corp", 1) is False  # no secret, nothing to advance
    await t.set_secret("alice@corp", "SECRET1")
    assert await t.get_secret("alice@corp") == "SECRET1"
    assert await t.last_step("alice@corp") is None
    assert await t.advance_step("alice@corp", 100) is True
    assert await t.advance_step("alice@corp", 100) is False  # replay
    assert await t.advance_step("alice@corp", 99) is False   # older
    assert await t.advance_step("alice@corp", 101) is True
    assert await t.last_step("alice@corp") == 101
    big = 2**40  # steps are 64-bit
    assert await t.advance_step("alice@corp", big) is True
    assert await t.last_step("alice@corp") == big
    await t.set_secret("alice@corp", "SECRET2")  # re-enrolment forgets the step
    assert await t.get_secret("alice@corp") == "SECRET2"
    assert await t.last_step("alice@corp") is None
    assert await t.advance_step("alice@corp", 5) is True
    assert await t.get_secret("bob@corp") is None


async def test_totp_advance_step_is_compare_and_set_across_processes(
        stores: StoreBundle) -> None:
    other = await stores.twin()
    await stores.totp.set_secret("alice@corp", "S")
    calls = [(stores if i % 2 else other).totp.advance_step("alice@corp", 1000)
             for i in range(8)]
    results = await asyncio.gather(*calls)
    assert results.count(True) == 1
    # racing different steps: every step is accepted at most once, the maximum always wins
    steps = [1001 + i % 4 for i in range(16)]
    results = await asyncio.gather(*[(stores if i % 2 else other).totp.advance_step("alice@corp", s)
                                     for i, s in enumerate(steps)])
    accepted = [s for s, ok in zip(steps, results, strict=True) if ok]
    assert len(accepted) == len(set(accepted)) >= 1
    assert await other.totp.last_step("alice@corp") == 1004


# --- throttle -------------------------------------------------------------------------------

async def test_throttle_counts_backs_off_and_locks(stores: StoreBundle) -> None:
    th = stores.throttle
    assert await th.state("alice") == ThrottleState("alice", 0, 0.0, False)
    now = 1_700_000_000.25
    for n in range(1, 7):
        st = await th.failed("alice", now + n, free=3, max_backoff=5.0, lock_after=5)
        expected = ThrottleState("alice", n, now + n + account_backoff(n, 3, 5.0), n >= 5)
        assert st == expected
        assert await th.state("alice") == expected
    assert (await th.state("alice")).locked


async def test_throttle_success_resets_only_unlocked(stores: StoreBundle) -> None:
    th = stores.throttle
    await th.failed("alice", 1.0, free=3, max_backoff=60.0, lock_after=5)
    await th.failed("alice", 2.0, free=3, max_backoff=60.0, lock_after=5)
    await th.succeeded("alice")
    assert await th.state("alice") == ThrottleState("alice", 0, 0.0, False)
    await th.succeeded("nobody")  # no row: nothing to do, no error
    for i in range(3):
        await th.failed("bob", float(i), free=3, max_backoff=60.0, lock_after=3)
    await th.succeeded("bob")  # a correct password does not unlock a locked account
    assert (await th.state("bob")).locked
    assert (await th.state("bob")).failures == 3
    assert await th.unlock("bob") is True
    assert await th.unlock("bob") is False
    assert await th.state("bob") == ThrottleState("bob", 0, 0.0, False)


async def test_throttle_listing_locked_first(stores: StoreBundle) -> None:
    th = stores.throttle
    assert await th.listing() == []
    for _ in range(2):
        await th.failed("two", 10.0, free=5, max_backoff=60.0, lock_after=9)
    await th.failed("one", 10.0, free=5, max_backoff=60.0, lock_after=9)
    await th.failed("locked", 10.0, free=5, max_backoff=60.0, lock_after=1)
    assert [(s.account, s.failures, s.locked) for s in await th.listing()] == [
        ("locked", 1, True), ("two", 2, False), ("one", 1, False),
    ]


async def test_throttle_failed_is_atomic_under_concurrency(stores: StoreBundle) -> None:
    other = await stores.twin()
    lock_after = 5
    results = await asyncio.gather(*[
        (stores if i % 2 else other).throttle.failed("mallory", 100.0 + i, free=3,
                                                     max_backoff=60.0, lock_after=lock_after)
        for i in range(20)
    ])
    assert sorted(r.failures for r in results) == list(range(1, 21))  # no lost update
    assert all(r.locked == (r.failures >= lock_after) for r in results)
    assert sum(r.locked for r in results) == 20 - lock_after + 1
    final = await other.throttle.state("mallory")
    assert final.failures == 20 and final.locked


async def test_source_throttle_counts_per_pair_and_locks_the_pair_only(
        stores: StoreBundle) -> None:
    th = stores.throttle
    now = 1_700_000_000.25
    assert await th.view("alice", "192.0.2.1", None) == ThrottleView(
        ThrottleState("alice", 0, 0.0, False),
        SourceThrottleState("alice", "192.0.2.1", 0, 0.0, False, None), None)
    for n in range(1, 6):
        st = await th.source_failed("alice", "192.0.2.1", now + n, free=3, max_backoff=5.0,
                                    lock_after=4)
        assert st == SourceThrottleState("alice", "192.0.2.1", n,
                                         now + n + account_backoff(n, 3, 5.0), n >= 4)
    await th.source_failed("alice", "2001:db8::7", now, free=3, max_backoff=5.0, lock_after=4)
    await th.source_failed("bob", "192.0.2.1", now, free=3, max_backoff=5.0, lock_after=4)
    v = await th.view("alice", "192.0.2.1", None)
    assert (v.source.failures, v.source.locked) == (5, True)
    assert v.account == ThrottleState("alice", 0, 0.0, False)  # counted apart
    assert (await th.view("alice", "2001:db8::7", None)).source.failures == 1
    assert (await th.view("bob", "192.0.2.1", None)).source.failures == 1
    assert [(s.account, s.source, s.failures, s.locked) for s in await th.source_listing()] == [
        ("alice", "192.0.2.1", 5, True), ("alice", "2001:db8::7", 1, False),
        ("bob", "192.0.2.1", 1, False)]
    # unlock clears the account and all its pairs, no one else's
    assert await th.unlock("alice") is True
    assert await th.unlock("alice") is False
    assert [(s.account, s.source) for s in await th.source_listing()] == [("bob", "192.0.2.1")]


async def test_login_succeeded_resets_and_remembers_known_devices(stores: StoreBundle) -> None:
    th = stores.throttle
    day = 86400.0
    await th.failed("alice", 10.0, free=3, max_backoff=60.0, lock_after=50)
    await th.source_failed("alice", "192.0.2.1", 10.0, free=3, max_backoff=60.0, lock_after=50)
    await th.source_failed("alice", "192.0.2.2", 10.0, free=3, max_backoff=60.0, lock_after=50)
    await th.login_succeeded("alice", "192.0.2.1", "SHA256:k1", 100.0, 100.0 - 30 * day)
    v = await th.view("alice", "192.0.2.1", "SHA256:k1")
    assert v == ThrottleView(ThrottleState("alice", 0, 0.0, False),
                             SourceThrottleState("alice", "192.0.2.1", 0, 0.0, False, 100.0),
                             100.0)
    other = await th.view("alice", "192.0.2.2", "SHA256:k2")  # another pair: not reset
    assert (other.source.failures, other.source.last_success, other.key_last_success) == (
        1, None, None)
    assert (await th.view("alice", "192.0.2.2", "SHA256:k1")).key_last_success == 100.0
    assert (await th.view("bob", "192.0.2.1", "SHA256:k1")) == ThrottleView(
        ThrottleState("bob", 0, 0.0, False),
        SourceThrottleState("bob", "192.0.2.1", 0, 0.0, False, None), None)
    # listing says which failing pairs are known devices
    await th.source_failed("alice", "192.0.2.1", 200.0, free=3, max_backoff=60.0, lock_after=50)
    assert [(s.source, s.last_success) for s in await th.source_listing()] == [
        ("192.0.2.1", 100.0), ("192.0.2.2", None)]
    # a later success refreshes; devices last used before forget_before are forgotten
    await th.login_succeeded("alice", "192.0.2.3", None, 40 * day, 10 * day)
    v = await th.view("alice", "192.0.2.1", "SHA256:k1")
    assert (v.source.last_success, v.key_last_success) == (None, None)
    assert (await th.view("alice", "192.0.2.3", None)).source.last_success == 40 * day


async def test_login_succeeded_does_not_unlock(stores: StoreBundle) -> None:
    th = stores.throttle
    for i in range(3):
        await th.failed("alice", float(i), free=0, max_backoff=60.0, lock_after=3)
        await th.source_failed("alice", "192.0.2.1", float(i), free=0, max_backoff=60.0,
                               lock_after=3)
    await th.login_succeeded("alice", "192.0.2.1", None, 10.0, 0.0)
    v = await th.view("alice", "192.0.2.1", None)
    assert v.account.locked and v.source.locked
    assert v.source.last_success == 10.0


async def test_source_failed_is_atomic_under_concurrency(stores: StoreBundle) -> None:
    other = await stores.twin()
    results = await asyncio.gather(*[
        (stores if i % 2 else other).throttle.source_failed(
            "mallory", "198.51.100.1", 100.0 + i, free=3, max_backoff=60.0, lock_after=5)
        for i in range(20)
    ])
    assert sorted(r.failures for r in results) == list(range(1, 21))  # no lost update
    assert all(r.locked == (r.failures >= 5) for r in results)
    assert (await other.throttle.view("mallory", "198.51.100.1", None)).source.failures == 20


# --- session index --------------------------------------------------------------------------

async def test_session_start_end_get(stores: StoreBundle) -> None:
    s = stores.sessions
    rec = make_session("a1b2c3d4e5f6", started=T0.astimezone(CET), command="uptime", kind="exec")
    await s.started(rec)
    got = await s.get("a1b2c3d4e5f6")
    assert got == replace(rec, started_at=T0)
    assert got is not None and _is_utc(got.started_at)
    end = T0 + timedelta(minutes=5, microseconds=7)
    big = 5 * 2**32  # byte counters exceed 32 bits
    await s.ended("a1b2c3d4e5f6", end.astimezone(CET), "0", big, 42)
    got = await s.get("a1b2c3d4e5f6")
    assert got is not None
    assert (got.ended_at, got.exit_status, got.bytes_in, got.bytes_out) == (end, "0", big, 42)
    assert _is_utc(got.ended_at)
    await s.ended("unknown-session", end, None, 0, 0)  # no row: silently nothing
    assert await s.get("unknown-session") is None


async def test_session_get_by_unique_prefix(stores: StoreBundle) -> None:
    s = stores.sessions
    await s.started(make_session("abcdef0001"))
    await s.started(make_session("abcdef0002"))
    await s.started(make_session("fedcba9999"))
    await s.started(make_session("x_y%z\\0001"))
    got = await s.get("fedcba")
    assert got is not None and got.id == "fedcba9999"
    assert await s.get("fedcb") is None          # under 6 characters: exact ids only
    assert await s.get("abcdef") is None         # ambiguous
    assert await s.get("abcdef000") is None      # still ambiguous
    got = await s.get("abcdef0002")
    assert got is not None and got.id == "abcdef0002"
    assert await s.get("abcdef00021") is None
    # LIKE metacharacters in the prefix are literal
    got = await s.get("x_y%z\\")
    assert got is not None and got.id == "x_y%z\\0001"
    assert await s.get("x_y%z_") is None
    assert await s.get("xay%z\\") is None
    assert await s.get("x%y%z\\0") is None


async def test_session_list_newest_first_and_limit(stores: StoreBundle) -> None:
    s = stores.sessions
    for i in range(5):
        await s.started(make_session(f"sess-{i:06d}", started=T0 + timedelta(minutes=i)))
    assert [r.id for r in await s.list()] == [f"sess-{i:06d}" for i in (4, 3, 2, 1, 0)]
    assert [r.id for r in await s.list(limit=2)] == ["sess-000004", "sess-000003"]
    assert await s.list(limit=0) == []


async def test_session_list_user_filter(stores: StoreBundle) -> None:
    s = stores.sessions
    users = ["alice@corp.example.com", "alice@other.example", "alicex@corp.example.com",
             "bob@corp.example.com", "a_b@corp", "axb@corp", "a%b@corp", "a%bc@corp",
             "back\\slash@corp", "alice"]
    for i, user in enumerate(users):
        await s.started(make_session(f"s{i:06d}", user=user, started=T0 + timedelta(seconds=i)))

    async def users_for(flt: str) -> set[str]:
        return {r.user for r in await s.list(user=flt)}

    assert await users_for("alice") == {"alice@corp.example.com", "alice@other.example", "alice"}
    assert await users_for("alice@corp.example.com") == {"alice@corp.example.com"}
    assert await users_for("alice@corp") == set()  # no prefix match on the domain
    assert await users_for("a_b") == {"a_b@corp"}
    assert await users_for("a%b") == {"a%b@corp"}
    assert await users_for("back\\slash") == {"back\\slash@corp"}
    assert await users_for("") == set(users)  # empty filter: everyone
    assert [r.user for r in await s.list(user="alice", limit=1)] == ["alice"]


async def test_session_user_filter_ascii_case(stores: StoreBundle) -> None:
    """SQLite's LIKE ignores ASCII case only; both backends agree on that quirk."""
    s = stores.sessions
    await s.started(make_session("s1", user="alice@corp"))
    await s.started(make_session("s2", user="élise@corp", started=T0 + timedelta(seconds=1)))
    assert [r.id for r in await s.list(user="ALICE")] == ["s1"]
    assert await s.list(user="ALICE@corp") == []  # the exact match is case-sensitive
    assert await s.list(user="Élise") == []
    await s.started(make_session("abcdef123", started=T0 + timedelta(seconds=2)))
    got = await s.get("ABCDEF")
    assert got is not None and got.id == "abcdef123"
    got = await s.get("ABCDEF123")  # the exact lookup misses, the prefix lookup finds it
    assert got is not None and got.id == "abcdef123"
    assert await s.get("ABCDE") is None  # too short for a prefix, and not an exact id


# --- SSH keys -------------------------------------------------------------------------------

async def test_keys_add_has_list_remove(stores: StoreBundle) -> None:
    k = stores.keys
    pub1, pub2 = ssh_key(), ssh_key()
    fp1 = await k.add("alice@corp", pub1, "laptop")
    assert fp1 == asyncssh.import_public_key(pub1).get_fingerprint("sha256")
    assert fp1.startswith("SHA256:")
    fp2 = await k.add("alice@corp", pub2, "desktop")
    fp3 = await k.add("bob@corp", pub1, "shared")
    assert fp3 == fp1
    assert await k.has("alice@corp", fp1) and await k.has("bob@corp", fp1)
    assert not await k.has("carol@corp", fp1)
    assert await k.listing("alice@corp") == [("alice@corp", fp1, "laptop"),
                                             ("alice@corp", fp2, "desktop")]
    assert await k.listing() == [("alice@corp", fp1, "laptop"), ("alice@corp", fp2, "desktop"),
                                 ("bob@corp", fp1, "shared")]
    assert await k.listing("") == await k.listing()
    # re-adding the same key replaces the row (newest comment, listed last)
    assert await k.add("alice@corp", pub1 + "\n", "laptop-2") == fp1
    assert await k.listing("alice@corp") == [("alice@corp", fp2, "desktop"),
                                             ("alice@corp", fp1, "laptop-2")]
    assert await k.remove("alice@corp", fp1) is True
    assert await k.remove("alice@corp", fp1) is False
    assert not await k.has("alice@corp", fp1)
    assert await k.has("bob@corp", fp1)


@pytest.mark.parametrize("bad", ["", "not a key", "ssh-ed25519 AAAAnotbase64!!", "\x00"])
async def test_keys_bad_key_is_store_error(stores: StoreBundle, bad: str) -> None:
    with pytest.raises(StoreError):
        await stores.keys.add("alice@corp", bad, "junk")
    assert await stores.keys.listing() == []


# --- re-authentication windows --------------------------------------------------------------

async def test_reauth_window(stores: StoreBundle) -> None:
    r = stores.reauth
    now = 1_700_000_000.5
    assert not await r.valid("alice", "10.0.0.1", "SHA256:k", now)
    await r.remember("alice", "10.0.0.1", "SHA256:k", now + 300)
    assert await r.valid("alice", "10.0.0.1", "SHA256:k", now)
    assert await r.valid("alice", "10.0.0.1", "SHA256:k", now + 299.9)
    assert not await r.valid("alice", "10.0.0.1", "SHA256:k", now + 300)  # expired at until
    assert not await r.valid("alice", "10.0.0.2", "SHA256:k", now)   # other address
    assert not await r.valid("alice", "10.0.0.1", "SHA256:j", now)   # other key
    assert not await r.valid("bob", "10.0.0.1", "SHA256:k", now)     # other account
    await r.remember("alice", "10.0.0.1", "SHA256:k", now + 600)     # extended
    assert await r.valid("alice", "10.0.0.1", "SHA256:k", now + 500)
    await r.remember("alice", "10.0.0.1", "SHA256:k", now + 10)      # or shortened
    assert not await r.valid("alice", "10.0.0.1", "SHA256:k", now + 500)


async def test_reauth_prunes_windows_over_a_day_old(stores: StoreBundle) -> None:
    r = stores.reauth
    await r.remember("old", "10.0.0.1", "k", 1000.0)
    await r.remember("new", "10.0.0.1", "k", 1000.0 + 86400 + 1)
    # pruned rows are gone even for a caller that asks with an old clock
    assert not await r.valid("old", "10.0.0.1", "k", 0.0)
    assert await r.valid("new", "10.0.0.1", "k", 0.0)


async def test_api_tokens_and_ended_web_sessions(stores: StoreBundle) -> None:
    from broker.ports import ApiTokenRecord

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    rec = ApiTokenRecord("t1", "alice@corp", "ci", ("grants:read",), ("requester",), ("ops",),
                         now, now + timedelta(days=30))
    await stores.tokens.add(rec, "h" * 64)
    assert await stores.tokens.by_hash("h" * 64) == rec
    assert await stores.tokens.by_hash("x" * 64) is None
    assert [t.id for t in await stores.tokens.listing("alice@corp")] == ["t1"]
    assert await stores.tokens.listing("bob@corp") == []
    assert not await stores.tokens.revoke("t1", "bob@corp", now)  # only the owner
    assert await stores.tokens.revoke("t1", "alice@corp", now)
    assert not await stores.tokens.revoke("t1", "alice@corp", now)
    got = await stores.tokens.by_hash("h" * 64)
    assert got is not None
    assert got.revoked_at == now
    assert not await stores.tokens.session_ended("s1")
    await stores.tokens.end_session("s1", now.timestamp() + 3600)
    await stores.tokens.end_session("s1", now.timestamp() + 3600)  # idempotent
    assert await stores.tokens.session_ended("s1")


async def test_operators_list_and_revoke_anyones_tokens(stores: StoreBundle) -> None:
    from broker.ports import ApiTokenRecord

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    for i, owner in enumerate(("alice@corp", "bob@corp", "alice@corp")):
        await stores.tokens.add(ApiTokenRecord(
            f"t{i}", owner, "ci", ("grants:read",), ("requester",), (),
            now + timedelta(seconds=i), now + timedelta(days=30)), str(i) * 64)
    assert [t.id for t in await stores.tokens.listing()] == ["t0", "t1", "t2"]
    assert [t.id for t in await stores.tokens.listing(None)] == ["t0", "t1", "t2"]
    assert [t.id for t in await stores.tokens.listing("alice@corp")] == ["t0", "t2"]
    assert await stores.tokens.revoke("t1", None, now)  # an operator: any owner
    assert not await stores.tokens.revoke("t1", None, now)  # once
    assert not await stores.tokens.revoke("t9", None, now)
    got = await stores.tokens.by_hash("1" * 64)
    assert got is not None and got.revoked_at == now


async def test_web_sessions_are_recorded_listed_and_revoked(stores: StoreBundle) -> None:
    from broker.ports import WebSessionRecord

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    t = stores.tokens
    a1 = WebSessionRecord("w-a1", "alice@corp", "10.0.0.1:5000", now, now + timedelta(hours=8))
    a2 = WebSessionRecord("w-a2", "alice@corp", "10.0.0.2:5000", now + timedelta(seconds=1),
                          now + timedelta(hours=1))
    b1 = WebSessionRecord("w-b1", "bob@corp", "10.0.0.3:5000", now + timedelta(seconds=2),
                          now + timedelta(hours=8))
    for rec in (a1, a2, b1):
        await t.start_session(rec)
    assert not await t.session_active("w-none", now)  # a cookie without a record
    assert await t.session_active("w-a1", now)
    assert await t.sessions(now=now) == [a1, a2, b1]
    assert await t.sessions("alice@corp", now=now) == [a1, a2]
    later = now + timedelta(hours=2)  # a2 has expired
    assert not await t.session_active("w-a2", later)
    assert await t.sessions(now=later) == [a1, b1]
    assert not await t.revoke_session("w-a2", later)  # expired: nothing to end
    assert await t.revoke_session("w-a1", later)
    assert not await t.revoke_session("w-a1", later)  # once
    assert not await t.revoke_session("w-none", later)
    assert not await t.session_active("w-a1", later)
    assert await t.session_ended("w-a1")  # brokers that only read the logged-out list agree
    assert await t.sessions(now=later) == [b1]
    # a logout (end_session) counts as well
    await t.end_session("w-b1", (now + timedelta(hours=8)).timestamp())
    assert not await t.session_active("w-b1", later)
    assert await t.sessions(now=later) == []
    # another broker on the same store sees all of it
    twin = await stores.twin()
    assert not await twin.tokens.session_active("w-a1", later)
    # a session started days later (old rows are pruned then) is listed with its own times
    await t.start_session(WebSessionRecord("w-new", "carol@corp", "10.0.0.4:1",
                                           now + timedelta(days=3), now + timedelta(days=4)))
    assert await t.sessions(now=now + timedelta(days=3)) == [
        WebSessionRecord("w-new", "carol@corp", "10.0.0.4:1", now + timedelta(days=3),
                         now + timedelta(days=4))]
