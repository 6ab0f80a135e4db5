"""Every ended session has an outcome in words."""

from __future__ import annotations

from broker.domain.outcome import CLOSED, NO_EXIT_STATUS, outcome


def test_outcomes() -> None:
    assert outcome("0") == "exit 0" and outcome("127", "exec") == "exit 127"
    assert outcome("signal:KILL") == "signal KILL"
    assert outcome(CLOSED, "exec") == "closed by client"
    assert outcome(CLOSED, "tunnel") == "closed"
    assert outcome("terminated:grant revoked") == "ended: grant revoked"
    assert outcome(NO_EXIT_STATUS) == "ended: no exit status"
    assert outcome("interrupted").startswith("ended: interrupted")
    assert outcome("cut:not rdp", "tunnel") == "ended: cut:not rdp"
    assert outcome(None) == "ended: no exit status"
    assert outcome(None, ended=False) == "live"
