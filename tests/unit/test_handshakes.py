"""The handshake pump: pre-authentication reads parsed in bounded slices, oldest handshake first,
in order per connection, with reading paused when too much waits
(``broker.ssh.patches.handshakes``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from broker.ssh.patches import handshakes


class _Transport:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


class _Conn:
    """The attributes of an asyncssh connection the pump reads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.name = name
        self._loop = loop
        self._auth_complete = False
        self._transport: _Transport | None = _Transport()


async def _settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def test_established_reads_are_not_deferred() -> None:
    conn = _Conn(asyncio.get_running_loop(), "a")
    conn._auth_complete = True
    assert handshakes.defer(conn, b"x", lambda c, d: None) is False


async def test_reads_run_later_in_order_oldest_connection_first() -> None:
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, bytes]] = []

    def handle(c: Any, d: bytes) -> None:
        seen.append((c.name, d))

    old, new = _Conn(loop, "old"), _Conn(loop, "new")
    assert handshakes.defer(old, b"1", handle)
    assert handshakes.defer(new, b"1", handle)
    assert handshakes.defer(new, b"2", handle)
    assert handshakes.defer(old, b"2", handle)
    assert seen == []  # nothing is parsed inside the read callback
    await _settle()
    assert seen == [("old", b"1"), ("old", b"2"), ("new", b"1"), ("new", b"2")]


async def test_order_is_kept_after_authentication_completes() -> None:
    loop = asyncio.get_running_loop()
    seen: list[bytes] = []
    conn = _Conn(loop, "c")

    def handle(c: Any, d: bytes) -> None:
        seen.append(d)
        c._auth_complete = True  # the first packet finished the login

    handshakes.defer(conn, b"1", handle)
    # authenticated, but a read is still queued: the next one queues behind it
    conn._auth_complete = True
    assert handshakes.defer(conn, b"2", handle) is True
    await _settle()
    assert seen == [b"1", b"2"]
    assert handshakes.defer(conn, b"3", handle) is False  # nothing queued any more


async def test_a_slice_is_bounded_and_the_loop_runs_between_slices(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handshakes, "BUDGET", 0.002)
    loop = asyncio.get_running_loop()
    ran: list[int] = []

    def slow(c: Any, d: bytes) -> None:
        time.sleep(0.001)
        ran.append(len(ran))

    for i in range(20):
        handshakes.defer(_Conn(loop, str(i)), b"x", slow)
    ticks = 0
    while len(ran) < 20:
        await asyncio.sleep(0)
        ticks += 1
        assert ticks < 200
    assert ticks >= 5  # 20 ms of work in slices of about 2 ms, with the loop turning between


async def test_closed_connections_drop_what_they_queued() -> None:
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    gone, alive = _Conn(loop, "gone"), _Conn(loop, "alive")
    handshakes.defer(gone, b"x", lambda c, d: seen.append(c.name))
    handshakes.defer(alive, b"x", lambda c, d: seen.append(c.name))
    gone._transport = None
    await _settle()
    assert seen == ["alive"]


async def test_too_much_queued_pauses_reading_until_the_pump_catches_up() -> None:
    loop = asyncio.get_running_loop()
    conn = _Conn(loop, "flood")
    transport = conn._transport
    assert transport is not None
    chunk = b"\0" * 65536
    for _ in range(handshakes.MAX_QUEUED // len(chunk) + 1):
        handshakes.defer(conn, chunk, lambda c, d: None)
    assert transport.paused and transport.pauses == 1
    await _settle()
    assert not transport.paused


async def test_a_connection_past_the_age_limit_loses_its_head_start() -> None:
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    chunk = b"\0" * 4096
    flood = _Conn(loop, "flood")
    for _ in range(handshakes.AGE_LIMIT // len(chunk) + 1):
        handshakes.defer(flood, chunk, lambda c, d: None)
    await _settle()
    late = _Conn(loop, "late")
    handshakes.defer(late, b"kex", lambda c, d: seen.append(c.name))
    handshakes.defer(flood, b"more", lambda c, d: seen.append(c.name))  # older, but over the limit
    await _settle()
    assert seen == ["late", "flood"]  # arrival order: the flood's age no longer counts
