"""How a recorded ProxyJump's inner connection ended decides the jump session's outcome: the
client going away is "closed by client", anything else names the failure."""

from __future__ import annotations

import asyncssh

from broker.domain.outcome import outcome
from broker.ssh.jump import _client_ended


def test_the_client_going_away_is_not_a_failure() -> None:
    assert _client_ended(asyncssh.ConnectionLost("Connection lost"))
    assert _client_ended(asyncssh.DisconnectError(asyncssh.DISC_BY_APPLICATION, "bye"))
    assert _client_ended(ConnectionResetError("reset by peer"))
    assert _client_ended(BrokenPipeError())


def test_anything_else_is_a_failure_with_its_reason() -> None:
    assert not _client_ended(asyncssh.ConnectionLost("Login timeout expired"))
    assert not _client_ended(asyncssh.DisconnectError(asyncssh.DISC_PROTOCOL_ERROR, "bad"))
    assert not _client_ended(asyncssh.KeyExchangeFailed("no matching kex"))
    assert not _client_ended(OSError("disk"))
    assert outcome("ended:inner connection: Login timeout expired", "jump") == (
        "ended: inner connection: Login timeout expired")
    assert outcome("closed", "jump") == "closed by client"
