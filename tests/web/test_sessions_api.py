"""The sessions API against a real aiohttp server, the real SQLite store and real recordings.

Sessions are made by the real ``SessionService`` (recording sink, index, audit, asciicast render,
signed manifest), as the SSH relay makes them; only the wall clock is fake (``FakeClock``), as in
the grant API's tests. ``review_env`` is shared with ``test_sessions_api_security``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import DummyCookieJar
from aiohttp.test_utils import TestClient, TestServer

from broker.audit.reader import JsonlAuditReader
from broker.domain import recording as fmt
from broker.domain import totp
from broker.domain.models import Instance, Principal
from broker.integrity.archive import LocalRecordingArchive
from broker.integrity.keys import load_or_create_signing_key
from broker.integrity.manifest import RecordingSealer
from broker.ports import SessionRecord, TextSegment
from broker.recordings.local import LocalRecordingSink, render_cast
from broker.services.review import ReviewService
from broker.services.sessions import LiveSession, SessionRequest, SessionService
from broker.store.sqlite import SqliteGrantStore, SqliteSessionIndex, SqliteTotpStore
from broker.web import create_app
from tests.web.conftest import DOMAIN, USERS, Env, FakeClock, LiveDirectory, Who, build_context

pytestmark = pytest.mark.timeout(60)

WEB01 = Instance("i-0web01", "web01", "stack-web", "vpc-0demo", "127.0.0.1")
DB01 = Instance("i-0db01", "db01", "stack-db", "vpc-0demo", "127.0.0.2")


class ReviewClock:
    """The tests' fake wall clock, with the real monotonic clock sessions stamp activity on."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    def now(self) -> Any:
        return self._clock.now()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass
class ReviewEnv(Env):
    sessions: SessionService = field(default=None)  # type: ignore[assignment]
    sealer: RecordingSealer = field(default=None)  # type: ignore[assignment]
    index: SqliteSessionIndex = field(default=None)  # type: ignore[assignment]
    grant_ids: dict[str, str] = field(default_factory=dict)

    async def grant_of(self, user: str) -> Any:
        """A live read-only grant of ``user`` (one per user and test)."""
        if user not in self.grant_ids:
            self.grant_ids[user] = (await self.approved(user))["id"]
        g = await SqliteGrantStore(self.db).get(self.grant_ids[user])
        assert g is not None
        return g

    async def start(self, user: str, *, instance: Instance = WEB01, kind: str = "shell",
                    command: str | None = None, parent: str | None = None,
                    recorded: bool = True) -> LiveSession:
        self.clock.advance(1)  # distinct start times, in the order the test makes them
        req = SessionRequest(
            principal=Principal(DOMAIN, user), instance=instance,
            grant=await self.grant_of(user), login="bb-readonly", kind=kind, command=command,
            term_type="xterm-256color" if kind == "shell" else None, width=80, height=24,
            peer="192.0.2.7:50000", parent_id=parent)
        if recorded:
            return await self.sessions.start(req)
        unrecorded = SessionService(
            LocalRecordingSink(self.state / "recordings"), self.index, self.ctx.audit,
            ReviewClock(self.clock), recording_enabled=False)
        return await unrecorded.start(req)

    async def finish(self, live: LiveSession, exit_status: str = "0") -> None:
        await self.sessions.finish(live, exit_status)
        await self.sessions.drain()
        await self.sealer.drain()

    async def session(self, user: str, output: Sequence[bytes] = (b"hello\r\n",), *,
                      exit_status: str | None = "0", text: str | None = None,
                      frames: Sequence[tuple[float, bytes, bytes]] = (),
                      **kw: Any) -> str:
        """A finished (or, with ``exit_status=None``, live) recorded session of ``user``; its
        output relayed through the real recording path, or ``frames`` (t, kind, data) written
        at chosen times; ``text`` indexed for search as output at t = 1.5."""
        live = await self.start(user, **kw)
        for chunk in output:
            live.output(chunk, False, lambda: None)
        if frames:
            w = live.writer
            parts: list[bytes] = []
            for t, kind, data in frames:
                parts += [fmt.frame_header(int(t * 1_000_000), kind, len(data)), data]
            w.write_frames(parts)  # type: ignore[attr-defined]
        live.flush()
        if text is not None:
            await self.index.index_text(live.id, [TextSegment(1.5, "output", text)])
        if exit_status is not None:
            await self.finish(live, exit_status)
        return live.id

    async def get(self, who: Who | str, path: str) -> tuple[int, Any]:
        return await self.call(who, "GET", path)

    async def raw(self, who: Who | str, path: str) -> tuple[int, dict[str, str], bytes]:
        w = who if isinstance(who, Who) else await self.who(who)
        r = await self.client.get(path, headers=w.headers)
        return r.status, dict(r.headers), await r.read()


