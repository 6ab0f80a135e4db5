"""``FleetStore`` on PostgreSQL (migration 10 in ``pg_migrations``): every bastion of a fleet
beats here, and the others close the open session rows of one that went silent."""

from __future__ import annotations

import builtins
from datetime import datetime

from broker.ports import Bastion, SessionRecord
from broker.store.postgres import PostgresDatabase, _session_from_row, _utc

_STRANDED = (
    "SELECT s.*, b.seen_at AS bastion_seen_at FROM sessions s JOIN bastions b"
    " ON b.name = s.bastion WHERE s.ended_at IS NULL AND b.seen_at < $1 AND b.name <> $2"
    " ORDER BY s.started_at LIMIT $3")


class PostgresFleetStore:
    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def beat(self, name: str, now: datetime, started_at: datetime) -> None:
        async with self._db.acquire("cannot record the heartbeat") as conn:
            await conn.execute(
                "INSERT INTO bastions (name, started_at, seen_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO UPDATE SET started_at = EXCLUDED.started_at,"
                " seen_at = EXCLUDED.seen_at", name, _utc(started_at), _utc(now))

    async def bastions(self) -> builtins.list[Bastion]:
        async with self._db.acquire("cannot read the bastions") as conn:
            rows = await conn.fetch(
                "SELECT b.*, (SELECT count(*) FROM sessions s WHERE s.bastion = b.name"
                ' AND s.ended_at IS NULL) AS live FROM bastions b ORDER BY b.name COLLATE "C"')
        return [Bastion(r["name"], r["started_at"], r["seen_at"], int(r["live"])) for r in rows]

    async def stranded(self, silent_since: datetime, exclude: str,
                       limit: int) -> builtins.list[tuple[SessionRecord, datetime]]:
        async with self._db.acquire("cannot read stranded sessions") as conn:
            rows = await conn.fetch(_STRANDED, _utc(silent_since), exclude, limit)
        return [(_session_from_row(r), r["bastion_seen_at"]) for r in rows]

    async def close_stranded(self, session_id: str, bastion: str, ended_at: datetime,
                             exit_status: str) -> bool:
        async with self._db.acquire("cannot close a stranded session") as conn:
            done = await conn.fetchval(
                "UPDATE sessions SET ended_at = $1, exit_status = $2 WHERE id = $3"
                " AND bastion = $4 AND ended_at IS NULL RETURNING 1",
                _utc(ended_at), exit_status, session_id, bastion)
        return done is not None

    async def reopen_stranded(self, session_id: str, exit_status: str) -> None:
        async with self._db.acquire("cannot reopen a stranded session") as conn:
            await conn.execute("UPDATE sessions SET ended_at = NULL, exit_status = NULL"
                               " WHERE id = $1 AND exit_status = $2", session_id, exit_status)
