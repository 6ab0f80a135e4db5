"""``NotificationStore`` on PostgreSQL (the outbox of migration 8 in ``pg_migrations``), shared by
every bastion of a fleet: each claims due rows with ``FOR UPDATE SKIP LOCKED`` and a lease, so
a row is sent by one of them at a time and none waits for another's claim."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from broker.domain.notify import Delivery, Outcome
from broker.store.postgres import PostgresDatabase, _utc

_COLUMNS = ("id, event_id, event, channel, payload, dedupe_key, status, attempts, created_at,"
            " next_attempt_at, updated_at, last_error, last_status, sent_at")
_DUE = ("status = 'pending' AND next_attempt_at <= $1"
        " AND (lease_until IS NULL OR lease_until <= $1) AND channel = ANY($4::text[])")
# the window function ranks each channel's due rows; the row locks are taken a level up
# (FOR UPDATE is not allowed beside a window function), where the due check is made again
_CLAIM = ("UPDATE notify_outbox SET lease_owner = $2, lease_until = $3,"  # noqa: S608 - constants
          " attempts = attempts + 1, updated_at = $1 WHERE seq IN ("
          f" SELECT seq FROM notify_outbox WHERE {_DUE} AND seq IN ("
          "  SELECT seq FROM (SELECT seq, row_number() OVER (PARTITION BY channel"
          f"   ORDER BY next_attempt_at, seq) AS n FROM notify_outbox WHERE {_DUE}) ranked"
          "  WHERE n <= $6)"
          " ORDER BY next_attempt_at, seq LIMIT $5 FOR UPDATE SKIP LOCKED) RETURNING *")


def _delivery(r: Any) -> Delivery:
    return Delivery(id=r["id"], event_id=r["event_id"], event=r["event"], channel=r["channel"],
                    payload=r["payload"], dedupe_key=r["dedupe_key"], status=r["status"],
                    attempts=r["attempts"], created_at=r["created_at"],
                    next_attempt_at=r["next_attempt_at"], updated_at=r["updated_at"],
                    last_error=r["last_error"], last_status=r["last_status"],
                    sent_at=r["sent_at"])


class PostgresNotificationStore:
    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def enqueue(self, rows: Sequence[Delivery]) -> int:
        if not rows:
            return 0
        async with self._db.acquire("cannot queue notification") as conn:
            inserted = await conn.fetch(
                f"INSERT INTO notify_outbox ({_COLUMNS})"  # noqa: S608 - constant columns
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
                " $5::text[], $6::text[], $7::text[], $8::int[], $9::timestamptz[],"
                " $10::timestamptz[], $11::timestamptz[], $12::text[], $13::int[],"
                " $14::timestamptz[]) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
                [d.id for d in rows], [d.event_id for d in rows], [d.event for d in rows],
                [d.channel for d in rows], [d.payload for d in rows],
                [d.dedupe_key for d in rows], [d.status for d in rows],
                [d.attempts for d in rows], [_utc(d.created_at) for d in rows],
                [_utc(d.next_attempt_at) for d in rows], [_utc(d.updated_at) for d in rows],
                [d.last_error for d in rows], [d.last_status for d in rows],
                [_utc(d.sent_at) if d.sent_at else None for d in rows])
        return len(inserted)

    async def claim(self, now: datetime, owner: str, lease_until: datetime,
                    channels: Sequence[str], limit: int,
                    per_channel: int) -> builtins.list[Delivery]:
        if not channels or limit <= 0 or per_channel <= 0:
            return []
        async with self._db.acquire("cannot claim notifications") as conn:
            rows = await conn.fetch(_CLAIM, _utc(now), owner, _utc(lease_until), list(channels),
                                    limit, per_channel)
        return sorted((_delivery(r) for r in rows), key=lambda d: (d.next_attempt_at, d.id))

    async def finish(self, delivery_id: str, owner: str, outcome: Outcome,
                     now: datetime) -> bool:
        async with self._db.acquire("cannot store a notification's outcome") as conn:
            status = await conn.execute(
                "UPDATE notify_outbox SET status = $1, next_attempt_at = $2, last_error = $3,"
                " last_status = $4, sent_at = $5, updated_at = $6, lease_owner = NULL,"
                " lease_until = NULL WHERE id = $7 AND lease_owner = $8 AND status = 'pending'",
                outcome.status, _utc(outcome.next_attempt_at), outcome.error,
                outcome.http_status, _utc(now) if outcome.status == "sent" else None, _utc(now),
                delivery_id, owner)
        return bool(status.endswith(" 1"))

    async def finish_many(self, owner: str, outcomes: Sequence[tuple[str, Outcome]],
                          now: datetime) -> set[str]:
        if not outcomes:
            return set()
        o = [x for _, x in outcomes]
        async with self._db.acquire("cannot store notifications' outcomes") as conn:
            rows = await conn.fetch(
                "UPDATE notify_outbox AS t SET status = u.status, next_attempt_at = u.next_at,"
                " last_error = u.error, last_status = u.http_status,"
                " sent_at = CASE WHEN u.status = 'sent' THEN $7::timestamptz END,"
                " updated_at = $7, lease_owner = NULL, lease_until = NULL"
                " FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::int[])"
                " AS u(id, status, next_at, error, http_status)"
                " WHERE t.id = u.id AND t.lease_owner = $6 AND t.status = 'pending'"
                " RETURNING t.id",
                [i for i, _ in outcomes], [x.status for x in o],
                [_utc(x.next_attempt_at) for x in o], [x.error for x in o],
                [x.http_status for x in o], owner, _utc(now))
        return {r["id"] for r in rows}

    async def prune(self, before: datetime, limit: int) -> int:
        async with self._db.acquire("cannot prune the delivery log") as conn:
            done = await conn.execute(
                "DELETE FROM notify_outbox WHERE seq IN (SELECT seq FROM notify_outbox"
                " WHERE status IN ('sent', 'failed') AND updated_at < $1 ORDER BY seq LIMIT $2)",
                _utc(before), limit)
        return int(done.split()[-1])

    async def listing(self, *, status: str | None = None,
                      limit: int = 100) -> builtins.list[Delivery]:
        async with self._db.acquire("cannot read the delivery log") as conn:
            if status:
                rows = await conn.fetch("SELECT * FROM notify_outbox WHERE status = $1"
                                        " ORDER BY seq DESC LIMIT $2", status, limit)
            else:
                rows = await conn.fetch("SELECT * FROM notify_outbox ORDER BY seq DESC LIMIT $1",
                                        limit)
        return [_delivery(r) for r in rows]
