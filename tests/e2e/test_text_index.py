"""What sessions showed and typed is searchable once they end: a shell in a real pty and an exec
through the real OpenSSH client, a session repaired after ``kill -9``, and ``sessions reindex``.

The store is read as the console and the CLI read it (``connect_stores(config, "read")``)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.config import load_config
from broker.ports import SessionMatch, SessionQuery, TextHit
from broker.store.sqlite import SqliteDatabase, SqliteSessionIndex
from broker.stores import Stores, connect_stores
from tests.conftest import Demo
from tests.e2e.test_durability import BrokerProcess, Client, broker_config

pytestmark = pytest.mark.e2e

WAIT = 30.0  # for a session's text to be indexed after its end
PAUSE = 3.0  # before the command is typed: its text must be timed after it, not at the prompt


def _word() -> str:
    return "zq" + uuid.uuid4().hex[:12]  # letters and digits: one token for the index


@pytest.fixture
async def store(demo: Demo) -> AsyncIterator[Stores]:
    stores = await connect_stores(load_config(Path(demo.config)), "read")
    try:
        yield stores
    finally:
        await stores.close()


async def _found(stores: Stores, text: str) -> SessionMatch:
    """The one session whose indexed text has ``text`` (indexing runs after the session end)."""
    deadline = time.monotonic() + WAIT
    while True:
        matches = await stores.sessions.search(SessionQuery(text=text))
        if matches:
            (m,) = matches
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"no session's text has {text!r} after {WAIT} s")
        await asyncio.sleep(0.1)


def _within(hits: list[TextHit] | tuple[TextHit, ...], m: SessionMatch) -> None:
    assert m.record.ended_at is not None
    duration = (m.record.ended_at - m.record.started_at).total_seconds()
    for h in hits:
        assert 0 <= h.t <= duration + 0.01, (h, duration)


async def test_a_shell_session_is_searchable_at_the_moment_it_showed_the_text(
        demo: Demo, store: Stores) -> None:
    user, word = demo.take_user(), _word()
    client = Client(demo, user, demo.port, demo.known_hosts, None, tty=True)
    try:
        client.send(b"PS1='RE''ADY> '\n")
        client.pump(b"READY> ")
        await asyncio.sleep(PAUSE)
        client.send(f"echo {word}-$((6*7))\n".encode())
        client.pump(f"{word}-42".encode())
        client.send(b"exit\n")
        assert client.finish() == 0
    finally:
        if client.proc.poll() is None:
            client.proc.kill()
    m = await _found(store, word)
    assert m.record.user.startswith(user + "@") and m.record.kind == "shell"
    assert {h.source for h in m.hits} == {"input", "output"}  # typed, then echoed and shown
    _within(m.hits, m)
    assert all(h.t >= PAUSE - 0.5 for h in m.hits), m.hits
    # what only the output has (the shell's arithmetic): the moment it was shown
    (shown,) = await store.sessions.text_hits(m.record.id, f"{word}-42")
    assert shown.source == "output" and word in shown.snippet
    _within([shown], m)
    assert shown.t >= PAUSE - 0.5


async def test_an_exec_session_has_its_command_and_output(demo: Demo, store: Stores) -> None:
    user, word = demo.take_user(), _word()
    r = demo.ssh(user, "web01", f"echo {word}-$((6*7)); echo also-on-stderr >&2")
    assert r.returncode == 0 and f"{word}-42".encode() in r.stdout
    m = await _found(store, word)
    assert m.record.kind == "exec"
    assert [(h.source, h.t) for h in m.hits if h.source == "command"] == [("command", 0.0)]
    assert {h.source for h in m.hits} == {"command", "output"}  # no pty: stdin is not typing
    _within(m.hits, m)
    (shown,) = await store.sessions.text_hits(m.record.id, f"{word}-42")
    assert shown.source == "output"
    assert await store.sessions.text_hits(m.record.id, "also-on-stderr")


async def test_reindex_rebuilds_a_sessions_text(demo: Demo, store: Stores) -> None:
    user, word = demo.take_user(), _word()
    assert demo.ssh(user, "web01", f"echo {word}").returncode == 0
    m = await _found(store, word)
    sid = m.record.id
    before = await store.sessions.text_hits(sid, word)
    # lose the session's text (as a failed or never-run indexing leaves it)
    db = SqliteDatabase(load_config(Path(demo.config)).db_path)
    try:
        await SqliteSessionIndex(db).index_text(sid, [])
    finally:
        db.close()
    assert await store.sessions.text_hits(sid, word) == []

    r = demo.cli("sessions", "reindex", sid[:12])
    assert r.stdout.startswith(f"{sid}: ") and "segments" in r.stdout
    assert await store.sessions.text_hits(sid, word) == before  # the same text, once

    r = demo.cli("sessions", "reindex", "--all", "--json", check=False)
    report = json.loads(r.stdout)
    assert sid in {d["session_id"] for d in report["indexed"]}
    assert sid not in {f["session_id"] for f in report["failed"]}
    assert await store.sessions.text_hits(sid, word) == before
    events = [e for e in demo.audit_lines() if e["event"] == "sessions.reindexed"]
    assert [e["scope"] for e in events[-2:]] == [sid[:12], "all"]

    r = demo.cli("sessions", "reindex", check=False)
    assert r.returncode == 2 and "--all" in r.stderr and "Traceback" not in r.stderr


async def test_a_session_repaired_after_kill_9_is_indexed_at_the_next_start(
        demo: Demo, store: Stores, tmp_path: Path) -> None:
    rec_dir = tmp_path / "rec"
    rec_dir.mkdir()
    cfg = broker_config(demo, tmp_path, f'[recordings]\ndir = "{rec_dir}"\n')
    log = tmp_path / "broker.log"
    log.touch()
    broker = BrokerProcess(cfg, log)
    user, word = demo.take_user(), _word()
    client = Client(demo, user, broker.port, demo.known_hosts_for(tmp_path, broker.port), None,
                    tty=True)
    try:
        client.send(f"echo {word}-$((6*7))\n".encode())
        client.pump(f"{word}-42".encode())
        broker.proc.send_signal(signal.SIGKILL)
        assert broker.wait(30) == -signal.SIGKILL
        client.finish(60)
    finally:
        broker.kill()
        if client.proc.poll() is None:
            client.proc.kill()
    assert await store.sessions.search(SessionQuery(text=word)) == []  # never indexed

    again = BrokerProcess(cfg, log)  # repairs, seals and indexes before it listens... or soon
    try:
        m = await _found(store, f"{word}-42")
        assert m.record.exit_status == "interrupted"
        assert {h.source for h in m.hits} == {"output"}
        _within(m.hits, m)
    finally:
        again.proc.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0
    assert "Traceback" not in log.read_text(errors="replace")
