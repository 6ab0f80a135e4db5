"""broker.ssh.patches: the private asyncssh names the patches touch all exist on the installed
asyncssh (an upgrade fails here first); the gate installs every patch on the tested version and
none on any other (one warning, asyncssh's classes untouched); with the gate closed each public
function takes asyncssh's stock path, and the ProxyJump link carries an SSH session either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import asyncssh
import pytest
from asyncssh.channel import SSHChannel
from asyncssh.logging import SSHLogger
from structlog.testing import capture_logs

from broker.ssh import patches
from broker.ssh.patches import private, wire
from broker.ssh.patches.pubkey import on_key_proven
from tests import sshloop


@pytest.fixture(autouse=True)
def _restored() -> Iterator[None]:
    """Each test starts from stock asyncssh; whatever was installed before is put back after."""
    was = patches.active()
    patches.uninstall()
    yield
    patches.uninstall()
    if was:
        assert patches.install(stock=False)


def _stock(snap: dict[tuple[str, str], object]) -> bool:
    """Every replaced name holds asyncssh's own object, and nothing of ours is added."""
    for value in snap.values():
        if isinstance(value, dict):  # a registry (cipher -> (class, ...)) or a dispatch table
            items = [v[0] if isinstance(v, tuple) else v for v in value.values()]
            if any(not getattr(v, "__module__", "asyncssh").startswith("asyncssh")
                   for v in items):
                return False
        elif value is not private._MISSING and not getattr(
                value, "__module__", "").startswith("asyncssh"):
            return False
    return True


def test_asyncssh_is_the_tested_version_and_has_every_private_name() -> None:
    assert asyncssh.__version__ == patches.TESTED_VERSION
    assert private.missing() == []
    assert patches.problems() == []
    keys = [(r.owner, r.name) for r in private.TABLE]
    assert len(keys) == len(set(keys)) and all(r.why for r in private.TABLE)


@pytest.mark.parametrize(("row", "expected"), [
    (private.Private(private.CONN, "_no_such_state", "instance", "test"), "no longer sets"),
    (private.Private(private.CONN, "_no_such_method", "replaced", "test"), "is gone"),
    (private.Private("asyncssh.no_such_module", "x", "read", "test"), "is gone"),
    (private.Private(private.CONN, "_send", "added", "test"), "asyncssh now has"),
    (private.Private(private.CONN, "_transport", "added-instance", "test"), "asyncssh now sets"),
    (private.Private(private.SERVER_CONN, "no_such_keyword", "param", "test"), "takes no"),
])
def test_the_check_reports_what_an_upgrade_would_break(
        monkeypatch: pytest.MonkeyPatch, row: private.Private, expected: str) -> None:
    monkeypatch.setattr(private, "TABLE", (*private.TABLE, row))
    found = private.missing()
    assert len(found) == 1 and expected in found[0] and row.name in found[0], found


def test_another_version_installs_nothing_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    pristine = private.snapshot()
    assert _stock(pristine)
    monkeypatch.setattr(asyncssh, "__version__", "2.99.0")
    with capture_logs() as logs:
        assert patches.install(stock=False) is False
    assert private.snapshot() == pristine
    assert not patches.active() and not wire.installed()
    assert len(logs) == 1, logs
    assert logs[0]["event"] == "asyncssh.patches_disabled"
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["version"] == "2.99.0" and logs[0]["tested"] == patches.TESTED_VERSION
    assert "2.99.0" in logs[0]["reason"]
    assert isinstance(patches.corked(), contextlib.nullcontext)


def test_a_missing_private_name_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    pristine = private.snapshot()
    monkeypatch.delattr(SSHChannel, "_accept_data")
    monkeypatch.delattr(SSHLogger, "_debug_level")
    with capture_logs() as logs:
        assert patches.install(stock=False) is False
    assert private.snapshot() == pristine
    assert len(logs) == 1
    assert "SSHChannel._accept_data" in logs[0]["reason"]
    assert "SSHLogger._debug_level" in logs[0]["reason"]


def test_the_tested_version_installs_every_patch_and_uninstall_restores_them() -> None:
    pristine = private.snapshot()
    with capture_logs() as logs:
        assert patches.install(stock=False) is True
        assert patches.install(stock=False) is True  # idempotent
    assert logs == []
    assert patches.active() and wire.installed()
    installed = private.snapshot()
    assert [k for k in pristine if installed[k] == pristine[k]] == []  # every row changed
    assert not _stock(installed)
    assert not isinstance(patches.corked(), contextlib.nullcontext)
    patches.uninstall()
    assert private.snapshot() == pristine and not wire.installed()