async def _review_env(tmp_path: Path) -> AsyncIterator[ReviewEnv]:
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


@pytest_asyncio.fixture
async def review_env(tmp_path: Path) -> AsyncIterator[ReviewEnv]:
    async for e in _review_env(tmp_path):
        yield e


async def token(env: Env, who: str, scopes: list[str]) -> Who:
    status, tok = await env.call(who, "POST", "/api/tokens", {"name": "t", "scopes": scopes})
    assert status == 201, tok
    return Who("token", {"Authorization": f"Bearer {tok['token']}"})


def ids(body: dict[str, Any]) -> list[str]:
    return [s["id"] for s in body["items"]]


# -- search ----------------------------------------------------------------------------------------
async def test_the_list_shows_each_session_as_the_contract_says(review_env: ReviewEnv) -> None:
    env = review_env
    ok = await env.session("rita", [b"uptime\r\n"])
    failed = await env.session("rita", exit_status="2", kind="exec", command="false")
    live = await env.session("ron", exit_status=None)
    status, body = await env.get("audrey", "/api/sessions")
    assert status == 200, body
    assert ids(body) == [live, failed, ok] and body["next_cursor"] is None
    s = {x["id"]: x for x in body["items"]}
    first = s[ok]
    assert set(first) == {
        "id", "user", "target", "target_name", "stack", "login", "level", "kind", "command",
        "peer", "grant_id", "parent_id", "bastion", "started_at", "ended_at", "duration_s",
        "exit_status", "outcome", "status", "bytes_in", "bytes_out", "recorded",
        "recording_bytes", "hits"}
    assert (first["user"], first["target"], first["target_name"], first["stack"]) == (
        f"rita@{DOMAIN}", "i-0web01", "web01", "stack-web")
    assert first["started_at"].endswith("+00:00") and first["ended_at"].endswith("+00:00")
    assert (first["status"], first["outcome"], first["exit_status"]) == ("ok", "exit 0", "0")
    assert first["recorded"] is True and first["recording_bytes"] > 0
    assert first["bytes_out"] == len(b"uptime\r\n") and first["hits"] == []
    assert (s[failed]["status"], s[failed]["outcome"], s[failed]["command"]) == (
        "failed", "exit 2", "false")
    assert (s[live]["status"], s[live]["outcome"], s[live]["ended_at"]) == ("live", "live", None)


async def test_pages_follow_the_cursor_without_gaps_or_repeats(review_env: ReviewEnv) -> None:
    env = review_env
    made = [await env.session("rita") for _ in range(5)]
    seen: list[str] = []
    path = "/api/sessions?limit=2"
    for _ in range(5):
        status, body = await env.get("audrey", path)
        assert status == 200, body
        seen += ids(body)
        if body["next_cursor"] is None:
            break
        path = f"/api/sessions?limit=2&cursor={body['next_cursor']}"
    assert seen == list(reversed(made))
    # a session started meanwhile does not shift the pages being read
    _, first = await env.get("audrey", "/api/sessions?limit=2")
    await env.session("rita")
    _, second = await env.get("audrey", f"/api/sessions?limit=2&cursor={first['next_cursor']}")
    assert ids(second) == list(reversed(made))[2:4]


