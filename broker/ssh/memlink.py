"""Two asyncio transports joined back to back in memory: a socketpair without the kernel.

Recorded ProxyJump serves the inner SSH connection inside the broker; its bytes only move
between two protocols of the same event loop (the tunnel's end and asyncssh's connection). A
socketpair cost a send and a receive system call and two kernel copies per chunk each way, on
the event loop that is the bottleneck of a recorded ``scp -J``. Here a write is queued and
handed to the other end's ``data_received`` in the next loop iteration (never from inside the
writer's own call, as with a socket), chunks written in one iteration arriving as one. Flow
control works as with sockets: an end that stops reading keeps the other end's data queued,
and a writer whose queue passes the high-water mark gets ``pause_writing`` until it drains.
``write_eof`` is a half-close (the other end gets ``eof_received``); ``close`` delivers what is
queued, then the other end gets ``eof_received`` and both get ``connection_lost``.
"""

from __future__ import annotations

import asyncio
from typing import Any

HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10


class _End(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._loop = loop
        self._peer: _End = self
        self._proto: asyncio.Protocol | None = None
        self._out: list[bytes] = []
        self._out_len = 0
        self._scheduled = False
        self._reading = True
        self._writer_paused = False
        self._eof_out = self._eof_sent = False
        self._closing = self._lost = False
        self._high, self._low = HIGH_WATER, LOW_WATER

    # -- writing (this end's protocol sends to the peer) --------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or self._eof_out or not data:
            return
        chunk = data if type(data) is bytes else bytes(data)
        self._out.append(chunk)
        self._out_len += len(chunk)
        self._schedule()
        if not self._writer_paused and self._out_len > self._high and self._proto is not None:
            self._writer_paused = True
            self._proto.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        if not (self._closing or self._lost):
            self._eof_out = True
            self._schedule()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self._out_len

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        self._high, self._low = high, high // 4 if low is None else low

    # -- reading (this end's protocol receives from the peer) ---------------------------------
    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._peer._schedule()

    def is_reading(self) -> bool:
        return self._reading and not self._lost

    # -- protocol, closing ---------------------------------------------------------------------
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._proto = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        if self._proto is None:
            raise RuntimeError("no protocol set")
        return self._proto

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        if not (self._closing or self._lost):
            self._closing = True
            self._schedule()

    def abort(self) -> None:
        if self._lost:
            return
        self._out.clear()
        self._out_len = 0
        self._lose(None)
        self._peer._lose(ConnectionResetError("the other end aborted"))

    def _schedule(self) -> None:
        if not self._scheduled and not self._lost:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        peer = self._peer
        if self._lost:
            return
        if self._out and peer._reading and not peer._lost and peer._proto is not None:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            self._out_len = 0
            peer._proto.data_received(data)
            if self._writer_paused and self._out_len <= self._low and self._proto is not None:
                self._writer_paused = False
                self._proto.resume_writing()
        if self._out or self._lost:
            return
        if (self._eof_out or self._closing) and not self._eof_sent and not peer._lost:
            self._eof_sent = True
            if peer._proto is not None and not peer._proto.eof_received() and not self._closing:
                peer.close()  # as a socket transport does when eof_received returns false
        if self._closing:
            self._lose(None)
            peer._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._out.clear()
        self._out_len = 0
        if self._proto is not None:
            self._loop.call_soon(self._proto.connection_lost, exc)


def pair(loop: asyncio.AbstractEventLoop, extra_a: dict[str, Any] | None = None,
         extra_b: dict[str, Any] | None = None) -> tuple[asyncio.Transport, asyncio.Transport]:
    """Two connected transports; give each its protocol with ``set_protocol`` and call the
    protocol's ``connection_made`` as a loop would."""
    a, b = _End(loop, extra_a or {}), _End(loop, extra_b or {})
    a._peer, b._peer = b, a
    return a, b
