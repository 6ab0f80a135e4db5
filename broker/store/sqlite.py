"""The embedded store: one SQLite file in WAL mode, shared by the broker and the CLI.

Every query runs on one thread of the database's own (``SqliteDatabase.run``), in the order the
event loop asked for them, never on the loop itself. The queries are short primary-key reads and
single-row writes (tens of microseconds on an idle machine), but a login makes six of them in a
row, and during a login storm each could hold the loop for several milliseconds (measured: about
2 s of the loop's time per 600 logins), delaying every open session's keystrokes behind them; a
write that waits for another process's lock (``busy_timeout``, up to 10 s) would have stopped
the whole loop. One thread keeps each method's statements (and its transactions) atomic with
respect to the others, as the loop did. ``busy_timeout`` lets the CLI and several broker processes
on one host write the same file. Schema changes are numbered migrations tracked in
``PRAGMA user_version``.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from broker.domain.models import Grant, GrantState, Level, Trigger
from broker.domain.ratelimit import account_backoff
from broker.domain.workflow import HistoryEntry
from broker.errors import ConflictError, StoreError
from broker.ports import (
    ApiTokenRecord,
    Metrics,
    NullMetrics,
    ParsePublicKey,
    SessionMatch,
    SessionQuery,
    SessionRecord,
    SourceThrottleState,
    TextHit,
    TextSegment,
    ThrottleState,
    ThrottleSummary,
    ThrottleView,
    WebSessionRecord,
)
from broker.store.text import (
    MAX_HITS,
    STATUS_SQL,
    ascii_lower,
    check_query,
    fts5_match,
    query_words,
    snippet,
)

P = ParamSpec("P")
R = TypeVar("R")


class _OnDatabase(Protocol):
    _db: SqliteDatabase


S = TypeVar("S", bound=_OnDatabase)


def _on_db_thread(fn: Callable[Concatenate[S, P], R]
                  ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Make a synchronous store method an ``async`` one that runs on the database's thread."""
    @functools.wraps(fn)
    async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._db.run(functools.partial(fn, self, *args, **kwargs))
    return run


MIGRATIONS: list[str] = [
    """
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        username_key TEXT NOT NULL,
        domain TEXT NOT NULL,
        domain_key TEXT NOT NULL,
        stack_ids TEXT NOT NULL,
        vpc_id TEXT NOT NULL,
        level TEXT NOT NULL,
        state TEXT NOT NULL,
        starts_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        trigger TEXT NOT NULL,
        ticket TEXT NOT NULL,
        reason TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        approved_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        version INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX grants_user ON grants (username_key, domain_key);
    CREATE TABLE totp (
        user_key TEXT PRIMARY KEY,
        secret TEXT NOT NULL,
        last_step INTEGER
    );
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        target TEXT NOT NULL,
        login TEXT NOT NULL,
        grant_id TEXT NOT NULL,
        level TEXT NOT NULL,
        kind TEXT NOT NULL,
        command TEXT,
        peer TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        exit_status TEXT,
        bytes_in INTEGER NOT NULL DEFAULT 0,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        recording TEXT NOT NULL
    );
    CREATE INDEX sessions_started ON sessions (started_at);
    """,
    """
    CREATE TABLE auth_throttle (
        account TEXT PRIMARY KEY,
        failures INTEGER NOT NULL DEFAULT 0,
        next_allowed REAL NOT NULL DEFAULT 0,
        locked INTEGER NOT NULL DEFAULT 0,
        last_failure REAL
    );
    """,
    """
    CREATE TABLE user_keys (
        account TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        public_key TEXT NOT NULL,
        comment TEXT NOT NULL,
        added_at TEXT NOT NULL,
        PRIMARY KEY (account, fingerprint)
    );
    CREATE TABLE reauth_windows (
        account TEXT NOT NULL,
        ip TEXT NOT NULL,
        key_fp TEXT NOT NULL,
        until REAL NOT NULL,
        PRIMARY KEY (account, ip, key_fp)
    );
    """,
    """
    CREATE TABLE grant_history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        grant_id TEXT NOT NULL,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        comment TEXT NOT NULL,
        state TEXT NOT NULL,
        details TEXT NOT NULL
    );
    CREATE INDEX grant_history_grant ON grant_history (grant_id, seq);
    CREATE INDEX grants_state ON grants (state, expires_at);
    """,
    """
    CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        scopes TEXT NOT NULL,
        roles TEXT NOT NULL,
        groups TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX api_tokens_owner ON api_tokens (owner);
    CREATE TABLE web_sessions_revoked (
        sid TEXT PRIMARY KEY,
        expires REAL NOT NULL
    );
    """,
    # web sessions as logins made them, so operators can list and end anyone's
    """
    CREATE TABLE web_sessions (
        sid TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        peer TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        ended_at TEXT
    );
    CREATE INDEX web_sessions_owner ON web_sessions (owner);
    CREATE INDEX web_sessions_expires ON web_sessions (expires_at);
    """,
    # failures per (account, source address); known devices: "ip:ADDR" or "key:FINGERPRINT"
    """
    CREATE TABLE auth_source_throttle (
        account TEXT NOT NULL,
        source TEXT NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        next_allowed REAL NOT NULL DEFAULT 0,
        locked INTEGER NOT NULL DEFAULT 0,
        last_failure REAL,
        PRIMARY KEY (account, source)
    );
    CREATE TABLE auth_known_devices (
        account TEXT NOT NULL,
        device TEXT NOT NULL,
        last_success REAL NOT NULL,
        PRIMARY KEY (account, device)
    );
    """,
    # session search (``SessionQuery``): what a session ran on and what carried it, an index
    # per filter that leads to a first page without reading other sessions, and the sessions'
    # text. ``session_segments`` keeps each session's segments in ``t`` order under consecutive
    # ids, and the FTS5 index (external content) uses those ids as rowids, so one session's
    # matches are a rowid range. Tokenizer: see ``broker/store/text.py``.
    """
    ALTER TABLE sessions ADD COLUMN target_name TEXT NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN stack TEXT NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN parent_id TEXT;
    DROP INDEX sessions_started;
    CREATE INDEX sessions_started ON sessions (started_at, id);
    CREATE INDEX sessions_user ON sessions (user, started_at, id);
    CREATE INDEX sessions_user_key ON sessions (
        lower(substr(user, 1, instr(user || '@', '@') - 1)), started_at, id);
    CREATE INDEX sessions_target ON sessions (lower(target), started_at, id);
    CREATE INDEX sessions_target_name ON sessions (lower(target_name), started_at, id);
    CREATE INDEX sessions_stack ON sessions (stack, started_at, id);
    CREATE INDEX sessions_grant ON sessions (grant_id, started_at, id);
    CREATE INDEX sessions_parent ON sessions (parent_id, started_at, id);
    CREATE INDEX sessions_live ON sessions (started_at, id) WHERE ended_at IS NULL;
    CREATE INDEX sessions_id_key ON sessions (lower(id));
    CREATE INDEX grants_ticket ON grants (ticket);
    CREATE TABLE session_segments (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        t REAL NOT NULL,
        source TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX session_segments_session ON session_segments (session_id, id);
    CREATE VIRTUAL TABLE session_text USING fts5 (
        body, content='session_segments', content_rowid='id',
        tokenize='unicode61 remove_diacritics 0'
    );
    """,
    # locks (user, target, stack) and requests to end one live session (``LockStore``): every
    # bastion's enforcement loop reads the active locks and the pending kills of its sessions
    """
    CREATE TABLE locks (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT,
        removed_at TEXT,
        removed_by TEXT
    );
    CREATE INDEX locks_live ON locks (created_at, id) WHERE removed_at IS NULL;
    CREATE TABLE session_kills (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        done_at TEXT
    );
    CREATE INDEX session_kills_pending ON session_kills (session_id) WHERE done_at IS NULL;
    """,
    # 10: a lock's end is audited once (``lock.expired``) by whichever bastion notes it first
    """
    ALTER TABLE locks ADD COLUMN expiry_noted_at TEXT;
    """,
    # 11: the notification outbox (``NotificationStore``, ``sqlite_notify``): one row per event
    # and channel, claimed with a lease by whichever broker process sends it
    """
    CREATE TABLE notify_outbox (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        event_id TEXT NOT NULL,
        event TEXT NOT NULL,
        channel TEXT NOT NULL,
        payload TEXT NOT NULL,
        dedupe_key TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        next_attempt_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        last_error TEXT,
        last_status INTEGER,
        sent_at TEXT,
        lease_owner TEXT,
        lease_until TEXT
    );
    CREATE INDEX notify_outbox_due ON notify_outbox (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX notify_outbox_status ON notify_outbox (status, seq);
    """,
    # 12: which bastion of a fleet relays a session (``node_name``); '' for older rows and for
    # rows written by a broker of the previous version during a rolling upgrade
    """
    ALTER TABLE sessions ADD COLUMN bastion TEXT NOT NULL DEFAULT ''
    """,
    # 13: each bastion's heartbeat (``FleetStore``, ``sqlite_fleet``): the sessions of one that
    # went silent are closed as lost by the others
    """
    CREATE TABLE bastions (
        name TEXT PRIMARY KEY,
        started_at TEXT NOT NULL,
        seen_at TEXT NOT NULL
    );
    CREATE INDEX sessions_open_by_bastion ON sessions (bastion) WHERE ended_at IS NULL
    """,
]


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None


