"""Audit log rotation on real files: the chain runs on across files, several processes append
while one of them rotates, ``verify --audit`` checks every file and names the damaged one, and
the readers (search, session lines, shipping's tail) read across files in order."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pytest

from broker.audit.files import Snapshot, iter_lines
from broker.audit.jsonl import JsonlAuditLog
from broker.audit.reader import JsonlAuditReader
from broker.domain.audit import GENESIS, line_hash
from broker.domain.audit_files import ROTATED, parse_rotated, rotated_name
from broker.integrity.archive import session_lines
from broker.integrity.keys import SigningKey, load_or_create_signing_key
from broker.integrity.verify import Report, verify_audit
from broker.ports import AuditQuery
from broker.shipping.backlog import _audit_unread
from broker.shipping.spool import AuditTail, Spool
from tests.unit.test_audit_chain import FakeClock

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return load_or_create_signing_key(tmp_path / "key")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


def rotated(path: Path) -> list[Path]:
    with Snapshot(path) as snap:
        return [f.path for f in snap.rotated]


def events(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in iter_lines(path)]


def errors(report: Report) -> list[tuple[str, str]]:
    return [(f.code, f.message) for f in report.findings if f.severity == "error"]


def write(path: Path, key: SigningKey, n: int, rotate_bytes: int = 1500,
          **kw: object) -> None:
    log = JsonlAuditLog(path, FakeClock(), signer=key, rotate_bytes=rotate_bytes,
                        checkpoint_lines=1000, **kw)  # type: ignore[arg-type]
    for i in range(n):
        log.emit("test.event", n=i, session_id=f"s-{i % 7}", user="alice")
    log.close()


def test_the_chain_runs_on_across_files_and_each_closed_file_ends_signed(
        path: Path, key: SigningKey) -> None:
    write(path, key, 60)
    files = rotated(path)
    assert len(files) >= 3
    seen: list[dict[str, object]] = []
    prev_last: bytes | None = None
    prev_name = ""
    for f in [*files, path]:
        lines = f.read_bytes().splitlines(keepends=True)
        first = json.loads(lines[0])
        if prev_last is None:
            assert first["seq"] == 0 and first["prev"] == GENESIS
        else:
            # the first event of a file links to the last of the one before, and names it
            assert first["event"] == ROTATED and first["prev"] == line_hash(prev_last)
            assert first["previous"] == prev_name
        if f != path:
            assert json.loads(lines[-1])["event"] == "audit.checkpoint"
            r = parse_rotated(path.name, f.name)
            assert r is not None and r.first_seq == first["seq"]
            assert f.stat().st_size < 1500 + 2 * 400  # rotated before the event that follows
        seen += [json.loads(x) for x in lines]
        prev_last, prev_name = lines[-1], f.name
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    assert [e["n"] for e in seen if e["event"] == "test.event"] == list(range(60))
    report = verify_audit(path, key.public)
    assert report.ok and not report.findings, report.findings
    assert report.checked["files"] == [f.name for f in [*files, path]]
    assert not list(path.parent.glob(".*rotating"))  # nothing left behind


def test_daily_rotation_starts_a_file_on_a_new_utc_day(path: Path, key: SigningKey) -> None:
    clock = FakeClock()  # 2025-03-01 12:00 UTC, one second per reading
    log = JsonlAuditLog(path, clock, signer=key, rotate_bytes=0, rotate_daily=True)
    log.emit("test.event", n=0)
    log.emit("test.event", n=1)
    assert rotated(path) == []
    clock.t = clock.t.replace(hour=23, minute=59, second=58)
    log.emit("test.event", n=2)  # 23:59:59: same day
    log.emit("test.event", n=3)  # 00:00:00 the next day: a new file first
    log.close()
    [old] = rotated(path)
    assert old.name.startswith("audit-20250301T1200")
    assert [json.loads(x)["event"] for x in path.read_bytes().splitlines()] == [
        ROTATED, "test.event", "audit.checkpoint"]
    assert verify_audit(path, key.public).ok


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from broker.audit.jsonl import JsonlAuditLog
    from broker.integrity.keys import load_or_create_signing_key
    from broker.services.clock import SystemClock
    path, key, who, n, rotate = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], \\
        int(sys.argv[4]), int(sys.argv[5])
    log = JsonlAuditLog(path, SystemClock(), signer=load_or_create_signing_key(key),
                        rotate_bytes=rotate, checkpoint_lines=50)
    sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()
    for i in range(n):
        log.emit("test.event", writer=who, n=i)
    log.close()
""")


