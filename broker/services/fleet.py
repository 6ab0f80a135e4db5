"""The fleet watch: every bastion beats in the shared store, and the others close the session
rows of one that went silent.

A bastion killed for good (a replaced instance, a lost volume) never repairs its own sessions at
a next start, as a restarted one does (``broker.recordings.repair``): their rows would stay live
in every listing, search and dashboard of the fleet. So each bastion records every
``heartbeat`` seconds that it is alive, and closes the rows still open on a bastion not seen for
``lost_after``: exit status ``lost``, ended at that bastion's last heartbeat, with a synthesized
``session.end`` (reason ``bastion lost``). One conditional row update decides which bastion
audits each; if its audit line fails, the row is opened again for the next round. The recording
stays where it was written, on the lost instance's disk: if that instance starts again, its
repair closes and ships the file and leaves the row as it is.

Names must differ across the fleet (``node_name``, the host name by default); the broker
processes of one host (``[ssh] workers``) beat under one name. A bastion only paused past
``lost_after`` (a frozen VM) finds its sessions' rows closed when it resumes; its own
``session.end`` of each then corrects the row, and the audit has both.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from broker.domain.outcome import LOST
from broker.errors import AuditError, BrokerError
from broker.ports import AuditSink, Bastion, Clock, FleetStore
from broker.services.periodic import Periodic

log = structlog.get_logger("broker.fleet")

BATCH = 500  # stranded sessions closed per round at most (the next round takes the rest)


def state_of(b: Bastion, now: datetime, heartbeat: float, lost_after: float) -> str:
    """``alive``; ``late`` once two heartbeats are missed; ``lost`` once its sessions are
    closed by the others (silent for ``lost_after``)."""
    silent = (now - b.seen_at).total_seconds()
    if silent >= lost_after:
        return "lost"
    return "late" if silent >= 2 * heartbeat else "alive"


def bastion_json(b: Bastion, state: str, now: datetime, this: str) -> dict[str, Any]:
    """One bastion as ``bastions --json`` and ``GET /api/bastions`` show it."""
    return {"name": b.name, "state": state, "seen_at": b.seen_at.astimezone(UTC).isoformat(),
            "silent_s": round(max((now - b.seen_at).total_seconds(), 0.0), 1),
            "started_at": b.started_at.astimezone(UTC).isoformat(),
            "live_sessions": b.live_sessions, "this": b.name == this}


class FleetWatch:
    def __init__(self, store: FleetStore, audit: AuditSink, clock: Clock, name: str, *,
                 heartbeat: Callable[[], float], lost_after: Callable[[], float]) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock
        self.name = name
        self._heartbeat = heartbeat
        self._lost_after = lost_after
        self._started = clock.now()
        self._loop = Periodic(self.tick, heartbeat, failed_event="fleet.heartbeat_failed",
                              errors=(BrokerError,))

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def listing(self) -> list[tuple[Bastion, str]]:
        """Every bastion on the store with its state now (``state_of``)."""
        now = self._clock.now()
        return [(b, state_of(b, now, self._heartbeat(), self._lost_after()))
                for b in await self._store.bastions()]

    async def tick(self) -> int:
        """Beat, then close what silent bastions left open; returns how many were closed."""
        now = self._clock.now()
        await self._store.beat(self.name, now, self._started)
        silent_since = now - timedelta(seconds=self._lost_after())
        closed = 0
        for rec, seen in await self._store.stranded(silent_since, self.name, BATCH):
            ended = max(seen, rec.started_at)
            if not await self._store.close_stranded(rec.id, rec.bastion, ended, LOST):
                continue  # another bastion closed it first (and audits it)
            try:
                self._audit.emit(
                    "session.end", session_id=rec.id, user=rec.user, target=rec.target,
                    exit_status=LOST, reason="bastion lost", bastion=rec.bastion,
                    bastion_seen_at=seen.isoformat(), closed_by=self.name, synthesized=True,
                    bytes_in=rec.bytes_in, bytes_out=rec.bytes_out,
                    duration_s=round((ended - rec.started_at).total_seconds(), 3))
            except AuditError:
                await self._store.reopen_stranded(rec.id, LOST)  # the next round tries again
                raise
            log.warning("session.lost", session_id=rec.id, bastion=rec.bastion,
                        bastion_seen_at=seen.isoformat())
            closed += 1
        return closed
