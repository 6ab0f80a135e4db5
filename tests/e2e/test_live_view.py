"""Live view through the demo broker: a real OpenSSH session (in a pty, or an exec), watched over
the API's WebSocket (aiohttp client) and with ``sessions watch`` under a pty.

What is watched arrives within a second of the user seeing it; a foreign Origin and someone
else's session are refused; a 50 MiB flood is skipped with a marker while the user still gets
every byte; the watch ends with the session, and each watch is audited.
"""

from __future__ import annotations

import asyncio
import json
import os
import termios
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import BIN, Demo, serve_broker
from tests.e2e.test_terminal import Terminal

pytestmark = pytest.mark.e2e

FLOOD = 50 * 1024 * 1024


def _shell(demo: Demo, user: str) -> Terminal:
    env = demo.env(user)
    env["TERM"] = "xterm"
    term = Terminal(demo.ssh_args(f"{user}+web01", "-tt"), env, rows=30, cols=120)
    term.send(b"PS1='RE''ADY> '; export PS1\r")
    term.expect(b"READY> ")
    return term


def _live(demo: Demo, user: str, kind: str = "shell", wait: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    while True:
        rows = [s for s in demo.sessions() if s["user"].startswith(user + "@")
                and s["status"] == "live" and s["kind"] == kind]
        if rows:
            return rows[0]
        assert time.monotonic() < deadline, f"no live {kind} session of {user}"
        time.sleep(0.2)


async def _login(demo: Demo, http: aiohttp.ClientSession, user: str) -> None:
    password = demo.info["password"]
    code = await asyncio.to_thread(demo.next_code, user)
    resp = await http.post(demo.info["web_url"] + "/api/login",
                           json={"user": user, "password": password, "code": code})
    assert resp.status == 200, await resp.text()


def _ws_url(demo: Demo, sid: str) -> str:
    return demo.info["web_url"].replace("http://", "ws://") + f"/api/sessions/{sid}/live"


async def _watch(demo: Demo, http: aiohttp.ClientSession, sid: str
                 ) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(_ws_url(demo, sid), origin=demo.info["web_url"])


async def _until(ws: aiohttp.ClientWebSocketResponse, needle: str, seen: list[Any],
                 within: float = 15) -> float:
    """Read messages into ``seen`` until the output since the call holds ``needle``; when."""
    deadline = time.monotonic() + within
    start = len(seen)
    while needle not in _text(seen[start:]):
        msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, (msg, seen[-5:])
        seen.append(json.loads(msg.data))
    return time.monotonic()


async def _rest(ws: aiohttp.ClientWebSocketResponse, seen: list[Any],
                within: float = 30) -> dict[str, Any]:
    """Read to the end; the ``end`` message."""
    end: dict[str, Any] | None = None
    deadline = time.monotonic() + within
    while True:
        msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.CLOSING):
            break
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        doc = json.loads(msg.data)
        seen.append(doc)
        if isinstance(doc, dict) and "end" in doc:
            end = doc["end"]
    assert end is not None, seen[-5:]
    return end


def _text(seen: list[Any]) -> str:
    return "".join(d[2] for d in seen if isinstance(d, list) and d[1] == "o")


async def test_an_auditor_sees_what_the_user_sees_within_a_second(demo: Demo) -> None:
    user = demo.take_user()
    term = await asyncio.to_thread(_shell, demo, user)
    try:
        sid = (await asyncio.to_thread(_live, demo, user))["id"]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await _login(demo, http, "auditor")
            ws = await _watch(demo, http, sid[:12])  # a unique prefix, as for a replay
            header = json.loads((await ws.receive(timeout=10)).data)
            assert header["version"] == 2 and (header["width"], header["height"]) == (120, 30)
            assert header["bastion"]["session_id"] == sid and "t" in header["live"]
            seen: list[Any] = []
            for i in range(3):
                term.send(b"echo live\"\"-check-%d\r" % i)
                user_saw = (await asyncio.to_thread(term.expect, b"live-check-%d\r\n" % i),
                            time.monotonic())[1]
                watcher_saw = await _until(ws, f"live-check-{i}\r\n", seen)
                assert watcher_saw - user_saw < 1.0
            # a password typed at a no-echo prompt: only its marker reaches the watcher
            term.send(b"read -s -p 'Sec''ret: ' X; echo; echo got=${#X}\r")
            await asyncio.to_thread(term.expect, b"Secret: ")
            for b in b"hunter2-live":
                term.send(bytes([b]))
                await asyncio.sleep(0.01)
            term.send(b"\r")
            await asyncio.to_thread(term.expect, b"got=12\r\n")
            await _until(ws, "got=12", seen)
            term.send(b"printf 'A\\033]52;c;ZXZpbA==\\007B\\033]0;title\\007C\\n'; exit 3\r")
            end = await _rest(ws, seen)
            assert await asyncio.to_thread(term.close) == 3
            text = _text(seen)
            assert "hunter2" not in text and "hunter2" not in json.dumps(seen)
            assert "[input not echoed: 12 bytes]" in text
            assert ["i", "[input not echoed: 12 bytes]"] in [d[1:] for d in seen
                                                             if isinstance(d, list)]
            assert "ABC" in text and "\x1b]" not in text  # clipboard and title dropped
            assert end["exit_status"] == "3" and end["reason"] == "exit"
            await ws.close()
            # once ended it cannot be watched: the console offers the replay instead
            resp = await http.get(demo.info["web_url"] + f"/api/sessions/{sid}/live")
            assert resp.status == 409 and (await resp.json())["error"] == "ended"
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    watched = [e for e in demo.audit_lines() if e["event"] == "session.watched"
               and e.get("session_id") == sid]
    assert len(watched) == 1
    assert watched[0]["actor"].startswith("auditor@") and watched[0]["via"] == "console"


