"""The OpenAPI 3.1 document, generated from the same route table as the router so that every
served route is documented (a test checks it)."""

from __future__ import annotations

import re
from typing import Any

from broker.domain import workflow as wf
from broker.domain.models import Level, Trigger
from broker.ports import SESSION_STATUSES
from broker.services.review import MAX_LIMIT
from broker.web.fleet_api import SCHEMAS as FLEET_SCHEMAS
from broker.web.inventory_api import SCHEMAS as INVENTORY_SCHEMAS
from broker.web.known_hosts import HOST_RE
from broker.web.locks_api import SCHEMAS as LOCK_SCHEMAS
from broker.web.notify_api import SCHEMAS as NOTIFY_SCHEMAS
from broker.web.routes import Route
from broker.web.schema import MAX_HOURS, MIN_HOURS, SCOPES, STATES
from broker.web.sessions_api import (
    EVENT_RE,
    GRANT_RE,
    KINDS,
    REVIEW_USER_RE,
    SESSION_ID_RE,
    TARGET_RE,
)

_TIME = {"type": "string", "format": "date-time"}
# what the server accepts, said in the schema (schemathesis checks both ways): no control
# characters but tab and newline; ticket and reason not blank
_NO_CONTROL = "^[^\\u0000-\\u0008\\u000b-\\u001f]*$"
_TEXT = {"type": "string", "maxLength": 2000, "pattern": _NO_CONTROL}
_NOT_BLANK = {"type": "string", "maxLength": 2000,
              "pattern": "^[^\\u0000-\\u0008\\u000b-\\u001f]*[^\\s\\u0000-\\u001f]"
                         "[^\\u0000-\\u0008\\u000b-\\u001f]*$"}
