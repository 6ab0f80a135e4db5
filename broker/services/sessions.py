"""Recorded sessions: open the recording and the index row before any byte flows, close them after.

``start`` fails closed: if the recording or the audit line cannot be written, the session does
not start. ``LiveSession`` is what the relay calls on the hot path; it only appends frames.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import structlog

from broker.domain import recording as fmt
from broker.domain.models import Grant, Instance, Principal
from broker.errors import BrokerError, RecordingError
from broker.ports import (
    AuditSink,
    Clock,
    RecordingSink,
    RecordingWriter,
    SessionIndex,
    SessionRecord,
)
from broker.recordings.local import render_cast

log = structlog.get_logger("broker.sessions")


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """What the client asked for, as the SSH adapter saw it."""

    principal: Principal
    instance: Instance
    grant: Grant
    login: str
    kind: str  # shell | exec | subsystem
    command: str | None
    term_type: str | None
    width: int
    height: int
    peer: str


class _NullWriter:
    """Recording off (benchmark-only switch, refused unless explicitly allowed in config)."""

    location = ""

    def write(self, kind: bytes, data: bytes) -> None:
        return None

    def close(self) -> None:
        return None


class SessionControl(Protocol):
    """What the enforcer may do to a live session (implemented by the SSH relay)."""

    def notify(self, text: str) -> None:
        """Show a line to the user (recorded like any output)."""
        ...

    def terminate(self, reason: str) -> None:
        """End the session now, telling the user why."""
        ...


class LiveSession:
    """One relayed session; counters and the recording writer, nothing asynchronous."""

    def __init__(self, sid: str, req: SessionRequest, writer: RecordingWriter,
                 started_at: datetime) -> None:
        self.id = sid
        self.request = req
        self.writer = writer
        self.started_at = started_at
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        self.deadline = req.grant.expires_at  # moves when the grant is extended
        self.warned = False
        self.control: SessionControl | None = None

    def output(self, data: bytes, stderr: bool) -> None:
        self.writer.write(fmt.ERROR if stderr else fmt.OUTPUT, data)
        self.bytes_out += len(data)

    def input(self, data: bytes) -> None:
        self.writer.write(fmt.INPUT, data)
        self.bytes_in += len(data)

    def resize(self, width: int, height: int) -> None:
        self.writer.write(fmt.RESIZE, f"{width}x{height}".encode())


class SessionService:
    def __init__(
        self,
        sink: RecordingSink,
        index: SessionIndex,
        audit: AuditSink,
        clock: Clock,
        *,
        recording_enabled: bool = True,
        on_recorded: Callable[[LiveSession, datetime, str | None], Awaitable[None]] | None = None,
    ) -> None:
        self._sink = sink
        self._index = index
        self._audit = audit
        self._clock = clock
        self._recording_enabled = recording_enabled
        self._on_recorded = on_recorded  # seals a closed recording (signed manifest), see integrity
        self.live: dict[str, LiveSession] = {}
        self._bg: set[asyncio.Task[None]] = set()

    async def start(self, req: SessionRequest) -> LiveSession:
        sid = str(uuid.uuid4())
        now = self._clock.now()
        meta = {
            "session_id": sid, "user": str(req.principal), "target": req.instance.id,
            "target_name": req.instance.name,
            "address": f"{req.instance.address}:{req.instance.port}",
            "grant_id": req.grant.id, "level": str(req.grant.level), "login": req.login,
            "kind": req.kind, "command": req.command, "term": req.term_type,
            "width": req.width, "height": req.height, "peer": req.peer,
            "started_at": now.isoformat(), "started_at_epoch": int(now.timestamp()),
        }
        writer: RecordingWriter = (
            self._sink.open(sid, meta) if self._recording_enabled else _NullWriter()
        )
        try:
            self._audit.emit(
                "session.start", session_id=sid, user=str(req.principal), target=req.instance.id,
                address=meta["address"], grant_id=req.grant.id, level=str(req.grant.level),
                login=req.login, kind=req.kind, command=req.command, peer=req.peer,
                recorded=self._recording_enabled,
            )
            await self._index.started(SessionRecord(
                id=sid, user=str(req.principal), target=req.instance.id, login=req.login,
                grant_id=req.grant.id, level=str(req.grant.level), kind=req.kind,
                command=req.command, peer=req.peer, started_at=now, ended_at=None,
                exit_status=None, bytes_in=0, bytes_out=0, recording=writer.location,
            ))
        except BaseException:
            writer.close()
            raise
        live = LiveSession(sid, req, writer, now)
        self.live[sid] = live
        log.info("session.start", session_id=sid, user=str(req.principal),
                 target=req.instance.id, kind=req.kind)
        return live

    async def finish(self, live: LiveSession, exit_status: str | None) -> None:
        if live.closed:
            return
        live.closed = True
        self.live.pop(live.id, None)
        now = self._clock.now()
        try:
            if exit_status is not None:
                live.writer.write(fmt.EXIT, exit_status.encode())
        except RecordingError as exc:
            log.error("recording.write_failed", session_id=live.id, error=str(exc))
        finally:
            # close fsyncs: a large recording can take seconds, so keep it off the event loop
            await asyncio.to_thread(live.writer.close)
        if self._on_recorded is not None and live.writer.location:
            await self._on_recorded(live, now, exit_status)
        duration = (now - live.started_at).total_seconds()
        try:
            await self._index.ended(live.id, now, exit_status, live.bytes_in, live.bytes_out)
        except BrokerError as exc:
            log.error("index.write_failed", session_id=live.id, error=str(exc))
        self._audit.emit(
            "session.end", session_id=live.id, user=str(live.request.principal),
            target=live.request.instance.id, exit_status=exit_status, bytes_in=live.bytes_in,
            bytes_out=live.bytes_out, duration_s=round(duration, 3),
        )
        log.info("session.end", session_id=live.id, exit_status=exit_status,
                 bytes_in=live.bytes_in, bytes_out=live.bytes_out)
        if live.request.term_type and live.writer.location:
            # terminal sessions also get an asciicast file, rendered off the relay path
            task = asyncio.create_task(self._render(Path(live.writer.location)))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _render(self, path: Path) -> None:
        try:
            await asyncio.to_thread(render_cast, path)
        except (OSError, ValueError) as exc:
            log.error("recording.render_failed", path=str(path), error=str(exc))

    async def drain(self) -> None:
        """Wait for background renders (at shutdown)."""
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
