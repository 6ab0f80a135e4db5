"""A webhook receiver for the notification tests and the benchmark: a real aiohttp server on a
free 127.0.0.1 port that checks each request's signature with the channel's secret, as a
receiver should, and remembers what it got.

Paths: ``/ok/NAME`` answers 200; ``/flaky/NAME`` 500 to the first request, then 200;
``/gone/NAME`` 404; ``/hang/NAME`` never answers (until the server stops).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from broker.domain.notify import verify


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    signed_ok: bool | None  # None: no secret to check with

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    secret: bytes | None = None
    got: dict[str, list[Received]] = field(default_factory=lambda: defaultdict(list))
    hanging: int = 0  # requests held open now
    url: str = ""
    _changed: asyncio.Condition | None = None
    _runner: web.AppRunner | None = None
    _release: asyncio.Event | None = None

    async def start(self, port: int = 0) -> Receiver:
        self._changed = asyncio.Condition()
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{kind}/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        assert self._release is not None and self._runner is not None
        self._release.set()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._changed is not None and self._release is not None
        body = await request.read()
        signed_ok = None
        if self.secret is not None:
            signed_ok = verify(self.secret, request.headers.get("X-Bastion-Timestamp", ""),
                               body, request.headers.get("X-Bastion-Signature", ""),
                               now=time.time())
        kind, name = request.match_info["kind"], request.match_info["name"]
        rec = Received(request.path, dict(request.headers), body, signed_ok)
        async with self._changed:
            self.got[name].append(rec)
            self._changed.notify_all()
        if kind == "hang":
            self.hanging += 1
            try:
                await self._release.wait()
            finally:
                self.hanging -= 1
            return web.Response(status=200)
        if kind == "gone":
            return web.Response(status=404)
        if kind == "flaky" and len(self.got[name]) == 1:
            return web.Response(status=500, text="try later")
        return web.Response(status=200)

    async def wait_for(self, name: str, count: int, within: float = 15.0) -> list[Received]:
        """The first ``count`` requests to ``NAME``, once they have come."""
        assert self._changed is not None
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.got[name]) >= count), within)
        return self.got[name][:count]


async def until(check: Callable[[], Awaitable[bool]], within: float = 15.0,
                what: str = "the condition") -> None:
    """Return once ``check()`` holds, looking every 20 ms; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    for _ in itertools.count():
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come within {within} s")
        await asyncio.sleep(0.02)
