"""Live view: watch a session while it runs (the console's websocket, ``sessions watch``).

The source is the session's recording as it grows (``broker.recordings.follow``), so a watch
needs no link to the process relaying the session and costs that process nothing but the page
cache. What a watcher gets is what a replay would show (viewer-safe: ``broker.domain.sanitize``;
input the target did not echo only as its marker), about as soon as it is recorded: the file is
polled every ``POLL`` seconds and everything new goes out as one message.

Cost bound: a watcher reads at most ``RATE`` bytes a second (bursts of ``BURST``): reading,
decoding, filtering and sending text is what a watch costs the process relaying. A bulk
session writes far more than anyone can read, so when more than that is waiting, the frames are
passed over by their headers alone and the viewer gets ``[live view skipped N bytes]`` and the
last ``TAIL`` bytes, at most once a second while the flood lasts; a relay with 20 sessions
watched at once so loses only what polling, a header walk and a few KiB a second cost
(docs/benchmarks.md, "Live view").

Who may watch is the replay's rule (``ReviewService.resolve``: auditors and admins any session,
others their own; someone else's is answered like a missing one), and every watch is audited
(``session.watched``) before its first byte.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from broker.domain import recording as fmt
from broker.domain.sanitize import ViewerSafeFilter
from broker.domain.workflow import Actor
from broker.errors import ConflictError, NotFoundError
from broker.ports import AuditSink, Clock, SessionRecord
from broker.services.review import ReviewService

POLL = 0.05  # seconds between looks at the file while it grows
IDLE_POLL = 0.1  # ... and while it does not
RATE = 64 * 1024  # bytes a second a watcher reads at most (a full-screen redraw is ~30 KiB)
BURST = 128 * 1024  # read at once when that much is waiting, skipped beyond
TAIL = 16 * 1024  # what a viewer gets after a skip: the last screenful or so
CATCHUP = 64 * 1024  # the output before the watch started, to draw its screen from
SKIP_EVERY = 1.0  # seconds between skip markers (and tails) while a flood lasts
STUCK = 0.5  # seconds a walk waits for the kernel to read headers back before a thread reads them
SKIP_POLL = POLL  # ... and between header walks meanwhile: soon, while they are in the page cache
RECHECK = 15.0  # seconds between checks that the watcher may still watch
HEADER_WAIT = 5.0  # a recording created this instant may not have its header yet
WATCHABLE = ("shell", "exec")  # sftp, tunnels and jumps have no terminal to show
_ALT_SCREEN = re.compile(r"\x1b\[\?(?:1049|1047|47)([hl])")

Message = dict[str, Any] | list[Any]


class Passed(Protocol):
    """What ``Follower.skip`` passed over."""

    @property
    def bytes(self) -> int: ...

    @property
    def resize(self) -> fmt.Frame | None: ...

    @property
    def exit(self) -> fmt.Frame | None: ...

    @property
    def done(self) -> bool: ...


class Follower(Protocol):
    """A live recording read as it grows (``broker.recordings.follow.RecordingFollower``)."""

    def header(self) -> dict[str, Any] | None: ...

    def pending(self) -> int: ...

    def read(self, limit: int) -> list[fmt.Frame]: ...

    def skip(self, keep: int, nowait: bool = False) -> Passed: ...

    def writer_gone(self) -> bool: ...

    def close(self) -> None: ...


# opens the recording at a stored location on this bastion; NotFoundError when it is not here
Follow = Callable[[str], Follower]


class NotLive(ConflictError):
    """The session cannot be watched here: ``ended``, ``elsewhere`` (another bastion holds it),
    ``not_recorded`` or ``no_terminal``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def skip_marker(n: int) -> str:
    return f"\r\n[live view skipped {n} bytes]\r\n"


class Renderer:
    """Frames as a viewer sees them: output and error decoded (UTF-8 split across frames kept
    whole) and made viewer-safe, resizes, and withheld input as its marker. The marker is
    written into the output too while no full-screen program (the alternate screen) runs, as
    the terminal would have shown it after the prompt."""

    def __init__(self) -> None:
        self.alt_screen = False
        self.reset()

    def reset(self) -> None:
        """After a skip: what follows does not continue what came before."""
        self._dec = {k: codecs.getincrementaldecoder("utf-8")(errors="replace")
                     for k in (fmt.OUTPUT, fmt.ERROR)}
        self._filter = ViewerSafeFilter()

    def events(self, frames: list[fmt.Frame]) -> tuple[list[list[Any]], str | None]:
        """asciicast events (consecutive output merged into one) and the exit, if recorded."""
        out: list[list[Any]] = []
        text: list[str] = []
        t = 0.0
        exit_status = None

        def flush() -> None:
            if text:
                joined = "".join(text)
                text.clear()
                if joined:
                    out.append([round(t, 6), "o", joined])

        for f in frames:
            t = f.t_us / 1_000_000
            if f.kind in self._dec:
                shown = self._filter.feed(self._dec[f.kind].decode(f.data))
                if shown:
                    text.append(shown)
                    for m in _ALT_SCREEN.finditer(shown):
                        self.alt_screen = m.group(1) == "h"
            elif f.kind == fmt.NOT_ECHOED:
                marker = fmt.not_echoed_text(f.data)
                if not self.alt_screen:
                    text.append(marker)
                flush()
                out.append([round(t, 6), "i", marker])
            elif f.kind == fmt.RESIZE:
                flush()
                out.append([round(t, 6), "r", f.data.decode("ascii", "replace")])
            elif f.kind == fmt.EXIT:
                exit_status = f.data.decode("ascii", "replace")
        flush()
        return out, exit_status