async def test_foreign_origin_and_someone_elses_session_are_refused(demo: Demo) -> None:
    owner, other = demo.take_user(), demo.take_user()
    term = await asyncio.to_thread(_shell, demo, owner)
    try:
        sid = (await asyncio.to_thread(_live, demo, owner))["id"]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await _login(demo, http, "auditor")
            for origin in ("http://evil.example", "null", None):
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await http.ws_connect(_ws_url(demo, sid), origin=origin)
                assert err.value.status == 403
            # a page elsewhere cannot even learn whether the session is live
            resp = await http.get(demo.info["web_url"] + f"/api/sessions/{sid}/live",
                                  headers={"Origin": "http://evil.example"})
            assert resp.status == 403
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await _login(demo, http, other)  # no auditor role: someone else's is missing
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await _watch(demo, http, sid)
            assert err.value.status == 404
            resp = await http.get(demo.info["web_url"] + f"/api/sessions/{sid}/live")
            assert resp.status == 404
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await _login(demo, http, owner)  # their own session, like its replay
            ws = await _watch(demo, http, sid)
            assert json.loads((await ws.receive(timeout=10)).data)["version"] == 2
            await ws.close()
        term.send(b"exit\r")
        assert await asyncio.to_thread(term.close) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    refused = [e for e in demo.audit_lines() if e["event"] == "session.watched"
               and e.get("session_id") == sid]
    assert [e["actor"].split("@")[0] for e in refused] == [owner]


async def test_a_flood_is_skipped_for_the_watcher_and_whole_for_the_user(demo: Demo) -> None:
    user = demo.take_user()
    # 50 MiB of text lines after a pause (for the watch to start), then a last line
    command = ("sleep 2; yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklm"
               f" | head -c {FLOOD}; echo; echo flood-done")
    proc = await asyncio.create_subprocess_exec(
        *demo.ssh_args(f"{user}+web01"), command, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=demo.env(user))
    try:
        sid = (await asyncio.to_thread(_live, demo, user, "exec"))["id"]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await _login(demo, http, "auditor")
            ws = await _watch(demo, http, sid)
            seen: list[Any] = []
            got, _ = await asyncio.gather(proc.communicate(), _rest(ws, seen, within=120))
            out = got[0]
            end = next(d["end"] for d in seen if isinstance(d, dict) and "end" in d)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0 and end["exit_status"] == "0"
    assert len(out) == FLOOD + len("\nflood-done\n") and out.endswith(b"\nflood-done\n")
    text = _text(seen)
    assert "[live view skipped " in text and text.rstrip().endswith("flood-done")
    skipped = sum(int(part.split(" bytes]")[0]) for part in text.split("[live view skipped ")[1:])
    assert skipped > FLOOD // 2
    assert len(text) < FLOOD // 20  # what the watcher read is a small part


