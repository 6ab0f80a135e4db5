"""A loopback asyncssh server and client for tests of the broker's asyncssh transport patches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncssh


@asynccontextmanager
async def server(factory: Callable[[], asyncssh.SSHServer], **options: Any) -> AsyncIterator[int]:
    """An asyncssh server on 127.0.0.1 (free port, fresh Ed25519 host key); yields the port."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    srv = await asyncssh.create_server(factory, "127.0.0.1", 0, server_host_keys=[key],
                                       **options)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


def connect(port: int, username: str = "u", **options: Any) -> Any:
    """``asyncssh.connect`` to that server: no host key check, keys, agent or config files."""
    return asyncssh.connect("127.0.0.1", port, known_hosts=None, username=username,
                            client_keys=None, agent_path=None, config=None, **options)
