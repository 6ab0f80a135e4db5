"""Store migrations stay forward-compatible for one version (rolling upgrades, docs/operations.md).

During a rolling upgrade the first new broker migrates the shared store while brokers of the
previous version still serve on it: the previous version must go on reading and writing a schema
one migration ahead of its own. So a migration may add (tables, nullable columns or columns with
a default, indexes), never take away or change what the previous version uses: no DROP, no
RENAME, no change of a column's type or nullability, no NOT NULL column without a DEFAULT (the
previous version's INSERTs do not name it), no new constraint or UNIQUE index on an existing
table (its writes could start failing). Changes of that kind take two releases: stop using it,
then remove it. Each rule is shown to catch a bad example, so the check cannot pass vacuously.
``tests/e2e/test_rolling_upgrade.py`` runs the real previous version on the migrated schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from broker.store import pg_migrations, sqlite

# (backend, version, statement) -> why it is allowed although a rule refuses it
ALLOWED: dict[tuple[str, int, str], str] = {
    ("sqlite", 8, "DROP INDEX sessions_started"):
        "an index, not data: the very next statement creates it again under the same name with "
        "a tie-break column (started_at, id), and no query of any version names an index "
        "(no INDEXED BY); the previous version only loses speed for that instant",
}


@dataclass(frozen=True)
class Problem:
    rule: str
    statement: str


def _statements(script: str) -> list[str]:
    """The script's statements, comments dropped, whitespace collapsed."""
    text = re.sub(r"--[^\n]*", "", script)
    return [re.sub(r"\s+", " ", s).strip() for s in text.split(";") if s.strip()]


def _created_tables(statements: list[str]) -> set[str]:
    found = set()
    for s in statements:
        m = re.match(r"(?i)CREATE (?:VIRTUAL )?TABLE (?:IF NOT EXISTS )?(\w+)", s)
        if m:
            found.add(m.group(1).lower())
    return found


_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("drop", re.compile(r"(?i)\bDROP\b")),  # DROP TABLE/INDEX/VIEW, ALTER TABLE .. DROP COLUMN
    ("rename", re.compile(r"(?i)\bRENAME\b")),
    ("alter column", re.compile(r"(?i)\bALTER\s+TABLE\b.*\bALTER\b")),  # TYPE, SET NOT NULL
    ("truncate", re.compile(r"(?i)\bTRUNCATE\b")),
    ("new constraint", re.compile(
        r"(?i)\bALTER\s+TABLE\b.*\bADD\s+(CONSTRAINT|PRIMARY\s+KEY|UNIQUE|CHECK|FOREIGN\s+KEY)\b")),
]
_ADD_COLUMN = re.compile(r"(?i)\bALTER\s+TABLE\s+\w+\s+ADD\s+(?:COLUMN\s+)?(?!CONSTRAINT\b)(.*)")
_UNIQUE_INDEX = re.compile(r"(?i)\bCREATE\s+UNIQUE\s+INDEX\b.*?\bON\s+(\w+)")


def problems(script: str) -> list[Problem]:
    """What in ``script`` a broker of the previous version could not live with."""
    statements = _statements(script)
    new_tables = _created_tables(statements)
    found = []
    for s in statements:
        for rule, pattern in _RULES:
            if pattern.search(s):
                found.append(Problem(rule, s))
        add = _ADD_COLUMN.search(s)
        if add and re.search(r"(?i)\bNOT\s+NULL\b", add.group(1)) and not re.search(
                r"(?i)\bDEFAULT\b", add.group(1)):
            found.append(Problem("NOT NULL column without DEFAULT", s))
        if re.search(r"(?i)\bADD\s+(?:COLUMN\s+)?\w+\s+.*\b(UNIQUE|REFERENCES|CHECK)\b", s) and add:
            found.append(Problem("new constraint", s))
        unique = _UNIQUE_INDEX.search(s)
        if unique and unique.group(1).lower() not in new_tables:
            found.append(Problem("UNIQUE index on an existing table", s))
    return found


