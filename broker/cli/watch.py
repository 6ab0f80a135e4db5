"""``sessions watch SESSION``: watch a live session in this terminal, as the console's live view
shows it (``broker.services.live``: viewer-safe, withheld input as its marker, floods skipped).

It reads the recording on this bastion (the state directory), so it needs no API server or
login: like ``sessions kill``, it is the operator's tool on the bastion, audited
``session.watched`` (``operator:UNIX_USER``). A watch is read-only: this terminal's keys go
nowhere (no echo while watching); ``q`` or Ctrl-C stops it, and the terminal is put back as it
was (modes, and anything the session's output left on: the alternate screen, a hidden cursor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import termios
from typing import Any

from broker.cli import resolve
from broker.cli.common import config_of, leaf, run_async, unix_user
from broker.cli.output import printable

STOP_KEYS = (b"q", b"Q", b"\x03", b"\x04")  # q, Ctrl-C, Ctrl-D
# what the session's output may have left on in this terminal: attributes, a hidden cursor,
# bracketed paste, application cursor keys and keypad, mouse reports
RESET = "\x1b[0m\x1b[?25h\x1b[?2004l\x1b[?1l\x1b>\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l"
LEAVE_ALT = "\x1b[r\x1b[?1049l"


def _write(text: str) -> None:
    """To this terminal as UTF-8, whatever the locale (the text is viewer-safe already)."""
    sys.stdout.buffer.write(text.encode("utf-8", "replace"))
    sys.stdout.buffer.flush()


def _say(text: str) -> None:
    _write(f"\r\n[{printable(text)}]\r\n")


async def _watch(args: argparse.Namespace) -> int:
    from broker.recordings.follow import LocalFollow
    from broker.recordings.local import LocalRecordingSink
    from broker.services.live import LiveService
    from broker.stores import connect_stores

    config = config_of(args)
    stores = await connect_stores(config)
    try:
        rec = await resolve.session(stores.sessions, args.session_id)
        live = LiveService(None, LocalFollow(LocalRecordingSink(config.recordings_dir)),
                           stores.audit, stores.clock)
        watch = await live.watch(rec, f"operator:{unix_user()}", [], "cli")
    finally:
        await stores.close()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else -1
    saved: list[Any] | None = None
    if fd >= 0:
        saved = termios.tcgetattr(fd)
        quiet = termios.tcgetattr(fd)
        # no echo, no line editing, no signals from keys: q and Ctrl-C are read as keys; and
        # output as it came (the target's pty already turned its newlines into CR LF)
        quiet[3] &= ~(termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
        quiet[1] &= ~termios.OPOST
        quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 1, 0
        termios.tcsetattr(fd, termios.TCSANOW, quiet)

        def key() -> None:
            try:
                data = os.read(fd, 64)
            except OSError:
                data = b""
            if not data or any(k in data for k in STOP_KEYS):
                stop.set()

        loop.add_reader(fd, key)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    ended: dict[str, Any] | None = None
    try:
        _write(printable(f"watching session {rec.id}: {rec.user} on "
                         f"{rec.target_name or rec.target} (read-only; q or Ctrl-C stops)")
               + "\r\n")
        ended = await _relay(watch, stop)
    finally:
        watch.close()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        _write((LEAVE_ALT if watch.alt_screen else "") + RESET)
        if fd >= 0:
            loop.remove_reader(fd)
            if saved is not None:
                termios.tcsetattr(fd, termios.TCSAFLUSH, saved)  # typed keys dropped too
    if ended is None:
        _say("stopped watching; the session goes on")
    else:
        status = ended.get("exit_status")
        _say(f"session ended: {status}" if status else str(ended.get("message", "ended")))
    return 0


async def _relay(watch: Any, stop: asyncio.Event) -> dict[str, Any] | None:
    """Write the watch to stdout until the session ends (its ``end``) or ``stop`` is set."""
    messages = watch.messages()
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            nxt = asyncio.ensure_future(anext(messages))
            done, _ = await asyncio.wait({nxt, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
                return None
            try:
                msg = nxt.result()
            except StopAsyncIteration:
                return {}
            if isinstance(msg, list):
                if msg[1] == "o":
                    _write(msg[2])
            elif isinstance(msg, dict) and "version" in msg:
                _write(f"[its terminal: {msg['width']}x{msg['height']}]\r\n")
            elif isinstance(msg, dict) and "end" in msg:
                end: dict[str, Any] = msg["end"]
                return end
    finally:
        stopping.cancel()
        with contextlib.suppress(Exception):
            await messages.aclose()


def register(ss: Any) -> None:
    s = ss.add_parser("watch", parents=leaf(), help="watch a live session in this terminal "
                      "(read-only, viewer-safe; audited); q or Ctrl-C stops")
    s.add_argument("session_id", help="session id or a unique prefix of it")
    s.set_defaults(func=run_async(_watch))
