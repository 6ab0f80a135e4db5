"""Recorded sessions: open the recording and the index row before any byte flows, close them after.

``start`` fails closed: if the recording or the audit line cannot be written, or the recordings
disk is below its free-space threshold, the session does not start. ``LiveSession`` is what the
relay calls on the hot path; it only appends frames.

Off the hot path, one task per broker flushes every live recording to disk at least every
``sync_interval`` seconds (in a thread) and watches free space: below the critical threshold live
sessions end (policy ``strict``) or continue unrecorded with an audit event (``best-effort``).
``shutdown`` drains live sessions on SIGTERM within a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import structlog

from broker.domain import recording as fmt
from broker.domain.echo import EchoTracker, Piece
from broker.domain.models import Grant, Instance, Principal
from broker.domain.outcome import NO_EXIT_STATUS, outcome
from broker.errors import AuditError, BrokerError, RecordingDiskFull, RecordingError
from broker.ports import (
    AuditSink,
    Clock,
    DiskLevel,
    DiskSpace,
    FrameWriter,
    Metrics,
    NullMetrics,
    RecordingSink,
    RecordingWriter,
    SessionIndex,
    SessionRecord,
)
from broker.services.notify import Notifier
from broker.services.recording_pipeline import INLINE_MAX, RecordingPipeline, ReleaseScope

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
    # the pty-req size as the client sent it (cols, rows, pixels), when it was out of range
    # and ``width``/``height`` are clamped (see ``broker.domain.terminal``): audited as sent
    requested_size: tuple[int, int, int, int] | None = None
    parent_id: str | None = None  # the jump connection (a live ``jump`` session) carrying it


class _NullWriter:
    """Recording off (benchmark-only switch, refused unless explicitly allowed in config)."""

    location = ""

    def write(self, kind: bytes, data: bytes) -> None:
        return None

    def close(self) -> None:
        return None


class ShuttingDown(BrokerError):
    """A session asked for while the broker drains (SIGTERM)."""

    user_message = "the bastion is shutting down; try again in a moment"


class SessionControl(Protocol):
    """What the enforcer may do to a live session (implemented by the SSH relay)."""

    def notify(self, text: str) -> None:
        """Show a line to the user (recorded like any output)."""
        ...

    def terminate(self, reason: str) -> None:
        """End the session now, telling the user why."""
        ...


WriteErrorHandler = Callable[["LiveSession", RecordingError], None]

# input typed in a terminal that shows no echo within this long is withheld from the recording
# (``broker.domain.echo``): an echo takes a round trip to the target, milliseconds
ECHO_TIMEOUT_S = 2.0


class WithheldInput(Protocol):
    """Where the bytes of withheld input go besides the recording's marker ([recordings] input =
    "sealed": encrypted to the break-glass key, ``broker.recordings.sealed``)."""

    def add(self, t_us: int, data: bytes) -> None: ...

    def close(self) -> None: ...


def _noop() -> None:
    return None


class LiveSession:
    """One relayed session; counters and the recording writer, nothing asynchronous."""

    def __init__(self, sid: str, req: SessionRequest, writer: RecordingWriter,
                 started_at: datetime, on_write_error: WriteErrorHandler | None = None,
                 release_scope: ReleaseScope = contextlib.nullcontext, *,
                 monotonic: Callable[[], float] = time.monotonic,
                 withheld: WithheldInput | None = None) -> None:
        self.id = sid
        self.request = req
        self.writer = writer
        self.started_at = started_at
        self.bytes_in = 0
        self.bytes_out = 0
        # a byte either way, for the idle timeout: stamped and read (``idle_seconds``) on one
        # clock, the service's (``Clock.monotonic``)
        self._monotonic = monotonic
        self.last_activity = monotonic()
        self.closed = False
        self.deadline = req.grant.expires_at  # moves when the grant is extended
        self.warned = False
        self.control: SessionControl | None = None
        # why recording stopped while the session goes on (policy best-effort only), else None
        self.recording_suspended: str | None = None
        self.ending: str | None = None  # why the broker is ending it (disk, shutdown), once
        self._on_write_error = on_write_error
        # a batched write failed after ``record`` returned: the relay ends the session (set by
        # the relay; policy strict)
        self.on_recording_failed: Callable[[RecordingError], None] | None = None
        self._pipe: RecordingPipeline | None = None
        self._now_us: Callable[[], int] | None = None
        if isinstance(writer, FrameWriter):
            self._pipe = RecordingPipeline(writer, on_error=self._batch_failed,
                                           release_scope=release_scope)
            self._now_us = writer.now_us
        # Input is recorded as typed only where the target echoed it (a secret at a no-echo
        # prompt never is): in a terminal the tracker decides; without one nothing is echoed,
        # so every input frame becomes a marker with its length (broker.domain.echo)
        self._echo = EchoTracker() if req.term_type is not None else None
        self.withheld = withheld  # sealed mode: the withheld bytes, encrypted, beside the file

    # -- the relay's path: recorded, then relayed -------------------------------------------
    def record(self, kind: bytes, data: bytes, action: Callable[[], None],
               t_us: int | None = None, relayed: int = 0) -> None:
        """Record a frame (stamped now, or at ``t_us``), then run ``action`` (relay its bytes,
        ``relayed`` of them if more than the frame holds) once it is in the file.

        Raises ``RecordingError`` (nothing recorded, ``action`` not run) when policy strict ends
        the session; under best-effort a failure suspends recording and ``action`` still runs.
        """
        pipe = self._pipe
        if self.recording_suspended is not None or pipe is None or self.writer is not pipe.writer:
            self._record(kind, data)
            self.then(action)  # behind frames still queued, if recording stopped or moved
            return
        try:
            pipe.record(kind, data, action, t_us, relayed)
        except RecordingError as exc:
            if self._on_write_error is None:
                raise
            self._on_write_error(self, exc)  # raises again (strict) or suspends (best-effort)
            action()

    def then(self, action: Callable[[], None], relayed: int = 0) -> None:
        """Run ``action`` after what was recorded so far went out (an EOF, a signal); a relay
        of more than a small frame's bytes (``relayed``) waits for the batch, as in ``record``."""
        pipe = self._pipe
        if pipe is not None and (pipe.busy or relayed > INLINE_MAX):
            pipe.then(action, relayed)
        else:
            action()

    def flush(self) -> None:
        """Write the frames still queued and relay what waits for them (before the end)."""
        if self._pipe is not None:
            self._pipe.flush()

    def _batch_failed(self, exc: RecordingError) -> bool:
        """A batched write failed: True if the session goes on unrecorded (best-effort)."""
        try:
            if self._on_write_error is None:
                raise exc
            self._on_write_error(self, exc)
        except RecordingError as final:
            if self.on_recording_failed is not None:
                self.on_recording_failed(final)
            return False
        return True

    def _record(self, kind: bytes, data: bytes) -> None:
        if self.recording_suspended is not None:
            return
        try:
            self.writer.write(kind, data)
        except RecordingError as exc:
            if self._on_write_error is None:
                raise
            self._on_write_error(self, exc)  # raises again (strict) or suspends (best-effort)

    def output(self, data: bytes, stderr: bool, action: Callable[[], None]) -> None:
        echo = self._echo
        if echo is not None and echo.pending:
            # the input this output decided goes first, stamped when it was typed
            self._record_input(echo.output(data))
        elif echo is not None:
            echo.output(data)  # nothing pending: it only remembers the chunk (a cut sequence)
        self.record(fmt.ERROR if stderr else fmt.OUTPUT, data, action)
        self.bytes_out += len(data)
        monotonic = self._monotonic  # a local call: as cheap as ``time.monotonic()`` (3.11)
        self.last_activity = monotonic()

    def input(self, data: bytes, action: Callable[[], None]) -> None:
        echo = self._echo
        if echo is None:  # no terminal, no echo: withheld (and sealed, in sealed mode)
            t_us = self._now_us() if self._now_us is not None else 0
            if self.withheld is not None and self.recording_suspended is None:
                self.withheld.add(t_us, data)
            self.record(fmt.NOT_ECHOED, b"%d" % len(data), action, relayed=len(data))
        else:
            # relayed now: the target's echo (or its absence) decides how it is recorded
            t_us = self._now_us() if self._now_us is not None else 0
            self._record_input(echo.input(t_us, data))
            self.then(action, len(data))
        self.bytes_in += len(data)
        monotonic = self._monotonic
        self.last_activity = monotonic()

    def _record_input(self, pieces: Sequence[Piece]) -> None:
        for p in pieces:
            if p.kept:
                self.record(fmt.INPUT, p.data, _noop, p.t)
            else:
                if self.withheld is not None and self.recording_suspended is None:
                    self.withheld.add(p.t, p.data)
                self.record(fmt.NOT_ECHOED, b"%d" % len(p.data), _noop, p.t)

    def expire_input(self) -> None:
        """Withhold input that waited longer than ``ECHO_TIMEOUT_S`` for its echo (called about
        every second): what the recording holds is on disk within seconds of being typed."""
        echo = self._echo
        if echo is not None and echo.pending and self._now_us is not None:
            self._record_input(echo.expire(self._now_us() - int(ECHO_TIMEOUT_S * 1e6)))

    def close_input(self) -> None:
        """The session ends: input still waiting for its echo is withheld."""
        echo = self._echo
        if echo is not None and echo.pending:
            self._record_input(echo.close())

    def resize(self, width: int, height: int, action: Callable[[], None]) -> None:
        self.record(fmt.RESIZE, f"{width}x{height}".encode(), action)

    def idle_seconds(self) -> float:
        """Seconds since the last byte either way, on the clock that stamped it."""
        return self._monotonic() - self.last_activity


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
        guard: DiskSpace | None = None,
        disk_policy: str = "strict",
        sync_interval: float = 1.0,
        disk_check_interval: float = 1.0,
        release_scope: ReleaseScope = contextlib.nullcontext,
        metrics: Metrics | None = None,
        render_cast: Callable[[Path], object] | None = None,
        seal_input: Callable[[str, str], WithheldInput] | None = None,
        notifier: Notifier | None = None,
        node_name: str = "",
    ) -> None:
        self._notifier = notifier  # admin sessions are announced
        self._node_name = node_name  # indexed with each session: where in a fleet it runs
        self._release_scope = release_scope
        # [recordings] input = "sealed": (session id, recording location) -> where the input
        # withheld from the recording goes, encrypted to the break-glass key
        self._seal_input = seal_input
        # writes the viewer-safe .cast beside a closed terminal recording (the sink's format)
        self._render_cast = render_cast
        self._metrics = metrics or NullMetrics()
        # bytes relayed by the sessions that have ended, by (kind, "in" | "out"): with the live
        # sessions' counters, what the metrics report (moved here when a session leaves ``live``,
        # so the sum never goes back)
        self.ended_bytes: dict[tuple[str, str], int] = {}
        # the monotonic time up to which every live recording is known to be on disk
        self.synced_through: float | None = None
        self._sink = sink
        self._index = index
        self._audit = audit
        self._clock = clock
        self._recording_enabled = recording_enabled
        self._on_recorded = on_recorded  # seals a closed recording (signed manifest), see integrity
        self._guard = guard
        self._best_effort = disk_policy == "best-effort"
        self._sync_interval = sync_interval
        self._disk_check_interval = disk_check_interval
        self.live: dict[str, LiveSession] = {}
        self._bg: set[asyncio.Task[None]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None  # set when the last live session ends (shutdown)
        self._ending: set[str] = set()
        self._closing = False  # SIGTERM received: no new sessions

    def _check_disk_for_start(self, req: SessionRequest) -> None:
        if not self._recording_enabled or self._guard is None:
            return
        st = self._guard.status()
        if st.level is DiskLevel.OK:
            return
        self._audit.emit(
            "session.refused", reason="recording_disk_low", user=str(req.principal),
            target=req.instance.id, peer=req.peer, free_bytes=st.free_bytes,
            total_bytes=st.total_bytes,
        )
        log.error("session.refused_disk_low", user=str(req.principal), free_bytes=st.free_bytes)
        raise RecordingDiskFull(f"recordings disk below its free-space threshold "
                                f"({st.free_bytes} bytes free)")

    async def start(self, req: SessionRequest) -> LiveSession:
        if self._closing:
            raise ShuttingDown("session refused: the broker is shutting down")
        self._check_disk_for_start(req)
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
            "stack": req.instance.stack_id, "parent_id": req.parent_id,
        }
        writer: RecordingWriter = (
            self._sink.open(sid, meta) if self._recording_enabled else _NullWriter()
        )
        withheld: WithheldInput | None = None
        try:
            if self._seal_input is not None and writer.location:
                withheld = self._seal_input(sid, writer.location)
            self._audit.emit(
                "session.start", session_id=sid, user=str(req.principal), target=req.instance.id,
                address=meta["address"], grant_id=req.grant.id, level=str(req.grant.level),
                login=req.login, kind=req.kind, command=req.command, peer=req.peer,
                recorded=self._recording_enabled, term=req.term_type,
                **({"width": req.width, "height": req.height} if req.term_type else {}),
                requested_size=list(req.requested_size) if req.requested_size else None,
            )
            await self._index.started(SessionRecord(
                id=sid, user=str(req.principal), target=req.instance.id, login=req.login,
                grant_id=req.grant.id, level=str(req.grant.level), kind=req.kind,
                command=req.command, peer=req.peer, started_at=now, ended_at=None,
                exit_status=None, bytes_in=0, bytes_out=0, recording=writer.location,
                target_name=req.instance.name, stack=req.instance.stack_id,
                parent_id=req.parent_id, bastion=self._node_name,
            ))
        except BaseException:
            writer.close()
            if withheld is not None:
                with contextlib.suppress(RecordingError):
                    withheld.close()
            local = local_writer(writer)
            if local is not None:  # the session never started: nothing to repair later
                local.release()
            raise
        live = LiveSession(sid, req, writer, now, self._write_failed, self._release_scope,
                           monotonic=self._clock.monotonic, withheld=withheld)
        self.live[sid] = live
        log.info("session.start", session_id=sid, user=str(req.principal),
                 target=req.instance.id, kind=req.kind)
        if self._notifier is not None:
            await self._notifier.admin_session(
                session_id=sid, user=str(req.principal), target=req.instance.id,
                target_name=req.instance.name, stack=req.instance.stack_id, login=req.login,
                kind=req.kind, peer=req.peer, grant=req.grant, parent_id=req.parent_id)
        return live

    async def finish(self, live: LiveSession, exit_status: str | None) -> None:
        if live.closed:
            return
        live.closed = True
        exit_status = exit_status or NO_EXIT_STATUS  # every ended session has an outcome
        self.live.pop(live.id, None)
        kind, ended = live.request.kind, self.ended_bytes
        ended[kind, "in"] = ended.get((kind, "in"), 0) + live.bytes_in
        ended[kind, "out"] = ended.get((kind, "out"), 0) + live.bytes_out
        self._metrics.session_ended(kind, exit_status)
        self._ending.add(live.id)  # shutdown waits for these too (index, audit still to write)
        try:
            live.close_input()  # typed input still waiting for an echo: withheld
        except RecordingError as exc:
            log.error("recording.write_failed", session_id=live.id, error=str(exc))
        live.flush()  # frames still queued, and the bytes held behind them
        now = self._clock.now()
        try:
            if exit_status is not None and live.recording_suspended is None:
                live.writer.write(fmt.EXIT, exit_status.encode())
        except RecordingError as exc:
            log.error("recording.write_failed", session_id=live.id, error=str(exc))
        finally:
            # close fsyncs: a large recording can take seconds, so keep it off the event loop
            await asyncio.to_thread(live.writer.close)
            if live.withheld is not None:  # before the seal: the manifest covers it too
                try:
                    await asyncio.to_thread(live.withheld.close)
                except RecordingError as exc:
                    log.error("recording.sealed_input_failed", session_id=live.id,
                              error=str(exc))
        render = (self._render_cast if live.request.term_type and live.writer.location
                  else None)
        if self._on_recorded is not None and live.writer.location and render is None:
            await self._on_recorded(live, now, exit_status)
        duration = (now - live.started_at).total_seconds()
        try:
            await self._index.ended(live.id, now, exit_status, live.bytes_in, live.bytes_out)
        except BrokerError as exc:
            log.error("index.write_failed", session_id=live.id, error=str(exc))
        extra = ({"recording_suspended": live.recording_suspended}
                 if live.recording_suspended is not None else {})
        self._audit.emit(
            "session.end", session_id=live.id, user=str(live.request.principal),
            target=live.request.instance.id, exit_status=exit_status,
            outcome=outcome(exit_status, live.request.kind), bytes_in=live.bytes_in,
            bytes_out=live.bytes_out, duration_s=round(duration, 3), **extra,
        )
        local = local_writer(live.writer)
        if local is not None:
            # the end is in the index and the audit: nothing left for a crash repair to do
            with contextlib.suppress(OSError):
                local.release()
        log.info("session.end", session_id=live.id, exit_status=exit_status,
                 bytes_in=live.bytes_in, bytes_out=live.bytes_out)
        if render is not None:
            # terminal sessions also get an asciicast file, rendered off the relay path; the
            # seal waits for it, so the signed manifest covers the .cast as well
            task = asyncio.create_task(self._render_then_seal(render, live, now, exit_status))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)
        self._ending.discard(live.id)
        if not self.live and not self._ending and self._idle is not None:
            self._idle.set()

    @staticmethod
    async def _render(render: Callable[[Path], object], path: Path) -> None:
        try:
            await asyncio.to_thread(render, path)
        except (OSError, ValueError) as exc:
            log.error("recording.render_failed", path=str(path), error=str(exc))

    async def _render_then_seal(self, render: Callable[[Path], object], live: LiveSession,
                                now: datetime, exit_status: str | None) -> None:
        await self._render(render, Path(live.writer.location))
        if self._on_recorded is not None:
            try:
                await self._on_recorded(live, now, exit_status)
            except Exception as exc:  # a background task: log it, never lose it
                log.error("recording.seal_failed", session_id=live.id, error=str(exc))

    async def drain(self) -> None:
        """Wait for background renders and the seals they start (at shutdown)."""
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)

    # -- recording failures ------------------------------------------------------------------
    def _write_failed(self, live: LiveSession, exc: RecordingError) -> None:
        """A write to a live recording failed: strict re-raises (the relay ends the session)."""
        if not self._best_effort:
            raise exc
        self._suspend(live, str(exc))

    def _suspend(self, live: LiveSession, reason: str) -> None:
        """Policy best-effort: the session goes on unrecorded, and the audit says so first."""
        if live.recording_suspended is not None:
            return
        try:
            self._audit.emit(
                "session.recording_suspended", session_id=live.id,
                user=str(live.request.principal), target=live.request.instance.id,
                reason=reason, policy="best-effort", bytes_in=live.bytes_in,
                bytes_out=live.bytes_out,
            )
        except AuditError as exc:  # not even the audit: fail closed after all
            raise RecordingError(f"recording and audit unavailable: {exc}") from exc
        live.recording_suspended = reason
        log.error("recording.suspended", session_id=live.id, reason=reason)
        if live.control is not None:
            live.control.notify("bastion-broker: recording storage is full; "
                                "this session continues unrecorded")

    def _suspend_safely(self, live: LiveSession, reason: str) -> None:
        try:
            self._suspend(live, reason)
        except RecordingError:
            self._end_unrecordable(live, "recording and audit unavailable")

    def _end_unrecordable(self, live: LiveSession, reason: str) -> None:
        """Policy strict: end a session whose recording cannot go on (disk critical, sync error)."""
        if live.ending is not None:
            return
        live.ending = reason
        if live.control is None:  # still starting: its first byte ends it
            if not isinstance(live.writer, _FailingWriter):
                live.writer = _FailingWriter(reason, live.writer)
            return
        with contextlib.suppress(AuditError):
            self._audit.emit("session.recording_failed", session_id=live.id, error=reason)
        log.error("recording.failed", session_id=live.id, error=reason)
        live.control.notify(f"bastion-broker: {reason}")
        live.control.terminate("recording unavailable")

    # -- periodic flush and disk watch --------------------------------------------------------
    def start_maintenance(self) -> None:
        """Start the broker-wide flush/disk task (idempotent)."""
        if self._recording_enabled and self._maintenance is None:
            self.synced_through = self._clock.monotonic()
            self._maintenance = asyncio.create_task(self._maintain())

    def sync_lag(self) -> float | None:
        """Seconds of recorded data that may not be on disk yet (an upper bound: the age of the
        last completed flush's start); None when recordings are not flushed (recording off)."""
        if self._maintenance is None or self.synced_through is None:
            return None
        return self._clock.monotonic() - self.synced_through

    async def stop_maintenance(self) -> None:
        task, self._maintenance = self._maintenance, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        next_sync = loop.time() + self._sync_interval
        next_disk = loop.time()
        while True:
            await asyncio.sleep(max(0.0, min(next_sync, next_disk) - loop.time()))
            now = loop.time()
            try:
                if now >= next_sync:
                    next_sync = now + self._sync_interval
                    self.expire_inputs()
                    await self.sync_all()
                if now >= next_disk:
                    next_disk = now + self._disk_check_interval
                    await self.check_disk()
            except BrokerError as exc:  # e.g. the audit is full too: keep flushing the rest
                log.error("recording.maintenance_failed", error=str(exc))

    def expire_inputs(self) -> None:
        """Input that waited too long for its echo is withheld and written (then synced)."""
        for live in list(self.live.values()):
            if live.closed or live.recording_suspended is not None:
                continue
            try:
                live.expire_input()
            except RecordingError:
                self._end_unrecordable(live, "the recording could not be written")

    async def sync_all(self) -> None:
        """Flush every live recording with unsynced bytes to disk (in one worker thread)."""
        started = self._clock.monotonic()
        writers = [(live, live.writer) for live in self.live.values()
                   if live.recording_suspended is None
                   and isinstance(live.writer, FrameWriter) and live.writer.dirty]
        if not writers:
            self.synced_through = started
            return
        failures = await asyncio.to_thread(_sync_many, [w for _live, w in writers])
        self.synced_through = started  # what failed ends or goes on unrecorded just below
        for live, w in writers:
            exc = failures.get(id(w))
            if exc is None or live.closed:
                continue
            if self._best_effort:
                self._suspend_safely(live, str(exc))
            else:
                self._end_unrecordable(live, "the recording could not be flushed to disk")

    async def check_disk(self) -> None:
        """Below the critical threshold: end live sessions (strict) or suspend recording."""
        if self._guard is None or not self.live:
            return
        st = await asyncio.to_thread(self._guard.status)
        if st.level is not DiskLevel.CRITICAL:
            return
        for live in list(self.live.values()):
            if live.closed or live.recording_suspended is not None:
                continue
            if self._best_effort:
                self._suspend_safely(live, f"recordings disk critical ({st.free_bytes} bytes free)")
            else:
                self._end_unrecordable(live, "recording storage is full")

    # -- SIGTERM -----------------------------------------------------------------------------
    @property
    def busy(self) -> int:
        """Sessions live or still finishing (index and audit to write): a drain waits for 0."""
        return len(self.live) + len(self._ending)

    async def shutdown(self, grace: float, reason: str = "bastion shutting down") -> None:
        """Tell live users, let sessions end by themselves, end the rest, all within ``grace`` s.

        Sessions that still have not ended (a stuck upstream) are finished here, so every
        recording is closed and every session has its ``session.end`` before the broker exits.
        ``reason`` is what the ended ones are told and their exit status carries.
        """
        self._closing = True
        if not self.live and not self._ending:
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self._audit.emit("broker.draining", live_sessions=len(self.live), grace_s=grace)
        log.warning("broker.draining", live_sessions=len(self.live), grace_s=grace)
        for live in list(self.live.values()):
            if live.control is not None:
                with contextlib.suppress(Exception):  # one broken channel must not stop the rest
                    live.control.notify(f"bastion-broker: the bastion is shutting down; this "
                                        f"session ends within {grace:g} s")
        await self._wait_until_idle(t0 + grace * 2 / 3)
        for live in list(self.live.values()):
            if live.control is not None and live.ending is None:
                live.ending = reason
                with contextlib.suppress(Exception):
                    live.control.terminate(reason)
        await self._wait_until_idle(t0 + grace * 0.9)
        for live in list(self.live.values()):
            await self.finish(live, f"terminated:{reason}")
        await self._wait_until_idle(t0 + grace)  # finishes started by the relay

    async def _wait_until_idle(self, until: float) -> None:
        if not self.live and not self._ending:
            return
        self._idle = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(),
                                   max(0.0, until - asyncio.get_running_loop().time()))


def local_writer(writer: RecordingWriter) -> FrameWriter | None:
    """The on-disk writer behind ``writer``, if any."""
    if isinstance(writer, _FailingWriter):
        writer = writer.inner
    return writer if isinstance(writer, FrameWriter) else None


class _FailingWriter:
    """Replaces the writer of a session to end: its next write fails, so the relay ends it."""

    def __init__(self, reason: str, inner: RecordingWriter) -> None:
        self._reason = reason
        self.inner = inner

    @property
    def location(self) -> str:
        return self.inner.location

    def write(self, kind: bytes, data: bytes) -> None:
        raise RecordingError(self._reason)

    def close(self) -> None:
        self.inner.close()


def _sync_many(writers: list[FrameWriter]) -> dict[int, RecordingError]:
    failures: dict[int, RecordingError] = {}
    for w in writers:
        try:
            w.sync()
        except RecordingError as exc:
            failures[id(w)] = exc
    return failures