MIGRATIONS = [("sqlite", n, script) for n, script in enumerate(sqlite.MIGRATIONS, 1)] + [
    ("postgres", n, script) for n, script in enumerate(pg_migrations.MIGRATIONS, 1)]


@pytest.mark.parametrize(("backend", "version", "script"), MIGRATIONS,
                         ids=[f"{b}-{n}" for b, n, _ in MIGRATIONS])
def test_every_migration_is_one_an_older_broker_can_live_with(
    backend: str, version: int, script: str
) -> None:
    refused = [p for p in problems(script) if (backend, version, p.statement) not in ALLOWED]
    assert not refused, (
        f"{backend} migration {version} is not forward-compatible (a broker of the previous "
        "version still runs on the migrated store during a rolling upgrade; docs/operations.md "
        "'Rolling upgrade'): " + "; ".join(f"{p.rule}: {p.statement}" for p in refused))


def test_each_allowed_exception_is_still_there_and_still_needed() -> None:
    """An allowlist entry names a statement a rule refuses, in the migration it names."""
    scripts = {(b, n): s for b, n, s in MIGRATIONS}
    for (backend, version, statement), why in ALLOWED.items():
        assert why
        assert statement in [p.statement for p in problems(scripts[backend, version])]


@pytest.mark.parametrize(("script", "rule"), [
    ("DROP TABLE grants;", "drop"),
    ("DROP INDEX IF EXISTS sessions_user;", "drop"),
    ("ALTER TABLE sessions DROP COLUMN peer;", "drop"),
    ("ALTER TABLE sessions DROP peer;", "drop"),
    ("ALTER TABLE sessions RENAME TO sessions_old;", "rename"),
    ("ALTER TABLE sessions RENAME COLUMN peer TO source;", "rename"),
    ("ALTER TABLE sessions ALTER COLUMN bytes_in TYPE numeric;", "alter column"),
    ("ALTER TABLE sessions ALTER COLUMN command SET NOT NULL;", "alter column"),
    ("alter table sessions\n  alter peer set data type inet;", "alter column"),
    ("ALTER TABLE sessions ADD COLUMN host text NOT NULL;", "NOT NULL column without DEFAULT"),
    ("ALTER TABLE sessions ADD host TEXT NOT NULL -- no default\n;",
     "NOT NULL column without DEFAULT"),
    ("ALTER TABLE sessions ADD CONSTRAINT peer_ok CHECK (peer <> '');", "new constraint"),
    ("ALTER TABLE sessions ADD COLUMN ticket text UNIQUE;", "new constraint"),
    ("ALTER TABLE grants ADD COLUMN parent text REFERENCES grants (id);", "new constraint"),
    ("CREATE UNIQUE INDEX sessions_peer ON sessions (peer);", "UNIQUE index on an existing table"),
    ("TRUNCATE notify_outbox;", "truncate"),
    # the SQLite way of changing a column: copy, drop, rename
    ("CREATE TABLE s2 (id TEXT PRIMARY KEY); INSERT INTO s2 SELECT id FROM sessions;\n"
     "DROP TABLE sessions; ALTER TABLE s2 RENAME TO sessions;", "drop"),
])
def test_the_detector_refuses_what_an_older_broker_cannot_live_with(script: str,
                                                                    rule: str) -> None:
    assert rule in [p.rule for p in problems(script)]


@pytest.mark.parametrize("script", [
    "ALTER TABLE sessions ADD COLUMN host TEXT NOT NULL DEFAULT '';",
    "ALTER TABLE sessions ADD COLUMN parent_id text;",
    "ALTER TABLE locks ADD COLUMN expiry_noted_at timestamptz;",
    "CREATE TABLE t (id text PRIMARY KEY, n integer NOT NULL); CREATE UNIQUE INDEX t_n ON t (n);",
    "CREATE INDEX sessions_host ON sessions (host, started_at);",
    "-- DROP TABLE sessions would be refused, but this is a comment\nCREATE INDEX x ON y (z);",
    "UPDATE sessions SET stack = '' WHERE stack IS NULL;",
])
def test_the_detector_lets_additions_through(script: str) -> None:
    assert problems(script) == []
