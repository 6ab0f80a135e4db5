"""The relay: one client channel <-> one upstream channel, recorded, with backpressure both ways.

Uses asyncssh's callback API (not streams): each direction forwards in ``data_received`` and
propagates flow control by pausing the other side's reading when a send buffer fills
(``pause_writing``), so memory per session stays bounded by the channel windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import asyncssh
import structlog
from asyncssh.channel import SSHChannel

from broker.config import BrokerConfig, LimitsSettings
from broker.domain.models import Instance, Principal
from broker.domain.outcome import CLOSED, NO_EXIT_STATUS
from broker.domain.terminal import clamp_term_size
from broker.errors import AuditError, BrokerError, RecordingError
from broker.ports import AuditSink, Clock
from broker.services.access import AccessService
from broker.services.sessions import LiveSession, SessionRequest, SessionService
from broker.sftp.audit import SftpAudit
from broker.ssh import upstream
from broker.ssh.ca import UserCA

log = structlog.get_logger("broker.relay")

_FORWARD_ENV = ("LANG", "LC_")
_MAX_CLAMPED_RESIZES_AUDITED = 8  # per session: out-of-range window-changes audited as sent


class SessionLimitError(Exception):
    """One more session would pass ``[limits] max_sessions_per_connection`` or ``_per_user``."""


class SessionSlots:
    """Open session channels per user in this process (``[limits] max_sessions_per_user``);
    the caller passes how many its connection has open (``max_sessions_per_connection``)."""

    def __init__(self) -> None:
        self._by_user: dict[str, int] = {}

    def open_for(self, user: str) -> int:
        return self._by_user.get(user, 0)

    def take(self, user: str, on_connection: int, limits: LimitsSettings) -> Callable[[], None]:
        """Count one more session of ``user``, or raise ``SessionLimitError`` with what the client
        is told; returns the release (idempotent), to call when the session's channel closes."""
        if on_connection >= limits.max_sessions_per_connection:
            raise SessionLimitError(f"too many sessions on this connection (at most "
                                    f"{limits.max_sessions_per_connection})")
        if self.open_for(user) >= limits.max_sessions_per_user:
            raise SessionLimitError(f"too many sessions of {user} at once (at most "
                                    f"{limits.max_sessions_per_user})")
        self._by_user[user] = self.open_for(user) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self.open_for(user) - 1
                if left > 0:
                    self._by_user[user] = left
                else:
                    self._by_user.pop(user, None)
        return release


@dataclass(slots=True)
class RelayDeps:
    # read when a connection, session or tunnel starts, never kept by one that runs: a reload
    # (SIGHUP) replaces ``config`` with a new immutable one for what starts afterwards
    config: BrokerConfig
    access: AccessService
    sessions: SessionService
    ca: UserCA
    audit: AuditSink
    clock: Clock
    slots: SessionSlots = field(default_factory=SessionSlots)  # open sessions per user


class ConnectionSessions:
    """The session channels one client connection has open, each with a place under ``[limits]
    max_sessions_per_connection`` and ``max_sessions_per_user``; past either the channel is
    refused with why (the client prints "open failed: administratively prohibited: ..."), and
    the refusal is audited (``session.refused``)."""

    def __init__(self, deps: RelayDeps) -> None:
        self._deps = deps
        self.open = 0

    def take(self, principal: Principal, target: str, peer: str) -> Callable[[], None]:
        """A place for one more session, or ``ChannelOpenError``; returns its release (for
        ``ClientSession``'s ``on_close``; idempotent)."""
        deps = self._deps
        try:
            release_user = deps.slots.take(str(principal), self.open, deps.config.limits)
        except SessionLimitError as exc:
            deps.audit.emit("session.refused", user=str(principal), target=target, peer=peer,
                            reason=str(exc))
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            str(exc)) from None
        self.open += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open -= 1
                release_user()
        return release


