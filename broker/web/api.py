"""The grant-workflow JSON API: handlers, authentication, CSRF and error mapping.

One route table drives both the aiohttp router and the OpenAPI document, so the document cannot
drift from what is served. Every handler goes through ``GrantService`` with an ``Actor`` built
from a signed session or an API token; the service and the pure workflow decide what is allowed,
and this module only translates HTTP to those calls and their errors back to HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from broker.config import RoleSettings, WebSettings
from broker.domain import workflow as wf
from broker.domain.models import Grant, GrantState, Principal
from broker.domain.proxyproto import forwarded_client, networks
from broker.domain.selector import SelectorError, parse_selector
from broker.domain.workflow import Actor, GrantRequest, Role, WorkflowError
from broker.errors import AuditError, ConflictError, NotFoundError, StoreError
from broker.ports import ApiTokenRecord, AuditSink, Clock, TokenStore, WebSessionRecord
from broker.services.account_check import AccountChecker, directory_failed
from broker.services.auth import Authenticator
from broker.services.fleet import FleetWatch
from broker.services.grants import GrantFilter, GrantService
from broker.services.live import LiveService
from broker.services.locks import LockService
from broker.services.notify import Dispatcher
from broker.services.review import ReviewService
from broker.services.roles import roles_of
from broker.web import schema as S
from broker.web.console_routes import CONSOLE_PREFIX, add_console_routes
from broker.web.fleet_api import FleetApi, fleet_routes
from broker.web.inventory_api import inventory_routes
from broker.web.known_hosts import KnownHosts
from broker.web.live_api import live_routes
from broker.web.locks_api import IncidentApi, lock_routes
from broker.web.notify_api import NotifyApi, notify_routes
from broker.web.routes import Caller, Route
from broker.web.schema import ApiError
from broker.web.sessions_api import session_routes
from broker.web.signing import SessionSigner

log = structlog.get_logger("broker.web")

MAX_BODY = 64 * 1024
JSON_TYPE = "application/json"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_ALL_SCOPES = frozenset({"sessions:read", "audit:read"})
TOKEN_PREFIX = "bbt_"  # noqa: S105 - a marker, not a secret
HSTS = web.AppKey("hsts", bool)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# The console (``/``, ``/console/*``): its own scripts, styles and API calls, nothing inline, no
# eval. 'wasm-unsafe-eval' is the one addition: the asciinema player's terminal emulator is
# WebAssembly, compiled from bytes embedded in its script (``new WebAssembly.Module``), which
# script-src 'self' alone refuses; it allows compiling WebAssembly, never eval() or new Function.
# The player sets styles through the CSSOM (element.style), which style-src does not restrict,
# so style-src needs no 'unsafe-inline' (docs/console.md).
CONSOLE_CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
               "img-src 'self' data:; connect-src 'self'; font-src 'self'; "
               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


@dataclass
class WebContext:
    """What the API needs; ``app.py`` (or a test) builds it from real services."""

    grants: GrantService
    authenticator: Authenticator
    tokens: TokenStore
    audit: AuditSink
    clock: Clock
    roles: RoleSettings
    settings: WebSettings
    signer: SessionSigner
    # the directory, asked again at most every [web] recheck_seconds for each caller
    accounts: AccountChecker
    auto_approve_groups: tuple[str, ...] = ()
    review: ReviewService | None = None  # the sessions API (broker.web.sessions_api)
    locks: LockService | None = None  # kill and lock (broker.web.locks_api)
    known_hosts: KnownHosts | None = None  # GET /api/ssh/known_hosts (broker.web.known_hosts)
    live: LiveService | None = None  # watch a live session (broker.web.live_api)
    notify: Dispatcher | None = None  # the delivery log (broker.web.notify_api)
    fleet: FleetWatch | None = None  # the bastions' heartbeats (broker.web.fleet_api)

    @property
    def session_cookie(self) -> str:
        # __Host- binds the cookie to this origin (no Domain, Path=/), but requires Secure
        return "__Host-bb_session" if self.settings.secure_cookies else "bb_session"

    @property
    def csrf_cookie(self) -> str:
        return "__Host-bb_csrf" if self.settings.secure_cookies else "bb_csrf"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def error_response(status: int, error: str, detail: Any = None) -> web.Response:
    return _json({"error": error, "detail": detail}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid", "body is not valid JSON") from None
    except RecursionError:  # thousands of nested brackets fit in 64 KiB
        raise ApiError(400, "invalid", "body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid", "body must be a JSON object")
    return data


def _peer(request: web.Request, trusted_proxies: Sequence[str]) -> str:
    """The client as ``address:port``: the direct peer, or, from one of ``[web]
    trusted_proxies``, the client its X-Forwarded-For names (port unknown: 0)."""
    peername = request.transport.get_extra_info("peername") if request.transport else None
    if not (isinstance(peername, tuple) and len(peername) >= 2):
        return f"{request.remote or '?'}:0"
    ip = str(peername[0])
    if trusted_proxies:
        client = forwarded_client(ip, request.headers.getall("X-Forwarded-For", []),
                                  networks(tuple(trusted_proxies)))
        if client != ip:
            return f"{client}:0"
    return f"{ip}:{peername[1]}"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_WF_STATUS = {"invalid": 400, "forbidden": 403, "conflict": 409}


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """Every failure becomes ``{"error", "detail"}`` JSON; nothing leaks a stack trace."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.error, exc.detail)
    except WorkflowError as exc:
        status = _WF_STATUS.get(exc.kind, 400)
        name = {400: "invalid", 403: "forbidden", 409: "conflict"}[status]
        detail = {"message": str(exc)}
        if exc.field:  # the field at fault, as for the API's own checks (unknown stack, VPC)
            detail["field"] = exc.field
        return error_response(status, name, detail)
    except NotFoundError as exc:
        return error_response(404, "not found", {"message": str(exc)})
    except ConflictError as exc:
        return error_response(409, "conflict", {"message": str(exc)})
    except (StoreError, AuditError) as exc:
        log.error("web.unavailable", error=str(exc), path=request.path)
        return error_response(503, "unavailable", {"message": exc.user_message})
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "body too large",
                              {"message": f"request bodies are limited to {MAX_BODY} bytes"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = error_response(exc.status, (exc.reason or "error").lower(), None)
        if "Allow" in exc.headers:  # 405 names the methods the path has (RFC 9110)
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except Exception as exc:  # a bug: answer 500 without details, log the kind of failure
        log.error("web.internal_error", error=repr(exc)[:500], path=request.path,
                  method=request.method)
        return error_response(500, "internal error", None)


def guard_middleware(ctx: WebContext) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Size, content type and origin checks before any handler runs."""
    public = urlsplit(ctx.settings.public_url).netloc if ctx.settings.public_url else ""

    @web.middleware
    async def guard(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY,
                                                actual_size=request.content_length)
        if request.method not in SAFE_METHODS:
            if request.body_exists and request.content_type != JSON_TYPE:
                raise ApiError(415, "unsupported media type",
                               "send the body as application/json")
            origin = request.headers.get("Origin")
            if (origin is not None and "Authorization" not in request.headers
                    and urlsplit(origin).netloc not in (request.host, public)):
                raise ApiError(403, "forbidden", "cross-origin request refused")
        return await handler(request)

    return guard


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/" or request.path.startswith(CONSOLE_PREFIX):
        response.headers["Content-Security-Policy"] = CONSOLE_CSP
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    response.headers["Server"] = "bastion-broker"
    if request.app.get(HSTS):
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")


class Api:
    """The handlers, bound to one ``WebContext``."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    # -- authentication ----------------------------------------------------------------------
    async def caller(self, request: web.Request) -> Caller | None:
        authz = request.headers.get("Authorization")
        if authz is not None:
            scheme, _, cred = authz.partition(" ")
            if scheme.lower() != "bearer" or not cred.strip():
                raise ApiError(401, "unauthorized", "malformed Authorization header")
            return await self._token_caller(cred.strip())
        cookie = request.cookies.get(self.ctx.session_cookie)
        return await self._session_caller(cookie) if cookie else None

    async def _session_caller(self, cookie: str) -> Caller | None:
        now = self.ctx.clock.now()
        p = self.ctx.signer.verify(cookie, now.timestamp())
        if p is None:
            return None
        try:
            username, domain, sid = str(p["u"]), str(p["d"]), str(p["sid"])
            csrf, exp = str(p["csrf"]), float(p["exp"])
        except (KeyError, ValueError, TypeError):
            return None
        if not await self.ctx.tokens.session_active(sid, now):
            return None  # logged out, ended by an operator, or never recorded
        principal = await self._live(username, domain, sid=sid)
        # roles and groups as the directory says now, never as the cookie said at login
        roles = roles_of(principal, self.ctx.roles) | {Role.REQUESTER}
        actor = Actor(f"{username}@{domain}".casefold(), roles)
        return Caller(actor, username, domain, self._auto_groups(principal), "session",
                      frozenset(S.SCOPES), sid=sid, csrf=csrf, exp=exp)

    async def _token_caller(self, token: str) -> Caller:
        rec = None
        if token.startswith(TOKEN_PREFIX) and len(token) <= 200:
            rec = await self.ctx.tokens.by_hash(_token_hash(token))
        now = self.ctx.clock.now()
        if rec is None or rec.revoked_at is not None or now >= rec.expires_at:
            raise ApiError(401, "unauthorized", "invalid, expired or revoked token")
        username, _, domain = rec.owner.rpartition("@")
        principal = await self._live(username, domain, token_id=rec.id)
        # never more than the owner has now, nor more than the token was made with
        ceiling = {Role(r) for r in rec.roles if r in Role._value2member_map_}
        roles = set(roles_of(principal, self.ctx.roles) & ceiling)
        if "grants:approve" not in rec.scopes:
            if Role.ADMIN in roles and READ_ALL_SCOPES & set(rec.scopes):
                roles.add(Role.AUDITOR)  # an admin's reading token still reads everything
            roles -= {Role.APPROVER, Role.ADMIN}  # a token without the scope cannot approve
        scopes = set(rec.scopes)
        if not roles & {Role.APPROVER, Role.ADMIN}:
            scopes.discard("grants:approve")  # the owner may no longer approve
        groups = self._auto_groups(principal) & frozenset(rec.groups)
        return Caller(Actor(rec.owner, frozenset(roles | {Role.REQUESTER})), username, domain,
                      groups, "token", frozenset(scopes), token_id=rec.id)

    async def _live(self, username: str, domain: str, **ident: str) -> Principal:
        """The account as the directory describes it now (or within ``recheck_seconds``): 401
        for an account that is gone, disabled, expired, locked or out of the required groups;
        503 while the directory cannot answer (fail closed, without ending anything)."""
        outcome = await self.ctx.accounts.check(username, domain)
        user = f"{username}@{domain}".casefold()
        if outcome.principal is not None:
            # a lock on the user (``bastion-broker lock --user``) stops their console and
            # scripts too, at the next request: one read of the (few) active locks
            lock = (await self.ctx.locks.user_lock(outcome.principal)
                    if self.ctx.locks is not None else None)
            if lock is None:
                return outcome.principal
            await self._shut_out(user, f"locked: lock {lock.id}", ident)
            raise ApiError(401, "unauthorized", lock.describe())
        if directory_failed(outcome):
            log.error("web.directory_unavailable", user=f"{username}@{domain}",
                      reason=outcome.reason)
            raise ApiError(503, "unavailable", "the directory cannot answer now; try again later")
        await self._shut_out(user, f"account no longer allowed: {outcome.reason}", ident)
        raise ApiError(401, "unauthorized", "the account is no longer allowed in; log in again")

    async def _shut_out(self, user: str, reason: str, ident: dict[str, str]) -> None:
        """A login session that cannot come back ends for every bastion; a token is refused
        (it works again if the lock goes and the account is allowed). Both audited."""
        if "sid" in ident:
            if await self.ctx.tokens.revoke_session(ident["sid"], self.ctx.clock.now()):
                self.ctx.audit.emit("web.session_ended", user=user, session=ident["sid"],
                                    reason=reason)
        else:
            self.ctx.audit.emit("api_token.refused", user=user, token_id=ident["token_id"],
                                reason=reason)

    def _auto_groups(self, principal: Principal) -> frozenset[str]:
        wanted = {g.casefold() for g in self.ctx.auto_approve_groups}
        return frozenset(g for g in principal.groups if g.casefold() in wanted)

    def wrap(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            caller: Caller | None = None
            if route.auth != "public":
                caller = await self.caller(request)
                if caller is None:
                    raise ApiError(401, "unauthorized", "log in first (POST /api/login)")
                if route.auth == "session" and caller.via != "session" and not (
                        route.self_token and caller.token_id
                        and request.match_info.get("token_id") == caller.token_id):
                    raise ApiError(403, "forbidden", "this needs a login session, not a token")
                if caller.via == "token" and route.scopes and not (
                        caller.scopes & set(route.scopes)):
                    raise ApiError(403, "forbidden",
                                   "the token lacks the scope " + " or ".join(route.scopes))
                if caller.via == "session" and request.method not in SAFE_METHODS:
                    sent = request.headers.get(CSRF_HEADER, "")
                    if not hmac.compare_digest(sent.encode(), caller.csrf.encode()):
                        raise ApiError(403, "csrf", f"missing or wrong {CSRF_HEADER} header")
            return await route.handler(request, caller)

        return handle

    # -- login, logout, tokens -----------------------------------------------------------------
    async def login(self, request: web.Request, _: Caller | None) -> web.StreamResponse:
        body = await _body(request)
        S.check_keys(body, {"user", "password", "code"}, ("user", "password", "code"))
        user = S.get_str(body, "user", max_len=512) or ""
        password = S.get_str(body, "password", max_len=1024) or ""
        code = S.get_str(body, "code", max_len=16) or ""
        try:
            sel = parse_selector(user)
        except SelectorError:
            raise S.invalid("user", "must be user, user@domain or DOMAIN\\user") from None
        if sel.target:
            raise S.invalid("user", "must be user, user@domain or DOMAIN\\user")
        if not (code.isascii() and code.isdigit() and 6 <= len(code) <= 8):
            raise S.invalid("code", "must be the 6-digit code from the authenticator app")
        peer = _peer(request, self.ctx.settings.trusted_proxies)
        result = await self.ctx.authenticator.login(sel.username, sel.domain, password, code,
                                                    peer)
        principal = result.principal
        if principal is None or result.enrol_secret is not None:
            raise ApiError(401, "login failed",
                           "wrong user, password or code, or too many attempts; try again later")
        roles = roles_of(principal, self.ctx.roles) | {Role.REQUESTER}
        groups = sorted(self._auto_groups(principal))
        now = self.ctx.clock.now().timestamp()
        ttl = self.ctx.settings.session_minutes * 60
        # "w-": an id the operator CLI can take as an argument (never a leading "-")
        sid, csrf = "w-" + secrets.token_urlsafe(16), secrets.token_urlsafe(24)
        started = self.ctx.clock.now()
        await self.ctx.tokens.start_session(WebSessionRecord(
            sid=sid, owner=principal.key, peer=peer, created_at=started,
            expires_at=datetime.fromtimestamp(int(now + ttl), started.tzinfo)))
        token = self.ctx.signer.sign({
            "sid": sid, "u": principal.username, "d": principal.domain, "g": groups,
            "r": sorted(r.value for r in roles), "csrf": csrf, "iat": int(now),
            "exp": int(now + ttl),
        })
        self.ctx.audit.emit("web.login", user=str(principal), peer=peer, session=sid,
                            roles=sorted(r.value for r in roles))
        resp = _json({"user": str(principal), "roles": sorted(r.value for r in roles),
                      "expires_at": datetime.fromtimestamp(now + ttl, self.ctx.clock.now().tzinfo
                                                           ).isoformat(),
                      "csrf": csrf})
        secure = self.ctx.settings.secure_cookies
        resp.set_cookie(self.ctx.session_cookie, token, max_age=ttl, path="/", secure=secure,
                        httponly=True, samesite="Strict")
        resp.set_cookie(self.ctx.csrf_cookie, csrf, max_age=ttl, path="/", secure=secure,
                        httponly=False, samesite="Strict")
        return resp

    async def logout(self, request: web.Request, caller: Caller | None) -> web.StreamResponse:
        assert caller is not None  # noqa: S101 - wrap() guarantees it
        await self.ctx.tokens.revoke_session(caller.sid, self.ctx.clock.now())
        await self.ctx.tokens.end_session(caller.sid, caller.exp)
        self.ctx.audit.emit("web.logout", user=caller.actor.name, session=caller.sid,
                            peer=_peer(request, self.ctx.settings.trusted_proxies))
        resp = _json({"ok": True})
        for name in (self.ctx.session_cookie, self.ctx.csrf_cookie):
            resp.del_cookie(name, path="/", secure=self.ctx.settings.secure_cookies,
                            samesite="Strict")
        return resp

    async def me(self, request: web.Request, caller: Caller | None) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        return _json({"user": f"{caller.username}@{caller.domain}",
                      "roles": sorted(r.value for r in caller.actor.roles),
                      "via": caller.via, "scopes": sorted(caller.scopes)})

    async def token_create(self, request: web.Request, caller: Caller | None
                           ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        body = await _body(request)
        S.check_keys(body, {"name", "scopes", "ttl_days"}, ("name", "scopes"))
        name = (S.get_str(body, "name", max_len=100) or "").strip()
        if not name:
            raise S.invalid("name", "is required")
        scopes = body["scopes"]
        if (not isinstance(scopes, list) or not scopes
                or not all(isinstance(s, str) and s in S.SCOPES for s in scopes)
                or len(set(scopes)) != len(scopes)):
            raise S.invalid("scopes", "must be a non-empty list of " + ", ".join(S.SCOPES))
        ttl = body.get("ttl_days", 30)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= 365:
            raise S.invalid("ttl_days", "must be a whole number of days from 1 to 365")
        if "grants:approve" in scopes and not caller.actor.has(Role.APPROVER):
            raise ApiError(403, "forbidden", "grants:approve needs the approver role")
        if "audit:read" in scopes and not caller.actor.has(Role.AUDITOR):
            raise ApiError(403, "forbidden", "audit:read needs the auditor role")
        now = self.ctx.clock.now()
        token_id = "t-" + secrets.token_hex(8)
        token = f"{TOKEN_PREFIX}{secrets.token_urlsafe(32)}"
        rec = ApiTokenRecord(
            id=token_id, owner=caller.actor.name, name=name, scopes=tuple(scopes),
            roles=tuple(sorted(r.value for r in caller.actor.roles)),
            groups=tuple(sorted(caller.groups)), created_at=now,
            expires_at=now + timedelta(days=ttl))
        await self.ctx.tokens.add(rec, _token_hash(token))
        self.ctx.audit.emit("api_token.created", user=caller.actor.name, token_id=token_id,
                            name=name, scopes=list(scopes), expires_at=rec.expires_at.isoformat(),
                            roles=list(rec.roles))
        return _json({**self._token_json(rec), "token": token}, status=201)

    @staticmethod
    def _token_json(rec: ApiTokenRecord) -> dict[str, Any]:
        return {"id": rec.id, "name": rec.name, "scopes": list(rec.scopes),
                "created_at": rec.created_at.isoformat(),
                "expires_at": rec.expires_at.isoformat(),
                "revoked": rec.revoked_at is not None}

    async def token_list(self, request: web.Request, caller: Caller | None
                         ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        recs = await self.ctx.tokens.listing(caller.actor.name)
        return _json([self._token_json(r) for r in recs])

    async def token_revoke(self, request: web.Request, caller: Caller | None
                           ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        token_id = request.match_info["token_id"]
        if not await self.ctx.tokens.revoke(token_id, caller.actor.name, self.ctx.clock.now()):
            raise NotFoundError(f"no active token {token_id}")
        self.ctx.audit.emit("api_token.revoked", user=caller.actor.name, token_id=token_id,
                            via=caller.via, roles=sorted(r.value for r in caller.actor.roles))
        return _json({"id": token_id, "revoked": True})

    # -- grants ----------------------------------------------------------------------------------
    def _request_from(self, body: dict[str, Any], caller: Caller, base: Grant | None,
                      change: bool = False) -> GrantRequest:
        """A full request from the body over ``base``; others' grants need the approver role."""
        req = S.build_request(body, base, self.ctx.clock.now(), default_user=caller.username,
                              default_domain=caller.domain, change=change)
        mine = (req.username.casefold(), req.domain.casefold()) == (
            caller.username.casefold(), caller.domain.casefold())
        named = "user" in body or "domain" in body or base is None
        if not mine and named and not caller.actor.has(Role.APPROVER):
            raise ApiError(403, "forbidden",
                           "requesting access for someone else needs the approver role")
        return req

    def _grant(self, g: Grant, status: int = 200) -> web.Response:
        return _json(S.grant_json(g, self.ctx.clock.now()), status=status)

    async def grant_list(self, request: web.Request, caller: Caller | None
                         ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        q = request.query
        for k in q:
            if k not in ("user", "stack", "state", "since", "until", "limit"):
                raise S.invalid(k, "unknown query parameter")
        now = self.ctx.clock.now()
        state = q.get("state")
        if state is not None and state not in S.STATES:
            raise S.invalid("state", "must be one of " + ", ".join(S.STATES))
        user, stack = q.get("user"), q.get("stack")
        if user is not None and not wf.USER_RE.match(user):
            raise S.invalid("user", "is not a valid AD user name")
        if user is not None and user.casefold() != caller.username.casefold() \
                and not caller.actor.roles & {Role.APPROVER, Role.AUDITOR, Role.ADMIN}:
            # refused, not ignored: a requester sees only their own grants
            raise ApiError(403, "forbidden", "you may list only your own grants (query user)")
        if stack is not None and not wf.STACK_RE.match(stack):
            raise S.invalid("stack", "is not a valid stack ID")
        since = S.parse_time("since", q["since"], now) if "since" in q else None
        until = S.parse_time("until", q["until"], now) if "until" in q else None
        limit = 500
        if "limit" in q:
            if not q["limit"].isdigit() or not 1 <= int(q["limit"]) <= 1000:
                raise S.invalid("limit", "must be a whole number from 1 to 1000")
            limit = int(q["limit"])
        rows = await self.ctx.grants.search(caller.actor, GrantFilter(
            username=user, stack=stack, state=state, since=since, until=until, limit=limit))
        return _json([S.grant_json(g, now) for g in rows])

    async def grant_create(self, request: web.Request, caller: Caller | None
                           ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        req = self._request_from(await _body(request), caller, None)
        g = await self.ctx.grants.request(caller.actor, req, caller.groups)
        return self._grant(g, 201)

    async def grant_show(self, request: web.Request, caller: Caller | None
                         ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        g, history = await self.ctx.grants.show(caller.actor, request.match_info["grant_id"])
        data = S.grant_json(g, self.ctx.clock.now())
        data["history"] = [S.history_json(e) for e in history]
        return _json(data)

    async def grant_update(self, request: web.Request, caller: Caller | None
                           ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        body = await _body(request)
        base = await self.ctx.grants.load(caller.actor, request.match_info["grant_id"])
        state = base.effective_state(self.ctx.clock.now())
        if state is not GrantState.PENDING:
            hint = "use change" if state is GrantState.APPROVED else "a new request is needed"
            raise WorkflowError("conflict", f"grant {base.id} is {state}, not pending: {hint}")
        req = self._request_from(body, caller, base)
        return self._grant(await self.ctx.grants.update(caller.actor, base.id, req))

    async def grant_change(self, request: web.Request, caller: Caller | None
                           ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        body = await _body(request)
        base = await self.ctx.grants.load(caller.actor, request.match_info["grant_id"])
        req = self._request_from(body, caller, base, change=True)
        return self._grant(await self.ctx.grants.change(caller.actor, base.id, req))

    async def _comment(self, request: web.Request, required: bool = False) -> str:
        body = await _body(request)
        S.check_keys(body, {"comment"}, ("comment",) if required else ())
        comment = S.get_str(body, "comment", max_len=wf.MAX_TEXT) or ""
        if required and not comment.strip():
            raise S.invalid("comment", "must not be empty")
        return comment

    async def grant_withdraw(self, request: web.Request, caller: Caller | None
                             ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        comment = await self._comment(request)
        return self._grant(await self.ctx.grants.withdraw(
            caller.actor, request.match_info["grant_id"], comment))

    async def grant_approve(self, request: web.Request, caller: Caller | None
                            ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        comment = await self._comment(request)
        return self._grant(await self.ctx.grants.approve(
            caller.actor, request.match_info["grant_id"], comment))

    async def grant_reject(self, request: web.Request, caller: Caller | None
                           ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        comment = await self._comment(request, required=True)
        return self._grant(await self.ctx.grants.reject(
            caller.actor, request.match_info["grant_id"], comment))

    async def grant_revoke(self, request: web.Request, caller: Caller | None
                           ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        comment = await self._comment(request)
        return self._grant(await self.ctx.grants.revoke(
            caller.actor, request.match_info["grant_id"], comment))

    async def grant_extend(self, request: web.Request, caller: Caller | None
                           ) -> web.StreamResponse:
        assert caller is not None  # noqa: S101
        body = await _body(request)
        S.check_keys(body, {"until", "hours", "comment"})
        comment = S.get_str(body, "comment", max_len=wf.MAX_TEXT) or ""
        if ("until" in body) == ("hours" in body):
            raise S.invalid("until", "give either until (a time) or hours (added to the end)")
        grant_id = request.match_info["grant_id"]
        if "until" in body:
            if S.RELATIVE_RE.match(str(body["until"])):
                raise S.invalid("until", "must be an absolute time")
            until = S.parse_time("until", body["until"], self.ctx.clock.now())
        else:
            hours = S.get_hours(body) or 0.0
            base = await self.ctx.grants.load(caller.actor, grant_id)
            until = base.expires_at + timedelta(hours=hours)
        return self._grant(await self.ctx.grants.extend(caller.actor, grant_id, until, comment))

    async def openapi(self, request: web.Request, _: Caller | None) -> web.StreamResponse:
        from broker.web.openapi import document

        return _json(document(self.routes()))

    def routes(self) -> list[Route]:
        g = "/api/grants/{grant_id}"
        read, write, appr = ("grants:read",), ("grants:write",), ("grants:approve",)
        std = (200, 400, 401, 403, 404, 409, 413, 415)
        incidents = self._incidents()
        return [
            Route("GET", "/api/openapi.json", self.openapi, "This OpenAPI document", "public"),
            Route("POST", "/api/login", self.login,
                  "Log in with AD password and TOTP code; sets the session and CSRF cookies",
                  "public", body="Login", responses=(200, 400, 401, 413, 415),
                  ok_schema="Session"),
            Route("POST", "/api/logout", self.logout, "End the session (on every broker)",
                  "session", responses=(200, 401, 403)),
            Route("GET", "/api/me", self.me, "Who is calling, with roles and scopes", "any",
                  responses=(200, 401)),
            Route("POST", "/api/tokens", self.token_create,
                  "Create a scoped API token (shown once; at most the owner's rights)",
                  "session", body="TokenCreate", responses=(201, 400, 401, 403, 413, 415),
                  ok_schema="TokenCreated"),
            Route("GET", "/api/tokens", self.token_list, "The caller's API tokens", "session",
                  responses=(200, 401, 403)),
            Route("DELETE", "/api/tokens/{token_id}", self.token_revoke,
                  "Revoke an API token (with a session, or the token itself)",
                  "session", responses=(200, 401, 403, 404), self_token=True),
            Route("GET", "/api/grants", self.grant_list,
                  "List grants the caller may see (own, or all for approvers and auditors)",
                  "any", read, query=(
                      ("user", "AD user name (approvers and auditors only)"),
                      ("stack", "stack ID"),
                      ("state", "one of " + ", ".join(S.STATES)),
                      ("since", "grants ending after this (RFC 3339 or 12h, 7d)"),
                      ("until", "grants starting before this (RFC 3339 or 12h, 7d)"),
                      ("limit", "at most this many (1-1000, default 500)")),
                  responses=(200, 400, 401, 403), ok_schema="GrantList"),
            Route("POST", "/api/grants", self.grant_create, "Request access", "any", write,
                  body="GrantRequest", responses=(201, *std[1:]), ok_schema="Grant"),
            Route("GET", g, self.grant_show, "A grant with its history", "any", read,
                  responses=(200, 401, 403, 404), ok_schema="GrantWithHistory"),
            Route("PATCH", g, self.grant_update, "Edit a pending request (fields left out stay)",
                  "any", write, body="GrantPatch", responses=std, ok_schema="Grant"),
            Route("POST", g + "/withdraw", self.grant_withdraw, "Withdraw a pending request",
                  "any", write, body="Comment", responses=std, ok_schema="Grant"),
            Route("POST", g + "/change", self.grant_change,
                  "Change an approved grant; widening it needs approval again", "any", write,
                  body="GrantPatch", responses=std, ok_schema="Grant"),
            Route("POST", g + "/approve", self.grant_approve, "Approve a pending request",
                  "any", appr, body="Comment", responses=std, ok_schema="Grant"),
            Route("POST", g + "/reject", self.grant_reject, "Reject a pending request", "any",
                  appr, body="RequiredComment", responses=std, ok_schema="Grant"),
            Route("POST", g + "/extend", self.grant_extend, "Move the end of an approved grant",
                  "any", appr, body="Extend", responses=std, ok_schema="Grant"),
            Route("POST", g + "/revoke", self.grant_revoke,
                  "End a grant now (approvers, or the grantee)", "any", write + appr,
                  body="Comment", responses=std, ok_schema="Grant"),
            *inventory_routes(self.ctx.grants),
            *(session_routes(self.ctx.review, self.ctx.clock.now,
                             incidents.kill if incidents else None) if self.ctx.review else ()),
            *(lock_routes(incidents) if incidents else ()),
            *(self.ctx.known_hosts.routes() if self.ctx.known_hosts else ()),
            *(live_routes(self.ctx.live, self.ctx.settings.public_url, self.caller)
              if self.ctx.live else ()),
            *(notify_routes(NotifyApi(self.ctx.notify)) if self.ctx.notify else ()),
            *(fleet_routes(FleetApi(self.ctx.fleet, self.ctx.clock.now))
              if self.ctx.fleet else ()),
        ]

    def _incidents(self) -> IncidentApi | None:
        if self.ctx.locks is None or self.ctx.review is None:
            return None
        return IncidentApi(self.ctx.locks, self.ctx.review, self.ctx.clock.now,
                           self.ctx.authenticator.account_of)


def create_app(ctx: WebContext) -> web.Application:
    """The aiohttp application: routes from ``Api.routes()``, guards, security headers."""
    app = web.Application(client_max_size=MAX_BODY,
                          middlewares=[error_middleware, guard_middleware(ctx)])
    app[HSTS] = ctx.settings.secure_cookies
    api = Api(ctx)
    for route in api.routes():
        app.router.add_route(route.method, route.path, api.wrap(route))
    add_console_routes(app, ctx.settings)
    app.on_response_prepare.append(_security_headers)
    return app