async def test_filters(review_env: ReviewEnv) -> None:
    env = review_env
    web = await env.session("rita", text="disk full on /var")
    db = await env.session("ron", instance=DB01, exit_status="1", text="select 1")
    jump = await env.session("rita", kind="jump", exit_status=None)
    inner = await env.session("rita", parent=jump, text="carried disk check")

    async def found(query: str) -> list[str]:
        status, body = await env.get("audrey", "/api/sessions?" + query)
        assert status == 200, (query, body)
        return ids(body)

    assert await found("user=ron") == [db]
    assert await found(f"user=ron@{DOMAIN}") == [db]
    assert await found("target=db01") == [db] and await found("target=i-0db01") == [db]
    assert await found("stack=stack-db") == [db]
    assert await found("status=failed") == [db]
    assert await found("status=live") == [jump]
    assert await found("kind=jump") == [jump]
    assert await found(f"parent={jump}") == [inner]
    assert inner not in await found("top=1")
    assert await found("q=disk") == [inner, web]
    assert await found("q=select") == [db]
    _, body = await env.get("audrey", "/api/sessions?q=disk%20full")
    assert ids(body) == [web]
    assert body["items"][0]["hits"][0]["t"] == 1.5
    assert "disk" in body["items"][0]["hits"][0]["snippet"]
    grant = env.grant_ids["ron"]
    assert await found(f"grant={grant}") == [db]
    assert await found("ticket=INC-1&trigger=service-request&user=ron") == [db]
    assert await found("since=1h") == [inner, jump, db, web]


@pytest.mark.parametrize(("query", "field"), [
    ("cursor=bm90LWEtY3Vyc29y", "cursor"), ("cursor=%25%25", "cursor"), ("status=done", "status"),
    ("limit=0", "limit"), ("limit=201", "limit"), ("limit=x", "limit"), ("since=yesterday", "since"),
    ("until=2030-01-01T00:00:00", "until"), ("kind=telnet", "kind"), ("trigger=whim", "trigger"),
    ("top=yes", "top"), ("user=a%2Bb", "user"), ("q=a%07b", "q"), ("nope=1", "nope"),
    ("since=1h&until=2h", "until"), ("parent=..%2F", "parent"), ("limit=1&limit=2", "limit"),
])
async def test_bad_input_is_a_400_naming_it(review_env: ReviewEnv, query: str,
                                            field: str) -> None:
    status, body = await review_env.get("audrey", "/api/sessions?" + query)
    assert status == 400, body
    assert body["error"] == "invalid" and body["detail"]["field"] == field
    assert body["detail"]["message"].startswith(field)


# -- one session -----------------------------------------------------------------------------------
async def test_detail_joins_grant_files_children_and_integrity(review_env: ReviewEnv) -> None:
    env = review_env
    jump = await env.session("rita", kind="jump", exit_status=None)
    sftp = await env.session("rita", kind="subsystem", command="sftp", parent=jump,
                             output=[b"\x00\x00\x00\x05\x02\x00\x00\x00\x03"])
    env.ctx.audit.emit("sftp.open", session_id=sftp, user=f"rita@{DOMAIN}", path="/etc/hosts",
                       flags="read", status="ok")
    env.ctx.audit.emit("sftp.close", session_id=sftp, user=f"rita@{DOMAIN}", path="/etc/hosts",
                       transfer="download", size=12, sha256="ab" * 32, status="ok")
    status, d = await env.get("audrey", f"/api/sessions/{sftp}")
    assert status == 200, d
    assert d["id"] == sftp and d["parent_id"] == jump
    assert d["grant"]["id"] == env.grant_ids["rita"] and d["grant"]["state"] == "approved"
    assert [h["action"] for h in d["grant_history"]][:2] == ["requested", "approved"]
    assert [(f["event"], f["path"]) for f in d["files"]] == [
        ("sftp.open", "/etc/hosts"), ("sftp.close", "/etc/hosts")]
    assert d["integrity"] == {"status": "verified", "errors": [], "warnings": []}
    status, j = await env.get("audrey", f"/api/sessions/{jump}")
    assert [c["id"] for c in j["children"]] == [sftp]
    assert j["integrity"]["status"] == "unsealed"  # still running
    assert j["files"] == [] and j["grant"]["id"] == env.grant_ids["rita"]