class _Paused:
    """Why one side's reading is paused: "start" (upstream not up yet), "window" (the other
    side's send buffer is full). It resumes only when no reason is left.

    ``pause`` re-applies the channel's pause every time: asyncssh resumes reading by itself right
    after ``session_started`` (for shell, exec and subsystem requests), which silently undid the
    "start" pause, and a fast upload then piled up in memory until the upstream was ready (over
    100 MiB seen). The relay calls ``pause`` again on data that arrives while a reason is set.
    """

    def __init__(self) -> None:
        self._why: set[str] = set()

    def pause(self, chan: SSHChannel[bytes] | None, why: str) -> None:
        if chan is not None:
            chan.pause_reading()  # a flag in asyncssh: cheap, and idempotent
            self._why.add(why)

    def resume(self, chan: SSHChannel[bytes] | None, why: str) -> None:
        if why in self._why:
            self._why.discard(why)
            if not self._why and chan is not None:
                chan.resume_reading()


class UpstreamSession(asyncssh.SSHClientSession[bytes]):
    """Target side: output goes to the recording, then to the client."""

    def __init__(self, down: ClientSession) -> None:
        self._down = down

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._down.from_target(data, datatype)

    def eof_received(self) -> bool:
        self._down.target_eof()
        return True  # stay half-open until the target sends exit status and closes

    def pause_writing(self) -> None:
        self._down.pause_client("window")

    def resume_writing(self) -> None:
        self._down.resume_client("window")

    def connection_lost(self, exc: Exception | None) -> None:
        self._down.target_closed(exc)