def test_sessions_watch_in_a_terminal_follows_until_the_end(demo: Demo) -> None:
    user = demo.take_user()
    term = _shell(demo, user)
    watcher: Terminal | None = None
    try:
        sid = _live(demo, user)["id"]
        watcher = Terminal([str(BIN), "--config", demo.config, "sessions", "watch", sid[:10]],
                           dict(os.environ), rows=40, cols=140)
        watcher.expect(b"watching session " + sid.encode())
        watcher.expect(b"[its terminal: 120x30]")
        time.sleep(0.3)
        watcher.send(b"echo LEAK\"\"ED\r")  # the watcher's keys go nowhere
        term.send(b"echo cli\"\"-watch-ok\r")
        term.expect(b"cli-watch-ok\r\n")
        watcher.expect(b"cli-watch-ok\r\n", timeout=5)
        term.send(b"exit 0\r")
        assert term.close() == 0
        watcher.expect(b"[session ended: 0]", timeout=10)
        assert watcher.proc.wait(10) == 0
        assert b"LEAKED" not in term.buf
        attrs = termios.tcgetattr(watcher.master)  # the terminal is as it was
        assert attrs[3] & termios.ECHO and attrs[3] & termios.ICANON
    finally:
        for p in (term.proc, watcher.proc if watcher else None):
            if p is not None and p.poll() is None:
                p.kill()
        if watcher is not None:
            os.close(watcher.master)
    rec = next(s for s in demo.sessions() if s["id"] == sid)
    with open(rec["recording"], "rb") as f:
        assert b"LEAKED" not in f.read()
    watched = [e for e in demo.audit_lines() if e["event"] == "session.watched"
               and e.get("session_id") == sid]
    assert len(watched) == 1 and watched[0]["actor"].startswith("operator:")
    assert watched[0]["via"] == "cli"


def test_q_stops_watching_and_the_session_goes_on(demo: Demo) -> None:
    user = demo.take_user()
    term = _shell(demo, user)
    try:
        sid = _live(demo, user)["id"]
        watcher = Terminal([str(BIN), "--config", demo.config, "sessions", "watch", sid],
                           dict(os.environ), rows=40, cols=140)
        try:
            watcher.expect(b"[its terminal: 120x30]")
            term.send(b"printf '\\033[?1049h\\033[?25l'; echo in\"\"-alt\r")  # a full screen
            watcher.expect(b"in-alt", timeout=5)
            watcher.send(b"q")
            watcher.expect(b"\x1b[?1049l")  # left the alternate screen, cursor shown
            watcher.expect(b"[stopped watching; the session goes on]", timeout=5)
            assert watcher.proc.wait(10) == 0
            assert termios.tcgetattr(watcher.master)[3] & termios.ECHO
        finally:
            if watcher.proc.poll() is None:
                watcher.proc.kill()
            os.close(watcher.master)
        term.send(b"echo still\"\"-here\r")
        term.expect(b"still-here")
        term.send(b"exit\r")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    # a session that ended cannot be watched: said in one line
    r = demo.cli("sessions", "watch", sid, check=False)
    assert r.returncode != 0 and "has ended" in r.stderr and "Traceback" not in r.stderr


async def test_a_session_on_another_bastion_is_named_as_such(demo: Demo, tmp_path: Path) -> None:
    """A second broker on the same store with recordings of its own (a fleet's other bastion):
    its live session is listed, and this bastion answers 409 elsewhere at once, as does the
    CLI, instead of waiting for a file that is not here."""
    cfg = demo.variant_config(tmp_path, extra=f'[recordings]\ndir = "{tmp_path / "rec"}"\n'
                              "[web]\nenabled = false\n")
    cfg.write_text('node_name = "east-2"\n' + cfg.read_text())  # top level: before any section
    other, port = serve_broker(cfg)
    user = demo.take_user()
    proc = await asyncio.create_subprocess_exec(
        *demo.ssh_args(f"{user}+web01", port=port,
                       known_hosts=demo.known_hosts_for(tmp_path, port)),
        "echo started; sleep 30", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=demo.env(user))
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"started\n"
        sid = (await asyncio.to_thread(_live, demo, user, "exec"))["id"]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await _login(demo, http, "auditor")
            resp = await http.get(demo.info["web_url"] + f"/api/sessions/{sid}/live")
            body = await resp.json()
            assert resp.status == 409 and body["error"] == "elsewhere"
            assert f"session {sid} is live on bastion east-2" in body["detail"]["message"]
            detail = await (await http.get(demo.info["web_url"] + f"/api/sessions/{sid}")).json()
            assert detail["bastion"] == "east-2"
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await _watch(demo, http, sid)
            assert err.value.status == 409
        r = await asyncio.to_thread(demo.cli, "sessions", "watch", sid, check=False)
        assert r.returncode != 0 and "live on bastion east-2" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        proc.kill()
        await proc.wait()
        other.terminate()
        other.wait(20)
    assert not [e for e in demo.audit_lines() if e["event"] == "session.watched"
                and e.get("session_id") == sid]
