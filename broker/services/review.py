"""Session review for the security team: search, detail, replay, manifest, audit and dashboard.

Who sees what is decided here, once, for every way in: auditors and admins see every session
and the audit log; everyone else sees only the sessions they ran themselves (``user@domain``,
casefolded), by id, by prefix, by search or by any filter. Someone else's session is answered
exactly like a missing one (``NotFoundError``), so ids cannot be probed; an ambiguous prefix
names only the candidates the caller may see.

The service joins the session index, the grants, the recordings (through ``RecordingSink`` and
``RecordingArchive``) and the audit log (``AuditReader``); the web adapter only translates HTTP.
Replays are rendered frame by frame in a thread and made viewer-safe (never raw), and every
fetch of a recording is audited (``session.viewed``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import math
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, TypeVar

from broker.domain import recording as fmt
from broker.domain.models import Grant
from broker.domain.sanitize import safe_asciicast
from broker.domain.workflow import Actor, HistoryEntry, Role, WorkflowError
from broker.errors import ConflictError, NotFoundError
from broker.ports import (
    AuditQuery,
    AuditReader,
    AuditSink,
    Clock,
    GrantStore,
    IntegrityCheck,
    RecordingArchive,
    RecordingSink,
    SessionIndex,
    SessionQuery,
    SessionRecord,
    TextHit,
)

T = TypeVar("T")

MAX_LIMIT = 200
REVIEW_THREADS = 4
MIN_PREFIX = 6  # like ``SessionIndex.get``: shorter prefixes match too many sessions to be useful
MAX_FILES = 2000  # file events in a session's detail (``sessions files`` or the audit: all)
DASHBOARD_DAYS = 14
_PREFIX_SCAN = 100  # candidates looked at for a prefix (before the caller's own are kept)
_OWN_DAY_SCAN = 5000  # a non-auditor's sessions counted for the per-day chart
_STREAM_BATCH = 256 * 1024  # characters of asciicast rendered per trip to the thread


class AmbiguousSession(ConflictError):
    """A prefix that names several sessions the caller may see."""

    def __init__(self, prefix: str, candidates: list[str]) -> None:
        super().__init__(f"session id prefix {prefix} matches {len(candidates)} sessions; "
                         "give more of it")
        self.candidates = candidates


@dataclass(frozen=True, slots=True)
class SessionView:
    """A session as a reviewer sees it: the index row plus what the archive knows."""

    record: SessionRecord
    recording_bytes: int | None
    hits: tuple[TextHit, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionDetail:
    view: SessionView
    grant: Grant | None
    grant_history: list[HistoryEntry]
    files: list[dict[str, Any]]
    children: list[SessionView]
    integrity: IntegrityCheck


@dataclass(frozen=True, slots=True)
class Dashboard:
    scope: str  # "all" or "own"
    live_sessions: int
    sessions_per_day: list[tuple[str, int]]
    failed_logins_24h: int
    recent_failed_logins: list[dict[str, Any]]
    grants_expiring: list[Grant] = field(default_factory=list)


def sees_all(actor: Actor) -> bool:
    """Auditors and admins read every session and the audit log."""
    return actor.has(Role.AUDITOR)


def _own(actor: Actor, rec: SessionRecord) -> bool:
    return sees_all(actor) or rec.user.casefold() == actor.name


def encode_cursor(started_at: datetime, session_id: str) -> str:
    raw = f"{started_at.astimezone(UTC).isoformat()}|{session_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The keyset position of a cursor; ``ValueError`` if it is not one this service made."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, _, sid = raw.partition("|")
        t = datetime.fromisoformat(when)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a cursor from a previous page") from None
    if t.tzinfo is None or not sid or len(sid) > 64:
        raise ValueError("not a cursor from a previous page")
    return t, sid


def encode_audit_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"a{seq}".encode()).decode().rstrip("=")


def decode_audit_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a cursor from a previous page") from None
    if not raw.startswith("a") or not raw[1:].isdigit() or len(raw) > 20:
        raise ValueError("not a cursor from a previous page")
    return int(raw[1:])


def _window(lines: Iterator[str], start: float | None, end: float | None) -> Iterator[str]:
    """asciicast lines (header first) cut to ``start <= t < end``, times rebased to ``start``.

    The header's size is the terminal's at ``start`` (its last resize before), and its
    ``bastion`` object names the offset, so a player can show the session's own clock."""
    header_line = next(lines, None)
    if header_line is None:
        return
    if start is None and end is None:
        yield header_line
        yield from lines
        return
    header = json.loads(header_line)
    offset = start or 0.0
    pending: str | None = None
    for line in lines:
        t, code, data = json.loads(line)
        if t >= offset:
            pending = line
            break
        if code == "r":  # the terminal size when the window opens
            cols, _, rows = str(data).partition("x")
            if cols.isdigit() and rows.isdigit():
                header["width"], header["height"] = int(cols), int(rows)
    header.setdefault("bastion", {})["offset"] = offset
    yield json.dumps(header, ensure_ascii=False)
    rest = lines if pending is None else _chain(pending, lines)
    for line in rest:
        t, code, data = json.loads(line)
        if end is not None and t >= end:
            return
        yield json.dumps([round(t - offset, 6), code, data], ensure_ascii=False)


