"""How a session ended, in words: the ``status`` column of ``sessions list`` and ``outcome`` in
``session.end``, from the exit status the index and the audit log keep.

Every ended session has one: ``exit N`` (the command's exit code), ``signal NAME``, ``closed by
client`` (the client closed the channel before the target reported an exit), ``ended: REASON``
(the broker ended it: grant revoked, idle, shutdown, a crash repaired as ``interrupted``; or the
target closed without an exit status). ``status_of`` sorts them for filters: live, ok, failed.
"""

from __future__ import annotations

# the exit status of a session the client closed first (a tunnel's "either side closed")
CLOSED = "closed"
# the exit status of a session whose target closed the channel without an exit status
NO_EXIT_STATUS = "ended:no exit status"
# the exit status another bastion gives the open sessions of one that went silent
# (``broker.services.fleet``)
LOST = "lost"


def outcome(exit_status: str | None, kind: str = "shell", *, ended: bool = True) -> str:
    """The outcome of a session in words (``live`` while it runs)."""
    if not ended:
        return "live"
    if exit_status is None:
        return "ended: no exit status"  # rows written before outcomes were recorded
    if exit_status.isdigit():
        return f"exit {exit_status}"
    if exit_status.startswith("signal:"):
        return f"signal {exit_status.removeprefix('signal:')}"
    if exit_status == CLOSED:
        return "closed" if kind == "tunnel" else "closed by client"
    if exit_status == "interrupted":
        return "ended: interrupted (the broker stopped without closing it)"
    if exit_status == LOST:
        return "ended: lost (its bastion went silent)"
    for prefix in ("terminated:", "ended:"):
        if exit_status.startswith(prefix):
            return f"ended: {exit_status.removeprefix(prefix)}"
    return f"ended: {exit_status}"


def status_of(exit_status: str | None, *, ended: bool = True) -> str:
    """The session's class for filters (``SessionQuery.status``): ``live`` while it runs, ``ok``
    when it ended well (exit 0, or closed by the client), else ``failed``."""
    if not ended:
        return "live"
    return "ok" if exit_status in ("0", CLOSED) else "failed"
