"""Kill and lock over HTTP against a real aiohttp server, the real SQLite store, the real
``SessionService`` and audit log: who may, what is stored for the bastions' enforcement loops,
what is audited. (Ending the sessions is the enforcement loop's: tests/e2e/test_locks.py.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import DummyCookieJar
from aiohttp.test_utils import TestClient, TestServer

from broker.audit.reader import JsonlAuditReader
from broker.domain import totp
from broker.domain.locks import LockKind
from broker.integrity.archive import LocalRecordingArchive
from broker.integrity.keys import load_or_create_signing_key
from broker.integrity.manifest import RecordingSealer
from broker.recordings.local import LocalRecordingSink, render_cast
from broker.services.locks import LockService
from broker.services.review import ReviewService
from broker.services.sessions import SessionService
from broker.store.sqlite import SqliteGrantStore, SqliteSessionIndex, SqliteTotpStore
from broker.store.sqlite_locks import SqliteLockStore
from broker.web import create_app
from tests.web.conftest import DOMAIN, USERS, FakeClock, LiveDirectory, Who, build_context
from tests.web.test_sessions_api import ReviewClock, ReviewEnv, token

pytestmark = pytest.mark.timeout(60)


@pytest_asyncio.fixture
async def lock_env(tmp_path: Path) -> AsyncIterator[ReviewEnv]:
    """The sessions API's environment (``test_sessions_api``) with kill and lock served."""
    clock = FakeClock()
    directory = LiveDirectory(USERS)
    ctx, db, secrets = build_context(tmp_path, clock, directory=directory)
    key = load_or_create_signing_key(tmp_path / "integrity_ed25519_key")
    sink = LocalRecordingSink(tmp_path / "recordings")
    index = SqliteSessionIndex(db)
    sealer = RecordingSealer(key, ctx.audit)
    rclock = ReviewClock(clock)
    sessions = SessionService(sink, index, ctx.audit, rclock, recording_enabled=True,
                              on_recorded=sealer, render_cast=render_cast)
    ctx.review = ReviewService(
        index, SqliteGrantStore(db), sink,
        LocalRecordingArchive(sink, key.public, tmp_path / "audit.jsonl"),
        JsonlAuditReader(tmp_path / "audit.jsonl"), ctx.audit, rclock)
    ctx.locks = LockService(SqliteLockStore(db), ctx.audit, rclock)
    totp_store = SqliteTotpStore(db)
    for name in USERS:
        secrets[name] = totp.new_secret()
        await totp_store.set_secret(f"{name}@{DOMAIN}", secrets[name])
    client = TestClient(TestServer(create_app(ctx), host="127.0.0.1"),
                        cookie_jar=DummyCookieJar())
    await client.start_server()
    try:
        yield ReviewEnv(client, clock, secrets, tmp_path, ctx, db, directory,
                        sessions=sessions, sealer=sealer, index=index)
    finally:
        await client.close()
        db.close()


async def test_an_auditor_asks_to_end_a_live_session(lock_env: ReviewEnv) -> None:
    env = lock_env
    live = await env.session("rita", exit_status=None)
    status, body = await env.call("audrey", "POST", f"/api/sessions/{live[:8]}/kill",
                                  {"reason": "  copying\nthe customer DB "})
    assert status == 202, body
    assert (body["session_id"], body["reason"], body["requested_by"]) == (
        live, "copying the customer DB", f"audrey@{DOMAIN}")
    [pending] = await SqliteLockStore(env.db).pending_kills([live])
    assert (pending.id, pending.reason) == (body["id"], "copying the customer DB")
    [event] = [e for e in env.audit() if e["event"] == "session.kill_requested"]
    assert (event["user"], event["session_id"], event["session_user"], event["kill_id"],
            event["reason"]) == (f"audrey@{DOMAIN}", live, f"rita@{DOMAIN}", body["id"],
                                 "copying the customer DB")


async def test_who_may_end_a_session_and_what_is_refused(lock_env: ReviewEnv) -> None:
    env = lock_env
    live = await env.session("rita", exit_status=None)
    ended = await env.session("ron")
    path = f"/api/sessions/{live}/kill"
    for who in ("rita", "alan"):  # the session's own user, an approver
        status, body = await env.call(who, "POST", path, {"reason": "x"})
        assert (status, body["error"]) == (403, "forbidden"), body
    assert (await env.call("adam", "POST", path, {}))[0] == 400  # admins may; reason needed
    assert (await env.call("adam", "POST", path, {"reason": "   "}))[0] == 400
    assert (await env.call("adam", "POST", path, {"reason": "x", "why": 1}))[0] == 400
    status, body = await env.call("audrey", "POST", f"/api/sessions/{ended}/kill",
                                  {"reason": "late"})
    assert status == 409 and "already ended" in body["detail"]["message"]
    assert (await env.call("audrey", "POST", "/api/sessions/0000dead/kill",
                           {"reason": "x"}))[0] == 404
    audrey = await env.who("audrey")
    no_csrf = Who("audrey", {"Cookie": audrey.headers["Cookie"]})
    status, body = await env.call(no_csrf, "POST", path, {"reason": "x"})
    assert (status, body["error"]) == (403, "csrf")
    tok = await token(env, "audrey", ["sessions:read", "audit:read"])
    assert (await env.call(tok, "POST", path, {"reason": "x"}))[0] == 403  # a person's act
    assert await SqliteLockStore(env.db).pending_kills([live, ended]) == []