class _From:
    """A recording from ``start`` (seconds) on, for ``_window``: the streams' frames before it
    are passed over unrendered. Rendering (decoding, escaping, making viewer-safe) every byte
    before a late seek point was the whole cost of opening a long session far into it: seconds
    for 100 MiB. Resizes are kept (the window's terminal size comes from the last one before).
    Passing over is safe: a sequence cut at ``start`` reaches the viewer-safe filter without its
    ESC, as inert text, and the UTF-8 decoder starts fresh."""

    def __init__(self, rec: fmt.Recording, start: float) -> None:
        self.meta = rec.meta
        self._rec = rec
        self._start_us = math.ceil(start * 1_000_000)

    @property
    def frames(self) -> Iterator[fmt.Frame]:
        it = iter(self._rec.frames)
        for f in it:
            if f.t_us >= self._start_us:
                yield f
                break
            if f.kind == fmt.RESIZE:
                yield f
        yield from it


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


# JSON structure never uses these characters, so escaping them inside strings keeps every line
# the same JSON while no byte of it reads as markup or a script's line end wherever it lands
_INERT = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                        "\u2028": "\\u2028", "\u2029": "\\u2029"})


def inert(line: str) -> str:
    return line.translate(_INERT)


def _take(lines: Iterator[str]) -> list[str]:
    """The next batch of lines, about ``_STREAM_BATCH`` characters (the last batch may be [])."""
    out: list[str] = []
    size = 0
    for line in lines:
        out.append(inert(line) + "\n")
        size += len(line)
        if size >= _STREAM_BATCH:
            break
    return out


