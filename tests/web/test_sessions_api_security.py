"""Who may read which session: a requester reads only their own sessions, by every way in (id,
prefix, list, filters, text search, replay, manifest, hits, files, children, audit, dashboard),
and someone else's session answers exactly like a missing one; tokens need their scope; what a
target printed comes back inert. Real server, real SQLite store, real recordings
(``review_env`` in ``test_sessions_api``)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from broker.domain import recording as fmt
from broker.ports import SessionRecord
from tests.web.conftest import DOMAIN
from tests.web.test_sessions_api import DB01, ReviewEnv, ids, review_env, token

__all__ = ["review_env"]  # the fixture, shared

pytestmark = pytest.mark.timeout(60)

SECRET = "hunter2-ron-only"


async def _two_users(env: ReviewEnv) -> tuple[str, str, str]:
    """rita's session, and ron's jump with a session inside it (whose text has SECRET)."""
    mine = await env.session("rita", text="rita did uptime")
    jump = await env.session("ron", kind="jump", exit_status=None)
    theirs = await env.session("ron", instance=DB01, parent=jump, text=f"password {SECRET}")
    env.ctx.audit.emit("sftp.open", session_id=theirs, user=f"ron@{DOMAIN}",
                       path="/home/ron/.ssh/id_ed25519", flags="read", status="ok")
    return mine, jump, theirs


def _same_as_missing(a: tuple[int, Any], b: tuple[int, Any], real: str, fake: str) -> None:
    """Two answers that differ only by the id asked for."""
    assert a[0] == b[0] == 404, (a, b)
    assert json.dumps(a[1]).replace(real.casefold(), "ID") == \
        json.dumps(b[1]).replace(fake.casefold(), "ID")


async def test_someone_elses_session_is_answered_like_a_missing_one(review_env: ReviewEnv
                                                                    ) -> None:
    env = review_env
    mine, jump, theirs = await _two_users(env)
    missing = "0123abcd-0000-4000-8000-000000000000"
    for ref in (theirs, jump):
        for tail in ("", "/hits?q=password", "/recording.cast", "/manifest",
                     "/recording.cast?from=0&to=9", "?q=password"):
            got = await env.get("rita", f"/api/sessions/{ref}{tail}")
            _same_as_missing(got, await env.get("rita", f"/api/sessions/{missing}{tail}"),
                             ref, missing)
        # by prefix too, in any case
        got = await env.get("rita", f"/api/sessions/{ref[:8].upper()}")
        _same_as_missing(got, await env.get("rita", f"/api/sessions/{missing[:8]}"),
                         ref[:8].upper(), missing[:8])
    # rita's own works by every way, and the auditor reads ron's
    assert (await env.get("rita", f"/api/sessions/{mine}"))[0] == 200
    assert (await env.get("rita", f"/api/sessions/{mine[:8]}/manifest"))[0] == 200
    assert (await env.raw("rita", f"/api/sessions/{mine}/recording.cast"))[0] == 200
    assert (await env.get("audrey", f"/api/sessions/{theirs}"))[0] == 200
    # nobody viewed ron's recording: the refused fetches wrote no session.viewed
    viewed = [e["session_id"] for e in env.audit() if e["event"] == "session.viewed"]
    assert viewed == [mine]


async def test_approvers_are_not_auditors(review_env: ReviewEnv) -> None:
    env = review_env
    _, _, theirs = await _two_users(env)
    assert (await env.get("alan", f"/api/sessions/{theirs}"))[0] == 404
    assert (await env.get("alan", "/api/sessions"))[1]["items"] == []
    assert (await env.get("alan", "/api/audit"))[0] == 403


async def test_lists_and_every_filter_show_only_the_callers_sessions(review_env: ReviewEnv
                                                                    ) -> None:
    env = review_env
    mine, jump, _ = await _two_users(env)
    _, body = await env.get("rita", "/api/sessions?limit=200")
    assert ids(body) == [mine]
    for query in ("user=ron", f"user=ron@{DOMAIN}", "user=RON", "target=db01",
                  "stack=stack-db", f"parent={jump}", "kind=jump", "status=live",
                  f"q={SECRET}", "q=password", f"grant={env.grant_ids['ron']}",
                  "since=1h&user=ron", "top=1&user=ron"):
        status, body = await env.get("rita", "/api/sessions?" + query)
        assert (status, body["items"], body["next_cursor"]) == (200, [], None), query
    # her own name, in either form, is hers
    assert ids((await env.get("rita", "/api/sessions?user=rita"))[1]) == [mine]
    assert ids((await env.get("rita", f"/api/sessions?user=Rita@{DOMAIN}"))[1]) == [mine]
    # a cursor made from ron's session does not open his page either
    _, page = await env.get("audrey", "/api/sessions?limit=1")
    _, after = await env.get("rita", f"/api/sessions?cursor={page['next_cursor']}")
    assert ids(after) == [mine]
    # and the detail of her own jump-free session leaks no children or files of his
    _, d = await env.get("rita", f"/api/sessions/{mine}")
    assert d["children"] == [] and d["files"] == []
    assert SECRET not in json.dumps(d)


async def test_a_jump_shows_only_the_sessions_the_caller_may_see(review_env: ReviewEnv) -> None:
    """A session row naming someone else's jump as its parent (a forged or odd index row)
    never shows through the parent."""
    env = review_env
    jump = await env.session("rita", kind="jump", exit_status=None)
    await env.index.started(SessionRecord(
        id="f0f0f0f0-0000-4000-8000-000000000001", user=f"ron@{DOMAIN}", target="i-0db01",
        login="x", grant_id="", level="read-only", kind="exec", command="id", peer="p",
        started_at=env.clock.now(), ended_at=None, exit_status=None, bytes_in=0, bytes_out=0,
        recording="", parent_id=jump))
    _, d = await env.get("rita", f"/api/sessions/{jump}")
    assert d["children"] == []
    assert ids((await env.get("rita", f"/api/sessions?parent={jump}"))[1]) == []
    _, d = await env.get("audrey", f"/api/sessions/{jump}")
    assert [c["user"] for c in d["children"]] == [f"ron@{DOMAIN}"]


async def test_an_ambiguous_prefix_names_only_the_callers_candidates(review_env: ReviewEnv
                                                                     ) -> None:
    env = review_env
    now = env.clock.now()
    for sid, user in (("c0ffee00-1", "rita"), ("c0ffee00-2", "ron"), ("c0ffee00-3", "ron")):
        await env.index.started(SessionRecord(
            id=sid, user=f"{user}@{DOMAIN}", target="i-0web01", login="x", grant_id="",
            level="read-only", kind="exec", command="true", peer="p", started_at=now,
            ended_at=None, exit_status=None, bytes_in=0, bytes_out=0, recording=""))
    # rita's one session is hers: no 409 that would tell her ron's exist
    status, d = await env.get("rita", "/api/sessions/c0ffee00")
    assert (status, d["id"]) == (200, "c0ffee00-1")
    status, err = await env.get("lena", "/api/sessions/c0ffee00")
    assert status == 404 and "c0ffee00-" not in json.dumps(err).replace("c0ffee00", "")
    status, err = await env.get("ron", "/api/sessions/c0ffee00")
    assert (status, err["detail"]["candidates"]) == (409, ["c0ffee00-2", "c0ffee00-3"])
    status, err = await env.get("audrey", "/api/sessions/c0ffee00")
    assert err["detail"]["candidates"] == ["c0ffee00-1", "c0ffee00-2", "c0ffee00-3"]


async def test_the_audit_log_is_for_auditors_and_admins(review_env: ReviewEnv) -> None:
    env = review_env
    _, _, theirs = await _two_users(env)
    for query in ("", f"?session={theirs}", "?user=rita", "?event=sftp.*", "?limit=1"):
        status, err = await env.get("rita", "/api/audit" + query)
        assert (status, err["error"]) == (403, "forbidden"), query
    _, files = await env.get("audrey", f"/api/audit?session={theirs}&event=sftp.*")
    assert [e["path"] for e in files["items"]] == ["/home/ron/.ssh/id_ed25519"]
    assert (await env.get("adam", f"/api/audit?session={theirs}"))[0] == 200


async def test_the_dashboard_counts_only_the_callers_own(review_env: ReviewEnv) -> None:
    env = review_env
    await _two_users(env)
    assert (await env.login_raw("ron", password="wrong")).status == 401
    assert (await env.login_raw("lena", password="wrong")).status == 401
    assert (await env.login_raw("rita", password="wrong")).status == 401
    status, d = await env.get("rita", "/api/dashboard")
    assert status == 200, d
    assert d["scope"] == "own" and d["live_sessions"] == 0
    assert d["sessions_per_day"][-1][1] == 1
    assert d["failed_logins_24h"] == 1
    assert {e["user"] for e in d["recent_failed_logins"]} == {f"rita@{DOMAIN}"}
    assert [g["user"] for g in d["grants_expiring"]] == ["rita"]
    _, ron = await env.get("ron", "/api/dashboard")
    assert (ron["live_sessions"], ron["sessions_per_day"][-1][1]) == (1, 2)  # the jump runs
    _, all_ = await env.get("audrey", "/api/dashboard")
    assert (all_["scope"], all_["live_sessions"], all_["failed_logins_24h"]) == ("all", 1, 3)
    assert all_["sessions_per_day"][-1][1] == 3


# -- tokens ----------------------------------------------------------------------------------------
async def test_tokens_need_the_scope(review_env: ReviewEnv) -> None:
    env = review_env
    mine = await env.session("rita")
    grants_only = await token(env, "rita", ["grants:read", "grants:write"])
    for path in ("/api/sessions", f"/api/sessions/{mine}", f"/api/sessions/{mine}/manifest",
                 f"/api/sessions/{mine}/recording.cast", f"/api/sessions/{mine}/hits?q=x",
                 "/api/dashboard", "/api/audit"):
        status, _, raw = await env.raw(grants_only, path)
        body = json.loads(raw)
        assert status == 403 and "lacks the scope" in body["detail"]["message"], path
    reader = await token(env, "rita", ["sessions:read"])
    assert ids((await env.call(reader, "GET", "/api/sessions"))[1]) == [mine]
    assert (await env.raw(reader, f"/api/sessions/{mine}/recording.cast"))[0] == 200
    assert (await env.call(reader, "GET", "/api/audit"))[0] == 403  # no audit:read
    assert (await env.call(reader, "GET", "/api/grants"))[0] == 403  # no grants:read
    # audit:read is for auditors (and admins) only, at creation already
    status, err = await env.call("rita", "POST", "/api/tokens",
                                 {"name": "x", "scopes": ["audit:read"]})
    assert status == 403 and "auditor" in err["detail"]["message"]
    auditor = await token(env, "audrey", ["sessions:read", "audit:read"])
    assert (await env.call(auditor, "GET", "/api/audit"))[0] == 200
    assert ids((await env.call(auditor, "GET", "/api/sessions"))[1]) == [mine]
    no_audit = await token(env, "audrey", ["sessions:read"])
    assert (await env.call(no_audit, "GET", "/api/audit"))[0] == 403
    # an admin's reading token reads everything, and still cannot approve
    admin = await token(env, "adam", ["sessions:read", "audit:read", "grants:read"])
    assert ids((await env.call(admin, "GET", "/api/sessions"))[1]) == [mine]
    assert (await env.call(admin, "GET", "/api/audit"))[0] == 200
    pending = await env.request("lena")
    status, _ = await env.call(admin, "POST", f"/api/grants/{pending['id']}/approve", {})
    assert status == 403
    # an auditor moved out of the auditor group reads only their own from the next check
    env.directory.move("audrey", ["dev"])
    env.clock.advance(61)
    assert (await env.call(auditor, "GET", "/api/sessions"))[1]["items"] == []
    assert (await env.call(auditor, "GET", "/api/audit"))[0] == 403


async def test_anonymous_callers_get_401(review_env: ReviewEnv) -> None:
    env = review_env
    mine = await env.session("rita")
    for path in ("/api/sessions", f"/api/sessions/{mine}", f"/api/sessions/{mine}/recording.cast",
                 "/api/audit", "/api/dashboard"):
        r = await env.client.get(path)
        assert r.status == 401, path
        assert (await r.json())["error"] == "unauthorized"


# -- what the target printed stays inert ---------------------------------------------------------
HOSTILE = (b"<script>alert(1)</script>\r\n"
           b"\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07"  # OSC 52: set the viewer's clipboard
           b"\x1b]0;owned\x07"  # window title
           b"\x1b[6n"  # cursor position report: makes the viewer's terminal type
           b"</script><img src=x onerror=alert(2)>&amp;\r\n")


async def test_recordings_come_back_inert(review_env: ReviewEnv) -> None:
    env = review_env
    sid = await env.session("rita", output=(), kind="exec",
                            command="echo '<script>alert(3)</script>'",
                            frames=[(0.5, fmt.OUTPUT, HOSTILE[:30]), (0.6, fmt.OUTPUT, HOSTILE[30:]),
                                    (0.7, fmt.INPUT, b"<b>typed</b>\r")],
                            text="<script>alert(4)</script> in the index")
    status, headers, body = await env.raw("audrey", f"/api/sessions/{sid}/recording.cast")
    assert status == 200
    assert headers["Content-Type"].startswith("application/x-asciicast")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for raw in (b"<", b">", b"&", b"\x1b]52", b"\x1b]0", b"\x1b[6n", b"\\u001b]52"):
        assert raw not in body, raw
    header, *events = [json.loads(line) for line in body.decode().splitlines()]
    assert header["bastion"]["command"] == "echo '<script>alert(3)</script>'"  # JSON escapes
    out = "".join(e[2] for e in events if e[1] == "o")
    assert "<script>alert(1)</script>" in out  # text stays text, for the player to print
    assert "\x1b]" not in out and "\x1b[6n" not in out
    assert [e[2] for e in events if e[1] == "i"] == ["<b>typed</b>\r"]
    # every JSON answer escapes markup characters too (the list, the detail, the hits)
    for path in ("/api/sessions?q=script", f"/api/sessions/{sid}",
                 f"/api/sessions/{sid}/hits?q=script", f"/api/sessions/{sid}?q=alert"):
        r = await env.client.get(path, headers=(await env.who("audrey")).headers)
        raw = await r.read()
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
        assert not re.search(rb"[<>&]", raw), (path, raw[:300])
        assert "<script>" in json.dumps(json.loads(raw), ensure_ascii=False), path


async def test_session_ids_in_paths_are_checked(review_env: ReviewEnv) -> None:
    env = review_env
    await env.session("rita")
    for ref in ("..%2F..%2Fetc", "%00", "a" * 65, "x%20y", "%3Cscript%3E"):
        status, err = await env.get("audrey", f"/api/sessions/{ref}")
        assert status in (400, 404), (ref, err)
        assert status == 404 or err["detail"]["field"] == "session_id"


# -- end to end: a real OpenSSH session through the demo broker, read back through the API -------
def _login(demo: Any, user: str) -> Any:
    import http.cookiejar
    import urllib.request

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    password = demo.info[user]["password"] if isinstance(demo.info.get(user), dict) \
        else demo.info["password"]
    body = json.dumps({"user": user, "password": password,
                       "code": demo.next_code(user)}).encode()
    opener.open(urllib.request.Request(  # noqa: S310 - the demo's loopback URL
        demo.info["web_url"] + "/api/login", data=body,
        headers={"Content-Type": "application/json"}))
    return opener


def _fetch(opener: Any, demo: Any, path: str) -> tuple[int, dict[str, str], bytes]:
    import urllib.error

    try:
        with opener.open(demo.info["web_url"] + path, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.e2e
def test_a_real_session_read_back_by_its_user_and_the_auditor_only(demo: Any) -> None:
    import time

    alice, bob = demo.take_user(), demo.take_user()
    hostile = r"printf '<script>alert(1)</script>\033]52;c;aGk=\007done\n'; exit 3"
    r = demo.ssh(alice, "web01", hostile)
    assert r.returncode == 3, r.stderr
    assert b"<script>" in r.stdout  # the client saw it: the broker relays what targets print
    assert demo.ssh(bob, "web01", "true").returncode == 0
    mine = _login(demo, alice)
    status, _, raw = _fetch(mine, demo, "/api/sessions")
    assert status == 200
    items = json.loads(raw)["items"]
    assert [(s["user"].split("@")[0], s["kind"], s["status"], s["outcome"]) for s in items] == [
        (alice, "exec", "failed", "exit 3")]
    sid = items[0]["id"]
    assert b"<" not in raw and "\\u003cscript" in raw.decode()  # the command, escaped
    deadline = time.monotonic() + 30
    while True:  # the seal is written in the background after the session ends
        _, _, raw = _fetch(mine, demo, f"/api/sessions/{sid}")
        if json.loads(raw)["integrity"]["status"] == "verified" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert json.loads(raw)["integrity"] == {"status": "verified", "errors": [], "warnings": []}
    status, headers, cast = _fetch(mine, demo, f"/api/sessions/{sid}/recording.cast")
    assert status == 200 and headers["Content-Type"].startswith("application/x-asciicast")
    assert b"<" not in cast and b"\x1b]52" not in cast and b"\\u001b]52" not in cast
    out = "".join(e[2] for e in map(json.loads, cast.decode().splitlines()[1:]) if e[1] == "o")
    assert out == "<script>alert(1)</script>done\n"
    # bob sees neither alice's session nor its recording; the auditor sees both users'
    theirs = _login(demo, bob)
    _, _, raw = _fetch(theirs, demo, "/api/sessions")
    assert sid not in raw.decode()
    for tail in ("", "/recording.cast", "/manifest", "/hits?q=done"):
        assert _fetch(theirs, demo, f"/api/sessions/{sid}{tail}")[0] == 404, tail
    assert _fetch(theirs, demo, "/api/audit")[0] == 403
    auditor = _login(demo, "auditor")
    _, _, raw = _fetch(auditor, demo, f"/api/sessions?user={alice}")
    assert [s["id"] for s in json.loads(raw)["items"]] == [sid]
    _, _, raw = _fetch(auditor, demo, f"/api/audit?session={sid}&event=session.viewed")
    assert [e["actor"].split("@")[0] for e in json.loads(raw)["items"]] == [alice]
