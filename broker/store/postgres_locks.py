"""``LockStore`` on PostgreSQL (the tables of migration 6 in ``pg_migrations``), shared by every
bastion of a fleet: a lock or kill request made through one is read by all."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from broker.domain.locks import KillRequest, Lock, LockKind
from broker.store.postgres import PostgresDatabase, _utc

_ACTIVE = ("SELECT * FROM locks WHERE removed_at IS NULL"
           ' AND (expires_at IS NULL OR expires_at > $1) ORDER BY created_at, id COLLATE "C"')
_REMOVE = ("UPDATE locks SET removed_at = $1, removed_by = $2 WHERE id = $3"
           " AND removed_at IS NULL AND (expires_at IS NULL OR expires_at > $1) RETURNING *")


def _lock(r: Any) -> Lock:
    return Lock(id=r["id"], kind=LockKind(r["kind"]), value=r["value"], reason=r["reason"],
                created_by=r["created_by"], created_at=r["created_at"],
                expires_at=r["expires_at"], removed_at=r["removed_at"],
                removed_by=r["removed_by"])


def _kill(r: Any) -> KillRequest:
    return KillRequest(id=r["id"], session_id=r["session_id"], reason=r["reason"],
                       requested_by=r["requested_by"], requested_at=r["requested_at"],
                       done_at=r["done_at"])


class PostgresLockStore:
    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def add(self, lock: Lock) -> None:
        async with self._db.acquire("cannot store lock") as conn:
            await conn.execute(
                "INSERT INTO locks (id, kind, value, reason, created_by, created_at, expires_at)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7)",
                lock.id, lock.kind.value, lock.value, lock.reason, lock.created_by,
                _utc(lock.created_at), _utc(lock.expires_at) if lock.expires_at else None)

    async def active(self, now: datetime) -> builtins.list[Lock]:
        async with self._db.acquire("cannot read locks") as conn:
            rows = await conn.fetch(_ACTIVE, _utc(now))
        return [_lock(r) for r in rows]

    async def listing(self, *, include_inactive: bool, now: datetime) -> builtins.list[Lock]:
        async with self._db.acquire("cannot list locks") as conn:
            if include_inactive:
                rows = await conn.fetch('SELECT * FROM locks ORDER BY created_at, id COLLATE "C"')
            else:
                rows = await conn.fetch(_ACTIVE, _utc(now))
        return [_lock(r) for r in rows]

    async def remove(self, lock_id: str, by: str, now: datetime) -> Lock | None:
        async with self._db.acquire("cannot remove lock") as conn:
            r = await conn.fetchrow(_REMOVE, _utc(now), by, lock_id)
        return _lock(r) if r else None

    async def note_expired(self, now: datetime, limit: int) -> builtins.list[Lock]:
        async with self._db.acquire("cannot note expired locks") as conn:
            rows = await conn.fetch(
                "UPDATE locks SET expiry_noted_at = $1 WHERE id IN (SELECT id FROM locks"
                " WHERE removed_at IS NULL AND expiry_noted_at IS NULL AND expires_at <= $1"
                ' ORDER BY expires_at, id COLLATE "C" LIMIT $2 FOR UPDATE SKIP LOCKED)'
                " RETURNING *", _utc(now), limit)
        return sorted((_lock(r) for r in rows), key=lambda lk: (lk.expires_at or now, lk.id))

    async def unnote_expired(self, lock_ids: Sequence[str]) -> None:
        async with self._db.acquire("cannot un-note expired locks") as conn:
            await conn.execute("UPDATE locks SET expiry_noted_at = NULL WHERE id = ANY($1)",
                               list(lock_ids))

    async def request_kill(self, req: KillRequest) -> None:
        async with self._db.acquire("cannot store kill request") as conn:
            await conn.execute(
                "INSERT INTO session_kills (id, session_id, reason, requested_by, requested_at)"
                " VALUES ($1,$2,$3,$4,$5)",
                req.id, req.session_id, req.reason, req.requested_by, _utc(req.requested_at))

    async def pending_kills(self, session_ids: Sequence[str]) -> builtins.list[KillRequest]:
        async with self._db.acquire("cannot read kill requests") as conn:
            rows = await conn.fetch(
                "SELECT * FROM session_kills WHERE done_at IS NULL AND session_id = ANY($1::text[])"
                ' ORDER BY requested_at, id COLLATE "C"', list(session_ids))
        return [_kill(r) for r in rows]

    async def kill_done(self, request_id: str, now: datetime) -> bool:
        async with self._db.acquire("cannot update kill request") as conn:
            status = await conn.execute(
                "UPDATE session_kills SET done_at = $1 WHERE id = $2 AND done_at IS NULL",
                _utc(now), request_id)
        return bool(status.endswith(" 1"))