class ClientSession(asyncssh.SSHServerSession[bytes]):
    """Client side of one session channel; opens the upstream when the client starts it."""

    def __init__(self, deps: RelayDeps, principal: Principal, instance: Instance,
                 peer: str, on_close: Callable[[], None] | None = None,
                 parent_id: str | None = None) -> None:
        self._deps = deps
        self._on_close = on_close  # frees its place in the session limits
        self._parent_id = parent_id  # the recorded ProxyJump connection carrying it, if any
        self._principal = principal
        self._instance = instance
        self._peer = peer
        self.chan: asyncssh.SSHServerChannel[bytes]
        self._term: tuple[str, tuple[int, int, int, int], Mapping[int, int]] | None = None
        # as sent, when it was clamped
        self._term_requested: tuple[int, int, int, int] | None = None
        self._resizes_clamped = 0
        self._kind = "shell"
        self._command: str | None = None
        self._up_chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._up_conn: asyncssh.SSHClientConnection | None = None
        self._live: LiveSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._finished = False
        # client input that raced ahead of the upstream (bounded: reading pauses at once)
        self._pending: list[bytes] = []
        self._pending_eof = False
        self._target_eof = False
        self._terminating: str | None = None  # reason, once the enforcer ended the session
        self._sftp: SftpAudit | None = None  # file operations of an sftp subsystem, audited
        self._client_paused = _Paused()  # reading from the client
        self._target_paused = _Paused()  # reading from the target

    @property
    def session_id(self) -> str | None:
        """The recorded session's id, once it started."""
        return self._live.id if self._live is not None else None

    @property
    def ended_reason(self) -> str | None:
        """Why the enforcer (or a failed recording) ended the session, if it did."""
        return self._terminating

    # -- requests before the session starts --------------------------------------------------
    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        self.chan = cast(asyncssh.SSHServerChannel[bytes], chan)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        # the recording and the target get a size a terminal can be; the audit gets what was sent
        clamped = clamp_term_size(term_size)
        self._term_requested = term_size if clamped != term_size else None
        self._term = (term_type, clamped, term_modes)
        return True

    def shell_requested(self) -> bool:
        self._kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self._kind = "exec"
        self._command = command.decode("utf-8", "replace") if isinstance(command, bytes) else command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        name = subsystem.decode("ascii", "replace") if isinstance(subsystem, bytes) else subsystem
        if name != "sftp":
            return False
        self._kind = "subsystem"
        self._command = name
        return True

    def session_started(self) -> None:
        # Hold client input (in the channel window, not in our memory) until the upstream is up;
        # asyncssh resumes reading after this returns, so data_received pauses again (_Paused).
        self.pause_client("start")
        self._task = asyncio.create_task(self._start())

    # -- start --------------------------------------------------------------------------------
    async def _start(self) -> None:
        deps = self._deps
        try:
            # Fresh decision at session start: the grant may have changed since authentication.
            result = await deps.access.decide(self._principal, self._instance.id)
            grant = result.decision.grant
            if not result.decision.allowed or grant is None:
                deps.audit.emit(
                    "access.denied", user=str(self._principal), target=self._instance.id,
                    peer=self._peer, reason=result.decision.reason,
                )
                self._refuse(f"no access to {self._instance.name}")
                return
            level = grant.level
            login = self._instance.login_for(
                level, deps.config.upstream.admin_login, deps.config.upstream.read_only_login
            )
            width, height = (self._term[1][0], self._term[1][1]) if self._term else (0, 0)
            self._live = await deps.sessions.start(SessionRequest(
                principal=self._principal, instance=self._instance, grant=grant, login=login,
                kind=self._kind, command=self._command,
                term_type=self._term[0] if self._term else None,
                width=width, height=height, peer=self._peer,
                requested_size=self._term_requested, parent_id=self._parent_id,
            ))
            now = deps.clock.now()
            key, cert = deps.ca.issue(
                login=login,
                key_id=f"user={self._principal} grant={grant.id} session={self._live.id}",
                now=now, ttl=timedelta(seconds=deps.config.upstream.cert_ttl_seconds),
                not_after=grant.expires_at, permit_pty=self._term is not None,
            )
            self._up_conn = await upstream.connect(
                self._instance, login, key, cert, deps.config.upstream
            )
            env = {k: v for k, v in self.chan.get_environment().items()
                   if k == "LANG" or k.startswith("LC_")}
            kwargs: dict[str, Any] = {
                "encoding": None, "env": env,
                "window": deps.config.ssh.window_bytes,
                "max_pktsize": deps.config.ssh.max_packet_bytes,
            }
            if self._term:
                kwargs.update(term_type=self._term[0], term_size=self._term[1],
                              term_modes=self._term[2], request_pty="force")
            else:
                kwargs.update(request_pty=False)
            if self._kind == "subsystem":
                kwargs["subsystem"] = self._command
                command = None
                self._sftp = SftpAudit(self._sftp_event)
            else:
                command = self._command
            self._up_chan, _ = await self._up_conn.create_session(
                lambda: UpstreamSession(self), command, **kwargs
            )
        except BrokerError as exc:
            log.warning("session.start_failed", user=str(self._principal),
                        target=self._instance.id, error=str(exc))
            await self._fail(exc.user_message)
            return
        except (OSError, asyncssh.Error) as exc:
            log.warning("session.upstream_failed", user=str(self._principal),
                        target=self._instance.id, error=str(exc))
            await self._fail("target unavailable")
            return
        if self.chan.is_closing():
            self._up_chan.close()
            return
        self._live.on_recording_failed = self._recording_failed
        pending, self._pending = self._pending, []
        for data in pending:
            self._from_client(data)
        if self._pending_eof:
            self._live.then(self._eof_to_target)
        self._live.control = self  # from now on the enforcer may warn or end this session
        self.resume_client("start")

    # -- flow control -------------------------------------------------------------------------
    def pause_client(self, why: str) -> None:
        self._client_paused.pause(self.chan, why)

    def resume_client(self, why: str) -> None:
        self._client_paused.resume(self.chan, why)

    def _pause_target(self, why: str) -> None:
        self._target_paused.pause(self._up_chan, why)

    def _resume_target(self, why: str) -> None:
        self._target_paused.resume(self._up_chan, why)

    def _refuse(self, message: str) -> None:
        try:
            self.chan.write_stderr(f"bastion-broker: {message}\r\n".encode())
            self.chan.exit(255)
        except (OSError, asyncssh.Error):
            self.chan.close()

    async def _fail(self, message: str) -> None:
        self._refuse(message)
        await self._finish("255")
        if self._up_conn is not None:
            self._up_conn.close()

    # -- enforcement (SessionControl) -------------------------------------------------------
    def notify(self, text: str) -> None:
        """A line for the user: on the terminal in a PTY, on stderr otherwise (so a command's
        stdout stays clean). Recorded like any output, and shown even if it cannot be."""
        data = f"\r\n{text}\r\n".encode()
        datatype = asyncssh.EXTENDED_DATA_STDERR if self._term is None else None
        show = functools.partial(self._to_client, data, datatype)
        if self._live is not None:
            try:
                self._live.output(data, datatype is not None, show)
                return
            except RecordingError:
                pass  # the notice itself may not be recordable
        show()

    def terminate(self, reason: str) -> None:
        if self._terminating is not None:
            return
        self._terminating = reason
        self.notify(f"bastion-broker: access ended ({reason})")
        if self._up_chan is not None and self._up_conn is not None:
            # Closing only the channel would wait for a non-PTY command to finish; closing the
            # connection makes sshd hang up the session (SIGHUP). -> target_closed -> _end
            with contextlib.suppress(OSError, asyncssh.Error):
                self._up_chan.send_signal("HUP")
            self._up_conn.close()
        else:
            asyncio.get_running_loop().create_task(self._end(None, None, None))

    # -- client -> target -------------------------------------------------------------------
    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._up_chan is None or self._live is None:
            self._pending.append(data)
            self.pause_client("start")
            return
        self._from_client(data)

    def _from_client(self, data: bytes) -> None:
        live = self._live
        if live is None or live.closed or self._terminating is not None:
            return  # ended: its recording is closed, the target gone or going
        if self._sftp is not None:
            self._sftp.from_client(data)
            if self._terminating is not None:  # its audit event could not be written
                return
        try:
            live.input(data, functools.partial(self._to_target, data))
        except RecordingError as exc:
            self._recording_failed(exc)  # fail closed: nothing unrecorded reaches the target
            return

    def _to_target(self, data: bytes) -> None:
        if self._up_chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):  # target gone: target_closed ends it
                self._up_chan.write(data)

    def _eof_to_target(self) -> None:
        if self._up_chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._up_chan.write_eof()

    def _sftp_event(self, event: str, fields: dict[str, Any]) -> None:
        """One file operation into the audit log; if that fails, the session ends (fail closed)."""
        if self._live is None:
            return
        try:
            self._deps.audit.emit(event, session_id=self._live.id, user=str(self._principal),
                                  target=self._instance.id, **fields)
        except AuditError as exc:
            log.error("audit.failed", session_id=self._live.id, error=str(exc))
            self.terminate("audit log unavailable")

    def _recording_failed(self, exc: RecordingError) -> None:
        log.error("recording.failed", session_id=self._live.id if self._live else None,
                  error=str(exc))
        self._deps.audit.emit("session.recording_failed",
                              session_id=self._live.id if self._live else None, error=str(exc))
        self.terminate("recording unavailable")

    def eof_received(self) -> bool:
        if self._up_chan is not None and self._live is not None:
            self._live.then(self._eof_to_target)  # after the input held for its recording
        else:
            self._pending_eof = True
        return True

    def pause_writing(self) -> None:
        self._pause_target("window")

    def resume_writing(self) -> None:
        self._resume_target("window")

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        sent = (width, height, pixwidth, pixheight)
        width, height, pixwidth, pixheight = clamp_term_size(sent)
        if (width, height, pixwidth, pixheight) != sent:
            self._audit_clamped_resize(sent, (width, height, pixwidth, pixheight))
        if self._term:
            self._term = (self._term[0], (width, height, pixwidth, pixheight), self._term[2])
        up, live = self._up_chan, self._live
        if up is not None and live is not None and not live.closed:
            def resize() -> None:
                with contextlib.suppress(OSError, asyncssh.Error):
                    up.change_terminal_size(width, height, pixwidth, pixheight)
            try:
                live.resize(width, height, resize)
            except RecordingError as exc:
                self._recording_failed(exc)

    def _audit_clamped_resize(self, sent: tuple[int, ...], size: tuple[int, ...]) -> None:
        """A window-change out of range, audited as sent: the first few of a session (a client
        repeating it must not fill the disk), the last of those says the rest are not."""
        self._resizes_clamped += 1
        if self._resizes_clamped > _MAX_CLAMPED_RESIZES_AUDITED:
            return
        more = self._resizes_clamped == _MAX_CLAMPED_RESIZES_AUDITED
        try:
            self._deps.audit.emit(
                "session.resize", session_id=self._live.id if self._live else None,
                user=str(self._principal), target=self._instance.id,
                requested_size=list(sent), size=list(size), clamped=True,
                further_not_audited=True if more else None)
        except AuditError as exc:
            log.error("audit.write_failed", event="session.resize", error=str(exc))

    def signal_received(self, signal: str) -> None:
        up, live = self._up_chan, self._live
        if up is not None and live is not None:
            live.then(functools.partial(self._quietly, up.send_signal, signal))

    def break_received(self, msec: int) -> bool:
        up, live = self._up_chan, self._live
        if up is not None and live is not None:
            live.then(functools.partial(self._quietly, up.send_break, msec))
            return True
        return False

    @staticmethod
    def _quietly(fn: Any, arg: Any) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            fn(arg)

    def connection_lost(self, exc: Exception | None) -> None:
        # the client went away (or we closed): tear the upstream down too
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        if self._up_chan is not None:
            self._up_chan.close()
        if self._up_conn is not None:
            self._up_conn.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._live is not None and not self._finished:
            # the client closed the channel before the target reported an exit
            status = f"terminated:{self._terminating}" if self._terminating else CLOSED
            asyncio.get_running_loop().create_task(self._finish(status))

    # -- target -> client -------------------------------------------------------------------
    def from_target(self, data: bytes, datatype: asyncssh.DataType) -> None:
        live = self._live
        if live is None or self._terminating is not None:
            return
        if self._sftp is not None and datatype is None:
            # responses are audited before the client sees them (stderr carries no SFTP)
            self._sftp.from_target(data)
            if self._terminating is not None:
                return
        try:
            live.output(data, datatype == asyncssh.EXTENDED_DATA_STDERR,
                        functools.partial(self._to_client, data, datatype))
        except RecordingError as exc:
            self._recording_failed(exc)  # fail closed: nothing unrecorded reaches the client
            return

    def _to_client(self, data: bytes, datatype: asyncssh.DataType) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):  # client gone: connection_lost cleans up
            self.chan.write(data, datatype)

    def target_eof(self) -> None:
        # Held until the target closes: a client that already sent EOF (an OpenSSH mux client)
        # closes the channel on our EOF, and the exit status would then be lost.
        self._target_eof = True

    def target_closed(self, exc: Exception | None) -> None:
        up = self._up_chan
        status: str | None = None
        signal: tuple[str, bool, str, str] | None = None
        code: int | None = None
        if up is not None:
            signal = up.get_exit_signal()
            code = up.get_exit_status()
            if signal is not None:
                status = f"signal:{signal[0]}"
            elif code is not None and code >= 0:
                status = str(code)
        if status is None:
            status = NO_EXIT_STATUS  # the target closed without an exit status
        if self._up_conn is not None:
            self._up_conn.close()
        asyncio.get_running_loop().create_task(self._end(status, signal, code))

    async def _end(self, status: str | None, signal: tuple[str, bool, str, str] | None,
                   code: int | None) -> None:
        # Close the recording and write session.end first, so that when the client sees the
        # exit status, the recording is complete and on disk.
        if self._terminating is not None:
            status, signal, code = f"terminated:{self._terminating}", None, 255
        await self._finish(status)
        try:
            if self._target_eof and not self.chan.is_closing():
                self.chan.write_eof()
            if signal is not None:
                self.chan.exit_with_signal(*signal)
            elif code is not None and code >= 0:
                self.chan.exit(code)
            else:
                self.chan.close()
        except (OSError, asyncssh.Error):
            self.chan.close()

    async def _finish(self, status: str | None) -> None:
        if self._finished or self._live is None:
            return
        self._finished = True
        if self._sftp is not None:
            stats = self._sftp.finish()  # close events for handles never closed, then totals
            self._sftp_event("sftp.summary", dict(stats))
        try:
            await self._deps.sessions.finish(self._live, status)
        except BrokerError as exc:
            log.error("session.finish_failed", session_id=self._live.id, error=str(exc))
