"""Crash repair of recordings, the fsync bookkeeping of the writer, and the disk thresholds.

Real files, a real SQLite index and the real JSONL audit log on a temporary directory.
"""
# small local files: blocking file I/O inside these async tests is intended
# ruff: noqa: ASYNC230, ASYNC240

from __future__ import annotations

import collections
import fcntl
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.audit.jsonl import JsonlAuditLog
from broker.domain import recording as fmt
from broker.ports import SessionRecord
from broker.recordings.diskguard import DiskGuard, DiskLevel, classify
from broker.recordings.local import OPEN_DIR, LocalRecordingSink
from broker.recordings.repair import pending, repair_interrupted
from broker.services.clock import SystemClock
from broker.store.sqlite import SqliteDatabase, SqliteSessionIndex

SID = "0a1b2c3d-4e5f-0000-0000-000000000001"
META = {"session_id": SID, "user": "alice@corp.example.com", "target": "web01", "term": "xterm",
        "width": 80, "height": 24, "started_at_epoch": 1740830400}


class Env:
    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "recordings"
        self.sink = LocalRecordingSink(self.root)
        self.db = SqliteDatabase(tmp / "broker.db")
        self.index = SqliteSessionIndex(self.db)
        self.clock = SystemClock()
        self.audit_path = tmp / "audit.jsonl"
        self.audit = JsonlAuditLog(self.audit_path, self.clock)

    async def row(self, sid: str = SID) -> None:
        await self.index.started(SessionRecord(
            id=sid, user="alice@corp.example.com", target="web01", login="ec2-user",
            grant_id="g1", level="read-only", kind="shell", command=None, peer="127.0.0.1",
            started_at=datetime.now(UTC) - timedelta(minutes=1), ended_at=None,
            exit_status=None, bytes_in=0, bytes_out=0, recording="",
        ))

    def events(self) -> list[dict[str, object]]:
        return [json.loads(x) for x in self.audit_path.read_text().splitlines()]

    async def repair(self) -> list[object]:
        return list(await repair_interrupted(self.root, self.index, self.audit, self.clock))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.audit.close()
    e.db.close()


def _crash(writer: object) -> None:
    """What SIGKILL does to a writer: the descriptor (and its lock) goes, nothing else runs."""
    os.close(writer._fd)  # type: ignore[attr-defined]


async def test_crashed_recording_is_cut_marked_and_its_session_ended(env: Env) -> None:
    await env.row()
    w = env.sink.open(SID, META)
    w.write(fmt.OUTPUT, b"hello\r\n")
    w.write(fmt.INPUT, b"ls\r")
    w.write(fmt.OUTPUT, b"\x00\xffbinary")
    path = Path(w.location)
    _crash(w)
    good = path.stat().st_size
    with open(path, "ab") as f:  # a torn last write: header and half a payload
        f.write(fmt.frame_header(5, fmt.OUTPUT, 100) + b"partial")
    assert pending(env.root) == [(SID, env.root / OPEN_DIR / SID)]

    done = await env.repair()

    assert len(done) == 1
    assert done[0].cut_bytes == fmt.FRAME.size + len(b"partial")  # type: ignore[attr-defined]
    parsed = fmt.parse(path.read_bytes())
    assert not parsed.truncated
    assert parsed.valid_length == good + fmt.FRAME.size + len(b"interrupted")
    assert fmt.output_bytes(parsed.frames) == b"hello\r\n\x00\xffbinary"
    assert fmt.exit_status(parsed.frames) == "interrupted"
    assert path.with_suffix(".cast").exists()
    rec = await env.index.get(SID)
    assert rec is not None and rec.ended_at is not None
    assert rec.exit_status == "interrupted"
    assert (rec.bytes_in, rec.bytes_out) == (3, 15)
    ends = [e for e in env.events() if e["event"] == "session.end"]
    assert len(ends) == 1
    assert ends[0]["reason"] == "interrupted" and ends[0]["synthesized"] is True
    assert ends[0]["session_id"] == SID
    assert pending(env.root) == []
    assert await env.repair() == []  # idempotent: a second start repairs nothing


async def test_a_live_recording_of_another_process_is_left_alone(env: Env) -> None:
    await env.row()
    w = env.sink.open(SID, META)
    w.write(fmt.OUTPUT, b"still running")
    size = Path(w.location).stat().st_size
    assert await env.repair() == []
    assert Path(w.location).stat().st_size == size
    rec = await env.index.get(SID)
    assert rec is not None and rec.ended_at is None
    w.write(fmt.OUTPUT, b" and writing")
    w.close()
    w.release()
    assert pending(env.root) == []