class ReviewService:
    def __init__(self, index: SessionIndex, grants: GrantStore, recordings: RecordingSink,
                 archive: RecordingArchive, audit_log: AuditReader, audit: AuditSink,
                 clock: Clock) -> None:
        self._index = index
        self._grants = grants
        self._recordings = recordings
        self._archive = archive
        self._audit_log = audit_log
        self._audit = audit
        self._clock = clock
        # reviewers' file work (hashing a recording for its integrity, replays) runs in threads
        # of its own: however many requests queue here, the broker's own thread work (syncing
        # live recordings to disk) never waits behind them
        self._pool = ThreadPoolExecutor(max_workers=REVIEW_THREADS,
                                        thread_name_prefix="review")

    async def _thread(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kw))

    # -- sessions ------------------------------------------------------------------------------
    def _scoped(self, actor: Actor, q: SessionQuery) -> SessionQuery | None:
        """The query as the caller may run it; None when it can match none of theirs (a
        non-auditor filtering on someone else)."""
        if sees_all(actor):
            return q
        if q.user is not None:
            u, me = q.user.casefold(), actor.name
            if u != me and (("@" in u) or u != me.split("@", 1)[0]):
                return None
        return replace(q, user=actor.name)

    async def _views(self, recs: Iterable[tuple[SessionRecord, tuple[TextHit, ...]]]
                     ) -> list[SessionView]:
        rows = list(recs)

        def sizes() -> list[int | None]:
            return [self._archive.size(r.recording) if r.recording else None for r, _ in rows]

        got = await self._thread(sizes) if rows else []
        return [SessionView(r, n, hits) for (r, hits), n in zip(rows, got, strict=True)]

    async def search(self, actor: Actor, q: SessionQuery
                     ) -> tuple[list[SessionView], str | None]:
        """A page of sessions, newest first, and the cursor of the next page (None: the last)."""
        scoped = self._scoped(actor, replace(q, limit=min(max(q.limit, 1), MAX_LIMIT)))
        if scoped is None:
            return [], None
        matches = await self._index.search(replace(scoped, limit=scoped.limit + 1))
        matches = [m for m in matches if _own(actor, m.record)]  # never trust a filter alone
        more = len(matches) > scoped.limit
        page = matches[:scoped.limit]
        views = await self._views((m.record, m.hits) for m in page)
        last = page[-1].record if more and page else None
        return views, encode_cursor(last.started_at, last.id) if last else None

    async def resolve(self, actor: Actor, ref: str) -> SessionRecord:
        """The session ``ref`` names (its id or a unique prefix) if the caller may see it;
        someone else's is ``NotFoundError`` exactly like a missing one."""
        ref = ref.casefold()
        if len(ref) < MIN_PREFIX:
            raise NotFoundError(f"no session {ref} (give at least {MIN_PREFIX} characters)")
        rows = await self._index.by_prefix(ref, _PREFIX_SCAN)
        rows = [r for r in rows if _own(actor, r)]
        exact = [r for r in rows if r.id == ref]
        if exact:
            return exact[0]
        if not rows:
            raise NotFoundError(f"no session {ref}")
        if len(rows) > 1:
            raise AmbiguousSession(ref, sorted(r.id for r in rows)[:20])
        return rows[0]

    async def detail(self, actor: Actor, ref: str, text: str | None = None
                     ) -> tuple[SessionDetail, list[TextHit] | None]:
        rec = await self.resolve(actor, ref)
        grant = await self._grants.get(rec.grant_id) if rec.grant_id else None
        history = await self._grants.history(grant.id) if grant is not None else []
        # the session's own stretch of the log: its file events lie between its start and end
        end = rec.ended_at + timedelta(minutes=1) if rec.ended_at is not None else None
        files = await self._audit_log.search(AuditQuery(
            session_id=rec.id, event="sftp.*", since=rec.started_at, until=end, limit=MAX_FILES))
        files.reverse()  # in the order they happened
        children = await self._index.search(SessionQuery(parent_id=rec.id, limit=MAX_LIMIT))
        kids = [(m.record, ()) for m in children if _own(actor, m.record)]
        if rec.recording:
            integrity = await self._thread(self._archive.verify, rec.id, rec.recording,
                                                live=rec.ended_at is None)
        else:
            integrity = IntegrityCheck("not recorded")
        views = await self._views([(rec, ()), *kids])
        hits = await self._index.text_hits(rec.id, text) if text else None
        return SessionDetail(views[0], grant, history, files, views[1:], integrity), hits

    async def hits(self, actor: Actor, ref: str, text: str) -> list[TextHit]:
        rec = await self.resolve(actor, ref)
        return await self._index.text_hits(rec.id, text)

    async def manifest(self, actor: Actor, ref: str) -> bytes:
        rec = await self.resolve(actor, ref)
        data = (await self._thread(self._archive.manifest, rec.id, rec.recording)
                if rec.recording else None)
        if data is None:
            raise NotFoundError(f"session {rec.id} has no signed manifest (not recorded, "
                                "still running, or not on this bastion)")
        return data

    async def recording(self, actor: Actor, ref: str, start: float | None = None,
                        end: float | None = None, *, download: bool = False
                        ) -> tuple[SessionRecord, AsyncGenerator[str, None]]:
        """The session's replay as asciicast v2 lines (viewer-safe, inert in any page), read
        frame by frame in a thread; audited as ``session.viewed`` before the first byte."""
        rec = await self.resolve(actor, ref)
        if not rec.recording:
            raise NotFoundError(f"session {rec.id} was not recorded")
        opened = await self._thread(self._open, rec)
        try:
            self._audit.emit("session.viewed", actor=actor.name,
                             actor_roles=sorted(r.value for r in actor.roles),
                             session_id=rec.id, user=rec.user, start=start, end=end,
                             download=download or None)
        except BaseException:
            opened[0].close()
            raise
        return rec, self._stream(opened, start, end)

    def _open(self, rec: SessionRecord) -> tuple[BinaryIO, fmt.FrameReader]:
        f = self._recordings.open_read(rec.recording)  # NotFoundError if it is gone
        try:
            size = f.seek(0, 2)
            f.seek(0)
            return f, fmt.FrameReader(f, size)
        except (OSError, fmt.RecordingFormatError):
            f.close()
            raise NotFoundError(f"the recording of session {rec.id} is unreadable") from None

    async def _stream(self, opened: tuple[BinaryIO, fmt.FrameReader], start: float | None,
                      end: float | None) -> AsyncGenerator[str, None]:
        f, reader = opened
        rec: fmt.Recording = _From(reader, start) if start else reader
        lines = _window(safe_asciicast(fmt.to_asciicast(rec)), start, end)
        try:
            while batch := await self._thread(_take, lines):
                yield "".join(batch)
        finally:
            f.close()

    # -- audit and dashboard ---------------------------------------------------------------------
    async def audit_events(self, actor: Actor, q: AuditQuery
                           ) -> tuple[list[dict[str, Any]], str | None]:
        if not sees_all(actor):
            raise WorkflowError("forbidden", "reading the audit log needs the auditor role")
        limit = min(max(q.limit, 1), MAX_LIMIT)
        rows = await self._audit_log.search(replace(q, limit=limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        seq = rows[-1].get("seq") if more and rows else None
        return rows, encode_audit_cursor(seq) if isinstance(seq, int) else None

    async def dashboard(self, actor: Actor) -> Dashboard:
        """Counts for the console's first page: everything for auditors and admins, the
        caller's own sessions, failed logins and grants for everyone else."""
        now = self._clock.now()
        today = now.astimezone(UTC).date()
        first = today - timedelta(days=DASHBOARD_DAYS - 1)
        since = datetime(first.year, first.month, first.day, tzinfo=UTC)
        days = [(first + timedelta(days=i)).isoformat() for i in range(DASHBOARD_DAYS)]
        failed = AuditQuery(event="auth.failure", since=now - timedelta(hours=24))
        if sees_all(actor):
            scope = "all"
            live = await self._index.live_count()
            per_day: dict[str, int] = dict(await self._index.per_day(since))
            grants = await self._grants.search(states=["approved"], since=now,
                                                until=now + timedelta(hours=24))
        else:
            scope = "own"
            mine = await self._own_since(actor, since)
            live = sum(1 for r in mine if r.ended_at is None)
            per_day = {}
            for r in mine:
                if r.started_at >= since:
                    day = r.started_at.astimezone(UTC).date().isoformat()
                    per_day[day] = per_day.get(day, 0) + 1
            failed = replace(failed, user=actor.name)
            username = actor.name.split("@", 1)[0]
            grants = [g for g in await self._grants.search(username=username,
                                                           states=["approved"])
                      if f"{g.username}@{g.domain}".casefold() == actor.name]
        expiring = sorted((g for g in grants
                           if g.live_at(now) and g.expires_at <= now + timedelta(hours=24)),
                          key=lambda g: g.expires_at)
        return Dashboard(
            scope=scope, live_sessions=live,
            sessions_per_day=[(d, int(per_day.get(d, 0))) for d in days],
            failed_logins_24h=await self._audit_log.count(failed),
            recent_failed_logins=await self._audit_log.search(replace(failed, limit=20)),
            grants_expiring=expiring)

    async def _own_since(self, actor: Actor, since: datetime) -> list[SessionRecord]:
        """The caller's sessions that overlap [since, now), read page by page (capped)."""
        out: list[SessionRecord] = []
        q = SessionQuery(user=actor.name, since=since, limit=MAX_LIMIT)
        while len(out) < _OWN_DAY_SCAN:
            page = await self._index.search(q)
            out += [m.record for m in page if _own(actor, m.record)]
            if len(page) < q.limit:
                break
            last = page[-1].record
            q = replace(q, after=(last.started_at, last.id))
        return out
