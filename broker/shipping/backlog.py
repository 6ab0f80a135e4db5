"""What waits to be shipped, read without changing anything (for metrics; see ``shipping status``).

The spool is opened read-only, so a broker or a worker that is not the shipping leader can read
it too. The files of the sessions waiting for S3 are found in one pass over the recordings
directory (``session_files`` would walk it once per session).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import StoreError
from broker.shipping.spool import audit_chain


@dataclass(frozen=True, slots=True)
class ShippingBacklog:
    sessions: int  # ended sessions not yet verified in S3
    files: int  # their local files
    bytes: int
    oldest_seconds: float  # since the oldest of them was queued; 0 if none
    audit_bytes: dict[str, int] = field(default_factory=dict)  # shipper -> audit bytes unread


def open_spool_read_only(spool_db: Path) -> sqlite3.Connection:
    """The spool database for reading only (``StoreError`` if it cannot be opened): neither a
    metrics scrape nor ``shipping status`` may take a write lock the shipper waits on."""
    try:
        return sqlite3.connect(f"{spool_db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {spool_db}: {exc}") from None


def read_backlog(spool_db: Path, recordings_dir: Path, audit_path: Path,
                 now: float) -> ShippingBacklog | None:
    """The backlog at ``now`` (epoch seconds); None before the spool exists (nothing shipped)."""
    if not spool_db.exists():
        return None
    db = open_spool_read_only(spool_db)
    try:
        pending = dict(db.execute(
            "SELECT session_id, queued_at FROM uploads WHERE state = 'pending'").fetchall())
        offsets = db.execute("SELECT name, inode, offset FROM offsets").fetchall()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {spool_db}: {exc}") from None
    finally:
        db.close()
    files, size = _pending_files(recordings_dir, set(pending))
    oldest = max(0.0, now - min(pending.values())) if pending else 0.0
    return ShippingBacklog(len(pending), files, size, oldest, _audit_unread(audit_path, offsets))


def _pending_files(root: Path, sessions: set[str]) -> tuple[int, int]:
    """(files, bytes) of these sessions under ``root``: DAY/SESSION_ID.* and DAY/SESSION_ID/**,
    as the S3 shipper finds them (hidden and ``*.tmp`` files are not shipped)."""
    files = size = 0
    if not sessions or not root.is_dir():
        return 0, 0
    for day in os.scandir(root):
        if day.name.startswith(".") or not day.is_dir():  # .open: live sessions
            continue
        for entry in os.scandir(day.path):
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                if entry.name in sessions:
                    for p in Path(entry.path).rglob("*"):
                        if p.is_file() and not p.name.startswith(".") \
                                and not p.name.endswith(".tmp"):
                            files, size = files + 1, size + p.stat().st_size
            elif entry.name.split(".", 1)[0] in sessions and not entry.name.endswith(".tmp"):
                files, size = files + 1, size + entry.stat().st_size
    return files, size


def _audit_unread(path: Path, offsets: list[tuple[str, int, int]]) -> dict[str, int]:
    """Audit bytes each shipper has not read: the rest of the file it reads (a rotated file
    keeps its inode) and every file after it; all of them if its file is gone or shorter than
    its offset (it reads the log again from the start, see ``AuditTail``)."""
    return audit_unread(audit_chain(path), offsets)


def audit_unread(files: list[tuple[Path, int, int]], offsets: list[tuple[str, int, int]]
                 ) -> dict[str, int]:
    out: dict[str, int] = {}
    total = sum(size for _, _, size in files)
    for name, inode, offset in offsets:
        idx = next((i for i, f in enumerate(files) if f[1] == inode), None)
        if idx is None or files[idx][2] < offset:
            out[name] = total
        else:
            out[name] = files[idx][2] - offset + sum(size for _, _, size in files[idx + 1:])
    return out