def cast_size(meta: dict[str, Any], resize: fmt.Frame | None) -> tuple[int, int]:
    """The terminal's size now: the last resize, or the size the session started with."""
    if resize is not None:
        cols, _, rows = resize.data.decode("ascii", "replace").partition("x")
        if cols.isdigit() and rows.isdigit():
            return int(cols), int(rows)
    return int(meta.get("width") or 80), int(meta.get("height") or 24)


def _started(meta: dict[str, Any], rec: SessionRecord) -> float:
    """The recording's start in epoch seconds (to say how far behind a watch is)."""
    try:
        return datetime.fromisoformat(str(meta["started_at"])).timestamp()
    except (KeyError, ValueError):
        return rec.started_at.timestamp()


@dataclass
class Watch:
    """One watcher of one session: ``messages`` yields the asciicast header (with ``live``),
    events, ``{"lag": seconds}`` now and then, and ``{"end": {...}}`` last."""

    record: SessionRecord
    follower: Follower
    clock: Clock
    still_allowed: Callable[[], Awaitable[bool]] | None = None
    rate: int = RATE
    burst: int = BURST

    render: Renderer | None = None  # set once the messages start

    def close(self) -> None:
        self.follower.close()

    @property
    def alt_screen(self) -> bool:
        """Whether the session's terminal is on the alternate screen (a full-screen program)
        as far as the watcher has been shown: ``sessions watch`` leaves it on exit."""
        return self.render is not None and self.render.alt_screen

    def _now(self, started: float) -> float:
        return self.clock.now().timestamp() - started

    async def _header(self) -> dict[str, Any]:
        deadline = self.clock.monotonic() + HEADER_WAIT
        while True:
            meta = await asyncio.to_thread(self.follower.header)
            if meta is not None:
                return meta
            if self.clock.monotonic() > deadline:
                raise NotFoundError(f"the recording of session {self.record.id} has no header")
            await asyncio.sleep(POLL)

    async def messages(self) -> AsyncIterator[Message]:
        f, rec = self.follower, self.record
        meta = await self._header()
        started = _started(meta, rec)
        # the screen so far: the recording's frames passed over up to its last CATCHUP bytes
        # (in a thread: a long session has many), then those read and drawn
        passed = await asyncio.to_thread(f.skip, CATCHUP)
        frames = await asyncio.to_thread(f.read, 2 * CATCHUP)
        width, height = cast_size(meta, passed.resize)
        doc: dict[str, Any] = json.loads(next(iter(fmt.to_asciicast(_MetaOnly(meta)))))
        doc.update(width=width, height=height)
        doc["live"] = {"t": round(self._now(started), 3), "earlier_bytes": passed.bytes}
        yield doc
        render = self.render = Renderer()
        exit_status = passed.exit.data.decode("ascii", "replace") if passed.exit else None
        events, ex = render.events(frames)
        for ev in events:
            yield ev
        exit_status = ex or exit_status
        tokens = float(self.burst)
        last = self.clock.monotonic()
        skipping, skipped, shown_at = False, 0, 0.0
        lag_sent, lag_at, lag_max = 0.0, last, 0.0
        checked = last
        busy = False
        stuck = 0.0  # since when a walk has waited for headers to come back from the disk
        while exit_status is None:
            await asyncio.sleep(SKIP_POLL if skipping else POLL if busy else IDLE_POLL)
            now = self.clock.monotonic()
            tokens = min(float(self.burst), tokens + self.rate * (now - last))
            last = now
            if self.still_allowed is not None and now - checked >= RECHECK:
                checked = now
                if not await self.still_allowed():
                    yield {"end": {"reason": "not_allowed", "exit_status": None,
                                   "message": "you may no longer watch this session"}}
                    return
            pending = f.pending()
            busy = pending > 0
            frames = []
            if pending == 0:
                if f.writer_gone() and f.pending() == 0:
                    break
            elif pending <= tokens and (not skipping or pending <= 4 * TAIL):
                # (a flood is over once little is waiting, not when a burst's worth is)
                if skipping:
                    skipping = False
                    if skipped:
                        yield [round(self._now(started), 6), "o", skip_marker(skipped)]
                        skipped = 0
                    render.reset()
                frames = f.read(pending)
                tokens -= pending
                if not frames and f.writer_gone():
                    break  # only a frame its writer never finished (a crash mid-write)
            else:
                skipping = True
                # headers are read while in the page cache only: the writer drops what it has
                # synced, and a read from the disk must not stall the relay on this event loop
                p = f.skip(TAIL, nowait=True)  # not done: on at the next poll, once read back
                resize, ended = p.resize, p.exit
                skipped += p.bytes
                if p.done:
                    stuck = 0.0
                elif not stuck:
                    stuck = now
                elif now - stuck > STUCK:  # the disk is slow to give them back: wait, once
                    p = await asyncio.to_thread(f.skip, TAIL)
                    resize, ended = p.resize or resize, p.exit or ended
                    skipped += p.bytes
                    stuck = 0.0
                if resize is not None:
                    yield [round(resize.t_us / 1e6, 6), "r",
                           resize.data.decode("ascii", "replace")]
                if ended is not None:
                    exit_status = ended.data.decode("ascii", "replace")
                if p.done and (now - shown_at >= SKIP_EVERY or ended is not None):
                    shown_at = now
                    yield [round(self._now(started), 6), "o", skip_marker(skipped)]
                    skipped = 0
                    render.reset()
                    frames = _last(f.read(4 * TAIL), TAIL)
                    tokens = max(0.0, tokens - sum(len(x.data) for x in frames))
            if frames:
                lag_max = max(lag_max, self._now(started) - frames[0].t_us / 1e6)
                events, ex = render.events(frames)
                for ev in events:
                    yield ev
                exit_status = ex or exit_status
            if now - lag_at >= 1.0:
                lag = round(max(0.0, lag_max), 2)
                if abs(lag - lag_sent) >= 0.05:
                    yield {"lag": lag}
                    lag_sent = lag
                lag_at, lag_max = now, 0.0
        if skipped:
            yield [round(self._now(started), 6), "o", skip_marker(skipped)]
        if exit_status is None:  # closed without an exit frame (suspended, crashed)
            yield {"end": {"reason": "closed", "exit_status": None,
                           "message": "the session's recording was closed"}}
        else:
            yield {"end": {"reason": "exit", "exit_status": exit_status,
                           "message": "the session ended"}}


