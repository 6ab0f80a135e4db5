"""Channel data in one pass each way: SSH packets built and encrypted straight from the bytes the
relay hands over, and opened straight from the bytes the socket delivered.

asyncssh builds a CHANNEL_DATA packet in layers, each concatenating what the one above made:
the channel copies the data into its send buffer, slices a packet's worth off, prefixes the
length (``String``), the channel number, the message type, then the padding length and padding,
then the cipher's output is joined to the length header: about seven Python calls and copies
per 32 KiB packet before the socket sees it (the calls cost more than the copies). Here, once the
connection is in its steady state (AES-GCM keyed by ``KeyedGCMEncryption``, no compression,
key exchange and authentication complete, no rekey due), the plaintext packet is assembled with
one copy of the data, encrypted once, and a run of packets from one write is handed to the
transport as one list of headers and ciphertexts (``writelines``: no concatenation). Data the
window does not admit yet is buffered as asyncssh does. Anything else (other ciphers,
compression, a key exchange in progress or due, closing channels, encoded channels) takes
asyncssh's own path unchanged, which also starts the rekey.

Receiving is the mirror image: asyncssh appends every read to its input buffer and re-slices that
buffer twice per packet (so a 256 KiB read of eight packets copies most of itself sixteen times),
then slices the packet, joins it for the cipher, strips the padding and slices the data out. Here
a read that starts on a packet boundary is walked in place: each CHANNEL_DATA packet is opened
from a view of the read and its data (one slice of the plaintext) handed to the channel after
the same checks asyncssh makes (channel open, window not exceeded, lengths consistent). The first
packet that is anything else (or fails any check, or its tag) is handed back, with the rest of
the read, to asyncssh's parser, which handles it as it always does, errors included; an
incomplete packet at the end waits in asyncssh's input buffer for the next read.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any

from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA
from asyncssh.logging import SSHLogger
from asyncssh.misc import DisconnectError

from broker.ssh.patches.gcm import KeyedGCMEncryption
from broker.ssh.patches.private import replace

_original_write = SSHChannel.write
_original_flush = SSHChannel._flush_send_buf
_asyncssh_data_received = SSHConnection.data_received
_HEAD_DATA = struct.Struct(">BBII").pack  # padding length, type, channel, data length
_HEAD_EXTENDED = struct.Struct(">BBIII").pack  # ... channel, data type, data length
TAG = 16  # AES-GCM tag; the length header is authenticated, not encrypted (RFC 5647)


def _steady(conn: Any) -> KeyedGCMEncryption | None:
    """The connection's cipher if a data packet may skip asyncssh's general path now."""
    enc = conn._send_encryption
    if (type(enc) is not KeyedGCMEncryption or conn._compressor is not None
            or not conn._kex_complete or not conn._auth_complete
            or conn._rekey_bytes_sent >= conn._rekey_bytes
            or (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
            or SSHLogger._debug_level >= 3 or conn._transport is None):
        return None
    return enc


class _Random:
    """Random padding bytes, fetched from the OS 64 KiB at a time (one system call per ~3,000
    packets instead of one per packet); each byte is used once."""

    def __init__(self) -> None:
        self._pool, self._pos = b"", 0

    def __call__(self, n: int) -> bytes:
        if self._pos + n > len(self._pool):
            self._pool, self._pos = os.urandom(65536), 0
        self._pos += n
        return self._pool[self._pos - n:self._pos]


_padding = _Random()


def _send_run(chan: SSHChannel[Any], conn: Any, enc: KeyedGCMEncryption,
              datatype: int | None, view: memoryview) -> int:
    """CHANNEL_DATA (or CHANNEL_EXTENDED_DATA) packets from ``view``, as many as the window and
    the rekey limit admit, framed as asyncssh would (RFC 4253 section 6: length, padding
    length, payload, random padding; RFC 4254 section 5.2) and handed to the transport
    together. Returns how many bytes of ``view`` were sent."""
    pack: Any
    prefix: tuple[int | None, ...]
    if datatype is None:
        head_len, pack, prefix = 9, _HEAD_DATA, (MSG_CHANNEL_DATA, chan._send_chan)
    else:
        head_len, pack = 13, _HEAD_EXTENDED
        prefix = (MSG_CHANNEL_EXTENDED_DATA, chan._send_chan, datatype)
    enchdr, block, pktsize = conn._send_enchdrlen, conn._send_blocksize, chan._send_pktsize
    total, off, window = len(view), 0, chan._send_window
    seq, sent_bytes, rekey_at = conn._send_seq, conn._rekey_bytes_sent, conn._rekey_bytes
    seal, parts = enc.seal, list[bytes]()
    while off < total and window and sent_bytes < rekey_at:
        n = min(total - off, window, pktsize)
        padlen = -(enchdr + head_len + n) % block
        if padlen < 4:
            padlen += block
        pktlen = 1 + head_len + n + padlen
        hdr = pktlen.to_bytes(4, "big")
        # one copy of the data, and no zero-filled buffer first (bytearray(n) would memset it)
        plain = b"".join((pack(padlen, *prefix, n), view[off:off + n], _padding(padlen)))
        parts += (hdr, seal(plain, hdr))
        off += n
        window -= n
        seq += 1
        sent_bytes += pktlen
    chan._send_window = window
    conn._send_seq = seq & 0xFFFFFFFF
    conn._rekey_bytes_sent = sent_bytes
    if parts:
        conn._send_parts(parts)
    return off


def _flush_send_buf(self: SSHChannel[Any]) -> None:
    conn: Any = self._conn
    enc = _steady(conn) if conn is not None and self._send_chan is not None else None
    if enc is None:
        _original_flush(self)
        return
    while self._send_buf and self._send_window and conn._rekey_bytes_sent < conn._rekey_bytes:
        buf, datatype = self._send_buf[0]
        with memoryview(buf) as view:
            n = _send_run(self, conn, enc, datatype, view)
        if n == len(buf):
            del self._send_buf[0]
        else:
            del buf[:n]
        self._send_buf_len -= n
    _original_flush(self)  # pause/resume, a pending EOF or close; sends only if a rekey is due


def _write(self: SSHChannel[Any], data: Any, datatype: int | None = None) -> None:
    """Send straight from the caller's bytes while the window allows (asyncssh first copies
    everything into its send buffer); only what the window does not admit yet is buffered."""
    conn = self._conn
    if (self._send_buf or self._encoding or self._send_state != "open" or not data
            or (datatype is not None and datatype not in self._write_datatypes)
            or not self._send_window or conn is None or self._send_chan is None):
        _original_write(self, data, datatype)
        return
    enc = _steady(conn)
    if enc is None:
        _original_write(self, data, datatype)
        return
    with memoryview(data) as view:
        off = _send_run(self, conn, enc, datatype, view)
        if off == len(view):
            self._pause_resume_writing()
            return
        self._send_buf.append((bytearray(view[off:]), datatype))
        self._send_buf_len += len(view) - off
    self._flush_send_buf()  # the window is closed, or asyncssh's path starts the due rekey


def _deliver(conn: Any, plain: bytes) -> bool:
    """Hand one opened CHANNEL_DATA packet's data to its channel; False (nothing done) for any
    other packet or anything asyncssh would refuse, so that asyncssh handles it."""
    n, padlen = len(plain), plain[0]
    if n < 10 or plain[1] != MSG_CHANNEL_DATA or padlen < 4:
        return False
    chan = conn._channels.get(int.from_bytes(plain[2:6], "big"))
    datalen = int.from_bytes(plain[6:10], "big")
    if (chan is None or 10 + datalen + padlen != n or chan._recv_state != "open"
            or datalen > chan._recv_window):
        return False
    conn._auth_final = True
    chan._accept_data(plain[10:10 + datalen])
    return True


def _walk(conn: Any, dec: KeyedGCMEncryption, buf: bytes, off: int) -> tuple[int, bool]:
    """Open and deliver the whole CHANNEL_DATA packets in ``buf`` from ``off``: (where the first
    packet not taken starts, whether it goes back to asyncssh rather than waiting for more)."""
    total = len(buf)
    with memoryview(buf) as view:
        while total - off >= 4 and conn._transport is not None:
            pktlen = int.from_bytes(view[off:off + 4], "big")
            end = off + 4 + pktlen + TAG
            if pktlen > conn._max_recv_pktlen:
                return off, True  # asyncssh refuses it
            if end > total:
                break
            plain = dec.open(view[off:off + 4], view[off + 4:end])
            if plain is None or not _deliver(conn, plain):
                dec.rewind()
                return off, True
            conn._recv_seq = (conn._recv_seq + 1) & 0xFFFFFFFF
            off = end
    return off, False


def _completing(conn: Any, pending: bytes, data: bytes) -> int | None:
    """How many bytes of ``data`` complete the packet that ``pending`` (the end of the last
    read) begins: None if this read does not, -1 if its length is one asyncssh refuses."""
    head = (pending + data[:4])[:4]
    if len(head) < 4:
        return None
    pktlen = int.from_bytes(head, "big")
    if pktlen > conn._max_recv_pktlen:
        return -1
    need = 4 + pktlen + TAG - len(pending)
    return need if need <= len(data) else None


def receive(conn: Any, data: bytes) -> None:
    """``SSHConnection.data_received`` for one read (installed by ``wire``, which adds ACKs)."""
    dec = conn._recv_encryption
    if (type(dec) is not KeyedGCMEncryption or conn._decompressor is not None
            or conn._recv_handler != conn._recv_pkthdr or not conn._auth_complete
            or SSHLogger._debug_level >= 3 or conn._transport is None):
        _asyncssh_data_received(conn, data)
        return
    conn._reset_keepalive_timer()
    try:
        pending, start = conn._inpbuf, 0
        if pending:  # the last read ended inside a packet: join only that packet
            need = _completing(conn, pending, data)
            if need is None:  # still incomplete
                conn._inpbuf = pending + data
                return
            if need <= 0:  # a length asyncssh refuses (or a whole packet was already waiting)
                conn._inpbuf = pending + data
                conn._recv_data()
                return
            first = pending + data[:need]
            taken, handed_back = _walk(conn, dec, first, 0)
            if handed_back or taken < len(first):  # asyncssh's turn, or the connection closed
                conn._inpbuf = first[taken:] + data[need:]
                if handed_back:
                    conn._recv_data()
                return
            start = need
        off, handed_back = _walk(conn, dec, data, start)
        conn._inpbuf = data[off:] if off else data
    except DisconnectError as exc:  # as asyncssh's parser handles errors from a handler
        conn._send_disconnect(exc.code, exc.reason, exc.lang)
        conn._force_close(exc)
        return
    except Exception:
        conn.internal_error()
        return
    if handed_back:
        conn._recv_data()


def install() -> None:
    """Idempotent; called by ``wire.install()``, which also routes reads to ``receive`` and
    provides ``_send_parts``."""
    replace(SSHChannel, "write", _write)
    replace(SSHChannel, "_flush_send_buf", _flush_send_buf)


def installed() -> bool:
    return SSHChannel.write is _write and SSHChannel._flush_send_buf is _flush_send_buf
