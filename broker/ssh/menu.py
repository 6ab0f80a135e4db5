"""``ssh user@bastion`` without a target: the menu of what the user may reach now.

With a terminal (a pty request and a shell), the menu is interactive (``broker.domain.menu``):
the user picks a target by number or name, and the same channel then carries a recorded session
there, exactly the relay ``ssh user+target@bastion`` gets (``broker.ssh.relay.ClientSession``:
access decision, session row, recording, audit, enforcement). The menu lends the channel to the
session through ``_LentChannel``, which passes everything through except the session's end
(exit status, close): that brings the user back to the menu. So users without ControlMaster
(Windows' OpenSSH, PuTTY) reach several targets with one code; each pick is its own session.

Without a terminal (an exec request such as ``ssh user@bastion list``, or no pty) the list is
printed and the channel exits 0. A lock on the user, seen on a pick or when a session ends,
ends the connection (exit status 255) with the lock's reason; ``q``, Ctrl-C and Ctrl-D exit 0.
Keystrokes typed at the menu are in no recording; the picks are audited (``menu.pick``), with
``menu.start`` and ``menu.end`` (which lists the sessions) around them. The picked sessions carry
no ``parent_id``: that names a recorded ProxyJump connection (a session row with a target, a
grant and a recording), which the menu is not; ``menu.end`` links them instead. The idle timeout
(``[ssh] session_idle_timeout_seconds``) applies at the menu as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any, cast

import asyncssh
import structlog
from asyncssh.channel import SSHChannel

from broker.domain.menu import Entry, Menu, Pick, Quit
from broker.domain.models import Grant, Instance, Principal
from broker.domain.terminal import clamp_term_size
from broker.errors import AuditError, BrokerError
from broker.ssh.relay import ClientSession, ConnectionSessions, RelayDeps

log = structlog.get_logger("broker.menu")

_HELD_MAX = 64 * 1024  # bytes typed while a pick starts: kept for the session, no more
_RESET = b"\x1b[0m\x1b[?25h"  # attributes and a visible cursor, whatever the target left
Ended = Callable[[str], None]


def _until(grant: Grant) -> str:
    return grant.expires_at.strftime("%Y-%m-%d %H:%M UTC")


def rdp_hint(inst: Instance, user: str) -> str:
    return (f"Windows, RDP only: ssh -N -L 13389:{inst.name}:3389 {user}@<this bastion>, "
            "then an RDP client to localhost:13389")


def entries(rows: list[tuple[Instance, Grant]], user: str) -> list[Entry]:
    """The menu's rows, numbered by name; Windows hosts carry the RDP hint (no SSH there)."""
    ordered = sorted(rows, key=lambda r: (r[0].name, r[0].id))
    return [Entry(number=n, name=inst.name, id=inst.id, os=inst.os, level=str(grant.level),
                  until=_until(grant),
                  hint=rdp_hint(inst, user) if inst.os == "windows" else "")
            for n, (inst, grant) in enumerate(ordered, 1)]