def test_concurrent_writers_rotate_once_each_time_and_lose_nothing(
        tmp_path: Path, path: Path, key: SigningKey) -> None:
    """Four processes append at once (one never rotates: a broker with another config) while
    the others rotate at a tiny size: every event lands exactly once, seq counts up without a
    gap across every file, no event is in a file after its rotation, and verify passes."""
    n = 250
    procs = [subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(tmp_path / "key"), f"w{w}", str(n),
         "0" if w == 0 else "4000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=ROOT, text=True) for w in range(4)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:  # all start together
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
    for p in procs:
        assert p.wait(120) == 0
    files = rotated(path)
    assert len(files) >= 10
    evs = events(path)
    assert [e["seq"] for e in evs] == list(range(len(evs)))
    got = sorted((str(e["writer"]), int(str(e["n"]))) for e in evs if e["event"] == "test.event")
    assert got == sorted((f"w{w}", i) for w in range(4) for i in range(n))
    assert not any(e["event"] == "audit.cut" for e in evs)  # a rotation is not a cut
    for f in files:  # each closed file ends with its checkpoint: nothing came after
        assert json.loads(f.read_bytes().splitlines()[-1])["event"] == "audit.checkpoint"
    report = verify_audit(path, key.public)
    assert report.ok and not report.findings, report.findings


def test_an_edited_rotated_file_is_named_with_its_line(path: Path, key: SigningKey) -> None:
    write(path, key, 60)
    victim = rotated(path)[1]
    lines = victim.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"user":"alice"', b'"user":"mallory"')
    victim.write_bytes(b"".join(lines))
    report = verify_audit(path, key.public)
    assert not report.ok
    [(code, message)] = errors(report)
    assert code == "audit_line_modified"
    assert f"line 3 of {victim.name}" in message
    [f] = report.findings
    assert f.where["file"] == victim.name and f.where["line"] == 3


def test_a_removed_middle_file_is_reported_as_a_gap_by_name(path: Path, key: SigningKey) -> None:
    write(path, key, 60)
    files = rotated(path)
    gone = files[1]
    gone_first = json.loads(gone.read_bytes().splitlines()[0])["seq"]
    gone.unlink()
    report = verify_audit(path, key.public)
    assert not report.ok
    [(code, message)] = errors(report)
    assert code == "audit_file_missing"
    assert message.startswith(f"{gone.name} is missing")
    assert f"seq {gone_first}-" in message and files[2].name in message


def test_removed_first_files_are_named(path: Path, key: SigningKey) -> None:
    write(path, key, 60)
    first = rotated(path)[0]
    first.unlink()
    [(code, message)] = errors(verify_audit(path, key.public))
    assert code == "audit_file_missing" and message.startswith(f"{first.name} is missing")


def test_a_writer_holding_a_rotated_file_moves_to_the_new_one(path: Path, key: SigningKey) -> None:
    """Another process rotates the file this writer holds open: its next event goes to the new
    file (not the closed one), continues the chain, and is no cut."""
    quiet = JsonlAuditLog(path, FakeClock(), signer=key)  # never rotates by itself
    quiet.emit("test.event", who="quiet", n=0)
    write(path, key, 30, rotate_bytes=800)
    before = {f: f.read_bytes() for f in rotated(path)}
    assert before
    quiet.emit("test.event", who="quiet", n=1)
    quiet.close()
    assert {f: f.read_bytes() for f in rotated(path)} == before  # closed files unchanged
    evs = events(path)
    assert [e["seq"] for e in evs] == list(range(len(evs)))
    assert [e.get("who") for e in evs if e["event"] == "test.event"][-1] == "quiet"
    assert not any(e["event"] == "audit.cut" for e in evs)
    assert verify_audit(path, key.public).ok


def test_a_replaced_current_file_is_reported_as_a_cut(path: Path, key: SigningKey) -> None:
    log = JsonlAuditLog(path, FakeClock(), signer=key)
    for i in range(5):
        log.emit("test.event", n=i)
    path.unlink()  # the current file removed under a running writer
    log.emit("test.event", n=5)
    log.close()
    [cut] = [e for e in events(path) if e["event"] == "audit.cut"]
    assert cut["expected_seq"] == 5 and cut["found_seq"] == 0 and cut["replaced"] is True
    codes = [c for c, _ in errors(verify_audit(path, key.public))]
    assert "audit_tail_cut" in codes


def test_search_reads_rotated_files_newest_first(path: Path, key: SigningKey) -> None:
    write(path, key, 60)
    assert len(rotated(path)) >= 3
    reader = JsonlAuditReader(path)
    got = asyncio.run(reader.search(AuditQuery(event="test.event", limit=100)))
    assert [e["n"] for e in got] == list(range(59, -1, -1))
    # a page deep in the log: the files that start after the cursor are not read
    cursor = next(e["seq"] for e in events(path) if e.get("n") == 30)
    page = asyncio.run(reader.search(AuditQuery(event="test.event", before_seq=cursor,
                                                limit=3)))
    assert [e["n"] for e in page] == [29, 28, 27]
    assert asyncio.run(reader.count(AuditQuery(session_id="s-3"))) == len(range(3, 60, 7))


def test_session_lines_number_across_files(path: Path, key: SigningKey) -> None:
    write(path, key, 60)
    lines = session_lines(path, "s-2")
    assert lines is not None
    everything = list(iter_lines(path))
    assert len(lines) == len(everything)
    assert [x for x in lines if x] == [x for x in everything if b'"s-2"' in x]


def test_shipping_reads_the_rest_of_a_rotated_file_then_the_next(
        tmp_path: Path, path: Path, key: SigningKey) -> None:
    spool = Spool(tmp_path / "spool.db")
    tail = AuditTail(path, spool, "cloudwatch")
    log = JsonlAuditLog(path, FakeClock(), signer=key, rotate_bytes=1500, checkpoint_lines=1000)
    shipped: list[bytes] = []

    def drain(max_lines: int) -> None:
        while True:
            lines, inode, offset = tail.read(max_lines)
            if not lines:
                return
            shipped.extend(lines)
            tail.commit(inode, offset)

    for i in range(3):
        log.emit("test.event", n=i)
    lines, inode, offset = tail.read(2)  # part of the first file read...
    shipped.extend(lines)
    tail.commit(inode, offset)
    for i in range(3, 60):  # ...then it is rotated, several times
        log.emit("test.event", n=i)
    assert len(rotated(path)) >= 3
    files = [*rotated(path), path]
    backlog = _audit_unread(path, [("cloudwatch", inode, offset)])["cloudwatch"]
    assert backlog == sum(f.stat().st_size for f in files) - offset
    drain(7)
    log.close()
    drain(7)
    assert shipped == list(iter_lines(path))  # everything, once, in order
    assert _audit_unread(path, [("cloudwatch", *spool.offset("cloudwatch"))]) == {"cloudwatch": 0}
    spool.close()


def test_shipping_starts_at_the_oldest_file(tmp_path: Path, path: Path, key: SigningKey) -> None:
    write(path, key, 40)
    spool = Spool(tmp_path / "spool.db")
    tail = AuditTail(path, spool, "s3")
    out: list[bytes] = []
    while True:
        lines, inode, offset = tail.read(1000)
        if not lines:
            break
        out += lines
        tail.commit(inode, offset)
    assert out == list(iter_lines(path))
    spool.close()


def test_a_crash_between_link_and_rename_is_finished_by_the_next_rotation(
        path: Path, key: SigningKey) -> None:
    """The old file got its rotated name but the new one never replaced it: readers take it
    once, and the next rotation completes (the name it needs is already that file's)."""
    write(path, key, 10, rotate_bytes=0)
    first = json.loads(path.read_bytes().splitlines()[0])
    name = rotated_name(path.name, datetime.fromisoformat(first["ts"]), first["seq"])
    os.link(path, path.with_name(name))
    assert [len(list(iter_lines(path)))] == [len(path.read_bytes().splitlines())]
    assert verify_audit(path, key.public).ok
    write(path, key, 10, rotate_bytes=100)
    assert verify_audit(path, key.public).ok
    evs = events(path)
    assert [e["seq"] for e in evs] == list(range(len(evs)))


def test_a_failed_rotation_refuses_nothing_and_is_tried_again_later(
        path: Path, key: SigningKey) -> None:
    """The rotated name is taken by another file: events go on into the current file (a
    rotation failure is no reason to refuse an action), and the rotation is retried a minute
    later, once the obstacle is gone."""
    mono = [1000.0]
    log = JsonlAuditLog(path, FakeClock(), signer=key, rotate_bytes=600, checkpoint_lines=1000,
                        monotonic=lambda: mono[0])
    log.emit("test.event", n=0)
    first = json.loads(path.read_bytes().splitlines()[0])
    blocker = path.with_name(rotated_name(path.name, datetime.fromisoformat(first["ts"]), 0))
    blocker.write_text("someone else's file\n")
    for i in range(1, 10):
        log.emit("test.event", n=i)
    assert rotated(path) == [blocker]  # only the blocker: no rotation happened
    current = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert [e["n"] for e in current if e["event"] == "test.event"] == list(range(10))
    blocker.unlink()
    mono[0] += 61
    log.emit("test.event", n=10)
    log.close()
    assert len(rotated(path)) == 1
    evs = events(path)
    assert [e["seq"] for e in evs] == list(range(len(evs)))
    assert [e["n"] for e in evs if e["event"] == "test.event"] == list(range(11))
    assert verify_audit(path, key.public).ok
