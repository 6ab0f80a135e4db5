"""PostgreSQL schema, as numbered migrations: entry ``n - 1`` is version ``n``.

A Python list rather than ``.sql`` files so the migrations ship inside the wheel without package
data settings. Never edit an applied entry: append a new one. Tables mirror the SQLite store
(``broker/store/sqlite.py``) with native types: ``timestamptz`` for datetimes, ``text[]`` for
stack ids, ``boolean`` for flags. Epoch-second floats of the Protocols (throttle, re-auth window)
stay ``double precision`` so both backends compute identical values.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: grants and their history, TOTP, session index, account throttle, registered keys,
    # re-auth windows.
    # ``seq`` columns keep insertion order as the tie-break that SQLite's rowid gives.
    # ``sessions.user_name``: ``user`` is a reserved word (CURRENT_USER) in PostgreSQL.
    """
    CREATE TABLE grants (
        id text PRIMARY KEY,
        username text NOT NULL,
        username_key text NOT NULL,
        domain text NOT NULL,
        domain_key text NOT NULL,
        stack_ids text[] NOT NULL,
        vpc_id text NOT NULL,
        level text NOT NULL,
        state text NOT NULL,
        starts_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        trigger text NOT NULL,
        ticket text NOT NULL,
        reason text NOT NULL,
        requested_by text NOT NULL,
        approved_by text NOT NULL,
        created_at timestamptz NOT NULL,
        version integer NOT NULL DEFAULT 1,
        seq bigint GENERATED ALWAYS AS IDENTITY
    );
    CREATE INDEX grants_user ON grants (username_key, domain_key);
    CREATE INDEX grants_created ON grants (created_at, seq);
    CREATE INDEX grants_state ON grants (state, expires_at);

    CREATE TABLE grant_history (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        grant_id text NOT NULL,
        at timestamptz NOT NULL,
        actor text NOT NULL,
        action text NOT NULL,
        comment text NOT NULL,
        state text NOT NULL,
        details jsonb NOT NULL
    );
    CREATE INDEX grant_history_grant ON grant_history (grant_id, seq);

    CREATE TABLE totp (
        user_key text PRIMARY KEY,
        secret text NOT NULL,
        last_step bigint
    );

    CREATE TABLE sessions (
        id text PRIMARY KEY,
        user_name text NOT NULL,
        target text NOT NULL,
        login text NOT NULL,
        grant_id text NOT NULL,
        level text NOT NULL,
        kind text NOT NULL,
        command text,
        peer text NOT NULL,
        started_at timestamptz NOT NULL,
        ended_at timestamptz,
        exit_status text,
        bytes_in bigint NOT NULL DEFAULT 0,
        bytes_out bigint NOT NULL DEFAULT 0,
        recording text NOT NULL,
        seq bigint GENERATED ALWAYS AS IDENTITY
    );
    CREATE INDEX sessions_started ON sessions (started_at DESC, seq DESC);

    CREATE TABLE auth_throttle (
        account text PRIMARY KEY,
        failures integer NOT NULL DEFAULT 0,
        next_allowed double precision NOT NULL DEFAULT 0,
        locked boolean NOT NULL DEFAULT false,
        last_failure double precision
    );

    CREATE TABLE user_keys (
        account text NOT NULL,
        fingerprint text NOT NULL,
        public_key text NOT NULL,
        comment text NOT NULL,
        added_at timestamptz NOT NULL,
        PRIMARY KEY (account, fingerprint)
    );

    CREATE TABLE reauth_windows (
        account text NOT NULL,
        ip text NOT NULL,
        key_fp text NOT NULL,
        valid_until double precision NOT NULL,
        PRIMARY KEY (account, ip, key_fp)
    );
    CREATE INDEX reauth_windows_until ON reauth_windows (valid_until);
    """,
    """
    CREATE TABLE api_tokens (
        id text PRIMARY KEY,
        token_hash text NOT NULL UNIQUE,
        owner text NOT NULL,
        name text NOT NULL,
        scopes jsonb NOT NULL,
        roles jsonb NOT NULL,
        groups jsonb NOT NULL,
        created_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        revoked_at timestamptz
    );
    CREATE INDEX api_tokens_owner ON api_tokens (owner);
    CREATE TABLE web_sessions_revoked (
        sid text PRIMARY KEY,
        expires double precision NOT NULL
    );
    """,
    # web sessions as logins made them, so operators can list and end anyone's
    """
    CREATE TABLE web_sessions (
        sid text PRIMARY KEY,
        owner text NOT NULL,
        peer text NOT NULL,
        created_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        ended_at timestamptz
    );
    CREATE INDEX web_sessions_owner ON web_sessions (owner);
    CREATE INDEX web_sessions_expires ON web_sessions (expires_at);
    """,
    # failures per (account, source address); known devices: "ip:ADDR" or "key:FINGERPRINT"
    """
    CREATE TABLE auth_source_throttle (
        account text NOT NULL,
        source text NOT NULL,
        failures integer NOT NULL DEFAULT 0,
        next_allowed double precision NOT NULL DEFAULT 0,
        locked boolean NOT NULL DEFAULT false,
        last_failure double precision,
        PRIMARY KEY (account, source)
    );
    CREATE TABLE auth_known_devices (
        account text NOT NULL,
        device text NOT NULL,
        last_success double precision NOT NULL,
        PRIMARY KEY (account, device)
    );
    """,
    # 5: session search (``SessionQuery``): what a session ran on and what carried it, an index
    # per filter that leads to a first page without reading other sessions, and the sessions'
    # text, one row per segment with a GIN-indexed tsvector built by the store from the same
    # tokens as SQLite's FTS5 (``broker/store/text.py``). Case-insensitive filters use
    # ``lower(x COLLATE "C")`` (ASCII only, as SQLite's ``lower``); ids order under "C" (bytes,
    # as SQLite) whatever the database's collation.
    """
    ALTER TABLE sessions ADD COLUMN target_name text NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN stack text NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN parent_id text;
    CREATE INDEX sessions_order ON sessions (started_at, id COLLATE "C");
    CREATE INDEX sessions_user ON sessions (user_name, started_at, id COLLATE "C");
    CREATE INDEX sessions_user_key ON sessions
        (lower(split_part(user_name, '@', 1) COLLATE "C"), started_at, id COLLATE "C");
    CREATE INDEX sessions_target ON sessions
        (lower(target COLLATE "C"), started_at, id COLLATE "C");
    CREATE INDEX sessions_target_name ON sessions
        (lower(target_name COLLATE "C"), started_at, id COLLATE "C");
    CREATE INDEX sessions_stack ON sessions (stack, started_at, id COLLATE "C");
    CREATE INDEX sessions_grant ON sessions (grant_id, started_at, id COLLATE "C");
    CREATE INDEX sessions_parent ON sessions (parent_id, started_at, id COLLATE "C");
    CREATE INDEX sessions_live ON sessions (started_at, id COLLATE "C")
        WHERE ended_at IS NULL;
    CREATE INDEX sessions_id_key ON sessions (lower(id COLLATE "C"));
    CREATE INDEX grants_ticket ON grants (ticket);

    CREATE TABLE session_text (
        session_id text NOT NULL,
        seq integer NOT NULL,
        t double precision NOT NULL,
        source text NOT NULL,
        body text NOT NULL,
        tsv tsvector NOT NULL,
        PRIMARY KEY (session_id, seq)
    );
    CREATE INDEX session_text_tsv ON session_text USING gin (tsv);
    -- statistics for the new expression indexes now, not at autovacuum's next visit: without
    -- them the planner guesses a user's share of the sessions
    ANALYZE sessions;
    """,
    # 6: locks (user, target, stack) and requests to end one live session (``LockStore``):
    # every bastion's enforcement loop reads the active locks and the pending kills of its
    # sessions
    """
    CREATE TABLE locks (
        id text PRIMARY KEY,
        kind text NOT NULL,
        value text NOT NULL,
        reason text NOT NULL,
        created_by text NOT NULL,
        created_at timestamptz NOT NULL,
        expires_at timestamptz,
        removed_at timestamptz,
        removed_by text
    );
    CREATE INDEX locks_live ON locks (created_at, id COLLATE "C") WHERE removed_at IS NULL;
    CREATE TABLE session_kills (
        id text PRIMARY KEY,
        session_id text NOT NULL,
        reason text NOT NULL,
        requested_by text NOT NULL,
        requested_at timestamptz NOT NULL,
        done_at timestamptz
    );
    CREATE INDEX session_kills_pending ON session_kills (session_id) WHERE done_at IS NULL;
    """,
    # 7: a lock's end is audited once (``lock.expired``) by whichever bastion notes it first
    """
    ALTER TABLE locks ADD COLUMN expiry_noted_at timestamptz;
    """,
    # 8: the notification outbox (``NotificationStore``, ``postgres_notify``): one row per event
    # and channel, claimed with FOR UPDATE SKIP LOCKED and a lease by whichever bastion sends it
    """
    CREATE TABLE notify_outbox (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        event_id text NOT NULL,
        event text NOT NULL,
        channel text NOT NULL,
        payload text NOT NULL,
        dedupe_key text NOT NULL UNIQUE,
        status text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL,
        next_attempt_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        last_error text,
        last_status integer,
        sent_at timestamptz,
        lease_owner text,
        lease_until timestamptz
    );
    CREATE INDEX notify_outbox_due ON notify_outbox (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX notify_outbox_status ON notify_outbox (status, seq);
    """,
    # 9: which bastion of a fleet relays a session (``node_name``); '' for older rows and for
    # rows written by a broker of the previous version during a rolling upgrade
    """
    ALTER TABLE sessions ADD COLUMN bastion text NOT NULL DEFAULT '';
    """,
    # 10: each bastion's heartbeat (``FleetStore``, ``postgres_fleet``): the sessions of one that
    # went silent are closed as lost by the others
    """
    CREATE TABLE bastions (
        name text PRIMARY KEY,
        started_at timestamptz NOT NULL,
        seen_at timestamptz NOT NULL
    );
    CREATE INDEX sessions_open_by_bastion ON sessions (bastion) WHERE ended_at IS NULL;
    """,
]
