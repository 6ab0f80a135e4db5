"""Fixtures for the AD identity tests: one real Samba AD DC per session (see tests/ad/samba.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from broker.identity.ldap import ADDirectory
from tests.ad.samba import (  # re-exported: the tests import these from here
    ADMIN_PASSWORD,
    BASE_DN,
    FQDN,
    GROUPS,
    NETBIOS,
    PASSWORD,
    REALM,
    SVC_PASSWORD,
    SVC_USER,
    USERS,
    SambaDC,
    ad_settings,
    preflight,
    running_dc,
)

__all__ = ["ADMIN_PASSWORD", "BASE_DN", "FQDN", "GROUPS", "NETBIOS", "PASSWORD", "REALM",
           "SVC_PASSWORD", "SVC_USER", "USERS", "HangServer", "SambaDC", "ad_settings"]


@pytest.fixture(scope="session")
def samba_dc() -> Iterator[SambaDC]:
    problem = preflight()
    if problem:
        pytest.fail(problem)
    with running_dc() as dc:
        yield dc


@pytest.fixture
async def ad(samba_dc: SambaDC) -> AsyncIterator[ADDirectory]:
    """A fresh ADDirectory on the test DC (its pools and timing samples start empty)."""
    d = ADDirectory(ad_settings(samba_dc))
    yield d
    d.close()


class HangServer:
    """Accepts TCP on 127.0.0.1 and never answers: a DC that is up but hung. Records what arrives."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self.received = bytearray()
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
                c.setblocking(False)
                self._conns.append(c)
            except TimeoutError:
                pass
            except OSError:
                return
            for c in self._conns:
                with contextlib.suppress(OSError):
                    self.received += c.recv(65536)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self._conns:
            c.close()
        self._sock.close()


@pytest.fixture
def hang_server() -> Iterator[HangServer]:
    s = HangServer()
    try:
        yield s
    finally:
        s.close()