_LOGIN_USER = "[A-Za-z0-9._$-](?:[A-Za-z0-9._$ -]{0,62}[A-Za-z0-9._$-])?"
_LOGIN_DOMAIN = "[A-Za-z0-9][A-Za-z0-9-]{0,62}(?:\\.[A-Za-z0-9-]{1,63})*"
# query parameters by name (the same name means the same thing on every route)
_QUERY_SCHEMAS: dict[str, dict[str, Any]] = {
    "user": {"type": "string", "pattern": wf.USER_RE.pattern},
    "stack": {"type": "string", "pattern": wf.STACK_RE.pattern},
    "limit": {"type": "string", "pattern": "^(?:[1-9][0-9]{0,2}|1000)$"},
    "host": {"type": "string", "maxLength": 260, "pattern": HOST_RE.pattern},
}
_REQUEST_PROPS: dict[str, Any] = {
    "user": {"type": "string", "pattern": wf.USER_RE.pattern, "maxLength": 64,
             "description": "AD user (default: the caller; others need the approver role)"},
    "domain": {"type": "string", "pattern": wf.DOMAIN_RE.pattern, "maxLength": 255,
               "description": "FQDN of the AD domain (default: the caller's)"},
    "stacks": {"type": "array", "items": {"type": "string", "pattern": wf.STACK_RE.pattern},
               "minItems": 1, "maxItems": 50},
    "vpc": {"type": "string", "pattern": "^vpc-[0-9a-zA-Z]{1,32}$"},
    "level": {"enum": [lv.value for lv in Level]},
    "trigger": {"enum": [t.value for t in Trigger], "default": Trigger.SERVICE_REQUEST.value},
    "ticket": _NOT_BLANK,
    "reason": _NOT_BLANK,
    "hours": {"type": "number", "minimum": MIN_HOURS, "maximum": MAX_HOURS,
              "description": "duration (default 8 h; at most the policy maximum per level)"},
    "starts_at": _TIME,
}
_GRANT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "user": {"type": "string"}, "domain": {"type": "string"},
        "stacks": {"type": "array", "items": {"type": "string"}}, "vpc": {"type": "string"},
        "level": {"enum": [lv.value for lv in Level]},
        "state": {"enum": [s for s in STATES if s != "active"]},
        "active": {"type": "boolean",
                   "description": "approved and inside its window now (state filter active)"},
        "starts_at": _TIME, "expires_at": _TIME,
        "trigger": {"enum": [t.value for t in Trigger]}, "ticket": {"type": "string"},
        "reason": {"type": "string"}, "requested_by": {"type": "string"},
        "approved_by": {"type": "array", "items": {"type": "string"}},
        "created_at": _TIME, "version": {"type": "integer"},
    },
}
_COMMENT = {"type": "object", "additionalProperties": False,
            "properties": {"comment": _TEXT}}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string"},
        "detail": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
            "message": {"type": "string"}, "field": {"type": "string"}}}]}}},
    "Login": {"type": "object", "additionalProperties": False,
              "required": ["user", "password", "code"], "properties": {
                  "user": {"type": "string", "maxLength": 512,
                           "pattern": f"^(?:{_LOGIN_DOMAIN}\\\\)?{_LOGIN_USER}$"
                                      f"|^{_LOGIN_USER}@{_LOGIN_DOMAIN}$",
                           "description": "alice, alice@corp.example.com or CORP\\alice"},
                  "password": {"type": "string", "format": "password", "maxLength": 1024,
                               "pattern": _NO_CONTROL},
                  "code": {"type": "string", "pattern": "^[0-9]{6,8}$"}}},
    "Session": {"type": "object", "properties": {
        "user": {"type": "string"}, "roles": {"type": "array", "items": {"type": "string"}},
        "expires_at": _TIME, "csrf": {"type": "string",
                                      "description": "send as X-CSRF-Token on unsafe methods"}}},
    "TokenCreate": {"type": "object", "additionalProperties": False,
                    "required": ["name", "scopes"], "properties": {
                        "name": {"type": "string", "maxLength": 100},
                        "scopes": {"type": "array", "items": {"enum": list(SCOPES)},
                                   "minItems": 1, "uniqueItems": True},
                        "ttl_days": {"type": "integer", "minimum": 1, "maximum": 365,
                                     "default": 30}}},
    "TokenCreated": {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"},
        "scopes": {"type": "array", "items": {"type": "string"}}, "created_at": _TIME,
        "expires_at": _TIME, "revoked": {"type": "boolean"},
        "token": {"type": "string", "description": "shown once; send as Bearer"}}},
    "GrantRequest": {"type": "object", "additionalProperties": False,
                     "required": ["stacks", "vpc", "level", "ticket", "reason"],
                     "properties": _REQUEST_PROPS},
    "GrantPatch": {"type": "object", "additionalProperties": False,
                   "properties": _REQUEST_PROPS},
    "Comment": _COMMENT,
    "RequiredComment": {**_COMMENT, "required": ["comment"]},
    "Extend": {"type": "object", "additionalProperties": False,
               "description": "exactly one of until and hours", "properties": {
                   "until": _TIME, "comment": _TEXT,
                   "hours": {"type": "number", "minimum": MIN_HOURS, "maximum": MAX_HOURS,
                             "description": "added to the current end"}}},
    "Grant": _GRANT,
    "GrantList": {"type": "array", "items": {"$ref": "#/components/schemas/Grant"}},
    "GrantWithHistory": {"allOf": [{"$ref": "#/components/schemas/Grant"}, {
        "type": "object", "properties": {"history": {"type": "array", "items": {
            "type": "object", "properties": {
                "at": _TIME, "actor": {"type": "string"}, "action": {"type": "string"},
                "comment": {"type": "string"}, "state": {"type": "string"},
                "details": {"type": "object", "description": "each field the entry "
                            "changed, as {\"before\": old, \"after\": new}"}}}}}}]},
}

# -- the sessions API (broker.web.sessions_api) ---------------------------------------------------
_HIT = {"type": "object", "properties": {
    "t": {"type": "number", "description": "seconds from the session start"},
    "source": {"enum": ["output", "input", "command"]}, "snippet": {"type": "string"}}}
