"""``FleetStore`` on the embedded SQLite store (migration 13 in ``sqlite``): the broker
processes of one host beat under one name, so nothing is ever stranded here unless several
hosts share the file (they should share PostgreSQL instead); kept for one code path."""

from __future__ import annotations

import builtins
from datetime import datetime

from broker.ports import Bastion, SessionRecord
from broker.store.sqlite import SqliteDatabase, _dt, _on_db_thread, _session_from_row, _ts
from broker.store.sqlite_locks import _failing_closed

_STRANDED = (
    "SELECT s.*, b.seen_at AS bastion_seen_at FROM sessions s JOIN bastions b"
    " ON b.name = s.bastion WHERE s.ended_at IS NULL AND b.seen_at < ? AND b.name != ?"
    " ORDER BY s.started_at LIMIT ?")

_BASTIONS = ("SELECT b.*, (SELECT count(*) FROM sessions s WHERE s.bastion = b.name"
             " AND s.ended_at IS NULL) AS live FROM bastions b ORDER BY b.name")


def _when(value: str) -> datetime:
    at = _dt(value)
    assert at is not None  # noqa: S101 - NOT NULL column
    return at


class SqliteFleetStore:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._c = db.conn

    @_on_db_thread
    @_failing_closed("cannot record the heartbeat")
    def beat(self, name: str, now: datetime, started_at: datetime) -> None:
        self._c.execute(
            "INSERT INTO bastions (name, started_at, seen_at) VALUES (?,?,?)"
            " ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at,"
            " seen_at = excluded.seen_at", (name, _ts(started_at), _ts(now)))

    @_on_db_thread
    @_failing_closed("cannot read the bastions")
    def bastions(self) -> builtins.list[Bastion]:
        rows = self._c.execute(_BASTIONS).fetchall()
        return [Bastion(r["name"], _when(r["started_at"]), _when(r["seen_at"]), r["live"])
                for r in rows]

    @_on_db_thread
    @_failing_closed("cannot read stranded sessions")
    def stranded(self, silent_since: datetime, exclude: str,
                 limit: int) -> builtins.list[tuple[SessionRecord, datetime]]:
        rows = self._c.execute(_STRANDED, (_ts(silent_since), exclude, limit)).fetchall()
        return [(_session_from_row(r), _when(r["bastion_seen_at"])) for r in rows]

    @_on_db_thread
    @_failing_closed("cannot close a stranded session")
    def close_stranded(self, session_id: str, bastion: str, ended_at: datetime,
                       exit_status: str) -> bool:
        cur = self._c.execute(
            "UPDATE sessions SET ended_at = ?, exit_status = ? WHERE id = ? AND bastion = ?"
            " AND ended_at IS NULL", (_ts(ended_at), exit_status, session_id, bastion))
        return cur.rowcount == 1

    @_on_db_thread
    @_failing_closed("cannot reopen a stranded session")
    def reopen_stranded(self, session_id: str, exit_status: str) -> None:
        self._c.execute("UPDATE sessions SET ended_at = NULL, exit_status = NULL WHERE id = ?"
                        " AND exit_status = ?", (session_id, exit_status))