def test_stock_by_argument_or_environment_removes_the_patches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pristine = private.snapshot()
    assert patches.install(stock=False)
    with capture_logs() as logs:
        assert patches.install(stock=True) is False
    assert private.snapshot() == pristine and not patches.active()
    assert [e["event"] for e in logs] == ["asyncssh.patches_disabled"]
    assert "requested" in logs[0]["reason"]
    monkeypatch.setenv(patches.STOCK_ENV, "1")
    assert patches.install() is False
    monkeypatch.setenv(patches.STOCK_ENV, "0")
    assert patches.install() is True


def test_replacing_a_name_the_table_does_not_list_is_refused() -> None:
    with pytest.raises(LookupError):
        private.replace(SSHChannel, "close", lambda self: None)
    assert SSHChannel.close.__module__ == "asyncssh.channel"


# -- public-key hook -----------------------------------------------------------------------------

class _Conn:
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.asked: list[bytes] = []

    async def validate_public_key(self, username: str, key_data: bytes, msg: bytes,
                                  signature: bytes) -> bool:
        self.asked.append(msg)
        return self.answer


async def test_a_proven_key_is_handed_to_the_broker_and_nothing_else_is() -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    seen: list[str] = []

    async def proven(fp: str) -> bool:
        seen.append(fp)
        return False  # e.g. go on with the code

    conn: Any = _Conn(True)
    on_key_proven(conn, proven)
    assert await conn.validate_public_key("u", key.public_data, b"", b"") is True  # a query
    assert await conn.validate_public_key("u", key.public_data, b"signed", b"sig") is False
    assert seen == [key.get_fingerprint("sha256")]
    cert = key.generate_user_certificate(key, "id")
    assert await conn.validate_public_key("u", cert.public_data, b"signed", b"sig") is False
    refused: Any = _Conn(False)
    on_key_proven(refused, proven)
    assert await refused.validate_public_key("u", key.public_data, b"signed", b"sig") is False
    assert seen == [key.get_fingerprint("sha256")]  # neither the certificate nor a refused key


def test_with_the_patches_off_no_key_hook_is_installed() -> None:
    conn: Any = _Conn(True)
    original = conn.validate_public_key

    async def proven(fp: str) -> bool:
        return True

    assert patches.on_key_proven(conn, proven) is False
    assert conn.validate_public_key == original
    assert patches.install(stock=False)
    assert patches.on_key_proven(conn, proven) is True
    assert conn.validate_public_key != original


# -- the ProxyJump link ------------------------------------------------------------------------

class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False


async def _echo(process: asyncssh.SSHServerProcess[bytes]) -> None:
    data = await process.stdin.read()
    process.stdout.write(data)
    process.stderr.write(hashlib.sha256(data).hexdigest().encode())
    process.exit(0)


class _Relay(asyncio.Protocol):
    """Bytes from one transport to another (the tunnel's part between a client and the link)."""

    def __init__(self) -> None:
        self.to: asyncio.Transport | None = None
        self.early = b""

    def data_received(self, data: bytes) -> None:
        if self.to is None:
            self.early += data
        else:
            self.to.write(data)

    def eof_received(self) -> bool:
        if self.to is not None and self.to.can_write_eof():
            self.to.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.to is not None:
            self.to.close()


@pytest.mark.parametrize("stock", [True, False])
async def test_the_link_serves_an_ssh_session_byte_exact(stock: bool) -> None:
    assert patches.install(stock=stock) is not stock
    loop = asyncio.get_running_loop()
    from_link = _Relay()
    link, end = await patches.server_link(from_link)
    sock = link.get_extra_info("socket")
    assert (sock is not None) is stock  # a socketpair only on the stock path
    served: list[asyncssh.SSHServerConnection] = []
    tasks: list[asyncio.Task[None]] = []
    key = asyncssh.generate_private_key("ssh-ed25519")

    async def serve() -> None:
        conn = await end.run_server(server_factory=_Server, server_host_keys=[key],
                                    process_factory=_echo, encoding=None)
        served.append(conn)
        await conn.wait_closed()
        end.close()

    class _Accepted(_Relay):
        """The client's TCP connection: its bytes go to the link, the link's come back."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.to = link
            from_link.to = transport
            if from_link.early:
                transport.write(from_link.early)
            tasks.append(loop.create_task(serve()))

    server = await loop.create_server(_Accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    payload = os.urandom((1 << 20) + 13)
    try:
        async with sshloop.connect(port) as conn:
            result = await asyncio.wait_for(conn.run(input=payload, encoding=None), 30)
        assert result.exit_status == 0
        assert result.stdout == payload
        assert result.stderr == hashlib.sha256(payload).hexdigest().encode()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)  # the server side ended too
        assert len(served) == 1
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("stock", [True, False])
async def test_a_link_closed_before_the_handshake_fails_the_server(stock: bool) -> None:
    patches.install(stock=stock)
    link, end = await patches.server_link(asyncio.Protocol())
    link.close()
    key = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises((OSError, asyncssh.Error)):
        await asyncio.wait_for(end.run_server(server_factory=_Server, server_host_keys=[key]),
                               10)
    end.close()