async def test_missing_file_and_header_less_file_still_end_the_session(env: Env) -> None:
    other = SID[:-1] + "2"
    await env.row()
    await env.row(other)
    w = env.sink.open(SID, META)
    path = Path(w.location)
    _crash(w)
    path.unlink()  # power loss before the file reached the disk
    w2 = env.sink.open(other, META)
    p2 = Path(w2.location)
    _crash(w2)
    p2.write_bytes(b"BB")  # torn header
    done = await env.repair()
    assert {d.session_id for d in done} == {SID, other}  # type: ignore[attr-defined]
    for sid in (SID, other):
        rec = await env.index.get(sid)
        assert rec is not None and rec.exit_status == "interrupted"
    assert p2.read_bytes() == b"BB"  # kept as evidence, not rewritten
    assert pending(env.root) == []


async def test_a_cleanly_finished_session_with_a_stale_marker_is_not_marked(env: Env) -> None:
    await env.row()
    w = env.sink.open(SID, META)
    w.write(fmt.OUTPUT, b"done")
    w.close()
    await env.index.ended(SID, datetime.now(UTC), None, 0, 4)
    before = Path(w.location).read_bytes()
    await env.repair()  # the crash came after session.end, before the marker went
    assert Path(w.location).read_bytes() == before
    assert [e for e in env.events() if e["event"] == "session.end"] == []
    assert pending(env.root) == []


def test_writer_tracks_unsynced_bytes_and_holds_a_lock(env: Env) -> None:
    w = env.sink.open(SID, META)
    assert w.dirty
    w.sync()
    assert not w.dirty
    w.write(fmt.OUTPUT, b"x")
    assert w.dirty
    with open(w.location, "rb") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    w.close()
    assert not w.dirty
    with open(w.location, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by close
    w.sync()  # after close: a no-op, not an error


def test_a_failed_start_leaves_no_file_and_no_marker(tmp_path: Path) -> None:
    root = tmp_path / "recordings"
    (root / OPEN_DIR).mkdir(parents=True)
    (root / OPEN_DIR / SID).mkdir()  # the marker cannot be written
    with pytest.raises(Exception, match="cannot create recording"):
        LocalRecordingSink(root).open(SID, META)
    assert list(root.rglob("*.rec")) == []


@pytest.mark.parametrize(("free", "expected"), [
    (500, DiskLevel.OK), (199, DiskLevel.LOW), (99, DiskLevel.CRITICAL), (0, DiskLevel.CRITICAL),
])
def test_thresholds_take_the_larger_of_percent_and_bytes(free: int, expected: DiskLevel) -> None:
    assert classify(free, 1000, min_free_percent=10, min_free_bytes=200,
                    critical_free_percent=5, critical_free_bytes=100) is expected
    assert classify(free, 1000, min_free_percent=20, min_free_bytes=0,
                    critical_free_percent=10, critical_free_bytes=0) is expected


def test_disk_guard_reads_the_file_system(tmp_path: Path) -> None:
    assert DiskGuard(tmp_path / "not" / "yet", min_free_percent=0,
                     critical_free_percent=0).status().level is DiskLevel.OK
    st = DiskGuard(tmp_path, min_free_bytes=2**62, critical_free_bytes=0,
                   min_free_percent=0, critical_free_percent=0).status()
    assert st.level is DiskLevel.LOW and st.total_bytes > 0


async def test_a_large_crashed_recording_is_repaired_in_bounded_memory(env: Env) -> None:
    """48 MiB of output and a torn last frame: cut, marked and counted while holding a few MiB
    (a crashed multi-GiB session must not take the starting broker's memory with it)."""
    import tracemalloc

    await env.row()
    w = env.sink.open(SID, META)
    chunk = bytes(range(256)) * 128  # 32 KiB
    n = 48 << 20 >> 15
    w.write_frames([part for _ in range(n) for part in w.frame(fmt.OUTPUT, chunk)])
    w.write(fmt.INPUT, b"q")
    path = Path(w.location)
    _crash(w)
    with open(path, "ab") as f:
        f.write(fmt.frame_header(5, fmt.OUTPUT, 1 << 20) + b"torn")
    tracemalloc.start()
    try:
        done = await env.repair()
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"repair held {peak >> 20} MiB"
    assert len(done) == 1 and done[0].cut_bytes == fmt.FRAME.size + 4  # type: ignore[attr-defined]
    rec = await env.index.get(SID)
    assert rec is not None and (rec.bytes_in, rec.bytes_out) == (1, n * len(chunk))
    with open(path, "rb") as f:
        reader = fmt.FrameReader(f, path.stat().st_size)
        tail = collections.deque(reader.frames, maxlen=1)
    assert not reader.truncated and tail
    assert (tail[0].kind, tail[0].data) == (fmt.EXIT, b"interrupted")