async def test_integrity_reports_a_changed_recording(review_env: ReviewEnv) -> None:
    env = review_env
    sid = await env.session("rita", [b"a" * 5000])
    rec = next((env.state / "recordings").glob(f"*/{sid}.rec"))
    data = bytearray(rec.read_bytes())
    data[-100] ^= 1
    rec.write_bytes(bytes(data))
    status, d = await env.get("audrey", f"/api/sessions/{sid}")
    assert status == 200 and d["integrity"]["status"] == "failed"
    assert "file_modified" in [e["code"] for e in d["integrity"]["errors"]]
    assert all(e["message"] for e in d["integrity"]["errors"])
    man = rec.with_name(f"{sid}.manifest.json")
    man.unlink()
    status, d = await env.get("audrey", f"/api/sessions/{sid}")
    # the audit log recorded the seal: a missing manifest is a failure, not "unsealed"
    assert d["integrity"]["status"] == "failed"
    assert [e["code"] for e in d["integrity"]["errors"]] == ["manifest_missing"]


async def test_an_unrecorded_session(review_env: ReviewEnv) -> None:
    env = review_env
    live = await env.start("rita", recorded=False)
    status, d = await env.get("audrey", f"/api/sessions/{live.id}")
    assert status == 200, d
    assert d["recorded"] is False and d["recording_bytes"] is None
    assert d["integrity"] == {"status": "not recorded", "errors": [], "warnings": []}
    for tail in ("/recording.cast", "/manifest"):
        status, _, body = await env.raw("audrey", f"/api/sessions/{live.id}{tail}")
        assert status == 404, body


async def test_prefixes_resolve_or_list_the_candidates(review_env: ReviewEnv) -> None:
    env = review_env
    sid = await env.session("rita")
    status, d = await env.get("audrey", f"/api/sessions/{sid[:8]}")
    assert (status, d["id"]) == (200, sid)
    assert (await env.get("audrey", f"/api/sessions/{sid[:8].upper()}"))[1]["id"] == sid
    now = env.clock.now()
    for suffix in ("1", "2"):  # two index rows sharing a prefix, as the store keeps them
        await env.index.started(SessionRecord(
            id=f"abcdef12-{suffix}", user=f"rita@{DOMAIN}", target="i-0web01", login="x",
            grant_id="", level="read-only", kind="exec", command="true", peer="p",
            started_at=now, ended_at=None, exit_status=None, bytes_in=0, bytes_out=0,
            recording=""))
    status, err = await env.get("audrey", "/api/sessions/abcdef12")
    assert status == 409, err
    assert err["error"] == "ambiguous"
    assert err["detail"]["candidates"] == ["abcdef12-1", "abcdef12-2"]
    assert (await env.get("audrey", "/api/sessions/abcdef12-2"))[1]["id"] == "abcdef12-2"
    assert (await env.get("audrey", "/api/sessions/abc"))[0] == 404  # too short to mean one
    assert (await env.get("audrey", "/api/sessions/ffffffff"))[0] == 404
    assert (await env.get("audrey", "/api/sessions/a%20b"))[0] == 400


# -- replay ----------------------------------------------------------------------------------------
def _cast(body: bytes) -> tuple[dict[str, Any], list[list[Any]]]:
    lines = body.decode().splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:]]


async def test_the_replay_is_asciicast_and_audited(review_env: ReviewEnv) -> None:
    env = review_env
    sid = await env.session("rita", [b"\x1b[31mred\x1b[0m\r\n", "caf\u00e9\r\n".encode()])
    status, headers, body = await env.raw("audrey", f"/api/sessions/{sid}/recording.cast")
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/x-asciicast")
    assert "Content-Disposition" not in headers and headers["X-Content-Type-Options"] == "nosniff"
    header, events = _cast(body)
    assert header["version"] == 2 and header["bastion"]["session_id"] == sid
    assert "offset" not in header["bastion"]
    out = "".join(e[2] for e in events if e[1] == "o")
    assert out == "\x1b[31mred\x1b[0m\r\ncaf\u00e9\r\n"  # colours kept
    assert events[-1][1:] == ["x", "0"]
    viewed = [e for e in env.audit() if e["event"] == "session.viewed"]
    assert [(e["actor"], e["session_id"], e["user"]) for e in viewed] == [
        (f"audrey@{DOMAIN}", sid, f"rita@{DOMAIN}")]
    status, headers, body = await env.raw("audrey",
                                          f"/api/sessions/{sid}/recording.cast?download=1")
    assert headers["Content-Disposition"] == f'attachment; filename="{sid}.cast"'
    assert len([e for e in env.audit() if e["event"] == "session.viewed"]) == 2


