"""The incident brakes over HTTP: end one live session (auditors and admins) and locks on a user,
a target or a stack (admins), routes for the router and the OpenAPI document (``api``).

They need a login session (cookie and ``X-CSRF-Token``), never an API token: ending someone's
work or locking them out is a person's act, audited with their name. The handlers parse input
and call ``LockService``; the bastions' enforcement loops do the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from broker.domain.locks import MAX_REASON, KillRequest, Lock, LockKind
from broker.domain.workflow import Role
from broker.services.locks import InvalidLock, LockService, parse_ttl
from broker.services.review import ReviewService
from broker.web import schema as S
from broker.web.routes import Caller, Route

LOCK_ID_PATH = re.compile(r"^lk-[0-9a-f]{1,64}$")


def lock_json(lk: Lock, now: datetime) -> dict[str, Any]:
    return {"id": lk.id, "kind": lk.kind.value, "value": lk.value, "reason": lk.reason,
            "state": lk.state(now), "created_by": lk.created_by,
            "created_at": lk.created_at.isoformat(),
            "expires_at": lk.expires_at.isoformat() if lk.expires_at else None,
            "removed_at": lk.removed_at.isoformat() if lk.removed_at else None,
            "removed_by": lk.removed_by}


def kill_json(k: KillRequest) -> dict[str, Any]:
    return {"id": k.id, "session_id": k.session_id, "reason": k.reason,
            "requested_by": k.requested_by, "requested_at": k.requested_at.isoformat()}


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read() if request.body_exists else b""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise S.invalid("body", "is not valid JSON") from None
    if not isinstance(data, dict):
        raise S.invalid("body", "must be a JSON object")
    return data


def _reason(body: dict[str, Any]) -> str:
    reason = S.get_str(body, "reason", max_len=MAX_REASON) or ""
    if not reason.strip():
        raise S.invalid("reason", "must say why (it is audited and shown to the user)")
    return reason


def _need(caller: Caller | None, role: Role, what: str) -> Caller:
    assert caller is not None  # noqa: S101 - wrap() guarantees it
    if not caller.actor.has(role):
        raise S.ApiError(403, "forbidden", f"{what} needs the {role.value} role")
    return caller


class IncidentApi:
    def __init__(self, locks: LockService, review: ReviewService, now: Callable[[], datetime],
                 account_of: Callable[[str, str | None], str]) -> None:
        self.locks = locks
        self.review = review
        self.now = now
        self.account_of = account_of  # user, domain -> user@fqdn as the directory names it

    async def kill(self, request: web.Request, caller: Caller | None) -> web.StreamResponse:
        c = _need(caller, Role.AUDITOR, "ending a session")
        body = await _body(request)
        S.check_keys(body, {"reason"}, ("reason",))
        reason = _reason(body)
        sid = request.match_info["session_id"]
        if not re.fullmatch(r"[0-9A-Za-z-]{1,64}", sid):
            raise S.invalid("session_id", "a session id is letters, digits and dashes")
        rec = await self.review.resolve(c.actor, sid)
        try:
            req = await self.locks.kill(c.actor.name, rec, reason)
        except InvalidLock as exc:
            raise S.invalid("reason", str(exc)) from None
        return web.json_response(kill_json(req), status=202)

    async def lock_list(self, request: web.Request, caller: Caller | None
                        ) -> web.StreamResponse:
        _need(caller, Role.ADMIN, "the lock list")
        for k in request.query:
            if k != "all":
                raise S.invalid(k, "unknown query parameter")
        every = request.query.get("all")
        if every not in (None, "0", "1"):
            raise S.invalid("all", "must be 1 (removed and expired locks too) or 0")
        now = self.now()
        rows = await self.locks.listing(include_inactive=every == "1")
        return web.json_response([lock_json(lk, now) for lk in rows])

    async def lock_create(self, request: web.Request, caller: Caller | None
                          ) -> web.StreamResponse:
        c = _need(caller, Role.ADMIN, "a lock")
        body = await _body(request)
        S.check_keys(body, {"user", "target", "stack", "ttl", "reason"}, ("reason",))
        named = [k for k in ("user", "target", "stack") if k in body]
        if len(named) != 1:
            raise S.invalid("user", "give exactly one of user, target and stack")
        kind = LockKind(named[0])
        value = S.get_str(body, kind.value, max_len=512) or ""
        reason = _reason(body)
        ttl_text = S.get_str(body, "ttl", max_len=16)
        try:
            ttl = parse_ttl(ttl_text) if ttl_text is not None else None
        except InvalidLock as exc:
            raise S.invalid("ttl", str(exc)) from None
        if kind is LockKind.USER:
            value = self._account(value)
        try:
            lock = await self.locks.create(c.actor.name, kind, value, reason, ttl)
        except InvalidLock as exc:
            raise S.invalid(kind.value, str(exc)) from None
        return web.json_response(lock_json(lock, self.now()), status=201)

    def _account(self, user: str) -> str:
        user = user.strip()
        domain: str | None = None
        if "\\" in user:
            domain, _, user = user.partition("\\")
        elif "@" in user:
            user, _, domain = user.rpartition("@")
        if not user:
            raise S.invalid("user", "must be user, user@domain or DOMAIN\\user")
        return self.account_of(user, domain)

    async def lock_remove(self, request: web.Request, caller: Caller | None
                          ) -> web.StreamResponse:
        c = _need(caller, Role.ADMIN, "removing a lock")
        lock_id = request.match_info["lock_id"]
        if not LOCK_ID_PATH.match(lock_id):
            raise S.invalid("lock_id", "a lock id looks like lk-0123456789ab")
        lock = await self.locks.remove(c.actor.name, lock_id)
        return web.json_response(lock_json(lock, self.now()))


def lock_routes(api: IncidentApi) -> list[Route]:
    std = (400, 401, 403, 413, 415)
    return [
        Route("GET", "/api/locks", api.lock_list,
              "Active locks (all=1: removed and expired ones too); admins", "session",
              query=(("all", "1: every lock ever made"),), responses=(200, 400, 401, 403),
              ok_schema="LockList"),
        Route("POST", "/api/locks", api.lock_create,
              "Lock a user, target or stack: its live sessions end on every bastion, new "
              "logins or sessions are refused until it expires or is removed; admins",
              "session", body="LockCreate", responses=(201, *std), ok_schema="Lock"),
        Route("DELETE", "/api/locks/{lock_id}", api.lock_remove, "Remove an active lock; admins",
              "session", responses=(200, 400, 401, 403, 404), ok_schema="Lock"),
    ]


# the OpenAPI components of these routes (``openapi`` merges them into its own)
_TIME = {"type": "string", "format": "date-time"}
_NULL_TIME = {"oneOf": [_TIME, {"type": "null"}]}
_REASON = {"type": "string", "maxLength": MAX_REASON,
           "pattern": "^[^\\u0000-\\u0008\\u000b-\\u001f]*[^\\s\\u0000-\\u001f]"
                      "[^\\u0000-\\u0008\\u000b-\\u001f]*$",
           "description": "why: audited, and shown to the user whose session ends"}
_LOCK = {"type": "object", "properties": {
    "id": {"type": "string"}, "kind": {"enum": [k.value for k in LockKind]},
    "value": {"type": "string"}, "reason": {"type": "string"},
    "state": {"enum": ["active", "expired", "removed"]}, "created_by": {"type": "string"},
    "created_at": _TIME, "expires_at": _NULL_TIME, "removed_at": _NULL_TIME,
    "removed_by": {"type": ["string", "null"]}}}
SCHEMAS: dict[str, Any] = {
    "Kill": {"type": "object", "additionalProperties": False, "required": ["reason"],
             "properties": {"reason": _REASON}},
    "KillRequested": {"type": "object", "properties": {
        "id": {"type": "string"}, "session_id": {"type": "string"},
        "reason": {"type": "string"}, "requested_by": {"type": "string"},
        "requested_at": _TIME}},
    "LockCreate": {
        "type": "object", "additionalProperties": False, "required": ["reason"],
        "description": "exactly one of user, target and stack",
        "properties": {
            "user": {"type": "string", "maxLength": 512,
                     "description": "alice, alice@corp.example.com or CORP\\alice"},
            "target": {"type": "string", "maxLength": 255,
                       "description": "an instance id or name"},
            "stack": {"type": "string", "maxLength": 255},
            "ttl": {"type": "string", "pattern": "^[0-9]{1,6}[smhdw]$",
                    "description": "how long (30m, 1h, 2d, 1w); default: until removed"},
            "reason": _REASON}},
    "Lock": _LOCK,
    "LockList": {"type": "array", "items": {"$ref": "#/components/schemas/Lock"}},
}
