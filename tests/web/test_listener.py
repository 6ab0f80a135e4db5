"""The API listener's limits (broker/web/listener.py) on real sockets, in front of a real aiohttp
application: header and body time limits, keep-alive and pipelined requests untouched, the
per-source cap and the overall cap that makes way for a real request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from broker.config import WebSettings
from broker.web.listener import GuardedListener

GET = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"


async def _hello(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(text=f"hello {len(body)}")


class Listener:
    def __init__(self, listener: GuardedListener, port: int) -> None:
        self.listener = listener
        self.port = port

    async def connect(self, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader,
                                                                  asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(source, 0))

    async def request(self, source: str = "127.0.0.1", data: bytes = GET) -> bytes:
        reader, writer = await self.connect(source)
        try:
            writer.write(data)
            return await asyncio.wait_for(_response(reader), 5)
        finally:
            writer.close()


async def _response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    t0 = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(4096), seconds):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[object]:
    runners: list[tuple[web.AppRunner, asyncio.Server]] = []

    async def start(**settings: float) -> Listener:
        s = WebSettings(**settings)  # type: ignore[arg-type]
        app = web.Application()
        app.router.add_route("*", "/hello", _hello)
        runner = web.AppRunner(app, keepalive_timeout=s.keepalive_timeout_seconds)
        await runner.setup()
        assert runner.server is not None
        listener = GuardedListener(s, runner.server)
        server = await asyncio.get_running_loop().create_server(listener, "127.0.0.1", 0)
        runners.append((runner, server))
        return Listener(listener, server.sockets[0].getsockname()[1])

    yield start
    for runner, server in runners:
        server.close()
        await runner.cleanup()


async def test_half_a_header_is_closed_after_the_header_timeout(serve: object) -> None:
    srv = await serve(header_timeout_seconds=0.5)  # type: ignore[operator]
    silent, _ = await srv.connect()
    half_r, half_w = await srv.connect()
    half_w.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    # half a header, and nothing at all: the same limit
    for after in await asyncio.gather(_closed_within(half_r, 3), _closed_within(silent, 3)):
        assert 0.3 < after < 1.5
    assert srv.listener.timed_out == 2
    assert not srv.listener.open and not srv.listener.per_source
    assert (await srv.request()).endswith(b"hello 0")


async def test_a_header_sent_slowly_but_in_time_and_keep_alive_requests_pass(
    serve: object
) -> None:
    srv = await serve(header_timeout_seconds=0.6)  # type: ignore[operator]
    reader, writer = await srv.connect()
    for _ in range(2):
        for part in (GET[:10], GET[10:20], GET[20:]):
            writer.write(part)
            await asyncio.sleep(0.15)
        assert (await asyncio.wait_for(_response(reader), 3)).endswith(b"hello 0")
        await asyncio.sleep(0.8)  # idle between requests longer than the header timeout
    # two pipelined requests with a body, in one write
    post = b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde"
    chunked = (b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\n\r\n")
    writer.write(post + chunked + GET)
    for expected in (b"hello 5", b"hello 3", b"hello 0"):
        assert (await asyncio.wait_for(_response(reader), 3)).endswith(expected)
    writer.close()
    assert srv.listener.timed_out == 0


async def test_a_body_that_does_not_arrive_in_time_is_closed(serve: object) -> None:
    srv = await serve(header_timeout_seconds=5, body_timeout_seconds=0.5)  # type: ignore[operator]
    reader, writer = await srv.connect()
    writer.write(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly this")
    assert 0.3 < await _closed_within(reader, 3) < 1.5
    reader, writer = await srv.connect()
    writer.write(b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc")
    assert 0.3 < await _closed_within(reader, 3) < 1.5


async def test_the_per_source_cap_refuses_the_excess_and_other_sources_pass(
    serve: object
) -> None:
    srv = await serve(max_connections_per_source=5)  # type: ignore[operator]
    held = [await srv.connect("127.0.0.5") for _ in range(5)]
    for _, w in held:
        w.write(b"GET /hello HTTP/1.1\r\n")  # half a header each
    await asyncio.sleep(0.1)
    refused = await srv.request("127.0.0.5")
    assert refused.startswith(b"HTTP/1.1 503 ") and refused.endswith(b"too many connections")
    assert (await srv.request("127.0.0.6")).endswith(b"hello 0")
    for r, _ in held:  # the held ones are untouched
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r.read(1), 0.05)


async def test_at_the_overall_cap_a_real_request_takes_the_stalest_half_headers_place(
    serve: object
) -> None:
    srv = await serve(max_connections=60, max_connections_per_source=10)  # type: ignore[operator]
    flood = []
    for i in range(90):  # 9 addresses, 10 each: 30 more than the cap
        r, w = await srv.connect(f"127.0.1.{1 + i // 10}")
        w.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        flood.append((r, w))
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    assert (await srv.request("127.0.0.1")).endswith(b"hello 0")
    assert time.monotonic() - t0 < 1.0
    assert len(srv.listener.open) <= 60
    # the oldest made way; the newest are still open
    assert await _closed_within(flood[0][0], 1) < 1
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(flood[-1][0].read(1), 0.05)
    for _, w in flood:
        w.close()


async def test_at_the_overall_cap_with_every_connection_in_a_request_the_new_one_gets_503(
    serve: object
) -> None:
    srv = await serve(max_connections=3, body_timeout_seconds=5)  # type: ignore[operator]
    held = []
    for _ in range(3):  # inside a request: a header, and a body still to come
        r, w = await srv.connect()
        w.write(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        held.append((r, w))
    await asyncio.sleep(0.1)
    assert (await srv.request()).startswith(b"HTTP/1.1 503 ")
    held[0][1].write(b"cdefghij")  # a body completes: that request is answered
    assert (await asyncio.wait_for(_response(held[0][0]), 3)).endswith(b"hello 10")
    for _, w in held:
        w.close()