async def test_admins_lock_list_and_remove(lock_env: ReviewEnv) -> None:
    env = lock_env
    status, lock = await env.call("adam", "POST", "/api/locks",
                                  {"user": "Rita", "ttl": "2h", "reason": "stolen laptop"})
    assert status == 201, lock
    assert (lock["kind"], lock["value"], lock["state"], lock["created_by"]) == (
        "user", f"rita@{DOMAIN}", "active", f"adam@{DOMAIN}")
    assert lock["expires_at"] is not None and lock["removed_at"] is None
    env.clock.advance(1)  # listed in the order they were made
    status, target = await env.call("adam", "POST", "/api/locks",
                                    {"target": "web01", "reason": "compromised"})
    assert status == 201 and target["expires_at"] is None
    status, rows = await env.call("adam", "GET", "/api/locks")
    assert [r["id"] for r in rows] == [lock["id"], target["id"]]
    status, removed = await env.call("adam", "DELETE", f"/api/locks/{lock['id']}")
    assert (status, removed["state"], removed["removed_by"]) == (200, "removed",
                                                                 f"adam@{DOMAIN}")
    assert (await env.call("adam", "DELETE", f"/api/locks/{lock['id']}"))[0] == 404
    assert [r["id"] for r in (await env.call("adam", "GET", "/api/locks"))[1]] == [target["id"]]
    assert [r["state"] for r in (await env.call("adam", "GET", "/api/locks?all=1"))[1]] == [
        "removed", "active"]
    events = [(e["event"], e.get("lock_id")) for e in env.audit()
              if e["event"].startswith("lock.")]
    assert events == [("lock.created", lock["id"]), ("lock.created", target["id"]),
                      ("lock.removed", lock["id"])]


@pytest.mark.parametrize("body", [
    {"reason": "x"}, {"user": "rita", "target": "web01", "reason": "x"},
    {"user": "rita"}, {"user": "rita", "reason": " "}, {"stack": "stack-web", "reason": "x",
                                                        "ttl": "forever"},
    {"target": "web 01", "reason": "x"}, {"stack": "x", "reason": "x", "ttl": "0m"},
    {"user": "rita", "reason": "x", "colour": "red"},
])
async def test_bad_lock_requests_are_400(lock_env: ReviewEnv, body: dict[str, str]) -> None:
    status, answer = await lock_env.call("adam", "POST", "/api/locks", body)
    assert status == 400, answer
    assert (await lock_env.call("adam", "GET", "/api/locks"))[1] == []


async def test_only_admins_manage_locks(lock_env: ReviewEnv) -> None:
    env = lock_env
    for who in ("audrey", "alan", "rita"):
        assert (await env.call(who, "POST", "/api/locks",
                               {"stack": "stack-web", "reason": "x"}))[0] == 403
        assert (await env.call(who, "GET", "/api/locks"))[0] == 403
        assert (await env.call(who, "DELETE", "/api/locks/lk-000000000000"))[0] == 403
    assert (await env.call("adam", "DELETE", "/api/locks/nope"))[0] == 400


async def test_the_openapi_document_lists_kill_and_locks(lock_env: ReviewEnv) -> None:
    status, doc = await lock_env.call("anon", "GET", "/api/openapi.json")
    assert status == 200
    kill = doc["paths"]["/api/sessions/{session_id}/kill"]["post"]
    assert kill["security"] == [{"session": []}] and "202" in kill["responses"]
    assert {"get", "post"} <= set(doc["paths"]["/api/locks"])
    assert "delete" in doc["paths"]["/api/locks/{lock_id}"]
    assert doc["components"]["schemas"]["LockCreate"]["required"] == ["reason"]



async def test_a_lock_that_reaches_its_end_is_audited_once(lock_env: ReviewEnv) -> None:
    """``lock.expired`` is written once, by the service's sweep, in the real audit log; a
    second sweep (another bastion, or the next pass) finds nothing to write."""
    locks = lock_env.ctx.locks
    assert locks is not None
    timed = await locks.create("op@corp", LockKind.USER, "carol@corp.example.com", "incident",
                               timedelta(minutes=30))
    await locks.create("op@corp", LockKind.STACK, "stack-web", "for good", None)
    assert await locks.note_expired() == 0
    lock_env.clock.advance(31 * 60)
    assert await locks.note_expired() == 1
    assert await locks.note_expired() == 0
    events = [json.loads(line) for line in
              (lock_env.state / "audit.jsonl").read_text().splitlines()]
    expired = [e for e in events if e["event"] == "lock.expired"]
    assert len(expired) == 1
    assert expired[0]["lock_id"] == timed.id and expired[0]["value"] == "carol@corp.example.com"


async def test_a_user_lock_stops_their_console_and_tokens_at_the_next_request(
        lock_env: ReviewEnv) -> None:
    env = lock_env
    rita = await env.who("rita")
    tok = await token(env, "rita", ["grants:read"])
    assert (await env.call(rita, "GET", "/api/grants"))[0] == 200
    status, lock = await env.call("adam", "POST", "/api/locks",
                                  {"user": "rita", "reason": "stolen laptop"})
    assert status == 201
    for who in (rita, tok):
        status, body = await env.call(who, "GET", "/api/grants")
        assert status == 401 and "stolen laptop" in body["detail"]["message"], body
    assert (await env.call("alan", "GET", "/api/grants"))[0] == 200  # others go on
    assert (await env.call("adam", "DELETE", f"/api/locks/{lock['id']}"))[0] == 200
    assert (await env.call(tok, "GET", "/api/grants"))[0] == 200  # the token works again
    assert (await env.call(rita, "GET", "/api/grants"))[0] == 401  # the login session ended
    reasons = {(e["event"], e["reason"]) for e in env.audit()
               if e["event"] in ("web.session_ended", "api_token.refused")}
    assert reasons == {("web.session_ended", f"locked: lock {lock['id']}"),
                       ("api_token.refused", f"locked: lock {lock['id']}")}
