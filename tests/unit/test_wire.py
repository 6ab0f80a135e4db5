"""broker.ssh.wire: no MSG_IGNORE per packet under AEAD ciphers, still sent under others.

A real asyncssh server and client on loopback; packets are counted by the sender's sequence
number, which every packet (MSG_IGNORE included) advances by one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh
import pytest

from broker.ssh import wire

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
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        _Server, "127.0.0.1", 0, server_host_keys=[key], encryption_algs=[cipher], encoding=None,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u",
                                    encryption_algs=[cipher], client_keys=None,
                                    agent_path=None, config=None) as conn:
            out = await asyncio.wait_for(conn.run(encoding=None), 10)
        assert isinstance(out.stdout, bytes)
        assert len(out.stdout) > WRITES * 100, (len(out.stdout), out.exit_status, out.stderr)
        return int(out.stdout[WRITES * 100:].decode())
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(autouse=True)
def _installed() -> None:
    wire.install()
    assert wire.installed()


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
async def test_aead_sends_one_packet_per_write(cipher: str) -> None:
    assert await _packets_for(cipher) == WRITES


async def test_other_ciphers_keep_the_ignore_packet() -> None:
    assert await _packets_for("aes128-ctr") == 2 * WRITES
