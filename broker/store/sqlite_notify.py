"""``NotificationStore`` on the embedded SQLite store (the outbox of migration 11 in ``sqlite``).

A claim is one ``UPDATE ... RETURNING`` statement: SQLite runs it under the database's write
lock, so two broker processes on this host never lease the same row.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Sequence
from datetime import datetime

from broker.domain.notify import Delivery, Outcome
from broker.errors import StoreError
from broker.store.sqlite import SqliteDatabase, _dt, _on_db_thread, _ts

_COLUMNS = ("id, event_id, event, channel, payload, dedupe_key, status, attempts, created_at,"
            " next_attempt_at, updated_at, last_error, last_status, sent_at")


def _delivery(r: sqlite3.Row) -> Delivery:
    def at(key: str) -> datetime:
        v = _dt(r[key])
        assert v is not None  # noqa: S101 - NOT NULL column
        return v

    return Delivery(id=r["id"], event_id=r["event_id"], event=r["event"], channel=r["channel"],
                    payload=r["payload"], dedupe_key=r["dedupe_key"], status=r["status"],
                    attempts=r["attempts"], created_at=at("created_at"),
                    next_attempt_at=at("next_attempt_at"), updated_at=at("updated_at"),
                    last_error=r["last_error"], last_status=r["last_status"],
                    sent_at=_dt(r["sent_at"]))


class SqliteNotificationStore:
    """The outbox, shared by the broker processes and the CLI (``notify test``) on this host."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._c = db.conn

    @_on_db_thread
    def enqueue(self, rows: Sequence[Delivery]) -> int:
        if not rows:
            return 0
        try:
            before = self._c.total_changes
            self._c.execute("BEGIN IMMEDIATE")
            try:
                self._c.executemany(
                    f"INSERT INTO notify_outbox ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"  # noqa: S608 - constant columns
                    " ON CONFLICT (dedupe_key) DO NOTHING",
                    [(d.id, d.event_id, d.event, d.channel, d.payload, d.dedupe_key, d.status,
                      d.attempts, _ts(d.created_at), _ts(d.next_attempt_at), _ts(d.updated_at),
                      d.last_error, d.last_status, _ts(d.sent_at) if d.sent_at else None)
                     for d in rows])
                self._c.execute("COMMIT")
            except BaseException:
                self._c.execute("ROLLBACK")
                raise
            return int(self._c.total_changes - before)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot queue notification: {exc}") from exc

    @_on_db_thread
    def claim(self, now: datetime, owner: str, lease_until: datetime, channels: Sequence[str],
              limit: int, per_channel: int) -> builtins.list[Delivery]:
        names = list(channels)[:500]  # below SQLite's bound-parameter limit
        if not names or limit <= 0 or per_channel <= 0:
            return []
        marks = ",".join("?" * len(names))
        t = _ts(now)
        sql = ("UPDATE notify_outbox SET lease_owner=?, lease_until=?, attempts=attempts+1,"  # noqa: S608 - placeholders only
               " updated_at=? WHERE seq IN (SELECT seq FROM (SELECT seq, next_attempt_at,"
               " row_number() OVER (PARTITION BY channel ORDER BY next_attempt_at, seq) AS n"
               " FROM notify_outbox WHERE status='pending' AND next_attempt_at <= ?"
               f" AND (lease_until IS NULL OR lease_until <= ?) AND channel IN ({marks}))"
               " WHERE n <= ? ORDER BY next_attempt_at, seq LIMIT ?) RETURNING *")
        try:
            rows = self._c.execute(
                sql, (owner, _ts(lease_until), t, t, t, *names, per_channel, limit)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot claim notifications: {exc}") from exc
        return sorted((_delivery(r) for r in rows), key=lambda d: (d.next_attempt_at, d.id))

    def _finish(self, delivery_id: str, owner: str, outcome: Outcome, now: datetime) -> bool:
        cur = self._c.execute(
            "UPDATE notify_outbox SET status=?, next_attempt_at=?, last_error=?,"
            " last_status=?, sent_at=?, updated_at=?, lease_owner=NULL, lease_until=NULL"
            " WHERE id=? AND lease_owner=? AND status='pending'",
            (outcome.status, _ts(outcome.next_attempt_at), outcome.error,
             outcome.http_status, _ts(now) if outcome.status == "sent" else None, _ts(now),
             delivery_id, owner))
        return cur.rowcount == 1

    @_on_db_thread
    def finish(self, delivery_id: str, owner: str, outcome: Outcome, now: datetime) -> bool:
        try:
            return self._finish(delivery_id, owner, outcome, now)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot store a notification's outcome: {exc}") from exc

    @_on_db_thread
    def finish_many(self, owner: str, outcomes: Sequence[tuple[str, Outcome]],
                    now: datetime) -> set[str]:
        """One transaction, one trip to the database thread, for a batch of outcomes."""
        done: set[str] = set()
        if not outcomes:
            return done
        try:
            self._c.execute("BEGIN IMMEDIATE")
            try:
                for delivery_id, outcome in outcomes:
                    if self._finish(delivery_id, owner, outcome, now):
                        done.add(delivery_id)
                self._c.execute("COMMIT")
            except BaseException:
                self._c.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot store notifications' outcomes: {exc}") from exc
        return done

    @_on_db_thread
    def prune(self, before: datetime, limit: int) -> int:
        try:
            cur = self._c.execute(
                "DELETE FROM notify_outbox WHERE seq IN (SELECT seq FROM notify_outbox"
                " WHERE status IN ('sent', 'failed') AND updated_at < ? ORDER BY seq LIMIT ?)",
                (_ts(before), limit))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prune the delivery log: {exc}") from exc
        return cur.rowcount

    @_on_db_thread
    def listing(self, *, status: str | None = None,
                limit: int = 100) -> builtins.list[Delivery]:
        try:
            if status:
                rows = self._c.execute("SELECT * FROM notify_outbox WHERE status=?"
                                       " ORDER BY seq DESC LIMIT ?", (status, limit)).fetchall()
            else:
                rows = self._c.execute("SELECT * FROM notify_outbox ORDER BY seq DESC LIMIT ?",
                                       (limit,)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the delivery log: {exc}") from exc
        return [_delivery(r) for r in rows]
