"""The durable side of shipping: a SQLite queue of finished sessions and audit-file offsets.

Everything the shippers promise survives a crash because it is written here before it is acted
on: a session is queued before its files are looked at, an object is recorded only once its
upload is verified, and an audit offset moves only after CloudWatch accepted the lines before it.
The recordings and the audit files themselves are the spooled data; nothing is copied.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from broker.domain.audit_files import ordered

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    session_id   TEXT PRIMARY KEY,
    queued_at    REAL NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending',  -- pending | uploaded | removed | empty
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error   TEXT,
    uploaded_at  REAL
);
CREATE INDEX IF NOT EXISTS uploads_due ON uploads (state, next_attempt);
CREATE TABLE IF NOT EXISTS objects (
    session_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    key         TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    version_id  TEXT,
    verified_at REAL NOT NULL,
    PRIMARY KEY (session_id, name)
);
CREATE TABLE IF NOT EXISTS offsets (
    name   TEXT PRIMARY KEY,
    inode  INTEGER NOT NULL,
    offset INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class UploadJob:
    session_id: str
    queued_at: float
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None
    uploaded_at: float | None


@dataclass(frozen=True, slots=True)
class ShippedObject:
    name: str
    key: str
    size: int
    sha256: str
    version_id: str | None


class Spool:
    """One connection per thread; every method is one short transaction."""

    def __init__(self, path: Path, *, setup_seconds: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.path = path
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        try:
            self._setup(setup_seconds)
        except BaseException:
            self._db.close()
            raise
        os.chmod(path, 0o600)

    def _setup(self, budget: float) -> None:
        """WAL mode and the schema. Switching to WAL while another connection (the other
        shipper's thread, another worker process) does the same answers "database is locked"
        at once, without SQLite's busy wait: retry that, briefly, until ``budget`` runs out."""
        deadline = time.monotonic() + budget
        delay = 0.01
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def close(self) -> None:
        self._db.close()

    # -- uploads ---------------------------------------------------------------------------
    def enqueue(self, session_id: str, now: float, ready_at: float) -> bool:
        """Queue a finished session once; True if it was new."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO uploads (session_id, queued_at, next_attempt) VALUES (?, ?, ?)",
            (session_id, now, ready_at))
        return cur.rowcount == 1

    def due(self, now: float, limit: int = 50) -> list[UploadJob]:
        """Pending sessions whose next attempt has come, oldest first."""
        rows = self._db.execute(
            "SELECT session_id, queued_at, state, attempts, next_attempt, last_error, uploaded_at"
            " FROM uploads WHERE state = 'pending' AND next_attempt <= ?"
            " ORDER BY next_attempt, queued_at LIMIT ?", (now, limit)).fetchall()
        return [UploadJob(*r) for r in rows]

    def uploaded_before(self, cutoff: float, limit: int = 50) -> list[UploadJob]:
        """Verified uploads at least as old as ``cutoff`` whose local copies are still there."""
        rows = self._db.execute(
            "SELECT session_id, queued_at, state, attempts, next_attempt, last_error, uploaded_at"
            " FROM uploads WHERE state = 'uploaded' AND uploaded_at <= ?"
            " ORDER BY uploaded_at LIMIT ?", (cutoff, limit)).fetchall()
        return [UploadJob(*r) for r in rows]

    def job(self, session_id: str) -> UploadJob | None:
        row = self._db.execute(
            "SELECT session_id, queued_at, state, attempts, next_attempt, last_error, uploaded_at"
            " FROM uploads WHERE session_id = ?", (session_id,)).fetchone()
        return UploadJob(*row) if row else None

    def jobs(self) -> list[UploadJob]:
        rows = self._db.execute(
            "SELECT session_id, queued_at, state, attempts, next_attempt, last_error, uploaded_at"
            " FROM uploads ORDER BY queued_at").fetchall()
        return [UploadJob(*r) for r in rows]

    def postpone(self, session_id: str, until: float) -> None:
        """Not ready yet (files still being written): try later, not counted as a failure."""
        self._db.execute("UPDATE uploads SET next_attempt = ? WHERE session_id = ?",
                         (until, session_id))

    def failed(self, session_id: str, until: float, error: str) -> None:
        self._db.execute(
            "UPDATE uploads SET attempts = attempts + 1, next_attempt = ?, last_error = ?"
            " WHERE session_id = ?", (until, error[:1000], session_id))

    def set_state(self, session_id: str, state: str, now: float) -> None:
        if state == "uploaded":
            self._db.execute(
                "UPDATE uploads SET state = 'uploaded', uploaded_at = ?, last_error = NULL"
                " WHERE session_id = ?", (now, session_id))
        else:
            self._db.execute("UPDATE uploads SET state = ?, next_attempt = ? WHERE session_id = ?",
                             (state, now, session_id))

    # -- objects ---------------------------------------------------------------------------
    def record_object(self, session_id: str, obj: ShippedObject, now: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO objects (session_id, name, key, size, sha256, version_id,"
            " verified_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (session_id, obj.name, obj.key, obj.size, obj.sha256, obj.version_id, now))

    def objects(self, session_id: str) -> dict[str, ShippedObject]:
        rows = self._db.execute(
            "SELECT name, key, size, sha256, version_id FROM objects WHERE session_id = ?",
            (session_id,)).fetchall()
        return {r[0]: ShippedObject(*r) for r in rows}

    # -- offsets ---------------------------------------------------------------------------
    def offset(self, name: str) -> tuple[int, int]:
        """(inode, byte offset) of a tailed file; (0, 0) before the first read."""
        row = self._db.execute("SELECT inode, offset FROM offsets WHERE name = ?",
                               (name,)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def set_offset(self, name: str, inode: int, offset: int) -> None:
        self._db.execute(
            "INSERT INTO offsets (name, inode, offset) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET inode = excluded.inode, offset = excluded.offset",
            (name, inode, offset))


def audit_chain(path: Path) -> list[tuple[Path, int, int]]:
    """(path, inode, size) of every file of the audit log, oldest first: the rotated files
    (``broker.domain.audit_files``) and then the current one. The current file is looked at
    first, so a rotation meanwhile shows it twice (once under its rotated name): it is kept
    once, as the current file."""
    try:
        cur = os.stat(path)
    except FileNotFoundError:
        cur = None
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        names = []
    out: list[tuple[Path, int, int]] = []
    for r in ordered(path.name, names):
        try:
            st = os.stat(path.parent / r.name)
        except FileNotFoundError:
            continue
        if cur is None or st.st_ino != cur.st_ino:
            out.append((path.parent / r.name, st.st_ino, st.st_size))
    if cur is not None:
        out.append((path, cur.st_ino, cur.st_size))
    return out


class AuditTail:
    """Complete lines appended to the audit log since the persisted position of one consumer.

    The position is (inode, offset), so a rotation (a rename: the inode stays) does not move it:
    the rest of the rotated file is read from where it was, then the files after it from their
    start, in order. A rotated file is complete (nothing is written to it after the rename), so
    reading on past its end is safe. An inode no file of the log has any more (a restore, a
    log removed), or a file shorter than the offset, means the log was replaced: reading starts
    again at the oldest file, and the consumer sees the lines again (at least once, never lost).
    """

    def __init__(self, path: Path, spool: Spool, name: str) -> None:
        self._path = path
        self._spool = spool
        self._name = name

    def _position(self) -> tuple[Path | None, int, int]:
        """The file to read (None: no log yet), its inode and the offset to read from."""
        inode, offset = self._spool.offset(self._name)
        try:
            st = os.stat(self._path)
            if st.st_ino == inode and st.st_size >= offset:
                return self._path, inode, offset  # the usual case: no listing needed
        except FileNotFoundError:
            pass
        files = audit_chain(self._path)
        if not files:
            return None, inode, offset
        idx = next((i for i, f in enumerate(files) if f[1] == inode), None)
        if idx is None or files[idx][2] < offset:
            return files[0][0], files[0][1], 0
        while offset >= files[idx][2] and idx + 1 < len(files):
            idx, offset = idx + 1, 0  # a rotated file read to its end: on to the next
        return files[idx][0], files[idx][1], offset

    def read(self, max_lines: int, max_bytes: int = 4 * 1024 * 1024) -> tuple[list[bytes], int, int]:
        """Up to ``max_lines`` complete lines of one file (about ``max_bytes``, at least one line
        if there is one): (lines, inode, offset just after the last one)."""
        path, inode, offset = self._position()
        if path is None:
            return [], inode, offset
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            return [], inode, offset
        with f:
            st = os.fstat(f.fileno())
            if st.st_ino != inode:  # rotated or replaced since: read it next time
                return [], inode, offset
            f.seek(offset)
            data = f.read(max_bytes)
            while data and b"\n" not in data:  # one line longer than a read: take it whole
                more = f.read(max_bytes)
                if not more:
                    break
                data += more
        lines: list[bytes] = []
        pos = 0
        while len(lines) < max_lines:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            lines.append(data[pos:nl + 1])
            pos = nl + 1
        return lines, inode, offset + pos

    def commit(self, inode: int, offset: int) -> None:
        self._spool.set_offset(self._name, inode, offset)
