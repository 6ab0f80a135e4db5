"""The grant API against a real aiohttp server: login, cookies, CSRF, roles, validation, tokens."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from datetime import timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.web import create_app
from tests.web.conftest import DOMAIN, Env, FakeClock, Who, build_context

pytestmark = pytest.mark.timeout(60)


# -- login and sessions ------------------------------------------------------------------------
async def test_login_sets_strict_http_only_signed_cookies(env: Env) -> None:
    r = await env.login_raw("rita")
    assert r.status == 200
    body = await r.json()
    assert body["user"] == f"rita@{DOMAIN}"
    assert body["roles"] == ["requester"]
    cookies = {c.split("=", 1)[0]: c for c in r.headers.getall("Set-Cookie")}
    session = cookies["__Host-bb_session"]
    for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
        assert flag in session, session
    assert "Domain=" not in session
    csrf = cookies["__Host-bb_csrf"]
    assert "HttpOnly" not in csrf and "Secure" in csrf and "SameSite=Strict" in csrf
    assert body["csrf"] in csrf
    assert any(e["event"] == "web.login" and e["user"] == f"rita@{DOMAIN}" for e in env.audit())
    assert any(e["event"] == "auth.success" for e in env.audit())
    assert stat.S_IMODE(os.stat(env.state / "web.key").st_mode) == 0o600


async def test_login_forms_of_the_user_name(env: Env) -> None:
    for user in (f"lena@{DOMAIN}", "CORP\\otto"):
        r = await env.login_raw(user)
        assert r.status == 200, await r.text()


async def test_login_failures_are_generic_401(env: Env) -> None:
    r = await env.login_raw("ron", password="wrong")
    assert r.status == 401
    body = await r.json()
    assert body["error"] == "login failed"
    assert "Set-Cookie" not in r.headers
    r = await env.login_raw("nobody", code="123456")
    assert r.status == 401
    assert (await r.json()) == body  # unknown user looks exactly like a bad password
    r = await env.login_raw("lena", code="000000")
    assert r.status == 401
    reasons = [e.get("reason") for e in env.audit() if e["event"] == "auth.failure"]
    assert "bad TOTP code" in reasons


async def test_reused_totp_code_is_refused(env: Env) -> None:
    code = env.code("abby")
    assert (await env.login_raw("abby", code=code)).status == 200
    r = await env.login_raw("abby", code=code)
    assert r.status == 401
    assert [e.get("reason") for e in env.audit() if e["event"] == "auth.failure"][-1] == \
        "TOTP code reused"


async def test_login_input_is_validated(env: Env) -> None:
    for body, fld in (({"user": "rita", "password": "x"}, "code"),
                      ({"user": "rita", "password": "x", "code": "12ab56"}, "code"),
                      ({"user": "ri\x00ta", "password": "x", "code": "123456"}, "user"),
                      ({"user": "rita+web01", "password": "x", "code": "123456"}, "user"),
                      ({"user": "rita", "password": 5, "code": "123456"}, "password"),
                      ({"user": "rita", "password": "x", "code": "123456", "x": 1}, "x")):
        r = await env.client.post("/api/login", json=body)
        assert r.status == 400, body
        assert (await r.json())["detail"]["field"] == fld


async def test_tampered_expired_and_logged_out_sessions_are_refused(env: Env) -> None:
    rita = await env.who("rita")
    assert (await env.call(rita, "GET", "/api/me"))[0] == 200
    forged = Who("x", {"Cookie": f"__Host-bb_session={rita.cookie[:-2]}xx"})
    assert (await env.call(forged, "GET", "/api/me"))[0] == 401
    # a second broker sharing the key file and the store accepts the same cookie
    ctx2, db2, _ = build_context(env.state, env.clock)
    other = TestClient(TestServer(create_app(ctx2), host="127.0.0.1"))
    await other.start_server()
    try:
        r = await other.get("/api/me", headers=rita.headers)
        assert r.status == 200
        # logging out on the first ends the session on the second too
        assert (await env.call(rita, "POST", "/api/logout", {}))[0] == 200
        assert (await other.get("/api/me", headers=rita.headers)).status == 401
        assert (await env.call(rita, "GET", "/api/me"))[0] == 401
    finally:
        await other.close()
        db2.close()
    ron = await env.who("ron")
    env.clock.advance(601 * 60)  # session_minutes = 600
    assert (await env.call(ron, "GET", "/api/me"))[0] == 401


# -- CSRF, headers, transport-level errors ---------------------------------------------------
async def test_csrf_is_required_for_cookie_sessions(env: Env) -> None:
    rita = await env.who("rita")
    body = {"stacks": ["stack-web"], "vpc": "vpc-0demo", "level": "read-only",
            "ticket": "T-1", "reason": "r"}
    no_csrf = Who("rita", {"Cookie": rita.headers["Cookie"]})
    status, err = await env.call(no_csrf, "POST", "/api/grants", body)
    assert (status, err["error"]) == (403, "csrf")
    status, err = await env.call(no_csrf, "POST", "/api/grants", body,
                                 headers={"X-CSRF-Token": "guess"})
    assert (status, err["error"]) == (403, "csrf")
    status, _ = await env.call(rita, "POST", "/api/grants", body,
                               headers={"Origin": "https://evil.example"})
    assert status == 403
    assert (await env.call(no_csrf, "POST", "/api/logout"))[0] == 403
    assert (await env.call(rita, "POST", "/api/grants", body))[0] == 201
    # reading needs no CSRF token
    assert (await env.call(no_csrf, "GET", "/api/grants"))[0] == 200


async def test_security_headers_and_json_errors_everywhere(env: Env) -> None:
    for method, path in (("GET", "/api/openapi.json"), ("GET", "/api/grants"),
                         ("GET", "/nope"), ("PUT", "/api/grants")):
        r = await env.client.request(method, path)
        assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["Content-Type"].startswith("application/json")
        assert "aiohttp" not in r.headers.get("Server", "")
        if r.status >= 400:
            body = await r.json()
            assert set(body) == {"error", "detail"}
    assert (await env.client.get("/nope")).status == 404
    assert (await env.client.put("/api/grants")).status == 405


async def test_body_limit_and_content_type(env: Env) -> None:
    rita = await env.who("rita")
    big = '{"reason": "' + "x" * (70 * 1024) + '"}'
    r = await env.client.post("/api/grants", data=big,
                              headers={**rita.headers, "Content-Type": "application/json"})
    assert r.status == 413
    assert (await r.json())["error"] == "body too large"

    async def chunks() -> Any:
        for _ in range(80):
            yield b"x" * 1024

    r = await env.client.post("/api/login", data=chunks(),
                              headers={"Content-Type": "application/json"})
    assert r.status == 413
    r = await env.client.post("/api/grants", data="stacks=a",
                              headers={**rita.headers,
                                       "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415
    r = await env.client.post("/api/login", data="{}", headers={"Content-Type": "text/plain"})
    assert r.status == 415
    for raw in ("{not json", "[1, 2]", '"text"'):
        r = await env.client.post("/api/grants", data=raw,
                                  headers={**rita.headers, "Content-Type": "application/json"})
        assert r.status == 400, raw


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("patch", "fld"), [
    ({"stacks": None}, "stacks"),
    ({"stacks": "stack-web"}, "stacks"),
    ({"stacks": []}, "stacks"),
    ({"stacks": ["bad stack!"]}, "stacks"),
    ({"vpc": "10.0.0.0/8"}, "vpc"),
    ({"level": "root"}, "level"),
    ({"trigger": "whim"}, "trigger"),
    ({"ticket": "  "}, "ticket"),
    ({"reason": "x" * 2001}, "reason"),
    ({"reason": "a\x07b"}, "reason"),
    ({"hours": -1}, "hours"),
    ({"hours": 10_000}, "hours"),
    ({"hours": "8"}, "hours"),
    ({"hours": True}, "hours"),
    ({"starts_at": "2030-01-01T10:00:00"}, "starts_at"),
    ({"starts_at": "tomorrow"}, "starts_at"),
    ({"user": "al/ice"}, "user"),
    ({"domain": "not a domain"}, "domain"),
    ({"color": "red"}, "color"),
])
async def test_request_validation_names_the_field(env: Env, patch: dict[str, Any],
                                                  fld: str) -> None:
    body = {"stacks": ["stack-web"], "vpc": "vpc-0demo", "level": "read-only", "ticket": "T",
            "reason": "r"}
    body.update(patch)
    body = {k: v for k, v in body.items() if v is not None}
    status, err = await env.call("rita", "POST", "/api/grants", body)
    assert status == 400, err
    assert err["error"] == "invalid"
    assert err["detail"]["field"] == fld
    assert fld in err["detail"]["message"]


async def test_other_validation_errors(env: Env) -> None:
    # policy: admin at most 12 h (the workflow's own check, still a clean 400)
    status, err = await env.call("rita", "POST", "/api/grants", {
        "stacks": ["s1"], "vpc": "vpc-01", "level": "admin", "ticket": "T", "reason": "r",
        "hours": 13})
    assert status == 400 and "maximum" in err["detail"]["message"]
    g = await env.approved()
    for body in ({}, {"until": "2030-01-01T00:00:00Z", "hours": 1}, {"hours": 0},
                 {"until": "12h"}, {"until": 5}):
        status, err = await env.call("alan", "POST", f"/api/grants/{g['id']}/extend", body)
        assert status == 400, body
    p = await env.request()
    status, err = await env.call("alan", "POST", f"/api/grants/{p['id']}/reject", {})
    assert (status, err["detail"]["field"]) == (400, "comment")
    for query in ("state=bogus", "limit=0", "limit=x", "since=yesterday", "color=red",
                  "user=a/b"):
        status, _ = await env.call("alan", "GET", f"/api/grants?{query}")
        assert status == 400, query


# -- every endpoint x role ---------------------------------------------------------------------
ROLE_USERS = {"anonymous": "anon", "requester": "ron", "owner": "rita", "approver": "alan",
              "auditor": "audrey", "admin": "adam"}
#                    anonymous requester owner approver auditor admin
MATRIX: dict[str, tuple[int, ...]] = {
    "list":           (401, 200, 200, 200, 200, 200),
    "create-own":     (401, 201, 201, 201, 201, 201),
    "create-for-bob": (401, 403, 403, 201, 403, 201),
    "show":           (401, 404, 200, 200, 200, 200),
    "update":         (401, 404, 200, 403, 403, 200),
    "withdraw":       (401, 404, 200, 403, 403, 200),
    "approve":        (401, 404, 403, 200, 403, 200),
    "reject":         (401, 404, 403, 200, 403, 200),
    "extend":         (401, 404, 403, 200, 403, 200),
    "change":         (401, 404, 200, 200, 403, 200),
    "revoke":         (401, 404, 200, 200, 403, 200),
    "me":             (401, 200, 200, 200, 200, 200),
    "tokens-list":    (401, 200, 200, 200, 200, 200),
    "token-approve":  (401, 403, 403, 201, 403, 201),
    "token-read":     (401, 201, 201, 201, 201, 201),
    "token-revoke":   (401, 404, 404, 404, 404, 404),
    "logout":         (401, 200, 200, 200, 200, 200),
}


async def _do(env: Env, action: str, who: str) -> tuple[int, Any]:
    req = {"stacks": ["stack-web"], "vpc": "vpc-0demo", "level": "read-only", "ticket": "T",
           "reason": "r"}
    if action == "list":
        return await env.call(who, "GET", "/api/grants")
    if action == "create-own":
        return await env.call(who, "POST", "/api/grants", req)
    if action == "create-for-bob":
        return await env.call(who, "POST", "/api/grants", {**req, "user": "bob"})
    if action in ("show", "update", "withdraw", "approve", "reject"):
        g = await env.request("rita")
        path = f"/api/grants/{g['id']}"
        if action == "show":
            return await env.call(who, "GET", path)
        if action == "update":
            return await env.call(who, "PATCH", path, {"reason": "more detail"})
        return await env.call(who, "POST", f"{path}/{action}", {"comment": "c"})
    if action in ("extend", "change", "revoke"):
        g = await env.approved("rita")
        path = f"/api/grants/{g['id']}/{action}"
        body = {"extend": {"hours": 1}, "change": {"hours": 1}, "revoke": {}}[action]
        return await env.call(who, "POST", path, body)
    if action == "me":
        return await env.call(who, "GET", "/api/me")
    if action == "tokens-list":
        return await env.call(who, "GET", "/api/tokens")
    if action in ("token-approve", "token-read"):
        scope = "grants:approve" if action == "token-approve" else "grants:read"
        return await env.call(who, "POST", "/api/tokens", {"name": "ci", "scopes": [scope]})
    if action == "token-revoke":  # someone else's token is not yours to revoke
        status, tok = await env.call("lena", "POST", "/api/tokens",
                                     {"name": "x", "scopes": ["grants:read"]})
        assert status == 201
        return await env.call(who, "DELETE", f"/api/tokens/{tok['id']}")
    assert action == "logout"
    status, body = await env.call(who, "POST", "/api/logout", {})
    env._who.pop(who, None)
    return status, body


async def test_every_endpoint_for_every_role(env: Env) -> None:
    wrong = []
    for action, expected in MATRIX.items():
        for (role, user), want in zip(ROLE_USERS.items(), expected, strict=True):
            status, body = await _do(env, action, user)
            if status != want:
                wrong.append(f"{action} as {role}: {status} (want {want}) {body}")
    assert not wrong, "\n".join(wrong)


async def test_visibility_of_lists(env: Env) -> None:
    mine = await env.request("rita")
    theirs = await env.request("ron")
    status, rows = await env.call("rita", "GET", "/api/grants")
    ids = {g["id"] for g in rows}
    assert mine["id"] in ids and theirs["id"] not in ids
    # a requester's user filter cannot widen the view: refused, not silently narrowed
    for query in ("user=ron", "user=RON&state=pending", "user=adam"):
        status, body = await env.call("rita", "GET", f"/api/grants?{query}")
        assert status == 403, (query, body)
        assert body["error"] == "forbidden" and "only your own" in body["detail"]["message"]
    status, rows = await env.call("rita", "GET", "/api/grants?user=Rita")  # herself: fine
    assert status == 200 and {g["id"] for g in rows} == {mine["id"]}
    for who in ("alan", "audrey", "adam"):
        status, rows = await env.call(who, "GET", "/api/grants?user=ron&state=pending")
        assert status == 200
        assert [g["id"] for g in rows] == [theirs["id"]]


async def test_list_filters(env: Env) -> None:
    a = await env.approved("rita", stacks=["stack-db"], hours=1)
    p = await env.request("rita", stacks=["stack-web"])
    q = "/api/grants?user=rita"
    assert {g["id"] for g in (await env.call("alan", "GET", q + "&state=active"))[1]} == {a["id"]}
    assert {g["id"] for g in (await env.call("alan", "GET", q + "&stack=stack-web"))[1]} == \
        {p["id"]}
    env.clock.advance(2 * 3600)
    _, rows = await env.call("alan", "GET", q + "&state=expired")
    assert [g["id"] for g in rows] == [a["id"]] and rows[0]["state"] == "expired"
    _, rows = await env.call("alan", "GET", q + "&since=30m")
    assert a["id"] not in {g["id"] for g in rows}
    _, rows = await env.call("alan", "GET", q + "&limit=1")
    assert len(rows) == 1


async def test_show_has_history(env: Env) -> None:
    g = await env.approved()
    status, shown = await env.call("rita", "GET", f"/api/grants/{g['id']}")
    assert status == 200
    assert [(h["action"], h["actor"]) for h in shown["history"]] == [
        ("requested", f"rita@{DOMAIN}"), ("approved", f"alan@{DOMAIN}")]
    assert (await env.call("rita", "GET", "/api/grants/g-doesnotexist"))[0] == 404


async def test_change_narrowing_applies_widening_needs_approval(env: Env) -> None:
    g = await env.approved(hours=4)
    status, narrowed = await env.call("rita", "POST", f"/api/grants/{g['id']}/change",
                                      {"hours": 2})
    assert (status, narrowed["state"]) == (200, "approved")
    status, widened = await env.call("rita", "POST", f"/api/grants/{g['id']}/change",
                                     {"stacks": ["stack-web", "stack-db"]})
    assert (status, widened["state"]) == (200, "pending")
    # a change that names no new duration keeps the end (no re-approval for a reason edit)
    h = await env.approved(hours=4)
    status, same = await env.call("rita", "POST", f"/api/grants/{h['id']}/change",
                                  {"reason": "better reason"})
    assert (status, same["state"]) == (200, "approved")


# -- approval rules --------------------------------------------------------------------------
async def test_nobody_approves_their_own_admin_request(env: Env) -> None:
    for who in ("adam", "alan"):
        g = await env.request(who, level="admin")
        status, err = await env.call(who, "POST", f"/api/grants/{g['id']}/approve", {})
        assert (status, err["error"]) == (403, "forbidden"), err
        other = "abby"
        status, ok = await env.call(other, "POST", f"/api/grants/{g['id']}/approve", {})
        assert (status, ok["state"]) == (200, "approved")
    # nor an admin request that an approver filed for themselves via someone else's name
    g = await env.request("alan", level="admin", user="rita")
    assert (await env.call("alan", "POST", f"/api/grants/{g['id']}/approve", {}))[0] == 403


async def test_two_approvers_when_configured(env2: Env) -> None:
    env = env2
    g = await env.request("rita", level="admin")
    status, one = await env.call("alan", "POST", f"/api/grants/{g['id']}/approve", {})
    assert (status, one["state"], one["approved_by"]) == (200, "pending", [f"alan@{DOMAIN}"])
    status, again = await env.call("alan", "POST", f"/api/grants/{g['id']}/approve", {})
    assert (status, again["error"]) == (409, "conflict")
    status, two = await env.call("abby", "POST", f"/api/grants/{g['id']}/approve", {})
    assert (status, two["state"]) == (200, "approved")
    # read-only needs one
    r = await env.request("rita")
    assert (await env.call("abby", "POST", f"/api/grants/{r['id']}/approve", {}))[1][
        "state"] == "approved"


async def test_concurrent_approvals_one_wins(env: Env) -> None:
    alan, abby = await env.who("alan"), await env.who("abby")
    for _ in range(3):
        g = await env.request("rita")
        path = f"/api/grants/{g['id']}/approve"
        results = await asyncio.gather(env.call(alan, "POST", path, {}),
                                       env.call(abby, "POST", path, {}))
        assert sorted(s for s, _ in results) == [200, 409]
        _, shown = await env.call("rita", "GET", f"/api/grants/{g['id']}")
        assert [h["action"] for h in shown["history"]] == ["requested", "approved"]


async def test_state_conflicts_are_409(env: Env) -> None:
    g = await env.approved()
    for action in ("approve", "withdraw"):
        status, err = await env.call("adam", "POST", f"/api/grants/{g['id']}/{action}",
                                     {"comment": "c"} if action == "withdraw" else {})
        assert (status, err["error"]) == (409, "conflict")
    status, err = await env.call("rita", "PATCH", f"/api/grants/{g['id']}", {"hours": 1})
    assert status == 409


# -- API tokens ------------------------------------------------------------------------------
async def _token(env: Env, who: str, scopes: list[str], ttl: int = 30) -> dict[str, Any]:
    status, tok = await env.call(who, "POST", "/api/tokens",
                                 {"name": "ci", "scopes": scopes, "ttl_days": ttl})
    assert status == 201, tok
    return dict(tok)


def _bearer(tok: dict[str, Any]) -> Who:
    return Who("token", {"Authorization": f"Bearer {tok['token']}"})


async def test_token_scopes_are_enforced(env: Env) -> None:
    read = _bearer(await _token(env, "rita", ["grants:read"]))
    write = _bearer(await _token(env, "rita", ["grants:read", "grants:write"]))
    req = {"stacks": ["stack-web"], "vpc": "vpc-0demo", "level": "read-only", "ticket": "T",
           "reason": "r"}
    assert (await env.call(read, "GET", "/api/grants"))[0] == 200
    status, err = await env.call(read, "POST", "/api/grants", req)
    assert status == 403 and "grants:write" in err["detail"]["message"]
    status, g = await env.call(write, "POST", "/api/grants", req)  # no CSRF needed
    assert status == 201 and g["requested_by"] == f"rita@{DOMAIN}"
    # tokens cannot manage tokens or sessions
    assert (await env.call(write, "POST", "/api/tokens",
                           {"name": "x", "scopes": ["grants:read"]}))[0] == 403
    assert (await env.call(write, "GET", "/api/tokens"))[0] == 403
    # an approver's token without grants:approve cannot approve, with it can
    alan_write = _bearer(await _token(env, "alan", ["grants:read", "grants:write"]))
    assert (await env.call(alan_write, "POST", f"/api/grants/{g['id']}/approve", {}))[0] == 403
    alan_appr = _bearer(await _token(env, "alan", ["grants:approve"]))
    assert (await env.call(alan_appr, "GET", f"/api/grants/{g['id']}"))[0] == 403
    status, ok = await env.call(alan_appr, "POST", f"/api/grants/{g['id']}/approve", {})
    assert (status, ok["state"], ok["approved_by"]) == (200, "approved", [f"alan@{DOMAIN}"])
    # more rights than the owner has: refused at creation
    status, err = await env.call("rita", "POST", "/api/tokens",
                                 {"name": "x", "scopes": ["grants:approve"]})
    assert status == 403
    for bad in ({"name": "x", "scopes": ["root"]}, {"name": "x", "scopes": []},
                {"name": "", "scopes": ["grants:read"]},
                {"name": "x", "scopes": ["grants:read"], "ttl_days": 0},
                {"name": "x", "scopes": ["grants:read", "grants:read"]}):
        assert (await env.call("rita", "POST", "/api/tokens", bad))[0] == 400, bad


async def test_tokens_are_stored_hashed_revocable_and_expire(env: Env) -> None:
    tok = await _token(env, "rita", ["grants:read"], ttl=1)
    who = _bearer(tok)
    rows = env.db.conn.execute("SELECT * FROM api_tokens WHERE id=?", (tok["id"],)).fetchall()
    assert len(rows) == 1
    assert tok["token"] not in [str(v) for v in tuple(rows[0])]
    assert rows[0]["token_hash"] == hashlib.sha256(tok["token"].encode()).hexdigest()
    _, listed = await env.call("rita", "GET", "/api/tokens")
    assert [t["id"] for t in listed] == [tok["id"]] and "token" not in listed[0]
    assert (await env.call(who, "GET", "/api/me"))[1]["via"] == "token"
    status, _ = await env.call("rita", "DELETE", f"/api/tokens/{tok['id']}")
    assert status == 200
    assert (await env.call(who, "GET", "/api/grants"))[0] == 401
    assert (await env.call("rita", "DELETE", f"/api/tokens/{tok['id']}"))[0] == 404
    other = _bearer(await _token(env, "rita", ["grants:read"], ttl=1))
    env.clock.advance(timedelta(days=1, seconds=1).total_seconds())
    assert (await env.call(other, "GET", "/api/grants"))[0] == 401
    for bad in ("Bearer bbt_nope", "Bearer ", "Basic dXNlcjpwYXNz"):
        assert (await env.call(Who("x", {"Authorization": bad}), "GET", "/api/grants"))[0] \
            == 401
    events = [e["event"] for e in env.audit()]
    assert "api_token.created" in events and "api_token.revoked" in events


# -- OpenAPI -----------------------------------------------------------------------------------
async def test_openapi_documents_every_route(env: Env) -> None:
    r = await env.client.get("/api/openapi.json")
    assert r.status == 200
    doc = await r.json()
    assert doc["openapi"].startswith("3.")
    served = set()
    for route in env.client.server.app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource else ""
        if path == "/" or path.startswith("/console/"):
            continue  # the console's static files (tests/browser), not API operations
        served.add((path, route.method.lower()))
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    for (p, m) in documented:
        op = doc["paths"][p][m]
        assert op["summary"] and op["responses"]
        for ref in _refs(op):
            assert ref.split("/")[-1] in doc["components"]["schemas"], ref


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"]] if "$ref" in node else []
        for v in node.values():
            out += _refs(v)
        return out
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_plain_http_cookies_for_the_demo(make_env: Any) -> None:
    async for env in make_env(secure_cookies=False):
        r = await env.login_raw("rita")
        cookie = next(c for c in r.headers.getall("Set-Cookie") if c.startswith("bb_session="))
        assert "Secure" not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "Strict-Transport-Security" not in r.headers


def test_clock_is_fake() -> None:
    c = FakeClock()
    before = c.now()
    c.advance(30)
    assert c.now() - before == timedelta(seconds=30)