_NULL_STR = {"type": ["string", "null"]}
_SESSION: dict[str, Any] = {"type": "object", "properties": {
    **{k: {"type": "string"} for k in ("id", "user", "target", "target_name", "stack", "login",
                                       "level", "kind", "peer", "grant_id", "outcome")},
    "bastion": {"type": "string", "description": "node_name of the bastion that relays it"},
    "command": _NULL_STR, "parent_id": _NULL_STR, "exit_status": _NULL_STR,
    "started_at": _TIME, "ended_at": {"oneOf": [_TIME, {"type": "null"}]},
    "duration_s": {"type": "number"}, "status": {"enum": ["live", "ok", "failed"]},
    "bytes_in": {"type": "integer"}, "bytes_out": {"type": "integer"},
    "recorded": {"type": "boolean"}, "recording_bytes": {"type": ["integer", "null"]},
    "hits": {"type": "array", "items": {"$ref": "#/components/schemas/Hit"}}}}
_FINDING = {"type": "object", "properties": {"code": {"type": "string"},
                                             "message": {"type": "string"}}}
_NEXT = {"type": ["string", "null"], "description": "pass as cursor for the next page"}
SCHEMAS.update({
    "Hit": _HIT,
    "RecordedSession": _SESSION,
    "SessionPage": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/RecordedSession"}},
        "next_cursor": _NEXT}},
    "SessionDetail": {"allOf": [{"$ref": "#/components/schemas/RecordedSession"}, {
        "type": "object", "properties": {
            "grant": {"oneOf": [{"$ref": "#/components/schemas/Grant"}, {"type": "null"}]},
            "grant_history": {"type": "array", "items": {"type": "object"}},
            "files": {"type": "array", "items": {"type": "object"},
                      "description": "the session's sftp.* audit events, in order"},
            "children": {"type": "array", "items": {"$ref": "#/components/schemas/RecordedSession"}},
            "integrity": {"type": "object", "properties": {
                "status": {"enum": ["verified", "failed", "unsealed", "not recorded"]},
                "errors": {"type": "array", "items": _FINDING},
                "warnings": {"type": "array", "items": _FINDING}}}}}]},
    "HitList": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Hit"}}}},
    "Asciicast": {"type": "string", "description": "asciicast v2: a header line, then one "
                  "event per line (served as application/x-asciicast)"},
    "Manifest": {"type": "object", "description": "the signed manifest file as stored"},
    "KnownHosts": {"type": "string", "description": "OpenSSH known_hosts lines: the bastion's "
                   "host key, then '@cert-authority NAMES KEY' for recorded ssh -J"},
    "AuditPage": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object"}}, "next_cursor": _NEXT}},
    "Dashboard": {"type": "object", "properties": {
        "scope": {"enum": ["all", "own"]}, "live_sessions": {"type": "integer"},
        "sessions_per_day": {"type": "array", "items": {
            "type": "array", "prefixItems": [{"type": "string", "format": "date"},
                                             {"type": "integer"}]}},
        "failed_logins_24h": {"type": "integer"},
        "recent_failed_logins": {"type": "array", "items": {"type": "object"}},
        "grants_expiring": {"type": "array", "items": {"$ref": "#/components/schemas/Grant"}}}},
})
SCHEMAS.update(LOCK_SCHEMAS)  # kill and lock (broker.web.locks_api)
SCHEMAS.update(NOTIFY_SCHEMAS)  # the delivery log (broker.web.notify_api)
SCHEMAS.update(FLEET_SCHEMAS)  # the bastions' heartbeats (broker.web.fleet_api)
SCHEMAS.update(INVENTORY_SCHEMAS)  # the request form's stacks and VPCs (broker.web.inventory_api)
# query parameters of the review routes, where a name means more than on the grant routes
_REVIEW_PREFIXES = ("/api/sessions", "/api/audit", "/api/dashboard")
_NO_CONTROL_LINE = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
_REVIEW_QUERY: dict[str, dict[str, Any]] = {
    "user": {"type": "string", "pattern": REVIEW_USER_RE.pattern},
    "limit": {"type": "string", "pattern": f"^(?:[1-9][0-9]?|1[0-9][0-9]|{MAX_LIMIT})$"},
    "q": {"type": "string", "maxLength": 200, "pattern": _NO_CONTROL_LINE},
    "ticket": {"type": "string", "maxLength": 200, "pattern": _NO_CONTROL_LINE},
    "target": {"type": "string", "pattern": TARGET_RE.pattern},
    "grant": {"type": "string", "pattern": GRANT_RE.pattern},
    "trigger": {"enum": [t.value for t in Trigger]},
    "kind": {"enum": list(KINDS)},
    "status": {"enum": list(SESSION_STATUSES)},
    "parent": {"type": "string", "pattern": SESSION_ID_RE.pattern},
    "session": {"type": "string", "pattern": SESSION_ID_RE.pattern},
    "top": {"enum": ["0", "1"]}, "download": {"enum": ["0", "1"]},
    "event": {"type": "string", "pattern": EVENT_RE.pattern},
    "from": {"type": "string", "pattern": "^[0-9]{1,9}(?:\\.[0-9]{1,6})?$"},
    "to": {"type": "string", "pattern": "^[0-9]{1,9}(?:\\.[0-9]{1,6})?$"},
    "cursor": {"type": "string", "maxLength": 200, "pattern": "^[A-Za-z0-9_-]*$"},
}