async def test_a_window_of_the_replay_is_rebased(review_env: ReviewEnv) -> None:
    env = review_env
    sid = await env.session("rita", output=(), frames=[
        (1.0, fmt.OUTPUT, b"one "), (2.0, fmt.RESIZE, b"100x30"), (2.5, fmt.OUTPUT, b"two "),
        (4.0, fmt.OUTPUT, b"three "), (6.0, fmt.OUTPUT, b"four ")])
    status, _, body = await env.raw("audrey",
                                    f"/api/sessions/{sid}/recording.cast?from=2.25&to=5")
    assert status == 200, body
    header, events = _cast(body)
    assert header["bastion"]["offset"] == 2.25
    assert (header["width"], header["height"]) == (100, 30)  # the size when the window opens
    assert events == [[0.25, "o", "two "], [1.75, "o", "three "]]
    _, _, body = await env.raw("audrey", f"/api/sessions/{sid}/recording.cast?from=4")
    assert [e[2] for e in _cast(body)[1] if e[1] == "o"] == ["three ", "four "]
    for bad in ("from=-1", "from=x", "from=3&to=2", "to=nan", "download=yes"):
        status, _, body = await env.raw("audrey", f"/api/sessions/{sid}/recording.cast?{bad}")
        assert status == 400, (bad, body)


async def test_a_large_replay_streams(review_env: ReviewEnv) -> None:
    env = review_env
    chunk = (b"x" * 1023 + b"\n")
    sid = await env.session("rita", output=[chunk] * 4096)  # 4 MiB of output
    r = await env.client.get(f"/api/sessions/{sid}/recording.cast",
                             headers=(await env.who("audrey")).headers)
    assert r.status == 200
    assert r.headers.get("Transfer-Encoding") == "chunked"  # streamed, no length up front
    size = 0
    async for part in r.content.iter_chunked(1 << 16):
        size += len(part)
    assert size > 4 * 1024 * 1024


async def test_manifest_and_hits(review_env: ReviewEnv) -> None:
    env = review_env
    sid = await env.session("rita", text="kernel panic at boot")
    status, _, body = await env.raw("audrey", f"/api/sessions/{sid}/manifest")
    assert status == 200
    stored = next((env.state / "recordings").glob(f"*/{sid}.manifest.json")).read_bytes()
    assert body == stored
    assert json.loads(body)["manifest"]["session_id"] == sid
    live = await env.session("rita", exit_status=None)
    assert (await env.raw("audrey", f"/api/sessions/{live}/manifest"))[0] == 404
    status, hits = await env.get("audrey", f"/api/sessions/{sid}/hits?q=panic")
    assert status == 200
    assert [(h["t"], h["source"]) for h in hits["items"]] == [(1.5, "output")]
    assert "panic" in hits["items"][0]["snippet"]
    assert (await env.get("audrey", f"/api/sessions/{sid}/hits?q=absent"))[1]["items"] == []
    assert (await env.get("audrey", f"/api/sessions/{sid}/hits"))[0] == 400
    status, d = await env.get("audrey", f"/api/sessions/{sid}?q=panic")
    assert [h["t"] for h in d["hits"]] == [1.5]


