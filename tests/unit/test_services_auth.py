"""TotpSecondFactor over the real SqliteTotpStore, and Authenticator's audit events."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest

from broker.domain import totp
from broker.domain.models import Principal
from broker.identity.passwords import hash_password
from broker.identity.static import StaticDirectory, StaticUser, UsersFile
from broker.services.auth import AccountPolicy, Authenticator, TotpSecondFactor
from broker.store.sqlite import SqliteDatabase, SqliteThrottleStore, SqliteTotpStore

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
T0 = datetime(2025, 3, 1, 12, 0, 10, tzinfo=UTC)
ALICE = Principal("corp.example.com", "alice")
PASSWORD = "correct horse battery staple"
PASSWORD_HASH = hash_password(PASSWORD)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.t = now

    def now(self) -> datetime:
        return self.t


class ListAudit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def code_at(t: datetime) -> str:
    return str(pyotp.TOTP(SECRET).at(t))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteDatabase]:
    d = SqliteDatabase(tmp_path / "state" / "broker.db")
    yield d
    d.close()


@pytest.fixture
async def store(db: SqliteDatabase) -> SqliteTotpStore:
    s = SqliteTotpStore(db)
    await s.set_secret(ALICE.key, SECRET)
    return s


async def test_code_accepted_once_then_refused_as_reuse(store: SqliteTotpStore) -> None:
    clock = FakeClock(T0)
    second = TotpSecondFactor(store, clock)
    c = code_at(T0)
    ok = await second.verify(ALICE, c)
    assert ok.principal == ALICE
    assert ok.reason == "totp ok"
    assert await store.last_step(ALICE.key) == totp.current_step(T0)
    again = await second.verify(ALICE, c)
    assert again.principal is None
    assert again.reason == "TOTP code reused"
    # still refused 20 s later, while the code is inside the drift window
    clock.t = T0 + timedelta(seconds=20)
    assert (await second.verify(ALICE, c)).reason == "TOTP code reused"


async def test_next_code_accepted_after_previous(store: SqliteTotpStore) -> None:
    clock = FakeClock(T0)
    second = TotpSecondFactor(store, clock)
    assert (await second.verify(ALICE, code_at(T0))).ok
    clock.t = T0 + timedelta(seconds=30)
    assert (await second.verify(ALICE, code_at(clock.t))).ok
    # the older code is now refused even though it is within drift
    assert (await second.verify(ALICE, code_at(T0))).reason == "TOTP code reused"


async def test_earlier_step_refused_after_later_step_used(store: SqliteTotpStore) -> None:
    second = TotpSecondFactor(store, FakeClock(T0))
    assert (await second.verify(ALICE, code_at(T0 + timedelta(seconds=30)))).ok
    res = await second.verify(ALICE, code_at(T0))
    assert res.principal is None
    assert res.reason == "TOTP code reused"


async def test_bad_code_and_stale_code(store: SqliteTotpStore) -> None:
    second = TotpSecondFactor(store, FakeClock(T0))
    stale = code_at(T0 - timedelta(seconds=90))
    assert stale not in {code_at(T0 + timedelta(seconds=30 * k)) for k in (-1, 0, 1)}
    assert (await second.verify(ALICE, stale)).reason == "bad TOTP code"
    assert (await second.verify(ALICE, "abcdef")).reason == "bad TOTP code"
    assert await store.last_step(ALICE.key) is None


async def test_not_enrolled(store: SqliteTotpStore) -> None:
    second = TotpSecondFactor(store, FakeClock(T0))
    res = await second.verify(Principal("corp.example.com", "bob"), code_at(T0))
    assert res.principal is None
    assert res.reason == "no TOTP enrolled"


async def test_principal_key_is_case_insensitive(store: SqliteTotpStore) -> None:
    second = TotpSecondFactor(store, FakeClock(T0))
    assert (await second.verify(Principal("CORP.example.com", "ALICE"), code_at(T0))).ok


async def test_set_secret_resets_last_step(store: SqliteTotpStore) -> None:
    assert await store.advance_step(ALICE.key, 100) is True
    assert await store.last_step(ALICE.key) == 100
    await store.set_secret(ALICE.key, SECRET)
    assert await store.last_step(ALICE.key) is None
    assert await store.get_secret(ALICE.key) == SECRET


async def test_advance_step_is_compare_and_set(store: SqliteTotpStore) -> None:
    assert await store.advance_step(ALICE.key, 10) is True
    assert await store.advance_step(ALICE.key, 10) is False
    assert await store.advance_step(ALICE.key, 9) is False
    assert await store.advance_step(ALICE.key, 11) is True
    assert await store.last_step(ALICE.key) == 11
    assert await store.advance_step("nobody@x", 1) is False


class YieldingTotpStore(SqliteTotpStore):
    """Yields to the loop before every call so two verifies interleave like two processes."""

    async def get_secret(self, user_key: str) -> str | None:
        await asyncio.sleep(0)
        return await super().get_secret(user_key)

    async def last_step(self, user_key: str) -> int | None:
        await asyncio.sleep(0)
        return await super().last_step(user_key)

    async def advance_step(self, user_key: str, step: int) -> bool:
        await asyncio.sleep(0)
        return await super().advance_step(user_key, step)


async def test_concurrent_same_code_two_stores_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    db1, db2 = SqliteDatabase(path), SqliteDatabase(path)
    try:
        s1, s2 = YieldingTotpStore(db1), YieldingTotpStore(db2)
        await s1.set_secret(ALICE.key, SECRET)
        assert await s2.get_secret(ALICE.key) == SECRET
        clock = FakeClock(T0)
        c = code_at(T0)
        r1, r2 = await asyncio.gather(
            TotpSecondFactor(s1, clock).verify(ALICE, c),
            TotpSecondFactor(s2, clock).verify(ALICE, c),
        )
        assert sorted([r1.ok, r2.ok]) == [False, True]
        loser = r2 if r1.ok else r1
        assert loser.reason == "TOTP code reused"
        assert await s1.last_step(ALICE.key) == totp.current_step(T0)
        assert await s2.last_step(ALICE.key) == totp.current_step(T0)
    finally:
        db1.close()
        db2.close()


def test_concurrent_same_code_two_threads_exactly_one_wins(tmp_path: Path) -> None:
    """Same race across threads, each with its own connection and event loop."""
    path = tmp_path / "broker.db"
    setup = SqliteDatabase(path)
    asyncio.run(SqliteTotpStore(setup).set_secret(ALICE.key, SECRET))
    setup.close()
    barrier = threading.Barrier(8)
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        db = SqliteDatabase(path)
        try:
            second = TotpSecondFactor(YieldingTotpStore(db), FakeClock(T0))
            barrier.wait()
            res = asyncio.run(second.verify(ALICE, code_at(T0)))
            with lock:
                results.append(res.ok)
        finally:
            db.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [False] * 7 + [True]


# --- Authenticator -----------------------------------------------------------------------------


@pytest.fixture
def directory() -> StaticDirectory:
    users = UsersFile(users=[StaticUser(name="alice", password_hash=PASSWORD_HASH, groups=["ops"])])
    return StaticDirectory(users, "corp.example.com", {"CORP": "corp.example.com"})


def _auth(db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory,
          audit: ListAudit, clock: FakeClock | None = None,
          policy: AccountPolicy | None = None) -> Authenticator:
    clock = clock or FakeClock(T0)
    return Authenticator(directory, TotpSecondFactor(store, clock), audit,
                         SqliteThrottleStore(db), clock, policy or AccountPolicy())


async def test_login_success(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    audit = ListAudit()
    auth = _auth(db, store, directory, audit)
    p = (await auth.login("alice", None, PASSWORD, code_at(T0), "192.0.2.1:5000")).principal
    assert p == Principal("corp.example.com", "alice", frozenset({"ops"}))
    assert audit.events == [
        (
            "auth.success",
            {"user": "alice@corp.example.com", "peer": "192.0.2.1:5000", "method": "password+totp"},
        ),
    ]


async def test_login_bad_password(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    audit = ListAudit()
    auth = _auth(db, store, directory, audit)
    assert (await auth.login("alice", "CORP", "wrong", code_at(T0), "peer")).principal is None
    assert audit.events == [
        ("auth.failure", {"user": "alice@corp.example.com", "peer": "peer", "reason": "bad password"}),
    ]
    # the code was not consumed by the failed login
    assert await store.last_step(ALICE.key) is None


async def test_login_unknown_user(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    audit = ListAudit()
    auth = _auth(db, store, directory, audit)
    assert (await auth.login("mallory", None, PASSWORD, "123456", "peer")).principal is None
    assert audit.events == [
        ("auth.failure", {"user": "mallory@corp.example.com", "peer": "peer", "reason": "unknown user"}),
    ]


async def test_login_bad_code_then_replay(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    audit = ListAudit()
    auth = _auth(db, store, directory, audit)
    stale = code_at(T0 - timedelta(minutes=5))
    assert (await auth.login("alice", None, PASSWORD, stale, "peer")).principal is None
    assert (await auth.login("alice", None, PASSWORD, code_at(T0), "peer")).principal is not None
    assert (await auth.login("alice", None, PASSWORD, code_at(T0), "peer")).principal is None
    assert audit.events == [
        ("auth.failure", {"user": "alice@corp.example.com", "peer": "peer", "reason": "bad TOTP code"}),
        ("auth.success", {"user": "alice@corp.example.com", "peer": "peer", "method": "password+totp"}),
        (
            "auth.failure",
            {"user": "alice@corp.example.com", "peer": "peer", "reason": "TOTP code reused"},
        ),
    ]


async def test_account_backoff_then_lock_then_unlock(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    """Failures from many addresses back off, then lock, the account for unknown devices."""
    audit = ListAudit()
    clock = FakeClock(T0)
    policy = AccountPolicy(free_failures=2, backoff_max_seconds=8, lock_after=5)
    auth = _auth(db, store, directory, audit, clock, policy)
    throttle = SqliteThrottleStore(db)
    for i in range(2):  # free failures: no waiting
        assert (await auth.login("alice", None, "wrong", "000000", f"198.51.100.{i}:40000")
                ).principal is None
    st = await throttle.state("alice@corp.example.com")
    assert st.failures == 2
    assert st.next_allowed == T0.timestamp() + 1  # third failure onwards waits 1, 2, 4 ... s
    # during the backoff even the right credentials are refused (from an unknown address),
    # and not counted
    assert (await auth.login("alice", None, PASSWORD, code_at(T0), "203.0.113.7:5")
            ).principal is None
    assert audit.events[-1][1]["reason"] == "throttled (account, unknown source) for 1.0 s more"
    assert (await throttle.state("alice@corp.example.com")).failures == 2
    for i in range(3):
        clock.t += timedelta(seconds=10)
        assert (await auth.login("alice", None, "wrong", "000000", f"198.51.100.{10 + i}:4")
                ).principal is None
    st = await throttle.state("alice@corp.example.com")
    assert st.locked
    assert ("account.locked", {"user": "alice@corp.example.com", "failures": 5,
                               "peer": "198.51.100.12:4"}) in audit.events
    clock.t += timedelta(hours=1)
    assert (await auth.login("alice", None, PASSWORD, code_at(clock.t), "203.0.113.7:5")
            ).principal is None
    assert audit.events[-1][1]["reason"] == "locked (account, unknown source) after 5 failures"
    assert await throttle.unlock("alice@corp.example.com")
    assert (await auth.login("alice", None, PASSWORD, code_at(clock.t), "203.0.113.7:5")
            ).principal is not None


async def test_unknown_names_are_throttled_like_known_ones(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    policy = AccountPolicy(free_failures=0, backoff_max_seconds=8, lock_after=3)
    auth = _auth(db, store, directory, ListAudit(), FakeClock(T0), policy)
    assert (await auth.login("mallory", "CORP", "x", "000000", "p")).principal is None
    st = await SqliteThrottleStore(db).state("mallory@corp.example.com")
    assert st.failures == 1
    assert st.next_allowed > T0.timestamp()


async def test_success_resets_the_counter(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    auth = _auth(db, store, directory, ListAudit())
    assert (await auth.login("alice", None, "wrong", "000000", "p")).principal is None
    assert (await auth.login("alice", None, PASSWORD, code_at(T0), "p")).principal is not None
    assert (await SqliteThrottleStore(db).state("alice@corp.example.com")).failures == 0


async def test_unknown_user_and_wrong_password_take_the_same_time(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    import time

    policy = AccountPolicy(free_failures=100, backoff_max_seconds=0, lock_after=100)
    auth = _auth(db, store, directory, ListAudit(), policy=policy)
    known: list[float] = []
    unknown: list[float] = []
    for i in range(15):  # interleaved, so drift in machine load hits both alike
        t0 = time.perf_counter()
        await auth.login("alice", None, f"wrong-{i}", "000000", "p")
        known.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await auth.login(f"nobody{i}", None, f"wrong-{i}", "000000", "p")
        unknown.append(time.perf_counter() - t0)
    k, u = min(known), min(unknown)
    # both pay one argon2 check (~20-40 ms): without the dummy check an unknown user would take
    # well under 1 ms. Each side's fastest try is its own cost: load only ever adds to a try, and
    # under load (other test workers) the medians differed by 30% while the cost did not
    assert abs(k - u) < 0.005 + 0.25 * max(k, u), (k, u)
    assert u > 0.5 * k, (k, u)


# --- known devices: failures elsewhere neither delay nor lock them ----------------------------

ALICE_HOME = "192.0.2.10"
ATTACKER = "203.0.113.66"
KEY = "SHA256:alicesregisteredkey"
STRICT = AccountPolicy(free_failures=2, backoff_max_seconds=8, lock_after=5)


class SpyDirectory(StaticDirectory):
    """Records who the directory was asked about."""

    calls: list[tuple[str, str]]

    async def authenticate(self, username: str, domain: str | None, password: str) -> Any:
        self.calls.append(("authenticate", username))
        return await super().authenticate(username, domain, password)

    async def lookup(self, username: str, domain: str | None) -> Any:
        self.calls.append(("lookup", username))
        return await super().lookup(username, domain)


@pytest.fixture
def spy() -> SpyDirectory:
    users = UsersFile(users=[StaticUser(name="alice", password_hash=PASSWORD_HASH, groups=["ops"])])
    d = SpyDirectory(users, "corp.example.com", {"CORP": "corp.example.com"})
    d.calls = []
    return d


async def _ok(auth: Authenticator, clock: FakeClock, ip: str, key: str | None = None) -> bool:
    """A correct login of alice (a fresh code each time: they are single-use)."""
    clock.t += timedelta(seconds=31)
    result = await auth.login("alice", None, None if key else PASSWORD, code_at(clock.t),
                              f"{ip}:50000", key_fp=key)
    return result.principal is not None


async def _attack(auth: Authenticator, clock: FakeClock, ips: list[str], n: int) -> None:
    """``n`` wrong passwords for alice, each after the previous back-off ran out."""
    for i in range(n):
        clock.t += timedelta(seconds=10)
        ip = ips[i % len(ips)]
        assert (await auth.login("alice", None, "wrong", "000000", f"{ip}:6{i:04d}")
                ).principal is None


def _reasons(audit: ListAudit) -> list[str]:
    return [f["reason"] for e, f in audit.events if e == "auth.failure"]


async def test_failures_from_one_address_neither_delay_nor_lock_a_known_address(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    audit, clock = ListAudit(), FakeClock(T0)
    auth = _auth(db, store, directory, audit, clock, STRICT)
    assert await _ok(auth, clock, ALICE_HOME)
    await _attack(auth, clock, [ATTACKER], 5)
    assert (await SqliteThrottleStore(db).state("alice@corp.example.com")).locked
    # no wait at all for alice at her known address
    assert await _ok(auth, clock, ALICE_HOME)
    # the attacker's own pair is locked; a new address waits for the account's rule
    clock.t += timedelta(seconds=31)
    assert (await auth.login("alice", None, PASSWORD, code_at(clock.t), f"{ATTACKER}:1")
            ).principal is None
    assert _reasons(audit)[-1] == "locked (source) after 5 failures"
    assert not await _ok(auth, clock, "192.0.2.99")
    assert _reasons(audit)[-1] == "locked (account, unknown source) after 5 failures"
    assert ("account.source_locked", {"user": "alice@corp.example.com", "source": ATTACKER,
                                      "failures": 5, "peer": f"{ATTACKER}:60004"}) in audit.events


async def test_one_failure_per_window_from_many_addresses_does_not_keep_alice_out(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    audit, clock = ListAudit(), FakeClock(T0)
    auth = _auth(db, store, directory, audit, clock, STRICT)
    assert await _ok(auth, clock, ALICE_HOME)
    botnet = [f"198.51.100.{i}" for i in range(1, 40)]
    for _ in range(3):
        await _attack(auth, clock, botnet, 13)  # locked, and kept in back-off
        assert await _ok(auth, clock, ALICE_HOME)
    assert not await _ok(auth, clock, "192.0.2.99")


async def test_a_known_key_counts_from_a_new_address(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    audit, clock = ListAudit(), FakeClock(T0)
    auth = _auth(db, store, directory, audit, clock, STRICT)
    assert await _ok(auth, clock, ALICE_HOME, KEY)
    await _attack(auth, clock, [ATTACKER, "198.51.100.7"], 6)
    assert await _ok(auth, clock, "192.0.2.200", KEY)  # the key is known, the address is not
    assert not await _ok(auth, clock, "192.0.2.201")  # the same address without the key
    assert not await _ok(auth, clock, "192.0.2.202", "SHA256:anotherkey")
    assert _reasons(audit)[-1] == "locked (account, unknown source) after 5 failures"


async def test_a_known_device_is_forgotten_after_known_source_days(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    audit, clock = ListAudit(), FakeClock(T0)
    auth = _auth(db, store, directory, audit, clock, STRICT)  # 30 days by default
    assert await _ok(auth, clock, ALICE_HOME)
    await _attack(auth, clock, [f"198.51.100.{i}" for i in range(5)], 5)
    clock.t += timedelta(days=29)
    assert await _ok(auth, clock, ALICE_HOME)  # still known (and known again from now)
    clock.t += timedelta(days=30, seconds=1)
    assert not await _ok(auth, clock, ALICE_HOME)
    assert _reasons(audit)[-1] == "locked (account, unknown source) after 5 failures"


async def test_an_attacker_at_the_known_address_is_still_limited_per_pair(
    db: SqliteDatabase, store: SqliteTotpStore, directory: StaticDirectory
) -> None:
    audit, clock = ListAudit(), FakeClock(T0)
    auth = _auth(db, store, directory, audit, clock, STRICT)
    assert await _ok(auth, clock, ALICE_HOME)
    for _ in range(2):  # two free failures, then 1 s
        assert (await auth.login("alice", None, "wrong", "000000", f"{ALICE_HOME}:7")
                ).principal is None
    assert (await auth.login("alice", None, "guess", "000000", f"{ALICE_HOME}:7")
            ).principal is None
    assert _reasons(audit)[-1] == "throttled (source) for 1.0 s more"
    assert (await SqliteThrottleStore(db).state("alice@corp.example.com")).failures == 2
    await _attack(auth, clock, [ALICE_HOME], 3)
    assert not await _ok(auth, clock, ALICE_HOME)
    assert _reasons(audit)[-1] == "locked (source) after 5 failures"


async def test_a_refusal_takes_the_path_of_a_wrong_password(
    db: SqliteDatabase, store: SqliteTotpStore, spy: SpyDirectory
) -> None:
    """Refused by a limit: the directory is asked about nobody (an unknown user's cost, not
    alice's credentials), nothing is counted, the code is not consumed, the same result."""
    audit, clock = ListAudit(), FakeClock(T0)
    auth = _auth(db, store, spy, audit, clock, STRICT)
    await _attack(auth, clock, [ATTACKER], 5)
    spy.calls.clear()
    clock.t += timedelta(hours=1)
    result = await auth.login("alice", None, PASSWORD, code_at(clock.t), "192.0.2.99:1")
    assert result == type(result)(None)
    assert spy.calls == [("authenticate", "\x00throttled")]
    assert await store.last_step(ALICE.key) is None
    spy.calls.clear()
    assert (await auth.login("alice", None, None, code_at(clock.t), "192.0.2.99:1",
                             key_fp=KEY)).principal is None
    assert spy.calls == [("lookup", "\x00throttled")]
    assert (await SqliteThrottleStore(db).state("alice@corp.example.com")).failures == 5
    assert [e for e, _ in audit.events[-2:]] == ["auth.failure", "auth.failure"]