_CONTENT_TYPES = {"Asciicast": "application/x-asciicast", "KnownHosts": "text/plain"}
_PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "session_id": {"type": "string", "pattern": "^[0-9A-Za-z-]{1,64}$",
                   "description": "a session id, or a unique prefix of 6 or more characters"},
}

_STATUS_TEXT = {101: "Switching to a WebSocket",
                200: "OK", 201: "Created", 202: "Accepted", 400: "Invalid input", 401: "Not logged in",
                403: "Forbidden (role, scope or CSRF)", 404: "Not found (or not visible)",
                409: "Conflict (state, a concurrent change, or an ambiguous session id prefix)",
                413: "Body over 64 KiB",
                415: "Body is not application/json", 503: "Unavailable now; try again later"}


def _query_schema(name: str, path: str = "") -> dict[str, Any]:
    if path.startswith(_REVIEW_PREFIXES) and name in _REVIEW_QUERY:
        return _REVIEW_QUERY[name]
    if name == "state":
        return {"type": "string", "enum": list(STATES)}
    if name in ("since", "until"):
        return {"anyOf": [_TIME, {"type": "string", "pattern": "^[0-9]{1,5}[mhdw]$"}]}
    return _QUERY_SCHEMAS.get(name, {"type": "string"})


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": str(getattr(route.handler, "__name__", route.path)),
        "summary": route.summary,
        "responses": {},
    }
    if route.auth == "public":
        op["security"] = []
    elif route.auth == "session" and route.self_token:
        op["security"] = [{"session": []}, {"token": []}]
    elif route.auth == "session":
        op["security"] = [{"session": []}]
    else:
        op["security"] = [{"session": []}, {"token": list(route.scopes)}]
    if route.scopes:
        op["x-scopes"] = list(route.scopes)
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _PATH_SCHEMAS.get(
            name, {"type": "string"})}
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    params += [{"name": n, "in": "query", "required": False, "description": d,
                "schema": _query_schema(n, route.path)} for n, d in route.query]
    if route.auth != "public" and route.method not in ("GET", "HEAD"):
        params.append({"name": "X-CSRF-Token", "in": "header", "required": False,
                       "description": "required with a session cookie (the bb_csrf cookie's"
                       " value); not with a bearer token", "schema": {"type": "string"}})
    if params:
        op["parameters"] = params
    if route.body:
        op["requestBody"] = {"required": bool(SCHEMAS[route.body].get("required")),
                             "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{route.body}"}}}}
    for status in route.responses:
        resp: dict[str, Any] = {"description": _STATUS_TEXT.get(status, "")}
        schema = route.ok_schema if status < 300 else "Error"
        if schema:
            resp["content"] = {_CONTENT_TYPES.get(schema, "application/json"): {
                "schema": {"$ref": f"#/components/schemas/{schema}"}}}
        op["responses"][str(status)] = resp
    return op


def document(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    from broker import __version__

    return {
        "openapi": "3.1.0",
        "info": {"title": "bastion-broker grant API", "version": __version__,
                 "description": "Request, approve and manage access grants. Log in with "
                 "POST /api/login (session cookie + X-CSRF-Token on unsafe methods) or send "
                 "an API token as 'Authorization: Bearer ...'."},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": "__Host-bb_session",
                            "description": "bb_session when secure_cookies = false"},
                "token": {"type": "http", "scheme": "bearer",
                          "description": "scopes: " + ", ".join(SCOPES)},
            },
        },
    }
