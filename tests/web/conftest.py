"""A real API server on 127.0.0.1 over the real Authenticator, GrantService and SQLite store.

Only the clock is fake: it lets each login use a fresh TOTP step (codes are single-use) and lets
tests expire sessions and tokens without waiting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
import pytest_asyncio
from aiohttp import DummyCookieJar
from aiohttp.test_utils import TestClient, TestServer

from broker.audit.jsonl import JsonlAuditLog
from broker.config import GrantSettings, RoleSettings, WebSettings
from broker.domain import totp
from broker.identity.passwords import hash_password
from broker.identity.static import StaticDirectory, StaticUser, UsersFile
from broker.inventory.static import InventoryFile, StaticInventory
from broker.ports import AuthOutcome
from broker.services.account_check import AccountChecker
from broker.services.auth import Authenticator, TotpSecondFactor
from broker.services.grants import GrantService
from broker.services.roles import grant_policy
from broker.store.sqlite import (
    SqliteApiTokenStore,
    SqliteDatabase,
    SqliteGrantStore,
    SqliteThrottleStore,
    SqliteTotpStore,
)
from broker.web import WebContext, create_app
from broker.web.signing import SessionSigner, load_or_create_key

DOMAIN = "corp.example.com"
PASSWORD = "correct horse battery"
_HASH = hash_password(PASSWORD)
USERS = {  # name -> groups
    "rita": ["dev"], "ron": ["dev"], "alan": ["approvers"], "abby": ["approvers"],
    "audrey": ["auditors"], "adam": ["admins"], "lena": ["dev"], "otto": ["dev"],
}
# requests are checked against it: stack-web and stack-db in vpc-0demo, as in the demo
INVENTORY = StaticInventory(InventoryFile.model_validate({"stacks": [
    {"id": stack, "vpc": "vpc-0demo", "instances": [
        {"id": f"i-0{name}", "name": name, "address": "10.0.0.1"}]}
    for stack, name in (("stack-web", "web01"), ("stack-db", "db01"))]}))
ROLES = RoleSettings(approver_groups=["approvers"], auditor_groups=["auditors"],
                     admin_groups=["admins"])


class LiveDirectory:
    """A real ``StaticDirectory`` whose users file can change under a running API, as an AD
    would (a user disabled, or moved out of a group); counts the lookups."""

    def __init__(self, users: dict[str, list[str]]) -> None:
        self.lookups = 0
        self.down = False  # answers as an unreachable DC does
        self.set(users)

    def set(self, users: dict[str, list[str]], disabled: frozenset[str] = frozenset()) -> None:
        self.users = dict(users)
        self._d = StaticDirectory(UsersFile(users=[
            StaticUser(name=n, password_hash=_HASH, groups=g, disabled=n in disabled)
            for n, g in users.items()]), DOMAIN, {"CORP": DOMAIN})

    def disable(self, name: str) -> None:
        self.set(self.users, frozenset({name}))

    def move(self, name: str, groups: list[str]) -> None:
        self.set({**self.users, name: groups})

    def canonical_domain(self, domain: str | None) -> str | None:
        return self._d.canonical_domain(domain)

    async def authenticate(self, username: str, domain: str | None, password: str) -> AuthOutcome:
        return await self._d.authenticate(username, domain, password)

    async def lookup(self, username: str, domain: str | None) -> AuthOutcome:
        self.lookups += 1
        if self.down:
            return AuthOutcome(None, "directory unavailable: no DC answered")
        return await self._d.lookup(username, domain)


class FakeClock:
    def __init__(self) -> None:
        self.t = datetime.now(UTC).replace(microsecond=0)

    def now(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@dataclass
class Who:
    """A logged-in caller: the headers a browser (cookie + CSRF) or a script would send."""

    name: str
    headers: dict[str, str] = field(default_factory=dict)
    csrf: str = ""
    cookie: str = ""


@dataclass
class Env:
    client: TestClient
    clock: FakeClock
    secrets: dict[str, str]
    state: Path
    ctx: WebContext
    db: SqliteDatabase
    directory: LiveDirectory
    _who: dict[str, Who] = field(default_factory=dict)

    def code(self, user: str) -> str:
        """The code of a TOTP step nobody used yet: move the clock a step first."""
        self.clock.advance(30)
        name = user.split("@")[0].split("\\")[-1]
        return str(pyotp.TOTP(self.secrets[name]).at(self.clock.now()))

    async def login_raw(self, user: str, password: str = PASSWORD, code: str | None = None,
                        **extra: Any) -> Any:
        body = {"user": user, "password": password,
                "code": self.code(user) if code is None else code, **extra}
        return await self.client.post("/api/login", json=body)

    async def who(self, user: str) -> Who:
        """``user`` logged in (once per test), or an anonymous caller for "anon"."""
        if user == "anon":
            return Who("anon")
        if user not in self._who:
            r = await self.login_raw(user)
            assert r.status == 200, await r.text()
            body = await r.json()
            cookie = r.cookies[self.ctx.session_cookie].value
            self._who[user] = Who(user, {
                "Cookie": f"{self.ctx.session_cookie}={cookie}",
                "X-CSRF-Token": body["csrf"]}, csrf=body["csrf"], cookie=cookie)
        return self._who[user]

    async def call(self, who: Who | str, method: str, path: str, body: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        w = who if isinstance(who, Who) else await self.who(who)
        h = {**w.headers, **(headers or {})}
        kw: dict[str, Any] = {"headers": h}
        if body is not None:
            kw["json"] = body
        r = await self.client.request(method, path, **kw)
        text = await r.text()
        assert "Traceback" not in text
        return r.status, (await r.json()) if text else None

    async def request(self, who: str = "rita", **fields: Any) -> dict[str, Any]:
        body = {"stacks": ["stack-web"], "vpc": "vpc-0demo", "level": "read-only",
                "ticket": "INC-1", "reason": "disk alarm", **fields}
        status, g = await self.call(who, "POST", "/api/grants", body)
        assert status == 201, g
        return dict(g)

    async def approved(self, who: str = "rita", **fields: Any) -> dict[str, Any]:
        g = await self.request(who, **fields)
        status, g = await self.call("alan", "POST", f"/api/grants/{g['id']}/approve", {})
        assert status == 200, g
        return dict(g)

    def audit(self) -> list[dict[str, Any]]:
        import json

        path = self.state / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


def build_context(state: Path, clock: FakeClock, *, two_approvers: bool = False,
                  secure_cookies: bool = True, recheck_seconds: int = 60,
                  directory: LiveDirectory | None = None, pending_expire_hours: float = 24.0,
                  ) -> tuple[WebContext, SqliteDatabase, dict[str, str]]:
    db = SqliteDatabase(state / "broker.db")
    audit = JsonlAuditLog(state / "audit.jsonl", clock)
    directory = directory or LiveDirectory(USERS)
    totp_store = SqliteTotpStore(db)
    auth = Authenticator(directory, TotpSecondFactor(totp_store, clock), audit,
                         SqliteThrottleStore(db), clock, totp_store=totp_store)
    grants = GrantService(SqliteGrantStore(db), audit, clock,
                          grant_policy(GrantSettings(two_approvers_for_admin=two_approvers,
                                                     pending_expire_hours=pending_expire_hours)),
                          inventory=lambda: INVENTORY)
    ctx = WebContext(grants=grants, authenticator=auth, tokens=SqliteApiTokenStore(db),
                     audit=audit, clock=clock, roles=ROLES,
                     settings=WebSettings(secure_cookies=secure_cookies, session_minutes=600),
                     signer=SessionSigner(load_or_create_key(state / "web.key")),
                     accounts=AccountChecker(directory, clock, recheck_seconds=recheck_seconds))
    return ctx, db, {}


async def _env(tmp_path: Path, **kw: Any) -> AsyncIterator[Env]:
    clock = FakeClock()
    directory = LiveDirectory(USERS)
    ctx, db, secrets = build_context(tmp_path, clock, directory=directory, **kw)
    totp_store = SqliteTotpStore(db)
    for name in USERS:
        secrets[name] = totp.new_secret()
        await totp_store.set_secret(f"{name}@{DOMAIN}", secrets[name])
    client = TestClient(TestServer(create_app(ctx), host="127.0.0.1"),
                        cookie_jar=DummyCookieJar())
    await client.start_server()
    try:
        yield Env(client, clock, secrets, tmp_path, ctx, db, directory)
    finally:
        await client.close()
        db.close()


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in _env(tmp_path):
        yield e


@pytest_asyncio.fixture
async def env2(tmp_path: Path) -> AsyncIterator[Env]:
    """Policy: admin grants need two distinct approvers."""
    async for e in _env(tmp_path, two_approvers=True):
        yield e


@pytest.fixture
def make_env(tmp_path: Path) -> Callable[..., Any]:
    return lambda **kw: _env(tmp_path, **kw)
