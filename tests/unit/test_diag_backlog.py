"""The shipping backlog the metrics report, read from a real spool and recordings directory, and
the same files the S3 shipper would send."""

from __future__ import annotations

import os
from pathlib import Path

from broker.shipping.backlog import read_backlog
from broker.shipping.s3 import session_files
from broker.shipping.spool import Spool

A, B, C = ("0a0a0a0a-0000-4000-8000-00000000000a", "0b0b0b0b-0000-4000-8000-00000000000b",
           "0c0c0c0c-0000-4000-8000-00000000000c")


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_no_spool_means_no_backlog_yet(tmp_path: Path) -> None:
    assert read_backlog(tmp_path / "spool.db", tmp_path / "rec", tmp_path / "audit.jsonl",
                        100.0) is None
    assert not (tmp_path / "spool.db").exists()  # reading never creates it


def test_pending_sessions_their_files_and_the_audit_not_yet_read(tmp_path: Path) -> None:
    rec, audit = tmp_path / "rec", tmp_path / "audit.jsonl"
    sp = Spool(tmp_path / "spool.db")
    sp.enqueue(A, now=1000.0, ready_at=1000.0)  # pending, the oldest
    sp.enqueue(B, now=1500.0, ready_at=1500.0)  # pending
    sp.enqueue(C, now=900.0, ready_at=900.0)
    sp.set_state(C, "uploaded", 950.0)  # shipped: not backlog though its files are still here
    _write(rec / "2026-06-01" / f"{A}.rec", 1000)
    _write(rec / "2026-06-01" / f"{A}.manifest.json", 200)
    _write(rec / "2026-06-01" / f"{A}.cast.tmp", 50)  # still being written: not shipped
    _write(rec / "2026-06-02" / B / "files" / "report.pdf", 30)  # sftp copies beside it
    _write(rec / "2026-06-02" / f"{B}.rec", 70)
    _write(rec / "2026-06-02" / f"{C}.rec", 5000)
    _write(rec / ".open" / "other", 1)
    _write(audit, 4000)
    sp.set_offset("cloudwatch", os.stat(audit).st_ino, 3000)
    sp.set_offset("s3", os.stat(audit).st_ino + 1, 10)  # another inode: reads it all again
    sp.close()

    b = read_backlog(tmp_path / "spool.db", rec, audit, now=2000.0)
    assert b is not None
    assert (b.sessions, b.files, b.bytes) == (2, 4, 1300)
    assert b.oldest_seconds == 1000.0
    assert b.audit_bytes == {"cloudwatch": 1000, "s3": 4000}
    # the S3 shipper would send exactly these files
    shipped = [p for sid in (A, B) for p, _ in session_files(rec, sid)[0]]
    assert (len(shipped), sum(p.stat().st_size for p in shipped)) == (b.files, b.bytes)


def test_an_empty_queue_is_zero(tmp_path: Path) -> None:
    Spool(tmp_path / "spool.db").close()
    b = read_backlog(tmp_path / "spool.db", tmp_path / "rec", tmp_path / "audit.jsonl", 5.0)
    assert b is not None
    assert (b.sessions, b.files, b.bytes, b.oldest_seconds, b.audit_bytes) == (0, 0, 0, 0.0, {})