class SqliteDatabase:
    """Owns the connection and applies migrations once at open."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        if read_only:
            self._open_read_only(path)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # used from the constructing thread (migrations) and then only from ``_thread``
            self.conn = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                        check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {path}: {exc}") from exc

    def _open_read_only(self, path: Path) -> None:
        """For commands that only read: no file is created, nothing is migrated or written."""
        if not path.exists():
            raise StoreError(f"no state database at {path} (the broker creates it when it "
                             "first starts)")
        try:
            self.conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                        timeout=10.0, isolation_level=None,
                                        check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {path}: {exc}") from exc
        if version < len(MIGRATIONS):
            self.conn.close()
            raise StoreError(f"state database {path} is at schema version {version}, this "
                             f"version needs {len(MIGRATIONS)}: start the broker once to "
                             "migrate it")

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                # re-check under the write lock: another process may have migrated meanwhile
                if self.conn.execute("PRAGMA user_version").fetchone()[0] >= n:
                    self.conn.execute("COMMIT")
                    continue
                for stmt in filter(str.strip, script.split(";")):
                    self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version = {n}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    _thread: ThreadPoolExecutor | None = None
    _metrics: Metrics = NullMetrics()

    async def run(self, fn: Callable[[], R]) -> R:
        """``fn()`` on the database's thread (started on first use, after any fork)."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bb-sqlite")
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn)
        finally:  # the wait behind earlier queries included: what the caller waited
            self._metrics.store_call(time.perf_counter() - started)

    def observe(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def ping(self) -> None:
        """Read the database header on the database's thread (behind the queries asked for
        before it, as a login's would be)."""
        def header() -> None:
            try:
                self.conn.execute("PRAGMA user_version").fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"the state database does not answer: {exc}") from exc

        await self.run(header)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)  # queries already asked for finish first
            self._thread = None
        self.conn.close()


def _grant_from_row(r: sqlite3.Row) -> Grant:
    return Grant(
        id=r["id"], username=r["username"], domain=r["domain"],
        stack_ids=tuple(json.loads(r["stack_ids"])), vpc_id=r["vpc_id"],
        level=Level(r["level"]), state=GrantState(r["state"]),
        starts_at=datetime.fromisoformat(r["starts_at"]),
        expires_at=datetime.fromisoformat(r["expires_at"]),
        trigger=Trigger(r["trigger"]), ticket=r["ticket"], reason=r["reason"],
        requested_by=r["requested_by"], approved_by=r["approved_by"],
        created_at=_dt(r["created_at"]), version=int(r["version"]),
    )


