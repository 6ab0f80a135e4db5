"""broker.ssh.patches.datapath: channel data framed, encrypted and opened in one pass.

A real asyncssh server and client on loopback, both with the broker's transport patches: random
data each way (stdout and stderr) must arrive byte-identical, with reads cut at random points
(partial headers and packets), through key re-exchanges in the middle of the stream, and the
one-pass paths must actually have carried the data. Under a cipher the one-pass path does not
handle, asyncssh's own path carries it all. A packet built here opens with asyncssh's own AES-GCM
as exactly the payload asyncssh would have built.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA
from asyncssh.encryption import GCMEncryption

from broker.ssh import patches
from broker.ssh.patches import datapath, wire
from broker.ssh.patches.gcm import KeyedGCMEncryption
from tests import sshloop

SIZE = 3 << 20
REKEY = 512 << 10  # bytes: several key re-exchanges during one transfer


class _Echo(asyncssh.SSHServerSession[bytes]):
    """Echoes stdin to stdout, and its SHA-256 to stderr at EOF."""

    def connection_made(self, chan: Any) -> None:
        self._chan = chan
        self._hash = hashlib.sha256()

    def shell_requested(self) -> bool:
        return True

    def data_received(self, data: bytes, datatype: Any) -> None:
        self._hash.update(data)
        self._chan.write(data)

    def eof_received(self) -> bool:
        self._chan.write(self._hash.hexdigest().encode(), asyncssh.EXTENDED_DATA_STDERR)
        self._chan.exit(0)
        return False


class _Server(asyncssh.SSHServer):
    def __init__(self, seed: int, flip_at: int | None = None) -> None:
        self._rng = random.Random(seed)  # noqa: S311 (test data, not secrets)
        self._flip_at, self._seen = flip_at, 0
        self.lost: list[Exception | None] = []

    def connection_made(self, conn: Any) -> None:
        whole = conn.data_received

        def chopped(data: bytes, datatype: Any = None) -> None:
            if self._flip_at is not None and self._seen <= self._flip_at < self._seen + len(data):
                i = self._flip_at - self._seen  # one bit flipped on the wire
                data = data[:i] + bytes((data[i] ^ 1,)) + data[i + 1:]
            self._seen += len(data)
            while data:  # cut every read at random points: 1 byte to 40 KiB at a time
                n = self._rng.choice((1, 3, 7, 16, 100, 4096, 33000, 40000))
                whole(data[:n])
                data = data[n:]

        conn.data_received = chopped

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> _Echo:
        return _Echo()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class _Counts:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent = self.opened = 0  # bytes sent, packets opened by the one-pass paths
        send, deliver = datapath._send_run, datapath._deliver

        def counted_send(*args: Any) -> int:
            n = send(*args)
            self.sent += n
            return n

        def counted_deliver(conn: Any, plain: bytes) -> bool:
            ok = deliver(conn, plain)
            self.opened += ok
            return ok

        monkeypatch.setattr(datapath, "_send_run", counted_send)
        monkeypatch.setattr(datapath, "_deliver", counted_deliver)


async def _echo_through(cipher: str, seed: int) -> tuple[bytes, bytes, int]:
    payload = os.urandom(SIZE)
    async with sshloop.server(lambda: _Server(seed), encryption_algs=[cipher], encoding=None,
                              rekey_bytes=REKEY) as port, \
            sshloop.connect(port, encryption_algs=[cipher], rekey_bytes=REKEY) as conn:
        enc0 = conn._send_encryption
        if "gcm" in cipher:  # the framing test's stand-in uses the same values
            assert (conn._send_enchdrlen, conn._send_blocksize) == (1, 16)
        proc = await conn.create_process(encoding=None)
        rng, off = random.Random(seed + 1), 0  # noqa: S311 (test data)
        while off < SIZE:
            n = rng.choice((1, 500, 32768, 100000))
            proc.stdin.write(payload[off:off + n])
            off += n
            await proc.stdin.drain()
        proc.stdin.write_eof()
        out = await asyncio.wait_for(proc.stdout.read(), 60)
        err = await asyncio.wait_for(proc.stderr.read(), 60)
        await proc.wait()
        assert conn._send_encryption is not enc0  # keys were re-exchanged
        assert out == payload, (len(out), len(payload))
        return out, err, proc.exit_status


@pytest.fixture(autouse=True)
def _installed() -> None:
    assert patches.install(stock=False)  # through the version gate
    assert wire.installed()  # datapath's patches included


@pytest.mark.parametrize("seed", [1, 2])
async def test_data_arrives_intact_both_ways_through_rekeys(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = _Counts(monkeypatch)
    out, err, status = await _echo_through("aes128-gcm@openssh.com", seed)
    assert err == hashlib.sha256(out).hexdigest().encode()  # stderr: extended data
    assert status == 0
    # both directions went through the one-pass paths (2 x 3 MiB is at least 192 packets of
    # 32 KiB; what is queued during a key exchange takes asyncssh's path)
    assert counts.sent > SIZE and counts.opened > 100, (counts.sent, counts.opened)


async def test_other_ciphers_take_asyncssh_path(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = _Counts(monkeypatch)
    out, err, status = await _echo_through("chacha20-poly1305@openssh.com", 3)
    assert err == hashlib.sha256(out).hexdigest().encode() and status == 0
    assert counts.sent == counts.opened == 0


async def test_a_flipped_bit_ends_the_connection_and_nothing_of_it_is_delivered() -> None:
    srv = _Server(4, flip_at=200_000)  # well after the handshake, inside bulk data
    gcm = ["aes128-gcm@openssh.com"]
    payload = os.urandom(1 << 20)
    async with sshloop.server(lambda: srv, encryption_algs=gcm, encoding=None) as port:
        async with sshloop.connect(port, encryption_algs=gcm) as conn:
            proc = await conn.create_process(encoding=None)
            out = b""
            with contextlib.suppress(asyncssh.Error, ConnectionError):
                proc.stdin.write(payload)
                proc.stdin.write_eof()
                out = await asyncio.wait_for(proc.stdout.read(), 30)
            # the server echoed what it received before the flipped bit, then the connection ended
            assert len(out) < 200_000 and out == payload[:len(out)]
        for _ in range(100):
            if srv.lost:
                break
            await asyncio.sleep(0.05)
        assert len(srv.lost) == 1 and isinstance(srv.lost[0], asyncssh.MACError), srv.lost


class _Chan:
    _send_chan = 7

    def __init__(self, window: int) -> None:
        self._send_window, self._send_pktsize = window, 32768


class _Conn:
    _send_enchdrlen, _send_blocksize = 1, 16  # what asyncssh sets for AES-GCM

    def __init__(self, key: bytes, iv: bytes, rekey_at: int) -> None:
        self._send_seq, self._rekey_bytes_sent, self._rekey_bytes = 0xFFFFFFFE, 0, rekey_at
        self.enc = KeyedGCMEncryption(key, iv)
        self.wire: list[bytes] = []

    def _send_parts(self, parts: list[bytes]) -> None:
        self.wire += [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]


@pytest.mark.parametrize("datatype", [None, asyncssh.EXTENDED_DATA_STDERR])
@pytest.mark.parametrize(("n", "window", "rekey_at", "sent"), [
    (1, 1 << 21, 1 << 40, 1), (11, 1 << 21, 1 << 40, 11), (12, 1 << 21, 1 << 40, 12),
    (3 * 32768 + 5, 1 << 21, 1 << 40, 3 * 32768 + 5),  # split into 32 KiB packets
    (100_000, 50_000, 1 << 40, 50_000),  # stops where the window closes
    (100_000, 1 << 21, 1, 32768),  # stops once a rekey is due (asyncssh's path starts it)
])
def test_packets_are_what_asyncssh_would_build(datatype: int | None, n: int, window: int,
                                               rekey_at: int, sent: int) -> None:
    key, iv = os.urandom(16), os.urandom(12)
    conn, chan, data = _Conn(key, iv, rekey_at), _Chan(window), os.urandom(n)
    assert datapath._send_run(chan, conn, conn.enc, datatype,  # type: ignore[arg-type]
                              memoryview(data)) == sent
    assert chan._send_window == window - sent
    assert conn._send_seq == (0xFFFFFFFE + len(conn.wire)) & 0xFFFFFFFF  # wraps like asyncssh's
    theirs = GCMEncryption.new("aes128-gcm", key, iv)
    total, payload = 0, b""
    for packet in conn.wire:
        header, ct, tag = packet[:4], packet[4:-16], packet[-16:]
        plain = theirs.decrypt_packet(0, header + ct[:12], ct[12:], 4, tag)
        assert plain is not None
        padlen = plain[0]
        assert padlen >= 4 and len(plain) % 16 == 0  # RFC 5647: the length is not encrypted
        assert len(plain) == int.from_bytes(header, "big")
        head = bytes((MSG_CHANNEL_DATA,)) + (7).to_bytes(4, "big")
        if datatype is not None:
            head = bytes((MSG_CHANNEL_EXTENDED_DATA,)) + (7).to_bytes(4, "big") + (1).to_bytes(4, "big")
        body = plain[1:-padlen]
        assert body[:len(head)] == head and len(body) <= len(head) + 4 + 32768
        size = int.from_bytes(body[len(head):len(head) + 4], "big")
        assert body[len(head) + 4:] == data[len(payload):len(payload) + size]
        payload += body[len(head) + 4:]
        total += len(plain)
    assert payload == data[:sent] and conn._rekey_bytes_sent == total


def test_padding_bytes_are_never_reused() -> None:
    pad = datapath._Random()
    taken = [pad(n) for n in [4, 19, 7] * 5000]  # more than one 64 KiB pool
    assert [len(t) for t in taken] == [4, 19, 7] * 5000
    joined = b"".join(taken)
    assert len(set(joined[i:i + 16] for i in range(0, len(joined) - 16, 16))) > 0.99 * len(joined) / 16