class _LentChannel:
    """The menu's channel as a picked session sees it: data, flow control and environment pass
    through; the session's end (exit, exit signal, close, EOF) goes to ``ended`` instead, and
    nothing the session writes after its end reaches the user."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], ended: Ended) -> None:
        self._chan = chan
        self._ended = ended
        self.done = False

    def _end(self, outcome: str) -> None:
        if not self.done:
            self.done = True
            self._ended(outcome)

    def write(self, data: bytes, datatype: asyncssh.DataType = None) -> None:
        if not self.done:
            self._chan.write(data, datatype)

    def write_stderr(self, data: bytes) -> None:
        if not self.done:
            self._chan.write_stderr(data)

    def write_eof(self) -> None:
        return None  # the menu goes on after the session

    def exit(self, status: int) -> None:
        self._end(f"exit status {status}")

    def exit_with_signal(self, signal: str, core_dumped: bool = False, msg: str = "",
                         lang: str = "") -> None:
        self._end(f"signal {signal}")

    def close(self) -> None:
        self._end("closed")

    def is_closing(self) -> bool:
        return self.done or self._chan.is_closing()

    def get_environment(self) -> Mapping[str, str]:
        return self._chan.get_environment()

    def pause_reading(self) -> None:
        if not self.done:
            self._chan.pause_reading()

    def resume_reading(self) -> None:
        if not self.done:
            self._chan.resume_reading()


class MenuSession(asyncssh.SSHServerSession[bytes]):
    def __init__(self, deps: RelayDeps, principal: Principal, peer: str,
                 sessions: ConnectionSessions) -> None:
        self._deps = deps
        self._principal = principal
        self._peer = peer
        self._slots = sessions  # [limits]: each pick takes a place like a session channel
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._term: tuple[str, tuple[int, int, int, int], Mapping[int, int]] | None = None
        self._interactive = False
        self._menu: Menu | None = None
        self._state = "starting"  # starting | menu | picking | session | returning | done
        self._held = bytearray()  # typed while the menu starts or a pick starts
        self._eof = False
        self._session: ClientSession | None = None
        self._lent: _LentChannel | None = None
        self._picked: list[str] = []  # session ids, for menu.end
        self._menu_id = str(uuid.uuid4())
        self._idle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- requests ----------------------------------------------------------------------------
    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        self._chan = cast(asyncssh.SSHServerChannel[bytes], chan)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        self._term = (term_type, term_size, term_modes)
        return True

    def shell_requested(self) -> bool:
        self._interactive = self._term is not None
        return True

    def exec_requested(self, command: str) -> bool:
        self._interactive = False  # ``ssh user@bastion list``: the list, even with -t
        return True

    def session_started(self) -> None:
        self._spawn(self._open() if self._interactive else self._list())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- without a terminal: the list --------------------------------------------------------
    async def _list(self) -> None:
        try:
            rows = await self._deps.access.reachable(self._principal)
        except BrokerError as exc:
            log.error("menu.list_failed", user=str(self._principal), error=str(exc))
            self._write(f"bastion-broker: {exc.user_message}\r\n".encode())
            self._exit(255)
            return
        lines = [f"bastion-broker: targets {self._principal} may reach now:"]
        if not rows:
            lines.append("  (none: request access with 'bastion-broker grant request')")
        for e in entries(rows, self._principal.username):
            line = f"  {e.name:<16} {e.id:<20} {e.os:<8} {e.level:<10} until {e.until}"
            lines.append(f"{line}  {e.hint}" if e.hint else line)
        lines.append(f"connect with: ssh {self._principal.username}+TARGET@<this bastion>")
        self._write(("\r\n".join(lines) + "\r\n").encode())
        self._exit(0)

    # -- with a terminal: the menu -----------------------------------------------------------
    async def _open(self) -> None:
        try:
            rows = await self._deps.access.reachable(self._principal)
            self._deps.audit.emit("menu.start", menu_id=self._menu_id,
                                  user=str(self._principal), peer=self._peer,
                                  targets=sorted(i.name for i, _ in rows))
        except BrokerError as exc:
            log.error("menu.start_failed", user=str(self._principal), error=str(exc))
            self._write(f"bastion-broker: {exc.user_message}\r\n".encode())
            self._exit(255)
            return
        width, height = self._size()
        self._menu = Menu(entries(rows, self._principal.username),
                          title=f"bastion-broker: targets {self._principal} may reach now",
                          width=width, height=height)
        self._show_menu(self._menu.show())

    def _size(self) -> tuple[int, int]:
        size = clamp_term_size(self._term[1]) if self._term else (80, 24, 0, 0)
        return (size[0] or 80, size[1] or 24)

    def _show_menu(self, screen: bytes) -> None:
        self._state = "menu"
        self._write(screen)
        self._arm_idle()
        if self._eof:
            self._quit(0)
            return
        held, self._held = bytes(self._held), bytearray()
        if held:
            self._typed(held)

    def _typed(self, data: bytes) -> None:
        menu = self._menu
        if menu is None:
            return
        self._arm_idle()
        screen, result = menu.feed(data)
        self._write(screen)
        if isinstance(result, Quit):
            self._quit(0)
        elif isinstance(result, Pick):
            self._state = "picking"
            self._cancel_idle()
            self._held += result.rest[:_HELD_MAX]
            self._spawn(self._pick(result.entry))

    async def _pick(self, entry: Entry) -> None:
        deps, who = self._deps, str(self._principal)
        try:
            result = await deps.access.decide(self._principal, entry.id)
            if not result.decision.allowed or result.instance is None:
                deps.audit.emit("access.denied", user=who, target=entry.id, peer=self._peer,
                                reason=result.decision.reason, menu_id=self._menu_id)
                if await self._locked_out():
                    return
                await self._back(f"No access to {entry.name}: {result.decision.reason}.")
                return
            deps.audit.emit("menu.pick", menu_id=self._menu_id, user=who,
                            target=result.instance.id, target_name=result.instance.name,
                            peer=self._peer)
        except BrokerError as exc:
            log.error("menu.pick_failed", user=who, target=entry.id, error=str(exc))
            await self._back(f"{entry.name}: {exc.user_message}")
            return
        instance = result.instance
        if instance.os == "windows":  # the list says so too; the inventory may have changed
            await self._back(f"{entry.name}: {rdp_hint(instance, self._principal.username)}")
            return
        try:
            release = self._slots.take(self._principal, instance.id, self._peer)
        except asyncssh.ChannelOpenError as exc:
            await self._back(f"{entry.name}: {exc.reason}")
            return
        chan = self._chan
        if chan is None or self._state != "picking":  # the client left meanwhile
            release()
            return
        self._write(f"Connecting to {instance.name} ({instance.id})...\r\n".encode())
        session = ClientSession(deps, self._principal, instance, self._peer, on_close=release)
        lent = _LentChannel(chan, lambda outcome: self._ended(session, instance.name, outcome))
        session.connection_made(cast(SSHChannel[bytes], lent))
        term_type, size, modes = self._term or ("xterm", (80, 24, 0, 0), {})
        session.pty_requested(term_type, size, modes)
        session.shell_requested()
        self._session, self._lent, self._state = session, lent, "session"
        session.session_started()
        held, self._held = bytes(self._held), bytearray()
        if held:
            session.data_received(held, None)
        if self._eof:
            session.eof_received()

    def _ended(self, session: ClientSession, name: str, outcome: str) -> None:
        """The picked session ended (its relay sent what would have been the channel's end):
        back to the menu once the relay's task is done (it may still be writing the end)."""
        if self._state != "session" or session is not self._session:
            return
        self._state = "returning"
        self._spawn(self._returned(session, name, outcome, asyncio.current_task()))

    async def _returned(self, session: ClientSession, name: str, outcome: str,
                        task: asyncio.Task[Any] | None) -> None:
        if task is not None and not task.done():
            await asyncio.wait([task])
        session.connection_lost(None)  # frees its place in the limits; nothing left upstream
        self._session = self._lent = None
        if session.session_id is not None:
            self._picked.append(session.session_id)
        if self._chan is None or self._chan.is_closing():
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            self._chan.resume_reading()  # the relay may have left it paused
        if session.ended_reason is not None:
            text = f"Back from {name}: access ended ({session.ended_reason})."
        else:
            text = f"Back from {name} ({outcome})."
        self._write(b"\r\n" + _RESET)
        if await self._locked_out():
            return
        await self._back(text)

    async def _locked_out(self) -> bool:
        """A lock on the user ends the menu too: nothing is reachable while it holds."""
        try:
            lock = await self._deps.access.user_lock(self._principal)
        except BrokerError as exc:
            log.error("menu.lock_check_failed", user=str(self._principal), error=str(exc))
            return False  # each pick is checked again (and fails closed) when it starts
        if lock is None:
            return False
        self._write(f"bastion-broker: {lock.describe()}\r\n".encode())
        self._quit(255, reason=f"lock {lock.id}")
        return True

    async def _back(self, message: str) -> None:
        """The menu again, with a fresh list (grants change) and ``message`` in it."""
        menu = self._menu
        if menu is None or self._state == "done":
            return
        try:
            rows = await self._deps.access.reachable(self._principal)
            menu.use_entries(entries(rows, self._principal.username), message)
        except BrokerError as exc:  # the list as it was; the pick decides again anyway
            log.error("menu.list_failed", user=str(self._principal), error=str(exc))
            menu.use_entries(menu.entries, message)
        if self._state != "done":
            menu.size(*self._size())
            self._show_menu(menu.show())

    # -- the idle timeout ([ssh] session_idle_timeout_seconds) applies at the menu too ------
    def _arm_idle(self) -> None:
        self._cancel_idle()
        timeout = self._deps.config.ssh.session_idle_timeout_seconds
        if timeout > 0:
            self._idle = asyncio.get_running_loop().call_later(timeout, self._idle_out)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idle_out(self) -> None:
        self._idle = None
        if self._state == "menu":
            self._write(b"\r\nbastion-broker: idle timeout at the menu\r\n")
            self._quit(255, reason="idle timeout")

    # -- the end -------------------------------------------------------------------------
    def _quit(self, status: int, reason: str = "quit") -> None:
        if self._state == "done":
            return
        self._state = "done"
        self._cancel_idle()
        self._audit_end(reason)
        self._exit(status)

    def _audit_end(self, reason: str) -> None:
        if self._menu is None:
            return
        try:
            self._deps.audit.emit("menu.end", menu_id=self._menu_id, user=str(self._principal),
                                  peer=self._peer, reason=reason, sessions=self._picked)
        except AuditError as exc:
            log.error("audit.write_failed", event="menu.end", error=str(exc))

    def _write(self, data: bytes) -> None:
        if self._chan is not None and data:
            with contextlib.suppress(OSError, asyncssh.Error):  # client gone: nothing to show
                self._chan.write(data)

    def _exit(self, status: int) -> None:
        if self._chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._chan.exit(status)

    # -- channel events: to the picked session while it runs, else to the menu -------------
    def _active(self) -> ClientSession | None:
        """The picked session, until its end came back to the menu (its recording is closed
        then: what the user types next is the menu's)."""
        return self._session if self._state == "session" else None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        session = self._active()
        if session is not None:
            session.data_received(data, datatype)
        elif self._state == "menu":
            self._typed(data)
        elif self._state in ("starting", "picking", "returning"):
            self._held += data[:max(_HELD_MAX - len(self._held), 0)]

    def eof_received(self) -> bool:
        self._eof = True
        session = self._active()
        if session is not None:
            return session.eof_received()
        if self._state == "menu":
            self._quit(0)
        return True  # without a terminal: the list is still shown

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        if self._term is not None:
            self._term = (self._term[0], (width, height, pixwidth, pixheight), self._term[2])
        session = self._active()
        if session is not None:
            session.terminal_size_changed(width, height, pixwidth, pixheight)
        elif self._menu is not None and self._state == "menu":
            self._write(self._menu.resize(*self._size()))

    def signal_received(self, signal: str) -> None:
        session = self._active()
        if session is not None:
            session.signal_received(signal)

    def break_received(self, msec: int) -> bool:
        session = self._active()
        return session.break_received(msec) if session is not None else False

    def pause_writing(self) -> None:
        session = self._active()
        if session is not None:
            session.pause_writing()

    def resume_writing(self) -> None:
        session = self._active()
        if session is not None:
            session.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        session, self._session = self._session, None
        if session is not None:
            if session.session_id is not None:
                self._picked.append(session.session_id)
            session.connection_lost(exc)  # the session ends as if its own channel closed
        if self._state != "done":
            self._state = "done"  # tasks still running see it and stop
            self._cancel_idle()
            self._audit_end("client left")
        self._chan = None
