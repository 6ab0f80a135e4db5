"""X-Forwarded-For on the real API server: believed only from ``[web] trusted_proxies``, and
then the client it names is the login's address (audit, throttling, known devices); from anyone
else the header is ignored, so a client cannot pick its own address."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
from aiohttp import DummyCookieJar
from aiohttp.test_utils import TestServer

from broker.config import WebSettings
from broker.domain import totp
from broker.store.sqlite import SqliteThrottleStore, SqliteTotpStore
from broker.web import create_app
from tests.web.conftest import DOMAIN, PASSWORD, USERS, Env, FakeClock, LiveDirectory, build_context
from tests.web.test_listener import serve  # noqa: F401 - the listener on real sockets

PROXY = "127.0.0.5"  # the trusted reverse proxy
OTHER = "127.0.0.6"  # a client straight to the API


@dataclasses.dataclass
class Setup:
    env: Env
    url: str


@pytest_asyncio.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    clock = FakeClock()
    directory = LiveDirectory(USERS)
    ctx, db, secrets = build_context(tmp_path, clock, directory=directory)
    ctx = dataclasses.replace(ctx, settings=WebSettings(
        session_minutes=600, trusted_proxies=[f"{PROXY}/32", "10.0.0.0/8"]))
    store = SqliteTotpStore(db)
    for name in USERS:
        secrets[name] = totp.new_secret()
        await store.set_secret(f"{name}@{DOMAIN}", secrets[name])
    server = TestServer(create_app(ctx), host="127.0.0.1")
    await server.start_server()
    try:
        yield Setup(Env(None, clock, secrets, tmp_path, ctx, db, directory),  # type: ignore[arg-type]
                    str(server.make_url("/api/login")))
    finally:
        await server.close()
        db.close()


async def _login(s: Setup, source: str, user: str, forwarded: str | None,
                 password: str = PASSWORD) -> int:
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    body: dict[str, Any] = {"user": user, "password": password, "code": s.env.code(user)}
    conn = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=conn, cookie_jar=DummyCookieJar()) as http, \
            http.post(s.url, json=body, headers=headers) as r:
        return r.status


def _peers(s: Setup, event: str, user: str) -> list[str]:
    return [str(e["peer"]) for e in s.env.audit()
            if e["event"] == event and e["user"] == f"{user}@{DOMAIN}"]


async def test_trusted_proxy_names_the_client(setup: Setup) -> None:
    # the client wrote 6.6.6.6 itself; the proxy appended the address it saw
    assert await _login(setup, PROXY, "rita", "6.6.6.6, 203.0.113.9") == 200
    assert _peers(setup, "web.login", "rita") == ["203.0.113.9:0"]
    assert _peers(setup, "auth.success", "rita") == ["203.0.113.9:0"]


async def test_trusted_hops_are_skipped_from_the_right(setup: Setup) -> None:
    assert await _login(setup, PROXY, "ron", "198.51.100.7, 10.1.2.3") == 200
    assert _peers(setup, "web.login", "ron") == ["198.51.100.7:0"]


async def test_untrusted_peer_cannot_pick_its_address(setup: Setup) -> None:
    assert await _login(setup, OTHER, "alan", "203.0.113.9") == 200
    [peer] = _peers(setup, "web.login", "alan")
    assert peer.startswith(f"{OTHER}:") and peer != f"{OTHER}:0"
    # without a header the proxy itself is the peer (its own requests, health checks)
    assert await _login(setup, PROXY, "abby", None) == 200
    assert _peers(setup, "web.login", "abby")[0].startswith(f"{PROXY}:")


async def test_failures_count_against_the_forwarded_client(setup: Setup) -> None:
    for _ in range(2):
        assert await _login(setup, PROXY, "lena", "198.51.100.20", password="wrong") == 401
    assert _peers(setup, "auth.failure", "lena") == ["198.51.100.20:0"] * 2
    # spoofed from outside: counted against the real peer, not the address it claimed
    assert await _login(setup, OTHER, "lena", "198.51.100.21", password="wrong") == 401
    throttle = SqliteThrottleStore(setup.env.db)
    account = f"lena@{DOMAIN}"
    assert (await throttle.view(account, "198.51.100.20", None)).source.failures == 2
    assert (await throttle.view(account, "198.51.100.21", None)).source.failures == 0
    assert (await throttle.view(account, OTHER, None)).source.failures == 1
    assert (await throttle.view(account, PROXY, None)).source.failures == 0


async def test_a_trusted_proxy_is_not_held_to_the_per_source_cap(
        serve: object,  # noqa: F811 - the fixture imported above
) -> None:
    """Its connections are many clients': only ``max_connections`` holds it. Another source
    is still capped."""
    srv = await serve(max_connections_per_source=3,  # type: ignore[operator]
                      trusted_proxies=[f"{PROXY}/32"])
    held = [await srv.connect(source) for source in (PROXY, OTHER) for _ in range(3)]
    for _, w in held:
        w.write(b"GET /hello HTTP/1.1\r\n")  # half a header each
    await asyncio.sleep(0.1)
    assert (await srv.request(PROXY)).endswith(b"hello 0")
    assert (await srv.request(OTHER)).startswith(b"HTTP/1.1 503 ")
    for _, w in held:
        w.close()