_INSERT_GRANT = (
    "INSERT INTO grants (id, username, username_key, domain, domain_key, stack_ids, vpc_id, level,"
    " state, starts_at, expires_at, trigger, ticket, reason, requested_by, approved_by, created_at)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_UPDATE_GRANT = (
    "UPDATE grants SET username=?, username_key=?, domain=?, domain_key=?, stack_ids=?, vpc_id=?,"
    " level=?, state=?, starts_at=?, expires_at=?, trigger=?, ticket=?, reason=?, requested_by=?,"
    " approved_by=?, created_at=?, version=version+1 WHERE id=?"
)


class SqliteGrantStore:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._c = db.conn

    def _row(self, g: Grant) -> tuple[object, ...]:
        return (
            g.id, g.username, g.username.casefold(), g.domain, g.domain.casefold(),
            json.dumps(list(g.stack_ids)), g.vpc_id, str(g.level), str(g.state),
            _ts(g.starts_at), _ts(g.expires_at), str(g.trigger), g.ticket, g.reason,
            g.requested_by, g.approved_by, _ts(g.created_at or g.starts_at),
        )

    @_on_db_thread
    def add(self, grant: Grant) -> None:
        try:
            self._c.execute(_INSERT_GRANT, self._row(grant))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot store grant: {exc}") from exc

    @_on_db_thread
    def replace(self, grant: Grant) -> None:
        row = self._row(grant)
        cur = self._c.execute(_UPDATE_GRANT, (*row[1:], grant.id))
        if cur.rowcount != 1:
            raise StoreError(f"grant {grant.id} not found")

    @_on_db_thread
    def get(self, grant_id: str) -> Grant | None:
        r = self._c.execute("SELECT * FROM grants WHERE id=?", (grant_id,)).fetchone()
        return _grant_from_row(r) if r else None

    @_on_db_thread
    def get_many(self, grant_ids: list[str]) -> dict[str, Grant]:
        out: dict[str, Grant] = {}
        for i in range(0, len(grant_ids), 500):
            chunk = grant_ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for r in self._c.execute(f"SELECT * FROM grants WHERE id IN ({marks})",  # noqa: S608
                                     chunk):
                out[r["id"]] = _grant_from_row(r)
        return out

    def _history(self, e: HistoryEntry) -> None:
        self._c.execute(
            "INSERT INTO grant_history (grant_id, at, actor, action, comment, state, details)"
            " VALUES (?,?,?,?,?,?,?)",
            (e.grant_id, _ts(e.at), e.actor, e.action, e.comment, e.state,
             json.dumps(e.details, sort_keys=True)),
        )

    @_on_db_thread
    def create(self, grant: Grant, entry: HistoryEntry) -> None:
        """A new grant and its first history entry, atomically."""
        self._c.execute("BEGIN IMMEDIATE")
        try:
            self._c.execute(_INSERT_GRANT, self._row(grant))
            self._history(entry)
            self._c.execute("COMMIT")
        except sqlite3.Error as exc:
            self._c.execute("ROLLBACK")
            raise StoreError(f"cannot store grant: {exc}") from exc

    @_on_db_thread
    def update(self, grant: Grant, entry: HistoryEntry) -> Grant:
        """Store ``grant`` if the stored version is still ``grant.version`` (compare-and-set);
        returns it with the new version, or raises ConflictError."""
        row = self._row(grant)
        self._c.execute("BEGIN IMMEDIATE")
        try:
            cur = self._c.execute(_UPDATE_GRANT + " AND version=?",
                                  (*row[1:], grant.id, grant.version))
            if cur.rowcount != 1:
                self._c.execute("ROLLBACK")
                raise ConflictError(
                    f"grant {grant.id} was changed by someone else meanwhile; reload and retry")
            self._history(entry)
            self._c.execute("COMMIT")
        except sqlite3.Error as exc:
            self._c.execute("ROLLBACK")
            raise StoreError(f"cannot update grant: {exc}") from exc
        return replace(grant, version=grant.version + 1)

    @_on_db_thread
    def history(self, grant_id: str) -> list[HistoryEntry]:
        rows = self._c.execute(
            "SELECT * FROM grant_history WHERE grant_id=? ORDER BY seq", (grant_id,)
        ).fetchall()
        return [HistoryEntry(r["grant_id"], datetime.fromisoformat(r["at"]), r["actor"],
                             r["action"], r["comment"], r["state"], json.loads(r["details"]))
                for r in rows]

    @_on_db_thread
    def search(self, *, username: str | None = None, stack: str | None = None,
               states: list[str] | None = None, since: datetime | None = None,
               until: datetime | None = None, expires_before: datetime | None = None,
               limit: int = 500) -> list[Grant]:
        """Filtered listing, newest first. ``states`` are stored states (expired is derived)."""
        sql = ["SELECT * FROM grants WHERE 1=1"]
        args: list[object] = []
        if username:
            sql.append("AND username_key=?")
            args.append(username.casefold())
        if stack:
            sql.append("AND EXISTS (SELECT 1 FROM json_each(grants.stack_ids) WHERE value=?)")
            args.append(stack)
        if states:
            sql.append(f"AND state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if since:
            sql.append("AND expires_at >= ?")
            args.append(_ts(since))
        if until:
            sql.append("AND starts_at <= ?")
            args.append(_ts(until))
        if expires_before:
            sql.append("AND expires_at < ?")
            args.append(_ts(expires_before))
        sql.append("ORDER BY created_at DESC LIMIT ?")
        args.append(limit)
        return [_grant_from_row(r) for r in self._c.execute(" ".join(sql), args)]

    @_on_db_thread
    def for_user(self, username: str, domain: str) -> list[Grant]:
        rows = self._c.execute(
            "SELECT * FROM grants WHERE username_key=? AND domain_key=?",
            (username.casefold(), domain.casefold()),
        ).fetchall()
        return [_grant_from_row(r) for r in rows]

    @_on_db_thread
    def list(self, *, username: str | None = None) -> list[Grant]:
        if username:
            rows = self._c.execute(
                "SELECT * FROM grants WHERE username_key=? ORDER BY created_at",
                (username.casefold(),),
            ).fetchall()
        else:
            rows = self._c.execute("SELECT * FROM grants ORDER BY created_at").fetchall()
        return [_grant_from_row(r) for r in rows]


class SqliteTotpStore:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._c = db.conn

    @_on_db_thread
    def get_secret(self, user_key: str) -> str | None:
        r = self._c.execute("SELECT secret FROM totp WHERE user_key=?", (user_key,)).fetchone()
        return str(r[0]) if r else None

    @_on_db_thread
    def set_secret(self, user_key: str, secret: str) -> None:
        self._c.execute(
            "INSERT INTO totp (user_key, secret, last_step) VALUES (?, ?, NULL)"
            " ON CONFLICT (user_key) DO UPDATE SET secret=excluded.secret, last_step=NULL",
            (user_key, secret),
        )

    @_on_db_thread
    def last_step(self, user_key: str) -> int | None:
        r = self._c.execute("SELECT last_step FROM totp WHERE user_key=?", (user_key,)).fetchone()
        return int(r[0]) if r and r[0] is not None else None

    @_on_db_thread
    def advance_step(self, user_key: str, step: int) -> bool:
        cur = self._c.execute(
            "UPDATE totp SET last_step=? WHERE user_key=? AND (last_step IS NULL OR last_step<?)",
            (step, user_key, step),
        )
        return cur.rowcount == 1


class SqliteThrottleStore:
    """Per-account failure counters; each update is one atomic statement, shared by processes."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._c = db.conn

    @_on_db_thread
    def state(self, account: str) -> ThrottleState:
        r = self._c.execute(
            "SELECT failures, next_allowed, locked FROM auth_throttle WHERE account=?", (account,)
        ).fetchone()
        if r is None:
            return ThrottleState(account, 0, 0.0, False)
        return ThrottleState(account, int(r[0]), float(r[1]), bool(r[2]))

    @_on_db_thread
    def failed(self, account: str, now: float, free: int, max_backoff: float,
               lock_after: int) -> ThrottleState:
        self._c.execute("BEGIN IMMEDIATE")
        try:
            r = self._c.execute(
                "SELECT failures FROM auth_throttle WHERE account=?", (account,)
            ).fetchone()
            failures = (int(r[0]) if r else 0) + 1
            wait = account_backoff(failures, free, max_backoff)
            locked = failures >= lock_after
            self._c.execute(
                "INSERT INTO auth_throttle (account, failures, next_allowed, locked, last_failure)"
                " VALUES (?,?,?,?,?) ON CONFLICT (account) DO UPDATE SET"
                " failures=excluded.failures, next_allowed=excluded.next_allowed,"
                " locked=excluded.locked, last_failure=excluded.last_failure",
                (account, failures, now + wait, int(locked), now),
            )
            self._c.execute("COMMIT")
        except BaseException:
            self._c.execute("ROLLBACK")
            raise
        return ThrottleState(account, failures, now + wait, locked)

    @_on_db_thread
    def succeeded(self, account: str) -> None:
        self._c.execute("DELETE FROM auth_throttle WHERE account=? AND locked=0", (account,))

    @_on_db_thread
    def view(self, account: str, source: str, key_fp: str | None) -> ThrottleView:
        a = self._c.execute(
            "SELECT failures, next_allowed, locked FROM auth_throttle WHERE account=?", (account,)
        ).fetchone()
        p = self._c.execute(
            "SELECT failures, next_allowed, locked FROM auth_source_throttle"
            " WHERE account=? AND source=?", (account, source)
        ).fetchone()
        seen = dict(self._c.execute(
            "SELECT device, last_success FROM auth_known_devices WHERE account=?"
            " AND device IN (?, ?)", (account, f"ip:{source}", f"key:{key_fp or ''}")
        ).fetchall())
        acc = (ThrottleState(account, int(a[0]), float(a[1]), bool(a[2])) if a
               else ThrottleState(account, 0, 0.0, False))
        ip_seen = seen.get(f"ip:{source}")
        pair = SourceThrottleState(account, source, int(p[0]) if p else 0,
                                   float(p[1]) if p else 0.0, bool(p[2]) if p else False,
                                   float(ip_seen) if ip_seen is not None else None)
        key_seen = seen.get(f"key:{key_fp}") if key_fp else None
        return ThrottleView(acc, pair, float(key_seen) if key_seen is not None else None)

    @_on_db_thread
    def source_failed(self, account: str, source: str, now: float, free: int,
                      max_backoff: float, lock_after: int) -> SourceThrottleState:
        self._c.execute("BEGIN IMMEDIATE")
        try:
            r = self._c.execute(
                "SELECT failures FROM auth_source_throttle WHERE account=? AND source=?",
                (account, source),
            ).fetchone()
            failures = (int(r[0]) if r else 0) + 1
            wait = account_backoff(failures, free, max_backoff)
            locked = failures >= lock_after
            self._c.execute(
                "INSERT INTO auth_source_throttle (account, source, failures, next_allowed,"
                " locked, last_failure) VALUES (?,?,?,?,?,?) ON CONFLICT (account, source)"
                " DO UPDATE SET failures=excluded.failures, next_allowed=excluded.next_allowed,"
                " locked=excluded.locked, last_failure=excluded.last_failure",
                (account, source, failures, now + wait, int(locked), now),
            )
            seen = self._c.execute(
                "SELECT last_success FROM auth_known_devices WHERE account=? AND device=?",
                (account, f"ip:{source}"),
            ).fetchone()
            self._c.execute("COMMIT")
        except BaseException:
            self._c.execute("ROLLBACK")
            raise
        return SourceThrottleState(account, source, failures, now + wait, locked,
                                   float(seen[0]) if seen else None)

    @_on_db_thread
    def login_succeeded(self, account: str, source: str, key_fp: str | None, now: float,
                        forget_before: float) -> None:
        devices = [f"ip:{source}"] + ([f"key:{key_fp}"] if key_fp else [])
        self._c.execute("BEGIN IMMEDIATE")
        try:
            self._c.execute("DELETE FROM auth_throttle WHERE account=? AND locked=0", (account,))
            self._c.execute("DELETE FROM auth_source_throttle WHERE account=? AND source=?"
                            " AND locked=0", (account, source))
            self._c.execute("DELETE FROM auth_known_devices WHERE account=? AND last_success<?",
                            (account, forget_before))
            self._c.executemany(
                "INSERT INTO auth_known_devices (account, device, last_success) VALUES (?,?,?)"
                " ON CONFLICT (account, device) DO UPDATE SET"
                " last_success=max(last_success, excluded.last_success)",
                [(account, d, now) for d in devices],
            )
            self._c.execute("COMMIT")
        except BaseException:
            self._c.execute("ROLLBACK")
            raise

    @_on_db_thread
    def source_listing(self) -> list[SourceThrottleState]:
        rows = self._c.execute(
            "SELECT t.account, t.source, t.failures, t.next_allowed, t.locked, k.last_success"
            " FROM auth_source_throttle t LEFT JOIN auth_known_devices k"
            " ON k.account = t.account AND k.device = 'ip:' || t.source"
            " ORDER BY t.locked DESC, t.failures DESC, t.account, t.source"
        ).fetchall()
        return [SourceThrottleState(r[0], r[1], int(r[2]), float(r[3]), bool(r[4]),
                                    float(r[5]) if r[5] is not None else None) for r in rows]

    @_on_db_thread
    def unlock(self, account: str) -> bool:
        self._c.execute("BEGIN IMMEDIATE")
        try:
            n = self._c.execute("DELETE FROM auth_throttle WHERE account=?", (account,)).rowcount
            n += self._c.execute("DELETE FROM auth_source_throttle WHERE account=?",
                                 (account,)).rowcount
            self._c.execute("COMMIT")
        except BaseException:
            self._c.execute("ROLLBACK")
            raise
        return n > 0

    @_on_db_thread
    def listing(self) -> list[ThrottleState]:
        rows = self._c.execute(
            "SELECT account, failures, next_allowed, locked FROM auth_throttle"
            " ORDER BY locked DESC, failures DESC"
        ).fetchall()
        return [ThrottleState(r[0], int(r[1]), float(r[2]), bool(r[3])) for r in rows]

    @_on_db_thread
    def summary(self, now: float) -> ThrottleSummary:
        r = self._c.execute(
            "SELECT COALESCE(SUM(locked != 0), 0),"
            " COALESCE(SUM(locked = 0 AND next_allowed > ?), 0) FROM auth_throttle", (now,)
        ).fetchone()
        return ThrottleSummary(int(r[0]), int(r[1]))


class SqliteKeyStore:
    def __init__(self, db: SqliteDatabase, parse: ParsePublicKey) -> None:
        self._db = db
        self._c = db.conn
        self._parse = parse

    @_on_db_thread
    def add(self, account: str, public_key: str, comment: str) -> str:
        line, fp = self._parse(public_key)
        self._c.execute(
            "INSERT OR REPLACE INTO user_keys (account, fingerprint, public_key, comment,"
            " added_at) VALUES (?,?,?,?,?)",
            (account, fp, line, comment,
             _ts(datetime.now(UTC))),
        )
        return fp

    @_on_db_thread
    def has(self, account: str, fingerprint: str) -> bool:
        r = self._c.execute("SELECT 1 FROM user_keys WHERE account=? AND fingerprint=?",
                            (account, fingerprint)).fetchone()
        return r is not None

    @_on_db_thread
    def remove(self, account: str, fingerprint: str) -> bool:
        cur = self._c.execute("DELETE FROM user_keys WHERE account=? AND fingerprint=?",
                              (account, fingerprint))
        return cur.rowcount == 1

    @_on_db_thread
    def listing(self, account: str | None = None) -> list[tuple[str, str, str]]:
        if account:
            rows = self._c.execute("SELECT account, fingerprint, comment FROM user_keys"
                                   " WHERE account=? ORDER BY added_at", (account,)).fetchall()
        else:
            rows = self._c.execute("SELECT account, fingerprint, comment FROM user_keys"
                                   " ORDER BY account, added_at").fetchall()
        return [(r[0], r[1], r[2]) for r in rows]


class SqliteReauthStore:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._c = db.conn

    @_on_db_thread
    def remember(self, account: str, ip: str, key_fp: str, until: float) -> None:
        self._c.execute(
            "INSERT INTO reauth_windows (account, ip, key_fp, until) VALUES (?,?,?,?)"
            " ON CONFLICT (account, ip, key_fp) DO UPDATE SET until=excluded.until",
            (account, ip, key_fp, until),
        )
        self._c.execute("DELETE FROM reauth_windows WHERE until < ?", (until - 86400,))

    @_on_db_thread
    def valid(self, account: str, ip: str, key_fp: str, now: float) -> bool:
        r = self._c.execute(
            "SELECT 1 FROM reauth_windows WHERE account=? AND ip=? AND key_fp=? AND until>?",
            (account, ip, key_fp, now),
        ).fetchone()
        return r is not None


def _session_from_row(r: sqlite3.Row) -> SessionRecord:
    started = datetime.fromisoformat(r["started_at"])
    return SessionRecord(
        id=r["id"], user=r["user"], target=r["target"], login=r["login"],
        grant_id=r["grant_id"], level=r["level"], kind=r["kind"], command=r["command"],
        peer=r["peer"], started_at=started, ended_at=_dt(r["ended_at"]),
        exit_status=r["exit_status"], bytes_in=r["bytes_in"], bytes_out=r["bytes_out"],
        recording=r["recording"], target_name=r["target_name"], stack=r["stack"],
        parent_id=r["parent_id"], bastion=r["bastion"],
    )


def _like_prefix(text: str) -> str:
    """A LIKE pattern matching ``text`` literally as a prefix."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


# a search whose words match at most this many segments, or this share of all segments (1 in
# _FEW_TEXT_SHARE), collects their sessions from the text index (a few microseconds a match);
# above, the sessions are read newest first and each is checked in the index (tens of
# microseconds a session, and a page needs limit / (share of sessions matching) of them)
_FEW_TEXT_MATCHES = 2000
_FEW_TEXT_SHARE = 50


# the user's local part in lower case (ASCII), as the sessions_user_key index has it: an equality
# on it leads to a user's sessions in start order, so a first page reads one page of rows
_USER_KEY = "lower(substr(user, 1, instr(user || '@', '@') - 1))"


def _session_filters(q: SessionQuery) -> tuple[list[str], list[object]]:
    """``SessionQuery``'s filters but the text as SQL conditions on ``sessions`` (ANDed).

    Case-insensitive filters compare ``lower()`` (ASCII only in SQLite, see ``ascii_lower``)
    against the indexed ``lower(column)`` expressions; the user's "any domain" match goes
    through the indexed local part instead of a LIKE (which SQLite's planner cannot use for a
    bound pattern)."""
    where: list[str] = []
    args: list[object] = []
    if q.user and "@" in q.user:
        where.append("user = ?")
        args.append(q.user)
    elif q.user:  # any domain, ASCII case-insensitive; a user without one: exactly
        where.append(f"{_USER_KEY} = ? AND (instr(user, '@') > 0 OR user = ?)")
        args += [ascii_lower(q.user), q.user]
    if q.target:
        where.append("(lower(target) = ? OR lower(target_name) = ?)")
        args += [ascii_lower(q.target)] * 2
    for column, value in (("stack", q.stack), ("grant_id", q.grant_id), ("kind", q.kind),
                          ("parent_id", q.parent_id)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    grant_where: list[str] = []
    for column, value in (("ticket", q.ticket), ("trigger", q.trigger)):
        if value is not None:
            grant_where.append(f"{column} = ?")
            args.append(value)
    if grant_where:
        where.append("grant_id IN (SELECT id FROM grants WHERE "  # noqa: S608
                     + " AND ".join(grant_where) + ")")
    if q.status is not None:
        where.append(STATUS_SQL[q.status])
    if q.since is not None:
        where.append("(ended_at IS NULL OR ended_at >= ?)")
        args.append(_ts(q.since))
    if q.until is not None:
        where.append("started_at < ?")
        args.append(_ts(q.until))
    if q.top_level:
        where.append("parent_id IS NULL")
    if q.after is not None:
        where.append("(started_at, id) < (?, ?)")
        args += [_ts(q.after[0]), q.after[1]]
    return where, args


# one session's segments that match: a rowid range of the text index (see the migration); an
# empty range for a session without text (NULL bounds would make FTS5 read every match)
_SEGMENT_SPAN = (
    "rowid BETWEEN (SELECT coalesce(min(id), 0) FROM session_segments WHERE session_id = {sid})"
    " AND (SELECT coalesce(max(id), -1) FROM session_segments WHERE session_id = {sid})"
)


_HAS_MATCH = ("SELECT EXISTS (SELECT 1 FROM session_text WHERE session_text MATCH ?"  # noqa: S608
              " AND " + _SEGMENT_SPAN.format(sid="?") + ")")


class SqliteSessionIndex:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._c = db.conn

    @_on_db_thread
    def started(self, rec: SessionRecord) -> None:
        self._c.execute(
            "INSERT INTO sessions (id, user, target, login, grant_id, level, kind, command, peer,"
            " started_at, recording, target_name, stack, parent_id, bastion)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (rec.id, rec.user, rec.target, rec.login, rec.grant_id, rec.level, rec.kind,
             rec.command, rec.peer, _ts(rec.started_at), rec.recording, rec.target_name,
             rec.stack, rec.parent_id, rec.bastion),
        )

    @_on_db_thread
    def ended(
        self, session_id: str, ended_at: datetime, exit_status: str | None,
        bytes_in: int, bytes_out: int,
    ) -> None:
        self._c.execute(
            "UPDATE sessions SET ended_at=?, exit_status=?, bytes_in=?, bytes_out=? WHERE id=?",
            (_ts(ended_at), exit_status, bytes_in, bytes_out, session_id),
        )

    @_on_db_thread
    def get(self, session_id: str) -> SessionRecord | None:
        r = self._c.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
        if r is None and len(session_id) >= 6:
            # accept a unique prefix, as git does for commits
            rows = self._by_prefix(session_id, 2)
            r = rows[0] if len(rows) == 1 else None
        return _session_from_row(r) if r else None

    def _by_prefix(self, prefix: str, limit: int) -> builtins.list[sqlite3.Row]:
        """Through the ``lower(id)`` index: the range of ids starting with the lowercased
        prefix (the last character's successor bounds it), then LIKE for the exact rule."""
        if not prefix:
            return self._c.execute("SELECT * FROM sessions ORDER BY id LIMIT ?",
                                   (limit,)).fetchall()
        key = ascii_lower(prefix)
        return self._c.execute(
            "SELECT * FROM sessions WHERE lower(id) >= ? AND lower(id) < ?"
            " AND id LIKE ? ESCAPE '\\' ORDER BY id LIMIT ?",
            (key, key[:-1] + chr(ord(key[-1]) + 1), _like_prefix(prefix), limit),
        ).fetchall()

    @_on_db_thread
    def by_prefix(self, prefix: str, limit: int = 10) -> builtins.list[SessionRecord]:
        return [_session_from_row(r) for r in self._by_prefix(prefix, limit)]

    @_on_db_thread
    def list(self, *, user: str | None = None, limit: int = 100) -> builtins.list[SessionRecord]:
        if user:
            # "alice" matches alice@any-domain; "alice@corp.example.com" matches exactly
            rows = self._c.execute(
                "SELECT * FROM sessions WHERE user = ? OR user LIKE ? ESCAPE '\\'"
                " ORDER BY started_at DESC LIMIT ?",
                (user, _like_prefix(user + "@"), limit),
            ).fetchall()
        else:
            rows = self._c.execute(
                "SELECT * FROM sessions ORDER BY started_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_session_from_row(r) for r in rows]

    @_on_db_thread
    def search(self, q: SessionQuery) -> builtins.list[SessionMatch]:
        """Filters through their index; a text through the text index when its segments are
        few, else by reading the filtered sessions newest first and checking each (FTS5 has no
        statistics that would let SQLite's planner tell the two apart, so a bounded count of
        the matching segments decides)."""
        check_query(q)
        words = query_words(q.text)
        if q.limit <= 0 or words == []:
            return []
        where, args = _session_filters(q)
        if words is None:
            return [SessionMatch(_session_from_row(r))
                    for r in self._sessions(where, args, q.limit)]
        match = fts5_match(words)
        if self._few_matches(match):
            rows = self._sessions(
                [*where, "id IN (SELECT g.session_id FROM session_segments g WHERE g.id IN"
                         " (SELECT rowid FROM session_text WHERE session_text MATCH ?))"],
                [*args, match], q.limit)
        else:
            rows = self._newest_matching(where, args, match, q.limit)
        return [SessionMatch(_session_from_row(r), tuple(self._hits(r["id"], words, MAX_HITS)))
                for r in rows]

    def _sessions(self, where: builtins.list[str], args: builtins.list[object],
                  limit: int) -> builtins.list[sqlite3.Row]:
        sql = ("SELECT * FROM sessions"  # noqa: S608 (conditions from _session_filters)
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY started_at DESC, id DESC LIMIT ?")
        return self._c.execute(sql, (*args, limit)).fetchall()

    def _few_matches(self, match: str) -> bool:
        segments = self._c.execute("SELECT max(id) FROM session_segments").fetchone()[0] or 0
        few = max(_FEW_TEXT_MATCHES, segments // _FEW_TEXT_SHARE)
        n = self._c.execute(
            "SELECT count(*) FROM (SELECT rowid FROM session_text WHERE session_text MATCH ?"
            " LIMIT ?)", (match, few + 1)).fetchone()[0]
        return bool(n <= few)

    def _newest_matching(self, where: builtins.list[str], args: builtins.list[object],
                         match: str, limit: int) -> builtins.list[sqlite3.Row]:
        """The filtered sessions in pages, newest first, each checked in the text index (a
        rowid-range probe) until ``limit`` match. In pages rather than one statement: SQLite
        would check every session of a filter's index range before sorting them."""
        out: builtins.list[sqlite3.Row] = []
        size = max(4 * limit, 100)
        rows = self._sessions(where, args, size)
        while True:
            for r in rows:
                if self._c.execute(_HAS_MATCH, (match, r["id"], r["id"])).fetchone()[0]:
                    out.append(r)
                    if len(out) == limit:
                        return out
            if len(rows) < size:
                return out
            last = rows[-1]
            size = min(2 * size, 5000)
            rows = self._sessions([*where, "(started_at, id) < (?, ?)"],
                                  [*args, last["started_at"], last["id"]], size)

    def _hits(self, session_id: str, words: builtins.list[builtins.list[str]],
              limit: int) -> builtins.list[TextHit]:
        rows = self._c.execute(
            "SELECT g.t, g.source, g.body FROM session_text f"  # noqa: S608
            " JOIN session_segments g ON g.id = f.rowid WHERE session_text MATCH ? AND f."
            + _SEGMENT_SPAN.format(sid="?") + " ORDER BY f.rowid LIMIT ?",
            (fts5_match(words), session_id, session_id, limit),
        ).fetchall()
        return [TextHit(float(r[0]), r[1], snippet(r[2], words)) for r in rows]

    @_on_db_thread
    def index_text(self, session_id: str, segments: Sequence[TextSegment]) -> None:
        """Replace the session's segments in one transaction, in ``t`` order under consecutive
        ids (this connection holds the write lock, so no one else takes ids meanwhile)."""
        ordered = sorted(segments, key=lambda s: s.t)
        self._c.execute("BEGIN IMMEDIATE")
        try:
            self._c.execute(
                "INSERT INTO session_text (session_text, rowid, body) SELECT 'delete', id, body"
                " FROM session_segments WHERE session_id = ?", (session_id,))
            self._c.execute("DELETE FROM session_segments WHERE session_id = ?", (session_id,))
            self._c.executemany(
                "INSERT INTO session_segments (session_id, t, source, body) VALUES (?,?,?,?)",
                [(session_id, s.t, s.source, s.text) for s in ordered])
            self._c.execute(
                "INSERT INTO session_text (rowid, body) SELECT id, body FROM session_segments"
                " WHERE session_id = ?", (session_id,))
            self._c.execute("COMMIT")
        except BaseException:
            self._c.execute("ROLLBACK")
            raise

    @_on_db_thread
    def text_hits(self, session_id: str, text: str,
                  limit: int = 200) -> builtins.list[TextHit]:
        words = query_words(text)
        if not words or limit <= 0:
            return []
        return self._hits(session_id, words, limit)

    @_on_db_thread
    def per_day(self, since: datetime) -> builtins.list[tuple[str, int]]:
        """Stored times are UTC ISO strings: the date is their first ten characters."""
        rows = self._c.execute(
            "SELECT substr(started_at, 1, 10) AS day, count(*) FROM sessions"
            " WHERE started_at >= ? GROUP BY day ORDER BY day", (_ts(since),)).fetchall()
        return [(r[0], int(r[1])) for r in rows]

    @_on_db_thread
    def live_count(self) -> int:
        return int(self._c.execute(
            "SELECT count(*) FROM sessions WHERE ended_at IS NULL").fetchone()[0])


def _web_session_from_row(r: sqlite3.Row) -> WebSessionRecord:
    return WebSessionRecord(
        sid=r["sid"], owner=r["owner"], peer=r["peer"],
        created_at=datetime.fromisoformat(r["created_at"]),
        expires_at=datetime.fromisoformat(r["expires_at"]), ended_at=_dt(r["ended_at"]))


def _token_from_row(r: sqlite3.Row) -> ApiTokenRecord:
    return ApiTokenRecord(
        id=r["id"], owner=r["owner"], name=r["name"], scopes=tuple(json.loads(r["scopes"])),
        roles=tuple(json.loads(r["roles"])), groups=tuple(json.loads(r["groups"])),
        created_at=datetime.fromisoformat(r["created_at"]),
        expires_at=datetime.fromisoformat(r["expires_at"]), revoked_at=_dt(r["revoked_at"]),
    )


class SqliteApiTokenStore:
    """API tokens (hashed) and logged-out web sessions, shared by every broker on this store."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db
        self._c = db.conn

    @_on_db_thread
    def add(self, rec: ApiTokenRecord, token_hash: str) -> None:
        self._c.execute(
            "INSERT INTO api_tokens (id, token_hash, owner, name, scopes, roles, groups,"
            " created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (rec.id, token_hash, rec.owner, rec.name, json.dumps(list(rec.scopes)),
             json.dumps(list(rec.roles)), json.dumps(list(rec.groups)), _ts(rec.created_at),
             _ts(rec.expires_at)),
        )

    @_on_db_thread
    def by_hash(self, token_hash: str) -> ApiTokenRecord | None:
        r = self._c.execute("SELECT * FROM api_tokens WHERE token_hash=?",
                            (token_hash,)).fetchone()
        return _token_from_row(r) if r else None

    @_on_db_thread
    def listing(self, owner: str | None = None) -> list[ApiTokenRecord]:
        rows = self._c.execute(
            "SELECT * FROM api_tokens WHERE ? IS NULL OR owner=? ORDER BY created_at, id",
            (owner, owner)).fetchall()
        return [_token_from_row(r) for r in rows]

    @_on_db_thread
    def revoke(self, token_id: str, owner: str | None, now: datetime) -> bool:
        cur = self._c.execute(
            "UPDATE api_tokens SET revoked_at=? WHERE id=? AND (? IS NULL OR owner=?)"
            " AND revoked_at IS NULL", (_ts(now), token_id, owner, owner))
        return cur.rowcount == 1

    @_on_db_thread
    def start_session(self, rec: WebSessionRecord) -> None:
        self._c.execute(
            "INSERT INTO web_sessions (sid, owner, peer, created_at, expires_at) VALUES"
            " (?,?,?,?,?)", (rec.sid, rec.owner, rec.peer, _ts(rec.created_at),
                             _ts(rec.expires_at)))
        self._c.execute("DELETE FROM web_sessions WHERE expires_at < ?",
                        (_ts(rec.created_at - timedelta(days=2)),))

    @_on_db_thread
    def session_active(self, sid: str, now: datetime) -> bool:
        r = self._c.execute(
            "SELECT 1 FROM web_sessions WHERE sid=? AND ended_at IS NULL AND expires_at > ?"
            " AND sid NOT IN (SELECT sid FROM web_sessions_revoked)", (sid, _ts(now))).fetchone()
        return r is not None

    @_on_db_thread
    def sessions(self, owner: str | None = None, *, now: datetime) -> list[WebSessionRecord]:
        rows = self._c.execute(
            "SELECT * FROM web_sessions WHERE (? IS NULL OR owner=?) AND ended_at IS NULL"
            " AND expires_at > ? AND sid NOT IN (SELECT sid FROM web_sessions_revoked)"
            " ORDER BY created_at, sid", (owner, owner, _ts(now))).fetchall()
        return [_web_session_from_row(r) for r in rows]

    @_on_db_thread
    def revoke_session(self, sid: str, now: datetime) -> bool:
        self._c.execute("BEGIN IMMEDIATE")
        try:
            r = self._c.execute(
                "SELECT expires_at FROM web_sessions WHERE sid=? AND ended_at IS NULL"
                " AND expires_at > ?", (sid, _ts(now))).fetchone()
            if r is not None:
                self._c.execute("UPDATE web_sessions SET ended_at=? WHERE sid=?",
                                (_ts(now), sid))
                self._c.execute(
                    "INSERT OR IGNORE INTO web_sessions_revoked (sid, expires) VALUES (?,?)",
                    (sid, datetime.fromisoformat(r["expires_at"]).timestamp()))
            self._c.execute("COMMIT")
        except BaseException:
            self._c.execute("ROLLBACK")
            raise
        return r is not None

    @_on_db_thread
    def end_session(self, sid: str, expires: float) -> None:
        """Remember a logged-out session until its cookie would have expired anyway."""
        self._c.execute("INSERT OR IGNORE INTO web_sessions_revoked (sid, expires) VALUES (?,?)",
                        (sid, expires))
        self._c.execute("DELETE FROM web_sessions_revoked WHERE expires < ?",
                        (expires - 2 * 86400,))

    @_on_db_thread
    def session_ended(self, sid: str) -> bool:
        r = self._c.execute("SELECT 1 FROM web_sessions_revoked WHERE sid=?", (sid,)).fetchone()
        return r is not None
