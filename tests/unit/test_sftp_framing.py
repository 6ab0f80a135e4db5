"""The SFTP framer: packets split or packed any way give the same result; hostile input never
raises and never makes it buffer more than one bounded packet."""

from __future__ import annotations

import random

from asyncssh.constants import FXP_DATA, FXP_OPEN, FXP_STATUS, FXP_WRITE
from asyncssh.packet import Byte, String, UInt32, UInt64

from broker.sftp.framing import MAX_HANDLE, Framer


def pkt(ptype: int, *fields: bytes) -> bytes:
    body = Byte(ptype) + b"".join(fields)
    return UInt32(len(body)) + body


def write(req_id: int, handle: bytes, offset: int, data: bytes) -> bytes:
    return pkt(FXP_WRITE, UInt32(req_id), String(handle), UInt64(offset), String(data))


class Rec:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.bulk = bytearray()

    def packet(self, ptype: int, body: bytes) -> None:
        self.events.append(("packet", ptype, body))

    def data_start(self, ptype: int, req_id: int, handle: bytes, offset: int, length: int) -> None:
        self.events.append(("start", ptype, req_id, handle, offset, length))

    def data(self, chunk: memoryview) -> None:
        assert isinstance(chunk, memoryview)  # never a copy
        self.bulk += chunk

    def data_end(self) -> None:
        self.events.append(("end", bytes(self.bulk)))
        self.bulk.clear()

    def framing_error(self, reason: str) -> None:
        self.events.append(("error", reason))

    def framing_lost(self, reason: str) -> None:
        self.events.append(("lost", reason))


STREAM = (
    pkt(FXP_OPEN, UInt32(1), String(b"/tmp/f"), UInt32(0x1a), UInt32(0))
    + write(2, b"\0\0\0\1", 0, b"x" * 70000)
    + write(3, b"\0\0\0\1", 70000, b"")
    + pkt(FXP_STATUS, UInt32(4), UInt32(0), String(b"ok"), String(b""))
    + write(5, b"\0\0\0\1", 70000, bytes(range(256)) * 3)
)
EXPECTED = [
    ("packet", FXP_OPEN, UInt32(1) + String(b"/tmp/f") + UInt32(0x1a) + UInt32(0)),
    ("start", FXP_WRITE, 2, b"\0\0\0\1", 0, 70000), ("end", b"x" * 70000),
    ("start", FXP_WRITE, 3, b"\0\0\0\1", 70000, 0), ("end", b""),
    ("packet", FXP_STATUS, UInt32(4) + UInt32(0) + String(b"ok") + String(b"")),
    ("start", FXP_WRITE, 5, b"\0\0\0\1", 70000, 768), ("end", bytes(range(256)) * 3),
]


def feed_in(data: bytes, cuts: list[int], *, client_side: bool = True,
            max_packet: int = 1 << 18) -> tuple[Rec, Framer]:
    rec = Rec()
    f = Framer(rec, client_side=client_side, max_packet=max_packet)
    prev = 0
    for cut in [*cuts, len(data)]:
        f.feed(data[prev:cut])
        prev = cut
    return rec, f


def test_whole_stream_in_one_chunk() -> None:
    rec, f = feed_in(STREAM, [])
    assert rec.events == EXPECTED
    assert f.buffered == 0


def test_split_at_every_byte_gives_the_same_packets() -> None:
    rec, _ = feed_in(STREAM, list(range(1, len(STREAM))))
    assert rec.events == EXPECTED


def test_random_splits_give_the_same_packets() -> None:
    rng = random.Random(7)  # noqa: S311 - reproducible test data
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 40)))
        rec, _ = feed_in(STREAM, cuts)
        assert rec.events == EXPECTED


def test_bulk_data_is_streamed_not_buffered() -> None:
    rec = Rec()
    f = Framer(rec, client_side=True)
    big = write(9, b"h", 0, b"y" * 1_000_000)
    for i in range(0, len(big), 32768):
        f.feed(big[i:i + 32768])
        assert f.buffered <= 25 + 1
    assert rec.events == [("start", FXP_WRITE, 9, b"h", 0, 1_000_000), ("end", b"y" * 1_000_000)]


def test_data_responses_are_bulk_on_the_target_side() -> None:
    stream = pkt(FXP_DATA, UInt32(7), String(b"abc")) + pkt(FXP_DATA, UInt32(8), String(b""))
    rec, _ = feed_in(stream, [3, 10], client_side=False)
    assert rec.events == [("start", FXP_DATA, 7, b"", 0, 3), ("end", b"abc"),
                          ("start", FXP_DATA, 8, b"", 0, 0), ("end", b"")]
    # on the client side a DATA packet is just a (small) packet
    rec, _ = feed_in(stream, [], client_side=True)
    assert [e[0] for e in rec.events] == ["packet", "packet"]


def test_oversized_packet_is_skipped_without_buffering_and_parsing_goes_on() -> None:
    huge = pkt(FXP_OPEN, UInt32(1), String(b"p" * 5000))
    rec, f = feed_in(huge + STREAM, list(range(100, len(huge), 100)), max_packet=1000)
    assert rec.events[0][0] == "error"
    assert rec.events[1:] == EXPECTED
    assert f.buffered == 0


def test_inconsistent_bulk_lengths_skip_that_packet_only() -> None:
    bad_data = pkt(FXP_DATA, UInt32(7), UInt32(99), b"abc")  # says 99, has 3
    good = pkt(FXP_DATA, UInt32(8), String(b"ok"))
    rec, _ = feed_in(bad_data + good, [], client_side=False)
    assert rec.events == [("error", "DATA length mismatch"), ("start", FXP_DATA, 8, b"", 0, 2),
                          ("end", b"ok")]
    bad_handle = pkt(FXP_WRITE, UInt32(1), UInt32(MAX_HANDLE + 1), b"h" * (MAX_HANDLE + 1),
                     UInt64(0), String(b"d"))
    short = pkt(FXP_WRITE, UInt32(1))
    rec, _ = feed_in(bad_handle + short + STREAM, [])
    assert [e[0] for e in rec.events[:2]] == ["error", "error"]
    assert rec.events[2:] == EXPECTED


def test_zero_length_loses_framing_once_and_ignores_the_rest() -> None:
    rec, f = feed_in(UInt32(0) + b"\x01" + STREAM, [2])
    assert rec.events == [("lost", "packet length 0")]
    assert f.lost
    f.feed(STREAM)
    assert rec.events == [("lost", "packet length 0")]


def test_random_bytes_never_raise_and_buffering_stays_bounded() -> None:
    rng = random.Random(1234)  # noqa: S311 - reproducible test data
    for client_side in (True, False):
        for _ in range(300):
            rec = Rec()
            f = Framer(rec, client_side=client_side, max_packet=4096)
            for _ in range(rng.randint(1, 20)):
                f.feed(rng.randbytes(rng.randint(0, 300)))
                assert f.buffered <= 4096 + 4


def test_mutated_valid_streams_never_raise() -> None:
    rng = random.Random(99)  # noqa: S311 - reproducible test data
    for _ in range(300):
        data = bytearray(STREAM)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cuts = sorted(rng.sample(range(1, len(data)), 5))
        _, f = feed_in(bytes(data), cuts, max_packet=4096)
        assert f.buffered <= 4096 + 4
