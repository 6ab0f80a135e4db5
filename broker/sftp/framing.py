"""Incremental SFTP packet framing for one direction of a channel.

SFTP packets (``uint32 length, byte type, payload``) arrive split across SSH data chunks or packed
several to a chunk. Small packets are buffered whole (bounded by ``max_packet``); the bulk data
of WRITE requests and DATA responses is never buffered or copied: its head (id, handle, offset,
length) is decoded and the data itself is handed on as zero-copy ``memoryview`` slices, so a
large transfer costs a slice and a hash update per chunk. Hostile input cannot make it buffer
more than ``max_packet`` bytes or raise: an inconsistent packet is skipped by its outer length;
an impossible outer length stops parsing for the rest of the channel (framing is lost) and is
reported once.
"""

from __future__ import annotations

from typing import Protocol

from asyncssh.constants import FXP_DATA, FXP_WRITE

MAX_PACKET = 256 * 1024 + 1024  # OpenSSH's sftp-server refuses larger packets too
MAX_HANDLE = 256  # OpenSSH handles are 4 bytes; RFC 4253 caps them at 256

_HEAD, _STREAM, _SKIP, _DEAD = range(4)


class FrameSink(Protocol):
    def packet(self, ptype: int, body: bytes) -> None:
        """A whole packet other than bulk data; ``body`` starts after the type byte."""

    def data_start(self, ptype: int, req_id: int, handle: bytes, offset: int, length: int) -> None:
        """Head of a WRITE request (``handle``, ``offset``) or DATA response (``b""``, 0)."""

    def data(self, chunk: memoryview) -> None:
        """Part of the bulk data announced by the last ``data_start``."""

    def data_end(self) -> None:
        """All bulk data of the packet was seen."""

    def framing_error(self, reason: str) -> None:
        """A packet was skipped (``reason``); parsing continues with the next one."""

    def framing_lost(self, reason: str) -> None:
        """Framing is lost: nothing more is parsed on this direction."""


class Framer:
    """Splits one direction's byte stream into SFTP packets for a :class:`FrameSink`."""

    __slots__ = ("_bulk", "_head", "_left", "_mode", "_need", "_sink", "max_packet")

    def __init__(self, sink: FrameSink, *, client_side: bool, max_packet: int = MAX_PACKET) -> None:
        self._sink = sink
        self._bulk = FXP_WRITE if client_side else FXP_DATA
        self.max_packet = max_packet
        self._head = bytearray()
        self._need = 5
        self._left = 0
        self._mode = _HEAD

    @property
    def lost(self) -> bool:
        return self._mode == _DEAD

    @property
    def buffered(self) -> int:
        """Bytes held for the packet being assembled (at most ``max_packet`` + 4)."""
        return len(self._head)

    def feed(self, data: bytes) -> None:
        mode = self._mode
        if mode == _DEAD:
            return
        end = len(data)
        if mode == _STREAM and self._left > end:  # the common case of a large transfer
            self._left -= end
            self._sink.data(memoryview(data))
            return
        view = memoryview(data)
        pos = 0
        while pos < end and self._mode != _DEAD:
            mode = self._mode
            if mode == _HEAD:
                head = self._head
                if not head and end - pos >= 13 and data[pos + 4] == self._bulk:
                    used = self._bulk_in_place(data, pos, end)
                    if used:
                        pos += used
                        continue
                take = min(self._need - len(head), end - pos)
                head += view[pos:pos + take]
                pos += take
                if len(head) == self._need:
                    self._parse_head()
            else:
                take = min(self._left, end - pos)
                self._left -= take
                if mode == _STREAM:
                    self._sink.data(view[pos:pos + take])
                pos += take
                if self._left == 0:
                    if mode == _STREAM:
                        self._sink.data_end()
                    self._reset()

    def _reset(self) -> None:
        self._head.clear()
        self._need = 5
        self._mode = _HEAD

    def _skip(self, reason: str) -> None:
        """Drop the rest of the current packet by its outer length."""
        head = self._head
        length = int.from_bytes(head[0:4], "big")
        self._left = length + 4 - len(head)
        self._sink.framing_error(reason)
        if self._left == 0:
            self._reset()
        else:
            self._mode = _SKIP

    def _parse_head(self) -> None:
        head = self._head
        length = int.from_bytes(head[0:4], "big")
        if length < 1:
            self._mode = _DEAD
            self._sink.framing_lost(f"packet length {length}")
            return
        ptype = head[4]
        have = len(head)
        if ptype != self._bulk:
            if have == 5 and length > self.max_packet:
                self._skip(f"packet of type {ptype} is {length} bytes")
            elif have == 5:
                self._need = length + 4
                if self._need == have:
                    self._deliver(ptype)
            else:
                self._deliver(ptype)
            return
        # bulk: DATA = id, uint32 n, data[n]; WRITE = id, string handle, uint64 offset, uint32 n, data
        if have == 5:
            self._need = 13
            if length < 9:
                self._skip("bulk packet too short")
            return
        req_id = int.from_bytes(head[5:9], "big")
        if ptype == FXP_DATA:
            count = int.from_bytes(head[9:13], "big")
            handle, offset = b"", 0
            if count != length - 9:
                self._skip("DATA length mismatch")
                return
        else:
            hlen = int.from_bytes(head[9:13], "big")
            if have == 13:
                if hlen > MAX_HANDLE or 21 + hlen > length:
                    self._skip("WRITE handle length")
                else:
                    self._need = 25 + hlen
                return
            handle = bytes(head[13:13 + hlen])
            offset = int.from_bytes(head[13 + hlen:21 + hlen], "big")
            count = int.from_bytes(head[21 + hlen:25 + hlen], "big")
            if count != length - 21 - hlen:
                self._skip("WRITE length mismatch")
                return
        self._sink.data_start(ptype, req_id, handle, offset, count)
        if count == 0:
            self._sink.data_end()
            self._reset()
        else:
            self._left = count
            self._mode = _STREAM

    def _bulk_in_place(self, data: bytes, pos: int, end: int) -> int:
        """The head of a bulk packet lying wholly in this chunk (the common case), parsed where it
        is; returns its size, or 0 to leave it (and any error report) to the general path."""
        length = int.from_bytes(data[pos:pos + 4], "big")
        if self._bulk == FXP_DATA:
            size = 13
            count = int.from_bytes(data[pos + 9:pos + 13], "big")
            if count != length - 9:
                return 0
            handle, offset = b"", 0
        else:
            hlen = int.from_bytes(data[pos + 9:pos + 13], "big")
            size = 25 + hlen
            if hlen > MAX_HANDLE or end - pos < size:
                return 0
            count = int.from_bytes(data[pos + 21 + hlen:pos + size], "big")
            if count != length - 21 - hlen:
                return 0
            handle = data[pos + 13:pos + 13 + hlen]
            offset = int.from_bytes(data[pos + 13 + hlen:pos + 21 + hlen], "big")
        self._sink.data_start(self._bulk, int.from_bytes(data[pos + 5:pos + 9], "big"), handle,
                              offset, count)
        if count == 0:
            self._sink.data_end()
        else:
            self._left = count
            self._mode = _STREAM
        return size

    def _deliver(self, ptype: int) -> None:
        body = bytes(self._head[5:])
        self._reset()
        self._sink.packet(ptype, body)
