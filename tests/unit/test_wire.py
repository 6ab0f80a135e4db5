"""broker.ssh.patches.wire: no MSG_IGNORE per packet under AEAD ciphers, still sent under others; the
keyed AES-GCM packet cipher is interchangeable with asyncssh's own.

A real asyncssh server and client on loopback; packets are counted by the sender's sequence
number, which every packet (MSG_IGNORE included) advances by one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, ClassVar

import asyncssh
import pytest
from asyncssh.encryption import GCMEncryption

from broker.ssh import patches
from broker.ssh.patches import datapath, wire
from broker.ssh.patches.gcm import KeyedGCMEncryption
from tests import sshloop

WRITES = 50


class _Writer(asyncssh.SSHServerSession[bytes]):
    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def shell_requested(self) -> bool:
        return True

    def session_started(self) -> None:
        seq0 = self._chan.get_extra_info("connection")._send_seq
        for _ in range(WRITES):
            self._chan.write(b"x" * 100)
        seq1 = self._chan.get_extra_info("connection")._send_seq
        self._chan.write(f"{seq1 - seq0}\n".encode())
        self._chan.exit(0)


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> _Writer:
        return _Writer()


async def _packets_for(cipher: str) -> int:
    async with sshloop.server(_Server, encryption_algs=[cipher], encoding=None) as port, \
            sshloop.connect(port, encryption_algs=[cipher]) as conn:
        out = await asyncio.wait_for(conn.run(encoding=None), 10)
    assert isinstance(out.stdout, bytes)
    assert len(out.stdout) > WRITES * 100, (len(out.stdout), out.exit_status, out.stderr)
    return int(out.stdout[WRITES * 100:].decode())


@pytest.fixture(autouse=True)
def _installed() -> None:
    assert patches.install(stock=False)  # through the version gate
    assert wire.installed()


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
async def test_aead_sends_one_packet_per_write(cipher: str) -> None:
    assert await _packets_for(cipher) == WRITES


async def test_other_ciphers_keep_the_ignore_packet() -> None:
    assert await _packets_for("aes128-ctr") == 2 * WRITES


def _asyncssh_gcm(key: bytes, iv: bytes) -> Any:
    return GCMEncryption.new("aes128-gcm", key, iv)


def test_keyed_gcm_interoperates_with_asyncssh_gcm_packet_by_packet() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    ours_tx, theirs_rx = KeyedGCMEncryption(key, iv), _asyncssh_gcm(key, iv)
    theirs_tx, ours_rx = _asyncssh_gcm(key, iv), KeyedGCMEncryption(key, iv)
    for n in (16, 100, 32768, 5):  # several packets: the nonce counter must advance alike
        header, body = n.to_bytes(4, "big"), os.urandom(n)
        wire_bytes = b"".join(ours_tx.encrypt_packet(0, header, body))  # asyncssh sends a + b
        ct, tag = wire_bytes[:-16], wire_bytes[-16:]
        assert theirs_rx.decrypt_packet(0, ct[:16], ct[16:], 4, tag) == body
        ct2, tag2 = theirs_tx.encrypt_packet(0, header, body)
        assert ct2 + tag2 == wire_bytes  # same key, same counter: same packet on the wire
        assert ours_rx.decrypt_packet(0, ct2[:16], ct2[16:], 4, tag2) == body


def test_keyed_gcm_rejects_a_flipped_bit_and_a_replayed_packet() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    tx, rx = KeyedGCMEncryption(key, iv), KeyedGCMEncryption(key, iv)
    header, body = b"\x00\x00\x00\x20", os.urandom(32)
    sealed = b"".join(tx.encrypt_packet(0, header, body))
    ct, tag = sealed[:-16], sealed[-16:]
    flipped = bytes([ct[20] ^ 1])
    assert rx.decrypt_packet(0, ct[:16], ct[16:20] + flipped + ct[21:], 4, tag) is None
    rx2 = KeyedGCMEncryption(key, iv)
    assert rx2.decrypt_packet(0, ct[:16], ct[16:], 4, tag) == body
    assert rx2.decrypt_packet(0, ct[:16], ct[16:], 4, tag) is None  # next nonce: replay fails


def test_keyed_gcm_counter_wraps_like_asyncssh() -> None:
    key, iv = os.urandom(16), os.urandom(4) + b"\xff" * 8
    ours, theirs = KeyedGCMEncryption(key, iv), _asyncssh_gcm(key, iv)
    for _ in range(2):
        assert b"".join(ours.encrypt_packet(0, b"\0\0\0\x10", b"x" * 16)) == \
            b"".join(theirs.encrypt_packet(0, b"\0\0\0\x10", b"x" * 16))


async def test_relay_ciphers_use_the_keyed_gcm_and_quiet_packet_logs() -> None:
    assert wire.installed()
    assert await _packets_for("aes256-gcm@openssh.com") == WRITES  # negotiates and works


class _Transport:
    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []

    def is_closing(self) -> bool:
        return False

    def writelines(self, packets: list[bytes]) -> None:
        self.calls.append(list(packets))

    def write(self, data: bytes) -> None:
        self.calls.append([data])


class _Conn:
    def __init__(self) -> None:
        self._transport = _Transport()


def test_corked_packets_leave_in_order_in_one_write_per_transport() -> None:
    a, b = _Conn(), _Conn()
    send = wire._send
    with wire.corked():
        send(a, b"1")  # type: ignore[arg-type]
        send(b, b"x")  # type: ignore[arg-type]
        with wire.corked():  # nested scopes: the outer one sends
            send(a, b"2")  # type: ignore[arg-type]
        assert a._transport.calls == [] and b._transport.calls == []
        send(a, b"3")  # type: ignore[arg-type]
    assert a._transport.calls == [[b"1", b"2", b"3"]]
    assert b._transport.calls == [[b"x"]]
    send(a, b"4")  # type: ignore[arg-type]  # not corked: straight through
    assert a._transport.calls[-1] == [b"4"]


def test_saslprep_fast_path_agrees_with_asyncssh_and_delegates_the_rest() -> None:
    from asyncssh.saslprep import SASLPrepError, saslprep

    printable = "".join(chr(c) for c in range(0x20, 0x7F))
    for name in (printable, "alice+web01", "CORP\\alice", "alice@corp.example.com+i-0web01", ""):
        assert wire._saslprep(name) == saslprep(name) == name
    # anything else takes RFC 4013's own path: mapped, normalised or refused
    assert wire._saslprep("al\u00adice") == "alice"  # soft hyphen maps to nothing
    assert wire._saslprep("a\u00a0b") == "a b"  # non-ASCII space maps to space
    assert wire._saslprep("\u2168") == "IX"  # NFKC
    for bad in ("a\x00b", "a\x07b", "a\x7fb", "a\u0627b"):  # controls; RandALCat mixed with L
        with pytest.raises(SASLPrepError):
            wire._saslprep(bad)


class _Names(asyncssh.SSHServer):
    """Accepts one password; records the user names asyncssh hands to the server."""

    names: ClassVar[list[str]] = []

    def begin_auth(self, username: str) -> bool:
        self.names.append(username)
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return password == "pw"

    def session_requested(self) -> _Writer:
        return _Writer()


async def test_a_non_ascii_user_name_still_reaches_the_server_prepared() -> None:
    _Names.names = []
    async with sshloop.server(_Names, encoding=None) as port:
        for sent, seen in (("al\u00adice+web01", "alice+web01"), ("bob", "bob")):
            async with sshloop.connect(port, sent, password="pw",
                                       preferred_auth=["password"]) as conn:
                assert conn.get_extra_info("username") == seen
            assert _Names.names[-1] == seen


class _Counted:
    """A log argument that counts how often it is turned into text (in a list, asyncssh's
    adapter joins the items' text itself; the handlers then only see a string)."""

    def __init__(self) -> None:
        self.calls = 0

    def __str__(self) -> str:
        self.calls += 1
        return "counted"


def test_asyncssh_log_arguments_are_only_formatted_when_the_level_is_on(
        caplog: pytest.LogCaptureFixture) -> None:
    from asyncssh.logging import logger

    arg = _Counted()
    with caplog.at_level(logging.WARNING, logger="asyncssh"):
        logger.info("not shown %s", [arg])
        assert arg.calls == 0
        logger.warning("shown %s", [arg])
    assert arg.calls == 1
    assert [r.getMessage() for r in caplog.records if r.name == "asyncssh"] == ["shown counted"]
    with caplog.at_level(logging.DEBUG, logger="asyncssh"):
        logger.info("now shown %s", [arg])
    assert "now shown counted" in caplog.text


class _Sock:
    def __init__(self, fail: bool = False) -> None:
        self.opts: list[tuple[int, int, int]] = []
        self._fail = fail

    def setsockopt(self, level: int, opt: int, value: int) -> None:
        if self._fail:
            raise OSError(95, "not supported")
        self.opts.append((level, opt, value))


class _QuickConn:
    def __init__(self, sock: _Sock | None) -> None:
        self._transport = self
        self._auth_complete = True  # an established connection: reads are handled at once
        self._sock = sock
        self.received: list[bytes] = []

    def get_extra_info(self, name: str) -> _Sock | None:
        self.asked = getattr(self, "asked", 0) + 1
        return self._sock if name == "socket" else None


def test_small_reads_are_acknowledged_at_once_and_bulk_reads_are_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def _process(conn: _QuickConn, data: bytes) -> None:
        conn.received.append(data)  # the data path's handling comes first

    monkeypatch.setattr(datapath, "receive", _process)
    sock = _Sock()
    conn = _QuickConn(sock)
    wire._data_received(conn, b"x" * 100)  # type: ignore[arg-type]
    wire._data_received(conn, b"y" * (wire.QUICKACK_BELOW - 1))  # type: ignore[arg-type]
    assert sock.opts == [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)] * 2
    wire._data_received(conn, b"z" * wire.QUICKACK_BELOW)  # type: ignore[arg-type]
    assert len(sock.opts) == 2  # bulk: the kernel's delayed ACKs stay
    assert [len(d) for d in conn.received] == [100, wire.QUICKACK_BELOW - 1, wire.QUICKACK_BELOW]
    assert conn.asked == 1  # the socket is looked up once per connection
    # no socket (closed transport) or an option the socket refuses: the data is still handled
    for other in (_QuickConn(None), _QuickConn(_Sock(fail=True))):
        wire._data_received(other, b"k")  # type: ignore[arg-type]
        assert other.received == [b"k"]
