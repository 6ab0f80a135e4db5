"""broker.ssh.memlink: two transports back to back behave like a socketpair's two ends.

Data arrives in order and never from inside the writer's own call; an end that stops reading
keeps the other's data queued and the writer is paused past the high-water mark and resumed
once it drains; write_eof half-closes; close delivers what is queued first; abort drops it.
"""

from __future__ import annotations

import asyncio

import pytest

from broker.ssh import memlink


class _Proto(asyncio.Protocol):
    def __init__(self, keep_open_on_eof: bool = True) -> None:
        self.data: list[bytes] = []
        self.events: list[str] = []
        self.lost: list[Exception | None] = []
        self.in_write = False
        self._keep_open = keep_open_on_eof

    def data_received(self, data: bytes) -> None:
        assert not self.in_write, "delivered from inside the writer's call"
        self.data.append(data)

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self._keep_open

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


def _pair(keep_open: bool = True) -> tuple[asyncio.Transport, _Proto, asyncio.Transport, _Proto]:
    a, b = memlink.pair(asyncio.get_running_loop())
    pa, pb = _Proto(keep_open), _Proto(keep_open)
    a.set_protocol(pa)
    b.set_protocol(pb)
    return a, pa, b, pb


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_data_arrives_in_order_in_a_later_iteration_both_ways() -> None:
    a, pa, b, pb = _pair()
    pb.in_write = True
    a.write(b"one ")
    a.writelines([b"two ", bytearray(b"three "), memoryview(b"four")])
    pb.in_write = False
    assert pb.data == []  # nothing delivered synchronously
    b.write(b"back")
    await _turns()
    assert b"".join(pb.data) == b"one two three four"
    assert len(pb.data) == 1  # written in one iteration: one delivery
    assert pa.data == [b"back"]


async def test_a_paused_reader_queues_data_and_pauses_then_resumes_the_writer() -> None:
    a, pa, b, pb = _pair()
    b.pause_reading()
    assert not b.is_reading()
    chunk = b"x" * (64 << 10)
    for _ in range((memlink.HIGH_WATER // len(chunk)) + 1):
        a.write(chunk)
    await _turns()
    assert pb.data == [] and pa.events == ["pause"]
    assert a.get_write_buffer_size() > memlink.HIGH_WATER
    b.resume_reading()
    await _turns()
    assert sum(map(len, pb.data)) == ((memlink.HIGH_WATER // len(chunk)) + 1) * len(chunk)
    assert pa.events == ["pause", "resume"] and a.get_write_buffer_size() == 0


async def test_write_eof_half_closes_and_the_other_way_still_works() -> None:
    a, pa, b, pb = _pair()
    a.write(b"last")
    a.write_eof()
    a.write(b"ignored after eof")
    await _turns()
    assert pb.data == [b"last"] and pb.events == ["eof"]
    b.write(b"reply")
    await _turns()
    assert pa.data == [b"reply"] and pa.lost == pb.lost == []


async def test_eof_received_false_closes_that_end_as_a_socket_transport_does() -> None:
    a, pa, _b, pb = _pair(keep_open=False)
    a.write_eof()
    await _turns(5)
    assert pb.events == ["eof"] and pa.lost == [None] and pb.lost == [None]


async def test_close_delivers_what_is_queued_then_ends_both() -> None:
    a, pa, b, pb = _pair()
    a.write(b"queued")
    a.close()
    assert a.is_closing()
    a.write(b"after close")
    await _turns(5)
    assert pb.data == [b"queued"] and pb.events == ["eof"]
    assert pa.lost == [None] and pb.lost == [None]
    b.write(b"to a closed pair")  # dropped, no error
    await _turns()
    assert pa.data == []


async def test_abort_drops_the_queue_and_resets_the_other_end() -> None:
    a, pa, _b, pb = _pair()
    a.write(b"never delivered")
    a.abort()
    await _turns()
    assert pb.data == [] and pa.lost == [None]
    assert len(pb.lost) == 1 and isinstance(pb.lost[0], ConnectionResetError)


async def test_buffer_limits_follow_asyncio_defaults() -> None:
    a, _pa, _b, _pb = _pair()
    a.set_write_buffer_limits(high=1000)
    assert a.get_write_buffer_limits() == (250, 1000)
    a.set_write_buffer_limits(low=100)
    assert a.get_write_buffer_limits() == (100, 400)
    with pytest.raises(RuntimeError):
        memlink.pair(asyncio.get_running_loop())[0].get_protocol()
