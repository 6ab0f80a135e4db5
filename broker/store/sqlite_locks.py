"""``LockStore`` on the embedded SQLite store (the tables of migration 9 in ``sqlite``)."""

from __future__ import annotations

import builtins
import functools
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Concatenate, ParamSpec, TypeVar

from broker.domain.locks import KillRequest, Lock, LockKind
from broker.errors import StoreError
from broker.store.sqlite import SqliteDatabase, _dt, _on_db_thread, _ts

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


def _failing_closed(what: str) -> Callable[[Callable[Concatenate[S, P], R]],
                                           Callable[Concatenate[S, P], R]]:
    """Any SQLite failure (a busy or broken database, a duplicate id) as ``StoreError``."""
    def wrap(fn: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
        @functools.wraps(fn)
        def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(self, *args, **kwargs)
            except sqlite3.Error as exc:
                raise StoreError(f"{what}: {exc}") from exc
        return run
    return wrap

_ACTIVE = ("SELECT * FROM locks WHERE removed_at IS NULL"
           " AND (expires_at IS NULL OR expires_at > ?) ORDER BY created_at, id")
_REMOVE = ("UPDATE locks SET removed_at=?, removed_by=? WHERE id=? AND removed_at IS NULL"
           " AND (expires_at IS NULL OR expires_at > ?)")


def _lock(r: sqlite3.Row) -> Lock:
    created = _dt(r["created_at"])
    assert created is not None  # noqa: S101 - NOT NULL column
    return Lock(id=r["id"], kind=LockKind(r["kind"]), value=r["value"], reason=r["reason"],
                created_by=r["created_by"], created_at=created,
                expires_at=_dt(r["expires_at"]), removed_at=_dt(r["removed_at"]),
                removed_by=r["removed_by"])


def _kill(r: sqlite3.Row) -> KillRequest:
    at = _dt(r["requested_at"])
    assert at is not None  # noqa: S101 - NOT NULL column
    return KillRequest(id=r["id"], session_id=r["session_id"], reason=r["reason"],
                       requested_by=r["requested_by"], requested_at=at,
                       done_at=_dt(r["done_at"]))


class SqliteLockStore:
    """Locks and kill requests, shared by the broker processes and the CLI on this host."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._c = db.conn

    @_on_db_thread
    @_failing_closed("cannot store lock")
    def add(self, lock: Lock) -> None:
        self._c.execute(
            "INSERT INTO locks (id, kind, value, reason, created_by, created_at, expires_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (lock.id, lock.kind.value, lock.value, lock.reason, lock.created_by,
             _ts(lock.created_at), _ts(lock.expires_at) if lock.expires_at else None))

    @_on_db_thread
    @_failing_closed("cannot read locks")
    def active(self, now: datetime) -> builtins.list[Lock]:
        rows = self._c.execute(_ACTIVE, (_ts(now),)).fetchall()
        return [_lock(r) for r in rows]

    @_on_db_thread
    @_failing_closed("cannot list locks")
    def listing(self, *, include_inactive: bool, now: datetime) -> builtins.list[Lock]:
        if include_inactive:
            rows = self._c.execute("SELECT * FROM locks ORDER BY created_at, id").fetchall()
        else:
            rows = self._c.execute(_ACTIVE, (_ts(now),)).fetchall()
        return [_lock(r) for r in rows]

    @_on_db_thread
    @_failing_closed("cannot remove lock")
    def remove(self, lock_id: str, by: str, now: datetime) -> Lock | None:
        cur = self._c.execute(_REMOVE, (_ts(now), by, lock_id, _ts(now)))
        if cur.rowcount != 1:
            return None
        r = self._c.execute("SELECT * FROM locks WHERE id=?", (lock_id,)).fetchone()
        return _lock(r) if r else None

    @_on_db_thread
    @_failing_closed("cannot note expired locks")
    def note_expired(self, now: datetime, limit: int) -> builtins.list[Lock]:
        rows = self._c.execute(
            "UPDATE locks SET expiry_noted_at=? WHERE id IN (SELECT id FROM locks"
            " WHERE removed_at IS NULL AND expiry_noted_at IS NULL AND expires_at IS NOT NULL"
            " AND expires_at <= ? ORDER BY expires_at, id LIMIT ?) RETURNING *",
            (_ts(now), _ts(now), limit)).fetchall()
        return sorted((_lock(r) for r in rows), key=lambda lk: (lk.expires_at or now, lk.id))

    @_on_db_thread
    @_failing_closed("cannot un-note expired locks")
    def unnote_expired(self, lock_ids: Sequence[str]) -> None:
        self._c.executemany("UPDATE locks SET expiry_noted_at=NULL WHERE id=?",
                            [(i,) for i in lock_ids])

    @_on_db_thread
    @_failing_closed("cannot store kill request")
    def request_kill(self, req: KillRequest) -> None:
        self._c.execute(
            "INSERT INTO session_kills (id, session_id, reason, requested_by, requested_at)"
            " VALUES (?,?,?,?,?)",
            (req.id, req.session_id, req.reason, req.requested_by, _ts(req.requested_at)))

    @_on_db_thread
    @_failing_closed("cannot read kill requests")
    def pending_kills(self, session_ids: Sequence[str]) -> builtins.list[KillRequest]:
        ids = list(session_ids)
        out: list[KillRequest] = []
        for i in range(0, len(ids), 500):  # below SQLite's bound-parameter limit
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            out += [_kill(r) for r in self._c.execute(
                f"SELECT * FROM session_kills WHERE done_at IS NULL AND session_id IN ({marks})",  # noqa: S608 - placeholders only
                chunk).fetchall()]
        return sorted(out, key=lambda k: (k.requested_at, k.id))

    @_on_db_thread
    @_failing_closed("cannot update kill request")
    def kill_done(self, request_id: str, now: datetime) -> bool:
        cur = self._c.execute("UPDATE session_kills SET done_at=? WHERE id=? AND done_at IS NULL",
                              (_ts(now), request_id))
        return cur.rowcount == 1