# -- audit log and dashboard ---------------------------------------------------------------------
async def test_the_audit_log_pages_and_filters(review_env: ReviewEnv) -> None:
    env = review_env
    sid = await env.session("rita")
    await env.session("ron")
    status, body = await env.get("audrey", "/api/audit?limit=200")
    assert status == 200, body
    seqs = [e["seq"] for e in body["items"]]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) > 5
    status, mine = await env.get("audrey", f"/api/audit?session={sid}")
    assert {e["event"] for e in mine["items"]} >= {"session.start", "session.end",
                                                   "recording.sealed"}
    assert all(e["session_id"] == sid for e in mine["items"])
    _, ends = await env.get("audrey", "/api/audit?event=session.end")
    assert [e["user"] for e in ends["items"]] == [f"ron@{DOMAIN}", f"rita@{DOMAIN}"]
    _, fam = await env.get("audrey", "/api/audit?event=session.*&user=ron")
    assert {e["event"] for e in fam["items"]} == {"session.start", "session.end"}
    _, grants = await env.get("audrey", "/api/audit?user=alan&event=grant.*")
    assert grants["items"] and all(e["actor"] == f"alan@{DOMAIN}" for e in grants["items"])
    # cursor pages, newest first, cover the log exactly once
    paged: list[int] = []
    path = "/api/audit?limit=3"
    while path:
        status, page = await env.get("audrey", path)
        assert status == 200, page
        paged += [e["seq"] for e in page["items"]]
        path = f"/api/audit?limit=3&cursor={page['next_cursor']}" if page["next_cursor"] else ""
    assert paged == seqs[:len(paged)] and len(paged) >= len(seqs)
    assert (await env.get("audrey", "/api/audit?since=2h&until=1h"))[1]["items"] == []
    for bad in ("cursor=zz", "event=a..b", "limit=500", "session=X%2F", "x=1"):
        assert (await env.get("audrey", f"/api/audit?{bad}"))[0] == 400, bad
    assert (await env.get("adam", "/api/audit"))[0] == 200


async def test_the_dashboard(review_env: ReviewEnv) -> None:
    env = review_env
    await env.session("rita")
    await env.session("ron", exit_status=None)
    r = await env.login_raw("rita", password="wrong")
    assert r.status == 401
    short = await env.approved("lena", hours=2)
    await env.request("otto", hours=2)  # pending: not live, not listed
    status, d = await env.get("audrey", "/api/dashboard")
    assert status == 200, d
    assert d["scope"] == "all" and d["live_sessions"] == 1
    days = d["sessions_per_day"]
    assert len(days) == 14 and days[-1] == [env.clock.now().date().isoformat(), 2]
    assert all(n == 0 for _, n in days[:-1])
    assert d["failed_logins_24h"] == 1
    assert [e["user"] for e in d["recent_failed_logins"]] == [f"rita@{DOMAIN}"]
    # live grants ending within 24 h, the soonest first (8 h by default; otto's is pending)
    assert [g["id"] for g in d["grants_expiring"]] == [
        short["id"], env.grant_ids["rita"], env.grant_ids["ron"]]
    env.clock.advance(25 * 3600)
    _, later = await env.get("adam", "/api/dashboard")
    assert later["failed_logins_24h"] == 0 and later["sessions_per_day"][-2][1] == 2


async def test_the_openapi_document_lists_the_sessions_api(review_env: ReviewEnv) -> None:
    r = await review_env.client.get("/api/openapi.json")
    doc = await r.json()
    served = {(route.resource.canonical, route.method.lower())
              for route in review_env.client.server.app.router.routes()
              if route.method != "HEAD" and route.resource is not None
              and route.resource.canonical.startswith("/api/")}
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    for path in ("/api/sessions", "/api/sessions/{session_id}",
                 "/api/sessions/{session_id}/recording.cast",
                 "/api/sessions/{session_id}/manifest", "/api/sessions/{session_id}/hits",
                 "/api/audit", "/api/dashboard"):
        op = doc["paths"][path]["get"]
        assert op["x-scopes"] == (["audit:read"] if path == "/api/audit" else ["sessions:read"])
    cast = doc["paths"]["/api/sessions/{session_id}/recording.cast"]["get"]["responses"]["200"]
    assert list(cast["content"]) == ["application/x-asciicast"]
    assert "sessions:read" in doc["components"]["schemas"]["TokenCreate"]["properties"][
        "scopes"]["items"]["enum"]


def test_cursors_are_opaque_and_checked() -> None:
    from broker.services.review import decode_cursor, encode_cursor

    now = FakeClock().now()
    c = encode_cursor(now, "abc")
    assert decode_cursor(c) == (now, "abc") and "|" not in c
    for bad in ("", "!!", base64.urlsafe_b64encode(b"2030-01-01|x").decode(),
                base64.urlsafe_b64encode(b"nope|x").decode()):
        with pytest.raises(ValueError, match="not a cursor"):
            decode_cursor(bad)
