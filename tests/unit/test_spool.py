"""The shipping spool and the pure parts of shipping: queue, offsets, tailing, batching, backoff."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from broker.shipping.aws import backoff
from broker.shipping.cloudwatch import EVENT_OVERHEAD, MAX_BATCH_BYTES, MAX_EVENT_BYTES, build_batch
from broker.shipping.s3 import name_key, session_files
from broker.shipping.settings import CloudWatchShippingSettings
from broker.shipping.spool import AuditTail, ShippedObject, Spool


def test_enqueue_once_and_due_in_order(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool.db")
    assert sp.enqueue("b", now=1.0, ready_at=20.0)
    assert sp.enqueue("a", now=2.0, ready_at=10.0)
    assert not sp.enqueue("a", now=3.0, ready_at=0.0)  # already queued: unchanged
    assert [j.session_id for j in sp.due(15.0)] == ["a"]
    assert [j.session_id for j in sp.due(30.0)] == ["a", "b"]
    sp.failed("a", until=100.0, error="EndpointConnectionError: down")
    a = sp.job("a")
    assert a is not None and a.attempts == 1 and a.next_attempt == 100.0 and a.last_error
    sp.postpone("b", until=50.0)
    assert sp.job("b").attempts == 0  # type: ignore[union-attr]
    assert sp.due(40.0) == []
    sp.set_state("a", "uploaded", 200.0)
    assert [j.session_id for j in sp.uploaded_before(200.0)] == ["a"]
    assert sp.uploaded_before(199.0) == []
    assert [j.session_id for j in sp.due(1000.0)] == ["b"]
    sp.close()


def test_state_survives_reopening(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool.db")
    sp.enqueue("s1", 1.0, 1.0)
    sp.record_object("s1", ShippedObject("d/s1.rec", "p/d/s1/s1.rec", 3, "ab", None), 2.0)
    sp.set_offset("s3", 42, 1000)
    sp.close()
    sp = Spool(tmp_path / "spool.db")
    assert sp.job("s1") is not None
    assert sp.objects("s1")["d/s1.rec"].key == "p/d/s1/s1.rec"
    assert sp.offset("s3") == (42, 1000)
    assert sp.offset("cloudwatch") == (0, 0)
    assert oct(os.stat(tmp_path / "spool.db").st_mode & 0o777) == "0o600"


def test_tail_returns_complete_lines_only_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}\n{"a":')
    sp = Spool(tmp_path / "spool.db")
    tail = AuditTail(path, sp, "x")
    lines, inode, off = tail.read(10)
    assert lines == [b'{"a":1}\n', b'{"a":2}\n']
    assert tail.read(10)[0] == lines  # nothing committed yet: same lines again
    tail.commit(inode, off)
    assert tail.read(10)[0] == []  # the torn line waits for its end
    with open(path, "ab") as f:
        f.write(b'3}\n{"a":4}\n')
    lines, inode, off = tail.read(1)
    assert lines == [b'{"a":3}\n']
    tail.commit(inode, off)
    assert tail.read(10)[0] == [b'{"a":4}\n']
    assert AuditTail(path, sp, "other").read(10)[0][0] == b'{"a":1}\n'  # offsets per consumer


def test_tail_starts_over_on_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"old1\nold2\n")
    sp = Spool(tmp_path / "spool.db")
    tail = AuditTail(path, sp, "x")
    _, inode, off = tail.read(10)
    tail.commit(inode, off)
    new = tmp_path / "audit.new"
    new.write_bytes(b"new1\n")
    new.replace(path)  # rotation: another inode
    assert tail.read(10)[0] == [b"new1\n"]
    assert AuditTail(tmp_path / "missing", sp, "y").read(10)[0] == []


def test_tail_takes_a_line_longer_than_one_read(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    big = b"x" * 5000 + b"\n"
    path.write_bytes(big + b"small\n")
    tail = AuditTail(path, Spool(tmp_path / "spool.db"), "x")
    lines, _, off = tail.read(10, max_bytes=1024)
    assert lines[0] == big and off >= len(big)


def _line(i: int, ts: str) -> bytes:
    return json.dumps({"seq": i, "ts": ts, "event": "e"}).encode() + b"\n"


def test_batch_timestamps_never_go_backwards() -> None:
    lines = [_line(0, "2026-01-01T00:00:02+00:00"), _line(1, "2026-01-01T00:00:01+00:00"),
             b"not json\n", _line(3, "2026-01-01T00:00:03+00:00")]
    events, used = build_batch(lines, last_ts=0, now_ms=1_767_225_605_000, max_events=100)
    assert used == 4
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    assert stamps[0] == 1_767_225_602_000 and stamps[1] == stamps[0]
    assert events[2]["message"] == "not json"  # shipped as written, stamped "now"
    # never before what the previous batch sent
    again, _ = build_batch(lines[:1], last_ts=1_767_225_609_000, now_ms=0, max_events=10)
    assert again[0]["timestamp"] == 1_767_225_609_000


def test_batch_limits_count_bytes_and_span() -> None:
    lines = [_line(i, "2026-01-01T00:00:00+00:00") for i in range(30)]
    assert build_batch(lines, 0, 0, max_events=7)[1] == 7
    big = [b"y" * 200_000 + b"\n" for _ in range(10)]
    events, used = build_batch(big, 0, 0, max_events=100)
    assert used == 5 and sum(len(e["message"]) + EVENT_OVERHEAD for e in events) <= MAX_BATCH_BYTES
    span = [_line(0, "2026-01-01T00:00:00+00:00"), _line(1, "2026-01-02T00:00:00+00:00")]
    assert build_batch(span, 0, 0, max_events=100)[1] == 1  # more than 23 h apart
    huge, used = build_batch([b"z" * 400_000 + b"\n"], 0, 0, max_events=10)
    assert used == 1 and len(huge[0]["message"].encode()) <= MAX_EVENT_BYTES
    assert huge[0]["message"].endswith("[truncated by bastion-broker]")


def test_backoff_grows_and_is_capped() -> None:
    s = CloudWatchShippingSettings(backoff_initial_seconds=2, backoff_max_seconds=60)
    for attempts, top in ((1, 2), (2, 4), (3, 8), (10, 60), (1000, 60)):
        for _ in range(20):
            assert top / 2 <= backoff(s, attempts) <= top


def test_session_files_and_keys(tmp_path: Path) -> None:
    sid = "0a1b2c3d-0000-4000-8000-000000000001"
    day = tmp_path / "2026-11-27"
    (day / sid).mkdir(parents=True)
    for name in (f"{sid}.rec", f"{sid}.cast", f"{sid}.cast.tmp", "other.rec", f".{sid}.x"):
        (day / name).write_bytes(b"x")
    (day / sid / "manifest.sig").write_bytes(b"s")
    files, busy = session_files(tmp_path, sid)
    names = sorted(n for _, n in files)
    assert busy
    assert names == [f"2026-11-27/{sid}.cast", f"2026-11-27/{sid}.rec",
                     f"2026-11-27/{sid}/manifest.sig"]
    assert name_key(f"2026-11-27/{sid}.rec", sid) == f"2026-11-27/{sid}/{sid}.rec"
    assert name_key(f"2026-11-27/{sid}/manifest.sig", sid) == f"2026-11-27/{sid}/manifest.sig"
    assert session_files(tmp_path / "none", sid) == ([], False)
    (day / f"{sid}.cast.tmp").unlink()
    assert not session_files(tmp_path, sid)[1]
    (tmp_path / ".open").mkdir()
    (tmp_path / ".open" / sid).write_bytes(b"")  # the recorder's live marker
    files, busy = session_files(tmp_path, sid)
    assert busy and len(files) == 3


def test_one_shipper_per_state_dir(tmp_path: Path) -> None:
    """Of several broker processes (workers), the one holding the lock ships; another takes
    over once it is released (process exit)."""
    from broker.shipping.service import _Leader

    a, b = _Leader(tmp_path / "s3.lock"), _Leader(tmp_path / "s3.lock")
    assert a.acquire() and a.acquire()
    assert not b.acquire()
    a.release()
    assert b.acquire()
    b.release()


def test_spools_opened_at_once_all_come_up(tmp_path: Path) -> None:
    """The S3 and CloudWatch threads (and other workers) open the spool together at start:
    switching a new database to WAL then answers "database is locked" at once, which killed a
    shipping thread before. Every opener now gets a working spool."""
    import threading

    for trial in range(80):
        path = tmp_path / f"t{trial}" / "spool.db"
        barrier = threading.Barrier(4)
        errors: list[str] = []

        def open_one(path: Path = path, barrier: threading.Barrier = barrier,
                     errors: list[str] = errors) -> None:
            barrier.wait()
            try:
                spool = Spool(path)
                spool.enqueue("s1", 1.0, 1.0)
                spool.close()
            except Exception as exc:  # collected: the assertion below shows them
                errors.append(repr(exc))

        threads = [threading.Thread(target=open_one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], (trial, errors)


def test_a_shipping_thread_outlives_a_failing_body(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A body that raises is logged and run again (it held the leadership all along)."""
    import threading

    from broker.shipping import service

    monkeypatch.setattr(service, "LEADER_RETRY_SECONDS", 0.01)
    calls: list[int] = []
    second = threading.Event()

    def body(stopping: threading.Event) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("database is locked")
        second.set()
        stopping.wait()

    worker = service._Worker("test", tmp_path / "lock", body)
    worker.start()
    try:
        assert second.wait(10), "the body was not started again after it failed"
    finally:
        worker.stopping.set()
        worker.join(10)
    assert not worker.is_alive() and len(calls) == 2
