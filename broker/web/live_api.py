"""``GET /api/sessions/{id}/live``: watch a live session over a WebSocket (``LiveService``).

A WebSocket handshake cannot carry the console's CSRF header, and browsers send the login
cookie with a handshake started by any site (cross-site WebSocket hijacking). So a caller
with a login cookie must come from the console's own origin (the ``Origin`` header every browser
sends, against this host or ``[web] public_url``); a bearer token is not sent by browsers on
their own, and needs no such check.

Protocol (text messages, JSON): first an asciicast v2 header with ``live`` (``t``: the session's
time now, in seconds), then events ``[t, "o", text]``, ``[t, "r", "COLSxROWS"]`` and
``[t, "i", "[input not echoed: N bytes]"]``, now and then ``{"lag": seconds}``, and last
``{"end": {"reason", "exit_status", "message"}}`` before a normal close. The watcher's messages
are ignored: a watch is read-only. The same URL without ``Upgrade`` answers whether the session
can be watched here (200, or the error a handshake would get), so a page can say why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import WSMsgType, web

from broker.services.live import LiveService, Message, NotLive
from broker.services.review import inert
from broker.web import schema as S
from broker.web.routes import Caller, Route
from broker.web.sessions_api import SESSION_ID_RE

log = structlog.get_logger("broker.web")

Recheck = Callable[[web.Request], Awaitable[Caller | None]]


def _dumps(msg: Any) -> str:
    return inert(json.dumps(msg, ensure_ascii=False))


class LiveApi:
    def __init__(self, live: LiveService, public_url: str | None, recheck: Recheck) -> None:
        self._live = live
        self._public = urlsplit(public_url).netloc if public_url else ""
        self._recheck = recheck

    def _origin_ok(self, request: web.Request, caller: Caller, upgrade: bool) -> bool:
        """A handshake with a login cookie must name this origin; a plain GET (the
        console's question whether it can watch; browsers send no Origin on a same-origin
        GET, and CORS keeps the answer from other sites) must not name another."""
        if caller.via != "session":
            return True
        origin = request.headers.get("Origin")
        if origin is None:
            return not upgrade
        u = urlsplit(origin)  # "null" (a sandboxed frame, a file) has no host: never ours
        return u.scheme in ("http", "https") and bool(u.netloc) and (
            u.netloc == request.host or u.netloc == self._public)

    async def live(self, request: web.Request, caller: Caller | None) -> web.StreamResponse:
        assert caller is not None  # noqa: S101 - wrap() guarantees it
        ref = request.match_info["session_id"]
        if not SESSION_ID_RE.match(ref.casefold()):
            raise S.invalid("session_id", "a session id (or a prefix of one) is letters, "
                                          "digits and dashes")
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4096, compress=False)
        upgrade = ws.can_prepare(request).ok
        if not self._origin_ok(request, caller, upgrade):
            raise S.ApiError(403, "forbidden", "a watch with a login cookie must come from the "
                             "console's own origin")
        rec = await self._live.resolve(caller.actor, ref)
        try:
            if not upgrade:
                await self._live.check(rec)
                return web.json_response({"session_id": rec.id, "live": True}, dumps=_dumps)
            roles = sorted(r.value for r in caller.actor.roles)

            async def still_allowed() -> bool:
                try:
                    now = await self._recheck(request)
                    return now is not None and (await self._live.resolve(
                        now.actor, rec.id)).id == rec.id
                except Exception:  # any failure ends the watch (fail closed)
                    return False

            watch = await self._live.watch(rec, caller.actor.name, roles,
                                           "console" if caller.via == "session" else "api",
                                           still_allowed)
        except NotLive as exc:
            raise S.ApiError(409, exc.reason, str(exc)) from None
        try:
            await ws.prepare(request)
            sender = asyncio.create_task(self._send(ws, watch.messages()))
            try:
                async for msg in ws:  # read-only: what a watcher sends is dropped
                    if msg.type == WSMsgType.ERROR:
                        break
                    if sender.done():
                        break
            finally:
                if not sender.done():
                    sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await sender
        finally:
            watch.close()
        return ws

    @staticmethod
    async def _send(ws: web.WebSocketResponse, messages: AsyncIterator[Message]) -> None:
        try:
            async for msg in messages:
                await ws.send_str(_dumps(msg))
        except (ConnectionError, RuntimeError) as exc:  # the watcher went away
            log.info("web.watch_aborted", error=str(exc)[:200])
            return
        except Exception as exc:  # a broken recording: say so, never a traceback
            log.error("web.watch_failed", error=repr(exc)[:300])
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(_dumps({"end": {"reason": "error", "exit_status": None,
                                                   "message": "the live view failed"}}))
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.close()


def live_routes(live: LiveService, public_url: str | None, recheck: Recheck) -> list[Route]:
    api = LiveApi(live, public_url, recheck)
    return [Route(
        "GET", "/api/sessions/{session_id}/live", api.live,
        "Watch a live session (WebSocket; viewer-safe; audited session.watched). Without "
        "Upgrade: whether it can be watched here (409 ended, elsewhere, not_recorded, "
        "no_terminal)", "any", ("sessions:read",), responses=(101, 200, 400, 401, 403, 404, 409))]