def _last(frames: list[fmt.Frame], limit: int) -> list[fmt.Frame]:
    """The frames' last ``limit`` bytes of output (a tail after a skip: a screenful is enough;
    the first frame kept may start mid-line), and every other frame."""
    out: list[fmt.Frame] = []
    room = limit
    for f in reversed(frames):
        if f.kind in (fmt.OUTPUT, fmt.ERROR):
            if room <= 0:
                continue
            if len(f.data) > room:
                f = fmt.Frame(f.t_us, f.kind, f.data[-room:])
            room -= len(f.data)
        out.append(f)
    out.reverse()
    return out


@dataclass(frozen=True, slots=True)
class _MetaOnly:
    """A recording with no frames: ``to_asciicast``'s header for given metadata."""

    meta: dict[str, Any]

    @property
    def frames(self) -> list[fmt.Frame]:
        return []


class LiveService:
    def __init__(self, review: ReviewService | None, follow: Follow, audit: AuditSink,
                 clock: Clock) -> None:
        self._review = review
        self._follow = follow
        self._audit = audit
        self._clock = clock

    async def resolve(self, actor: Actor, ref: str) -> SessionRecord:
        """The session, if the caller may see it (else ``NotFoundError``, as for a replay)."""
        if self._review is None:
            raise NotFoundError(f"no session {ref}")
        return await self._review.resolve(actor, ref)

    async def check(self, rec: SessionRecord) -> None:
        """``NotLive`` unless ``rec`` can be watched here (without opening a watch)."""
        follower = await self._open(rec)
        follower.close()

    async def _open(self, rec: SessionRecord) -> Follower:
        if rec.ended_at is not None:
            raise NotLive("ended", f"session {rec.id} has ended: replay its recording")
        if rec.kind not in WATCHABLE:
            raise NotLive("no_terminal", f"session {rec.id} is a {rec.kind} session: it has no "
                          "terminal to watch (its file operations and events are in the audit "
                          "log)")
        if not rec.recording:
            raise NotLive("not_recorded", f"session {rec.id} is not recorded: nothing to watch")
        try:
            return await asyncio.to_thread(self._follow, rec.recording)
        except (NotFoundError, OSError):
            where = f"bastion {rec.bastion}" if rec.bastion else "another bastion of the fleet"
            raise NotLive("elsewhere", f"session {rec.id} is live on {where} (its recording is "
                          "not on this one): watch it there") from None

    async def watch(self, rec: SessionRecord, watcher: str, roles: list[str], via: str,
                    still_allowed: Callable[[], Awaitable[bool]] | None = None) -> Watch:
        """A watch of ``rec`` (already resolved for the watcher), audited ``session.watched``."""
        follower = await self._open(rec)
        try:
            self._audit.emit("session.watched", actor=watcher, actor_roles=roles,
                             session_id=rec.id, user=rec.user, target=rec.target, via=via)
        except BaseException:
            with contextlib.suppress(OSError):
                follower.close()
            raise
        return Watch(rec, follower, self._clock, still_allowed)
