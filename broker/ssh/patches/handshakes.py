"""Handshakes yield to established sessions: pre-authentication reads are parsed in bounded
slices, the oldest handshake first.

One event loop relays every open session and also runs every new connection's key exchange and
authentication, and it serves ready callbacks in arrival order, so during a login storm a
keystroke waits behind every handshake packet that arrived before it. Here a read on a connection
that has not completed authentication is queued instead of parsed; one pump per loop parses
queued reads for at most ``BUDGET`` seconds per loop iteration, then yields, so reads of
established sessions, still handled as they arrive, wait for at most about one slice of handshake
parsing. When the loop has nothing else to do the pump runs again at once.

The queue is ordered by connection age: the handshake that started first is parsed first, so
logins finish in about the order they began instead of all slowing down together (a narrower
latency spread at the same rate). Measured with ``bench/login_storm.py``, two alternating pairs
of runs: echo p99 during the storm 30.4 / 35.9 ms against 42.0 / 40.3 without the pump, login p99
1240 / 1161 ms against 1336 / 1403, at the same ~50 logins/s. A connection keeps its age's
priority only for its first ``AGE_LIMIT`` bytes (a handshake is a few KiB), so a client that
keeps sending before authenticating cannot starve newer logins; after that its reads queue in
arrival order.

Order per connection is kept: once a connection has queued reads, later reads queue behind them
even if authentication completed meanwhile. A connection that closes drops what it had queued
(asyncssh's own close path runs as before). A connection with more than ``MAX_QUEUED`` bytes
waiting stops being read until the pump catches up, so the broker never buffers unparsed
handshake data without bound.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from collections.abc import Callable
from typing import Any

BUDGET = 0.001  # seconds of handshake parsing per loop iteration
MAX_QUEUED = 256 * 1024  # bytes queued on one connection before it stops being read
AGE_LIMIT = 64 * 1024  # pre-authentication bytes a connection may send with its age's priority


_Item = tuple[int, int, Any, bytes, Callable[[Any, bytes], None]]
_order = itertools.count()


class _Pump:
    __slots__ = ("loop", "queue", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # (connection's first-read number, read number, ...): the oldest handshake goes first
        self.queue: list[_Item] = []
        self.scheduled = False

    def schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        queue = self.queue
        deadline = time.perf_counter() + BUDGET
        while queue:
            _, _, conn, data, handle = heapq.heappop(queue)
            conn._bb_queued -= len(data)
            if conn._transport is None:  # closed meanwhile: its handshake is over
                continue
            if conn._bb_paused and conn._bb_queued <= MAX_QUEUED // 2:
                conn._bb_paused = False
                conn._transport.resume_reading()
            handle(conn, data)
            if time.perf_counter() >= deadline:
                break
        if queue:
            self.schedule()


_pumps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pump] = weakref.WeakKeyDictionary()


def defer(conn: Any, data: bytes, handle: Callable[[Any, bytes], None]) -> bool:
    """Queue ``data`` for ``handle(conn, data)`` in a later slice if ``conn`` is still
    authenticating (or has reads queued); False: the caller handles it now."""
    queued = getattr(conn, "_bb_queued", 0)
    if conn._auth_complete and not queued:
        return False
    loop = conn._loop
    pump = _pumps.get(loop)
    if pump is None:
        pump = _pumps[loop] = _Pump(loop)
    first = getattr(conn, "_bb_first", None)
    if first is None:
        first = conn._bb_first = next(_order)
        conn._bb_paused = False
        conn._bb_total = 0
    conn._bb_total += len(data)
    conn._bb_queued = queued + len(data)
    seq = next(_order)
    # a real handshake is a few KiB: past AGE_LIMIT a connection keeps no head start
    heapq.heappush(pump.queue, (first if conn._bb_total <= AGE_LIMIT else seq, seq, conn, data,
                                handle))
    if conn._bb_queued > MAX_QUEUED and not conn._bb_paused and conn._transport is not None:
        conn._bb_paused = True
        conn._transport.pause_reading()
    pump.schedule()
    return True


def received_before_auth(conn: Any) -> int:
    """Bytes ``conn`` has sent before authentication, as far as the pump has seen them (0 before
    its first read, and without the patches installed)."""
    return int(getattr(conn, "_bb_total", 0))
