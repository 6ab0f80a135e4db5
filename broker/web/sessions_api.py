"""The sessions API for the security team: search, detail, replay, manifest, hits, audit log and
dashboard, with their routes (added to the router and the OpenAPI document by ``api``).

Handlers only parse and check input (a 400 naming the parameter), call ``ReviewService`` (which
decides who sees what) and shape JSON. Every JSON answer escapes ``<``, ``>`` and ``&`` (as
``\\u003c``...), so recorded text, commands and file names are inert wherever a page puts them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from broker.domain import workflow as wf
from broker.domain.models import Trigger
from broker.domain.outcome import outcome, status_of
from broker.ports import SESSION_STATUSES, AuditQuery, SessionQuery, TextHit
from broker.services.review import (
    MAX_LIMIT,
    AmbiguousSession,
    Dashboard,
    ReviewService,
    SessionDetail,
    SessionView,
    decode_audit_cursor,
    decode_cursor,
    inert,
)
from broker.web import schema as S
from broker.web.routes import Caller, Handler, Route

log = structlog.get_logger("broker.web")

KINDS = ("shell", "exec", "subsystem", "tunnel", "jump")
SESSION_ID_RE = re.compile(r"^[0-9a-z-]{1,64}$")  # an id or a prefix of one (any case)
TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
GRANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
REVIEW_USER_RE = re.compile(r"^[A-Za-z0-9._$-][A-Za-z0-9._$ -]{0,63}(?:@[A-Za-z0-9.-]{1,255})?$")
EVENT_RE = re.compile(r"^[a-z_]{1,40}(?:\.[a-z_]{1,40}){0,3}(?:\.\*)?$")
MAX_TEXT = 200
CAST_TYPE = "application/x-asciicast"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status,
                             dumps=lambda d: inert(json.dumps(d, default=str)))


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def hit_json(h: TextHit) -> dict[str, Any]:
    return {"t": h.t, "source": h.source, "snippet": h.snippet}


def session_json(v: SessionView, now: datetime) -> dict[str, Any]:
    r = v.record
    end, ended = r.ended_at or now, r.ended_at is not None
    return {
        "id": r.id, "user": r.user, "target": r.target, "target_name": r.target_name,
        "stack": r.stack, "login": r.login, "level": r.level, "kind": r.kind,
        "command": r.command, "peer": r.peer, "grant_id": r.grant_id, "parent_id": r.parent_id,
        "bastion": r.bastion,
        "started_at": _iso(r.started_at), "ended_at": _iso(r.ended_at),
        "duration_s": round(max((end - r.started_at).total_seconds(), 0.0), 3),
        "exit_status": r.exit_status, "outcome": outcome(r.exit_status, r.kind, ended=ended),
        "status": status_of(r.exit_status, ended=ended), "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "recorded": bool(r.recording), "recording_bytes": v.recording_bytes,
        "hits": [hit_json(h) for h in v.hits],
    }


def detail_json(d: SessionDetail, hits: list[TextHit] | None, now: datetime) -> dict[str, Any]:
    data = session_json(d.view, now)
    data.update(
        grant=S.grant_json(d.grant, now) if d.grant is not None else None,
        grant_history=[S.history_json(e) for e in d.grant_history],
        files=d.files,
        children=[session_json(c, now) for c in d.children],
        integrity={"status": d.integrity.status,
                   "errors": [{"code": c, "message": m} for c, m in d.integrity.errors],
                   "warnings": [{"code": c, "message": m} for c, m in d.integrity.warnings]})
    if hits is not None:
        data["hits"] = [hit_json(h) for h in hits]
    return data


def dashboard_json(d: Dashboard, now: datetime) -> dict[str, Any]:
    return {"scope": d.scope, "live_sessions": d.live_sessions,
            "sessions_per_day": [[day, n] for day, n in d.sessions_per_day],
            "failed_logins_24h": d.failed_logins_24h,
            "recent_failed_logins": d.recent_failed_logins,
            "grants_expiring": [S.grant_json(g, now) for g in d.grants_expiring]}


# -- input ---------------------------------------------------------------------------------------
def _only(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    q = request.query
    for k in q:
        if k not in allowed:
            raise S.invalid(k, "unknown query parameter")
        if len(q.getall(k)) > 1:
            raise S.invalid(k, "give it once")
    return {k: q[k] for k in q}


def _matching(q: dict[str, str], name: str, pattern: re.Pattern[str], what: str) -> str | None:
    v = q.get(name)
    if v is not None and not pattern.match(v):
        raise S.invalid(name, what)
    return v


def _text(q: dict[str, str], name: str) -> str | None:
    v = q.get(name)
    if v is None or not v.strip():
        return None
    if len(v) > MAX_TEXT:
        raise S.invalid(name, f"must be at most {MAX_TEXT} characters")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in v):
        raise S.invalid(name, "must not contain control characters")
    return v.strip()


def _limit(q: dict[str, str]) -> int:
    v = q.get("limit")
    if v is None:
        return 50
    if not v.isascii() or not v.isdigit() or not 1 <= int(v) <= MAX_LIMIT:
        raise S.invalid("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(v)


def _times(q: dict[str, str], now: datetime) -> tuple[datetime | None, datetime | None]:
    since = S.parse_time("since", q["since"], now) if "since" in q else None
    until = S.parse_time("until", q["until"], now) if "until" in q else None
    if since is not None and until is not None and until <= since:
        raise S.invalid("until", "must be after since")
    return since, until


def _seconds(q: dict[str, str], name: str) -> float | None:
    v = q.get(name)
    if v is None:
        return None
    try:
        t = float(v)
    except ValueError:
        raise S.invalid(name, "must be seconds from the start of the session") from None
    if not math.isfinite(t) or not 0 <= t <= 10**9 or len(v) > 32:
        raise S.invalid(name, "must be seconds from the start of the session (0 or more)")
    return t


def _session_id(request: web.Request) -> str:
    sid = request.match_info["session_id"]
    if not SESSION_ID_RE.match(sid.casefold()):
        raise S.invalid("session_id", "a session id (or a prefix of one) is letters, digits "
                                      "and dashes")
    return sid


_SEARCH_PARAMS = ("q", "user", "target", "stack", "grant", "ticket", "trigger", "kind", "status",
                  "since", "until", "parent", "top", "cursor", "limit")
_AUDIT_PARAMS = ("session", "user", "event", "since", "until", "cursor", "limit")


def search_query(q: dict[str, str], now: datetime) -> SessionQuery:
    """``GET /api/sessions`` parameters as a ``SessionQuery``; a 400 names a bad one."""
    status = q.get("status")
    if status is not None and status not in SESSION_STATUSES:
        raise S.invalid("status", "must be one of " + ", ".join(SESSION_STATUSES))
    kind = q.get("kind")
    if kind is not None and kind not in KINDS:
        raise S.invalid("kind", "must be one of " + ", ".join(KINDS))
    trigger = q.get("trigger")
    if trigger is not None and trigger not in {t.value for t in Trigger}:
        raise S.invalid("trigger", "must be one of " + ", ".join(t.value for t in Trigger))
    top = q.get("top")
    if top is not None and top not in ("0", "1"):
        raise S.invalid("top", "must be 1 (only sessions no jump connection carried) or 0")
    after = None
    if "cursor" in q:
        try:
            after = decode_cursor(q["cursor"])
        except ValueError:
            raise S.invalid("cursor", "is not a cursor from a previous page") from None
    parent = _matching(q, "parent", SESSION_ID_RE, "must be a session id")
    since, until = _times(q, now)
    return SessionQuery(
        user=_matching(q, "user", REVIEW_USER_RE, "must be a user name or user@domain"),
        target=_matching(q, "target", TARGET_RE, "must be an instance id or name"),
        stack=_matching(q, "stack", wf.STACK_RE, "is not a valid stack ID"),
        grant_id=_matching(q, "grant", GRANT_RE, "must be a grant id"),
        ticket=_text(q, "ticket"), trigger=trigger, kind=kind, status=status,
        since=since, until=until, text=_text(q, "q"),
        parent_id=parent.casefold() if parent else None, top_level=top == "1",
        after=after, limit=_limit(q))


def audit_query(q: dict[str, str], now: datetime) -> AuditQuery:
    before = None
    if "cursor" in q:
        try:
            before = decode_audit_cursor(q["cursor"])
        except ValueError:
            raise S.invalid("cursor", "is not a cursor from a previous page") from None
    since, until = _times(q, now)
    session = _matching(q, "session", re.compile(r"^[0-9a-z-]{1,64}$"), "must be a session id")
    return AuditQuery(
        session_id=session,
        user=_matching(q, "user", REVIEW_USER_RE, "must be a user name or user@domain"),
        event=_matching(q, "event", EVENT_RE, "must be an event name like auth.failure, or a "
                                              "family like sftp.*"),
        since=since, until=until, before_seq=before, limit=_limit(q))


# -- handlers ------------------------------------------------------------------------------------
class SessionsApi:
    def __init__(self, review: ReviewService, now: Callable[[], datetime]) -> None:
        self.review = review
        self.now = now

    async def sessions(self, request: web.Request, caller: Caller | None) -> web.StreamResponse:
        assert caller is not None  # noqa: S101 - wrap() guarantees it
        q = search_query(_only(request, _SEARCH_PARAMS), self.now())
        views, cursor = await self.review.search(caller.actor, q)
        now = self.now()
        return _json({"items": [session_json(v, now) for v in views], "next_cursor": cursor})

    async def session(self, request: web.Request, caller: Caller | None) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        text = _text(_only(request, ("q",)), "q")
        detail, hits = await self.review.detail(caller.actor, _session_id(request), text)
        return _json(detail_json(detail, hits, self.now()))

    async def hits(self, request: web.Request, caller: Caller | None) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        text = _text(_only(request, ("q",)), "q")
        if text is None:
            raise S.invalid("q", "is required (the words to find)")
        found = await self.review.hits(caller.actor, _session_id(request), text)
        return _json({"items": [hit_json(h) for h in found]})

    async def manifest(self, request: web.Request, caller: Caller | None
                       ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        _only(request, ())
        data = await self.review.manifest(caller.actor, _session_id(request))
        return web.Response(body=data, content_type="application/json")

    async def recording(self, request: web.Request, caller: Caller | None
                        ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        q = _only(request, ("from", "to", "download"))
        start, end = _seconds(q, "from"), _seconds(q, "to")
        if start is not None and end is not None and end <= start:
            raise S.invalid("to", "must be after from")
        download = q.get("download")
        if download not in (None, "0", "1"):
            raise S.invalid("download", "must be 1 (save as a file) or 0")
        rec, lines = await self.review.recording(caller.actor, _session_id(request), start, end,
                                                 download=download == "1")
        resp = web.StreamResponse(headers={"Content-Type": f"{CAST_TYPE}; charset=utf-8"})
        if download == "1":
            resp.headers["Content-Disposition"] = f'attachment; filename="{rec.id}.cast"'
        try:
            await resp.prepare(request)
            async for chunk in lines:
                await resp.write(chunk.encode())
        except (ConnectionError, OSError) as exc:
            log.info("web.replay_aborted", session_id=rec.id, error=str(exc)[:200])
            return resp
        finally:
            await lines.aclose()
        await resp.write_eof()
        return resp

    async def audit(self, request: web.Request, caller: Caller | None) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        q = audit_query(_only(request, _AUDIT_PARAMS), self.now())
        rows, cursor = await self.review.audit_events(caller.actor, q)
        return _json({"items": rows, "next_cursor": cursor})

    async def dashboard(self, request: web.Request, caller: Caller | None
                        ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        _only(request, ())
        return _json(dashboard_json(await self.review.dashboard(caller.actor), self.now()))


def _ambiguous(handler: Handler) -> Handler:
    """An ambiguous prefix answers 409 with the candidates (the caller's own only)."""
    async def handle(request: web.Request, caller: Caller | None) -> web.StreamResponse:
        try:
            return await handler(request, caller)
        except AmbiguousSession as exc:
            return _json({"error": "ambiguous", "detail": {
                "message": str(exc), "candidates": exc.candidates}}, status=409)

    handle.__name__ = getattr(handler, "__name__", "handle")
    return handle


def session_routes(review: ReviewService, now: Callable[[], datetime],
                   kill: Handler | None = None) -> list[Route]:
    api = SessionsApi(review, now)
    s = "/api/sessions/{session_id}"
    read, audit = ("sessions:read",), ("audit:read",)
    one = (200, 400, 401, 403, 404, 409)
    wrap: Callable[[Handler], Handler] = _ambiguous
    return [
        Route("GET", "/api/sessions", api.sessions,
              "Search sessions (own, or all for auditors and admins), newest first", "any",
              read, query=(
                  ("q", "words the session showed or was typed (all must match)"),
                  ("user", "user or user@domain (others than the caller: auditors only)"),
                  ("target", "instance id or name"), ("stack", "stack ID"),
                  ("grant", "grant id"), ("ticket", "the grant's ticket"),
                  ("trigger", "the grant's trigger"), ("kind", "one of " + ", ".join(KINDS)),
                  ("status", "one of " + ", ".join(SESSION_STATUSES)),
                  ("since", "sessions running after this (RFC 3339 or 12h, 7d)"),
                  ("until", "sessions started before this (RFC 3339 or 12h, 7d)"),
                  ("parent", "sessions carried by this jump connection"),
                  ("top", "1: only sessions no jump connection carried"),
                  ("cursor", "next_cursor of the previous page"),
                  ("limit", f"at most this many (1-{MAX_LIMIT}, default 50)")),
              responses=(200, 400, 401, 403), ok_schema="SessionPage"),
        Route("GET", s, wrap(api.session),
              "A session with its grant, file operations, carried sessions and integrity",
              "any", read, query=(("q", "words to mark in the session (hits)"),),
              responses=one, ok_schema="SessionDetail"),
        Route("GET", s + "/recording.cast", wrap(api.recording),
              "The replay as asciicast v2, viewer-safe, streamed (audited session.viewed)",
              "any", read, query=(
                  ("from", "seconds: only events at or after this, times rebased to it"),
                  ("to", "seconds: only events before this"),
                  ("download", "1: as an attachment")),
              responses=one, ok_schema="Asciicast"),
        Route("GET", s + "/manifest", wrap(api.manifest),
              "The recording's signed manifest as stored", "any", read, responses=one,
              ok_schema="Manifest"),
        Route("GET", s + "/hits", wrap(api.hits), "Where words occur in a session", "any",
              read, query=(("q", "the words to find (required)"),), responses=one,
              ok_schema="HitList"),
        Route("GET", "/api/audit", api.audit,
              "Audit events as logged, newest first (auditors and admins)", "any", audit,
              query=(("session", "session id"),
                     ("user", "user or user@domain (the event's user or actor)"),
                     ("event", "an event name, or a family as sftp.*"),
                     ("since", "events at or after this (RFC 3339 or 12h, 7d)"),
                     ("until", "events before this (RFC 3339 or 12h, 7d)"),
                     ("cursor", "next_cursor of the previous page"),
                     ("limit", f"at most this many (1-{MAX_LIMIT}, default 50)")),
              responses=(200, 400, 401, 403), ok_schema="AuditPage"),
        Route("GET", "/api/dashboard", api.dashboard,
              "Live sessions, sessions per day, failed logins, grants ending soon (all for "
              "auditors and admins, the caller's own for others)", "any", read,
              responses=(200, 401, 403), ok_schema="Dashboard"),
        *([Route("POST", s + "/kill", wrap(kill),
                 "End a live session on whichever bastion holds it, within the enforcement "
                 "interval; the user sees the reason (auditors and admins; audited)", "session",
                 body="Kill", responses=(202, 400, 401, 403, 404, 409, 413, 415),
                 ok_schema="KillRequested")] if kill is not None else []),
    ]
