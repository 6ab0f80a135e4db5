"""The text index worker (``broker.services.text_index``) on real files, a real SQLite index and
the real JSONL audit log: sessions indexed in order, failures audited without stopping the
worker, a full queue and a stop that leaves sessions behind both say so."""
# small local files: blocking file I/O inside these async tests is intended
# ruff: noqa: ASYNC240

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.audit.jsonl import JsonlAuditLog
from broker.domain import recording as fmt
from broker.ports import SessionRecord
from broker.recordings.local import LocalRecordingSink
from broker.services.clock import SystemClock
from broker.services.text_index import TextIndexService
from broker.store.sqlite import SqliteDatabase, SqliteSessionIndex


class Env:
    def __init__(self, tmp: Path) -> None:
        self.sink = LocalRecordingSink(tmp / "recordings")
        self.db = SqliteDatabase(tmp / "broker.db")
        self.index = SqliteSessionIndex(self.db)
        self.audit_path = tmp / "audit.jsonl"
        self.audit = JsonlAuditLog(self.audit_path, SystemClock())
        self.service = TextIndexService(self.sink, self.index, self.audit)

    async def session(self, n: int, *frames: tuple[bytes, bytes]) -> tuple[str, str]:
        """A finished recording and its index row; returns (session id, location)."""
        sid = f"00000000-0000-4000-8000-{n:012d}"
        w = self.sink.open(sid, {"session_id": sid, "kind": "shell", "term": "xterm"})
        for kind, data in frames:
            w.write(kind, data)
        w.close()
        w.release()
        await self.index.started(SessionRecord(
            id=sid, user="alice@corp.example.com", target="web01", login="ec2-user",
            grant_id="g1", level="read-only", kind="shell", command=None, peer="127.0.0.1",
            started_at=datetime.now(UTC), ended_at=None, exit_status=None, bytes_in=0,
            bytes_out=0, recording=w.location))
        return sid, w.location

    def events(self, name: str) -> list[dict[str, object]]:
        lines = self.audit_path.read_text().splitlines() if self.audit_path.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == name]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.audit.close()
    e.db.close()


async def test_sessions_are_indexed_and_a_bad_recording_is_audited(env: Env) -> None:
    good, loc = await env.session(1, (fmt.OUTPUT, b"$ echo kiwi\r\nkiwi\r\n"))
    bad, bad_loc = await env.session(2, (fmt.OUTPUT, b"mango\r\n"))
    Path(bad_loc).write_bytes(b"not a recording")
    gone, gone_loc = await env.session(3, (fmt.OUTPUT, b"papaya\r\n"))
    Path(gone_loc).unlink()
    last, last_loc = await env.session(4, (fmt.OUTPUT, b"lime\r\n"))
    for sid, location in ((good, loc), (bad, bad_loc), (gone, gone_loc), (last, last_loc)):
        env.service.submit(sid, location)
    env.service.start()
    await env.service.stop(drain_seconds=30)
    (hit,) = await env.index.text_hits(good, "kiwi")  # one segment: both lines at once
    assert hit.source == "output" and 0 <= hit.t < 1
    assert await env.index.text_hits(last, "lime")  # the worker went on after the failures
    failed = env.events("session.index_failed")
    assert [(e["session_id"], e["reason"]) for e in failed] == [(bad, "error"), (gone, "error")]
    assert "bad magic" in str(failed[0]["error"]) and "missing" in str(failed[1]["error"])
    assert (env.service.indexed, env.service.failed) == (2, 2)


async def test_a_full_queue_and_a_stop_leave_sessions_for_reindex(env: Env) -> None:
    small = TextIndexService(env.sink, env.index, env.audit, max_pending=2)
    sids = [await env.session(n, (fmt.OUTPUT, b"fig\r\n")) for n in range(3)]
    for sid, location in sids:
        small.submit(sid, location)
    small.start()
    await small.stop(drain_seconds=0)  # nothing indexed: every queued session is reported
    failed = [(e["session_id"], e["reason"]) for e in env.events("session.index_failed")]
    assert failed == [(sids[2][0], "queue_full"), (sids[0][0], "stopped"),
                      (sids[1][0], "stopped")]
    for sid, _ in sids:
        assert await env.index.text_hits(sid, "fig") == []


async def test_reindex_all_reads_every_session_once_page_by_page(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.cli import reindex

    monkeypatch.setattr(reindex, "PAGE", 7)
    sids = {(await env.session(n, (fmt.OUTPUT, b"x\r\n")))[0] for n in range(23)}
    seen = [rec.id async for rec in reindex._all_sessions(env.index)]
    assert len(seen) == len(sids) and set(seen) == sids
