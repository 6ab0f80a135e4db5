"""The session search contract (``SessionQuery``, indexed text, prefix lookup, dashboard counts)
on SQLite and PostgreSQL alike, and the migration of a session index made by the schema before.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from broker.domain.models import Trigger
from broker.ports import SessionQuery, TextSegment
from broker.store.pg_migrations import MIGRATIONS as PG_MIGRATIONS
from broker.store.postgres import PostgresDatabase, PostgresSessionIndex
from broker.store.sqlite import MIGRATIONS, SqliteDatabase, SqliteSessionIndex
from tests.contract.conftest import StoreBundle
from tests.contract.test_store_contract import T0, make_grant, make_session


async def ids(stores: StoreBundle, **kw: object) -> list[str]:
    return [m.record.id for m in await stores.sessions.search(SessionQuery(**kw))]  # type: ignore[arg-type]


async def test_new_fields_round_trip(stores: StoreBundle) -> None:
    s = stores.sessions
    rec = make_session("s1", target="i-0abc", target_name="web-1", stack="shop-prod",
                       parent_id="jump-1", bastion="east-2")
    await s.started(rec)
    assert await s.get("s1") == rec
    await s.started(make_session("s2"))  # defaults
    got = await s.get("s2")
    assert got is not None
    assert (got.target_name, got.stack, got.parent_id, got.bastion) == ("", "", None, "")
    [m] = await s.search(SessionQuery(parent_id="jump-1"))
    assert m.record == rec and m.hits == ()


async def _fill(stores: StoreBundle) -> None:
    """Sessions one minute apart (s00 oldest); what differs is in the keyword arguments."""
    await stores.grants.add(make_grant("g1"))  # ticket INC-1, trigger incident
    await stores.grants.add(make_grant("g2", ticket="CHG-7", trigger=Trigger.DEPLOYMENT))
    await stores.grants.add(make_grant("g3", ticket="INC-1", trigger=Trigger.ALERT))
    end = {"ended_at": T0 + timedelta(hours=1)}
    rows: list[dict[str, object]] = [
        {"user": "alice@corp.example.com", "target": "i-0aaa", "target_name": "Web-1",
         "stack": "shop", "kind": "shell", **end, "exit_status": "0"},
        {"user": "Alice@other.example", "target": "i-0bbb", "target_name": "db-1",
         "stack": "shop", "kind": "exec", "grant_id": "g2", **end, "exit_status": "closed"},
        {"user": "alicex@corp.example.com", "target": "i-0aaa", "target_name": "Web-1",
         "kind": "jump", **end, "exit_status": "1"},
        {"user": "alice", "target": "i-0ccc", "target_name": "", "stack": "billing",
         "grant_id": "g3", "parent_id": "s02", **end, "exit_status": None},
        {"user": "bob@corp.example.com", "target": "I-0AAA", "kind": "subsystem",
         "parent_id": "s02"},
        {"user": "a_b@corp", "target": "web-1", "grant_id": "g2", **end,
         "exit_status": "signal TERM"},
        {"user": "bob@corp.example.com", "target": "i-0ddd", "target_name": "web-10"},
    ]
    for i, kw in enumerate(rows):
        await stores.sessions.started(
            replace(make_session(f"s{i:02d}", started=T0 + timedelta(minutes=i)),
                    **{k: v for k, v in kw.items()  # type: ignore[arg-type]
                       if k not in ("ended_at", "exit_status")}))
        if "ended_at" in kw:
            ended = kw["ended_at"]
            assert isinstance(ended, datetime)
            status = kw["exit_status"]
            await stores.sessions.ended(f"s{i:02d}", ended + timedelta(minutes=i),
                                        status if isinstance(status, str) else None, 1, 2)


async def test_search_filters(stores: StoreBundle) -> None:
    await _fill(stores)
    every = [f"s{i:02d}" for i in range(6, -1, -1)]
    assert await ids(stores) == every  # newest first
    assert await ids(stores, user="alice") == ["s03", "s01", "s00"]  # any domain, ASCII case
    assert await ids(stores, user="ALICE") == ["s01", "s00"]  # the exact match keeps case
    assert await ids(stores, user="alice@corp.example.com") == ["s00"]
    assert await ids(stores, user="Alice@corp.example.com") == []  # exact: case-sensitive
    assert await ids(stores, user="alice@corp") == []  # no prefix match on the domain
    assert await ids(stores, user="a_b") == ["s05"]
    assert await ids(stores, user="a%b") == []
    assert await ids(stores, user="") == every
    # target: instance id or name, exact, ASCII case-insensitive
    assert await ids(stores, target="i-0aaa") == ["s04", "s02", "s00"]
    assert await ids(stores, target="WEB-1") == ["s05", "s02", "s00"]
    assert await ids(stores, target="web") == []
    assert await ids(stores, target="db-1") == ["s01"]
    assert await ids(stores, stack="shop") == ["s01", "s00"]
    assert await ids(stores, stack="Shop") == []
    assert await ids(stores, grant_id="g2") == ["s05", "s01"]
    assert await ids(stores, ticket="INC-1") == ["s06", "s04", "s03", "s02", "s00"]  # g1, g3
    assert await ids(stores, trigger="deployment") == ["s05", "s01"]
    assert await ids(stores, ticket="INC-1", trigger="alert") == ["s03"]
    assert await ids(stores, ticket="nope") == []
    assert await ids(stores, kind="exec") == ["s01"]
    assert await ids(stores, status="live") == ["s06", "s04"]
    assert await ids(stores, status="ok") == ["s01", "s00"]
    assert await ids(stores, status="failed") == ["s05", "s03", "s02"]  # "1", none, a signal
    assert await ids(stores, parent_id="s02") == ["s04", "s03"]
    assert await ids(stores, top_level=True) == ["s06", "s05", "s02", "s01", "s00"]
    assert await ids(stores, user="bob", status="live", target="i-0ddd") == ["s06"]
    assert await ids(stores, user="alice", stack="shop", kind="shell") == ["s00"]
    assert await ids(stores, limit=2) == ["s06", "s05"]
    assert await ids(stores, limit=0) == []
    with pytest.raises(ValueError, match="status"):
        await stores.sessions.search(SessionQuery(status="running"))
    assert await stores.sessions.live_count() == 2


async def test_search_time_range_is_overlap(stores: StoreBundle) -> None:
    """since/until: sessions that were on at some moment of [since, until)."""
    s = stores.sessions
    spans = {"early": (0, 10), "middle": (20, 30), "long": (5, 50), "live": (40, None),
             "late": (60, 70)}
    for sid, (start, end) in spans.items():
        await s.started(make_session(sid, started=T0 + timedelta(minutes=start)))
        if end is not None:
            await s.ended(sid, T0 + timedelta(minutes=end), "0", 0, 0)

    async def between(since: int | None, until: int | None) -> set[str]:
        return set(await ids(
            stores, since=None if since is None else T0 + timedelta(minutes=since),
            until=None if until is None else T0 + timedelta(minutes=until)))

    assert await between(12, 18) == {"long"}
    assert await between(10, 20) == {"early", "long"}  # ended at since: still on then
    assert await between(30, 40) == {"middle", "long"}  # started at until: not yet
    assert await between(55, None) == {"live", "late"}
    assert await between(None, 5) == {"early"}
    assert await between(None, None) == set(spans)
    assert await between(80, 90) == {"live"}


async def test_pages_have_no_duplicates_or_gaps(stores: StoreBundle) -> None:
    """Keyset paging over (started_at, id), with many sessions started at the same moment, and
    sessions started while the pages are read (they never shift the pages)."""
    s = stores.sessions
    expected = []
    kinds = {}
    for i in range(41):
        started = T0 + timedelta(seconds=i // 4)  # runs of four at equal times
        sid = f"p-{(i * 7919) % 1000:03d}"  # ids not in start order within a run
        kinds[sid] = "shell" if i % 3 else "exec"
        await s.started(make_session(sid, started=started, kind=kinds[sid]))
        expected.append((started, sid))
    expected.sort(reverse=True)
    for kind, size in ((None, 1), (None, 4), (None, 7), (None, 41), ("shell", 5), (None, 100)):
        want = [sid for _, sid in expected if kind is None or kinds[sid] == kind]
        got: list[str] = []
        after = None
        for page_no in range(100):
            page = await s.search(SessionQuery(kind=kind, after=after, limit=size))
            if page_no == 1:  # a session started meanwhile, newer than all
                new = f"new-{size}-{kind}"
                await s.started(make_session(new, started=T0 + timedelta(hours=1)))
                kinds[new] = "shell"
                expected = sorted([*expected, (T0 + timedelta(hours=1), new)], reverse=True)
            got += [m.record.id for m in page]
            if len(page) < size:
                break
            last = page[-1].record
            after = (last.started_at, last.id)
        assert got == want


SEGMENTS = [
    TextSegment(0.0, "command", "uptime"),
    TextSegment(12.5, "output", "root@web-1:~# tail -n 3 /var/log/syslog\nDec  7 kernel: "
                                "\x1b[31mOOM killer\x1b[0m invoked for zebraflux"),
    TextSegment(3.25, "input", "sudo systemctl restart nginx.service"),
    TextSegment(30.0, "output", "nginx: [emerg] bind() to 0.0.0.0:80 failed (98: Address "
                                "already in use) zebraflux"),
    TextSegment(31.0, "output", "don't panic: it's \"quoted\" * NEAR(a b) OR -x"),
]


async def test_text_search_words_hits_and_snippets(stores: StoreBundle) -> None:
    s = stores.sessions
    await s.started(make_session("t1", started=T0))
    await s.started(make_session("t2", started=T0 + timedelta(minutes=1), user="bob@corp"))
    await s.started(make_session("t3", started=T0 + timedelta(minutes=2)))
    await s.index_text("t1", SEGMENTS)
    await s.index_text("t2", [TextSegment(1.0, "output", "ZebraFlux in upper case"),
                              TextSegment(2.0, "output", "nothing else here: syslog")])

    async def found(text: str, **kw: object) -> list[str]:
        return await ids(stores, text=text, **kw)

    assert await found("zebraflux") == ["t2", "t1"]  # case-insensitive
    assert await found("zebraflux", user="bob") == ["t2"]
    assert await found("syslog") == ["t2", "t1"]  # a part of a path
    assert await found("/var/log/syslog") == ["t1"]  # the path: its parts as a phrase
    assert await found("log/var") == []  # not in that order
    assert await found("web-1") == ["t1"]
    assert await found("nginx restart") == ["t1"]  # all words, any order, one segment
    assert await found("nginx zebraflux") == ["t1"]  # the 30 s segment has both
    assert await found("uptime zebraflux") == []  # in different segments only
    assert await found("zebra") == []  # words, not substrings
    assert await found("ssh") == []
    assert await found("   ") == ["t3", "t2", "t1"]  # blank: no text filter
    [m] = await s.search(SessionQuery(text="zebraflux", user="alice"))
    assert m.record.id == "t1"
    assert [(h.t, h.source) for h in m.hits] == [(12.5, "output"), (30.0, "output")]
    assert "OOM killer invoked for zebraflux" in m.hits[0].snippet  # escape sequences gone
    assert "\x1b" not in m.hits[0].snippet and "\n" not in m.hits[0].snippet
    [m] = await s.search(SessionQuery(text="restart nginx", user="alice"))
    assert [(h.t, h.source) for h in m.hits] == [(3.25, "input")]
    # without a text, no hits
    assert all(m.hits == () for m in await s.search(SessionQuery()))
    # hits of one session, for the player's markers
    hits = await s.text_hits("t1", "nginx")
    assert [h.t for h in hits] == [3.25, 30.0]
    assert [h.t for h in await s.text_hits("t1", "nginx", limit=1)] == [3.25]
    assert await s.text_hits("t2", "nginx") == []
    assert await s.text_hits("t1", "  ") == []
    assert await s.text_hits("nope", "nginx") == []


@pytest.mark.parametrize("text", ['"', "*", "NEAR(", "OR", "-x", "'", '"quoted', "it's",
                                  "a AND", "(a b)", "NOT x", "^", "x:y", "col:body", "\\",
                                  "'; DROP TABLE sessions; --", "a -- b", "%", "_", "{a b}"])
async def test_text_is_never_query_syntax(stores: StoreBundle, text: str) -> None:
    """What looks like FTS5 or tsquery syntax is plain text: no error, and it finds what its
    letters and digits are (or nothing, for punctuation alone)."""
    s = stores.sessions
    await s.started(make_session("t1"))
    await s.index_text("t1", SEGMENTS)
    got = await ids(stores, text=text)
    hits = await s.text_hits("t1", text)
    if not any(c.isalnum() for c in text):
        assert got == [] and hits == []
    assert await s.get("t1") is not None


async def test_text_syntax_lookalikes_match_as_words(stores: StoreBundle) -> None:
    await stores.sessions.started(make_session("t1"))
    await stores.sessions.index_text("t1", SEGMENTS)
    assert await ids(stores, text="NEAR(a") == ["t1"]  # the words "near" and "a"
    assert await ids(stores, text='"quoted"') == ["t1"]
    assert await ids(stores, text="OR -x") == ["t1"]
    assert await ids(stores, text="don't") == ["t1"]  # the phrase "don t"
    assert await ids(stores, text="NOT panic") == []  # "not" is a word here, and absent
    assert await ids(stores, text="... ---") == []  # punctuation only: nothing, no error


async def test_reindex_replaces_the_text(stores: StoreBundle) -> None:
    s = stores.sessions
    await s.started(make_session("t1"))
    await s.started(make_session("t2", started=T0 + timedelta(seconds=1)))
    await s.index_text("t1", SEGMENTS)
    await s.index_text("t2", [TextSegment(0.0, "output", "zebraflux")])
    await s.index_text("t1", [TextSegment(5.0, "output", "quokka")])
    assert await ids(stores, text="zebraflux") == ["t2"]
    assert await ids(stores, text="quokka") == ["t1"]
    assert [h.t for h in await s.text_hits("t1", "quokka")] == [5.0]
    await s.index_text("t1", [])
    assert await ids(stores, text="quokka") == []
    assert await ids(stores, text="zebraflux") == ["t2"]


async def test_hits_are_capped_and_earliest_first(stores: StoreBundle) -> None:
    s = stores.sessions
    await s.started(make_session("t1"))
    segs = [TextSegment(float(100 - i), "output", f"line {i} marker " + "x " * 200)
            for i in range(30)]
    await s.index_text("t1", segs)
    [m] = await s.search(SessionQuery(text="marker"))
    assert [h.t for h in m.hits] == [float(t) for t in range(71, 91)]
    assert all(len(h.snippet) <= 122 and "marker" in h.snippet for h in m.hits)
    assert len(await s.text_hits("t1", "marker")) == 30


async def test_text_search_with_many_matching_sessions(stores: StoreBundle) -> None:
    """A word in many sessions (the SQLite store then reads sessions newest first and checks
    each in the text index instead of collecting every match)."""
    s = stores.sessions
    for i in range(150):
        sid = f"m{i:03d}"
        await s.started(make_session(sid, started=T0 + timedelta(seconds=i),
                                     user="bob@corp" if i % 2 else "alice@corp"))
        await s.index_text(sid, [TextSegment(float(k), "output", f"common line {k} of {sid}"
                                             + (" rare" if i == 3 else ""))
                                 for k in range(20)])
    got = await ids(stores, text="common", limit=5)
    assert got == ["m149", "m148", "m147", "m146", "m145"]
    got = await ids(stores, text="common", user="alice", after=(T0 + timedelta(seconds=10),
                                                                "m010"), limit=3)
    assert got == ["m008", "m006", "m004"]
    assert await ids(stores, text="common rare") == ["m003"]
    [m] = await s.search(SessionQuery(text="m100"))
    assert [h.t for h in m.hits] == [float(k) for k in range(20)]


async def test_by_prefix(stores: StoreBundle) -> None:
    s = stores.sessions
    for sid in ("abcdef0001", "abcdef0002", "ABCDEF0003", "fedcba9999", "x_y%z\\0001",
                "xay%z\\0002"):
        await s.started(make_session(sid))

    async def pre(prefix: str, limit: int = 10) -> list[str]:
        return [r.id for r in await s.by_prefix(prefix, limit)]

    assert await pre("abcdef") == ["ABCDEF0003", "abcdef0001", "abcdef0002"]  # ambiguous
    assert await pre("ABCDEF000", limit=2) == ["ABCDEF0003", "abcdef0001"]
    assert await pre("abcdef0002") == ["abcdef0002"]
    assert await pre("f") == ["fedcba9999"]  # any length
    assert await pre("abcdef00021") == []
    assert await pre("x_y") == ["x_y%z\\0001"]  # LIKE metacharacters are literal
    assert await pre("x_y%z\\") == ["x_y%z\\0001"]
    assert await pre("x%") == []
    assert await pre("_") == []
    assert len(await pre("", limit=4)) == 4
    # get keeps its rule: a unique prefix of six characters or more
    got = await s.get("fedcba")
    assert got is not None and got.id == "fedcba9999"
    assert await s.get("abcdef") is None


async def test_per_day_and_live_count(stores: StoreBundle) -> None:
    s = stores.sessions
    day = datetime(2025, 3, 1, tzinfo=UTC)
    starts = [day - timedelta(minutes=1), day, day + timedelta(hours=23, minutes=59),
              day + timedelta(days=1, hours=1), day + timedelta(days=3)]
    for i, started in enumerate(starts):
        # given in local times whose dates are not the UTC ones: counted by the UTC day
        await s.started(make_session(f"d{i}", started=started.astimezone(
            timezone(timedelta(hours=-5 if i % 2 else 1)))))
    await s.ended("d0", day + timedelta(minutes=5), "0", 0, 0)
    assert await s.per_day(day) == [("2025-03-01", 2), ("2025-03-02", 1), ("2025-03-04", 1)]
    assert await s.per_day(day - timedelta(days=1)) == [
        ("2025-02-28", 1), ("2025-03-01", 2), ("2025-03-02", 1), ("2025-03-04", 1)]
    assert await s.per_day(day + timedelta(days=9)) == []
    assert await s.live_count() == 4


# --- migration from the schema before --------------------------------------------------------

OLD_SESSION = (
    "INSERT INTO sessions (id, user, target, login, grant_id, level, kind, command, peer,"
    " started_at, ended_at, exit_status, bytes_in, bytes_out, recording)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


async def test_sqlite_migrates_an_existing_session_index(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    conn = sqlite3.connect(path, isolation_level=None)
    old = 7  # the schema before session search (migration 8)
    for script in MIGRATIONS[:old]:
        conn.executescript(script)
    conn.execute(f"PRAGMA user_version = {old}")
    for i in range(3):
        started = (T0 + timedelta(minutes=i)).isoformat(timespec="microseconds")
        conn.execute(OLD_SESSION, (f"old-{i}", "alice@corp", "i-0aaa", "ec2-user", "g1", "admin",
                                   "shell", None, "10.0.0.5:1", started,
                                   started if i else None, "0" if i else None, 1, 2,
                                   f"/rec/old-{i}.rec"))
    conn.close()
    db = SqliteDatabase(path)
    try:
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        s = SqliteSessionIndex(db)
        got = await s.get("old-0")
        assert got is not None
        assert (got.target_name, got.stack, got.parent_id, got.bastion) == ("", "", None, "")
        assert [m.record.id for m in await s.search(SessionQuery(user="alice"))] == [
            "old-2", "old-1", "old-0"]
        assert [m.record.id for m in await s.search(SessionQuery(status="live"))] == ["old-0"]
        await s.index_text("old-1", [TextSegment(1.0, "output", "migrated fine")])
        assert [m.record.id for m in await s.search(SessionQuery(text="migrated"))] == ["old-1"]
        await s.started(make_session("new-1", started=T0 + timedelta(hours=1),
                                     target_name="web-1"))
        assert [m.record.id for m in await s.search(SessionQuery(target="WEB-1"))] == ["new-1"]
    finally:
        db.close()


@pytest.mark.postgres
async def test_postgres_migrates_an_existing_session_index(pg_empty_database: str) -> None:
    old = 4  # the schema before session search (migration 5)
    conn = await asyncpg.connect(pg_empty_database)
    try:
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")
        for n, script in enumerate(PG_MIGRATIONS[:old], start=1):
            await conn.execute(script)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", n)
        for i in range(3):
            started = T0 + timedelta(minutes=i)
            await conn.execute(
                "INSERT INTO sessions (id, user_name, target, login, grant_id, level, kind,"
                " peer, started_at, ended_at, exit_status, recording)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
                f"old-{i}", "alice@corp", "i-0aaa", "ec2-user", "g1", "admin", "shell",
                "10.0.0.5:1", started, started if i else None, "0" if i else None,
                f"/rec/old-{i}.rec")
    finally:
        await conn.close()
    db = await PostgresDatabase.connect(pg_empty_database)
    try:
        assert await db.versions() == list(range(1, len(PG_MIGRATIONS) + 1))
        s = PostgresSessionIndex(db)
        got = await s.get("old-0")
        assert got is not None
        assert (got.target_name, got.stack, got.parent_id, got.bastion) == ("", "", None, "")
        assert [m.record.id for m in await s.search(SessionQuery(user="alice"))] == [
            "old-2", "old-1", "old-0"]
        await s.index_text("old-1", [TextSegment(1.0, "output", "migrated fine")])
        assert [m.record.id for m in await s.search(SessionQuery(text="migrated"))] == ["old-1"]
    finally:
        await db.close()


async def test_large_and_odd_segments_index(stores: StoreBundle) -> None:
    """What PostgreSQL's tsvector cannot hold (a lexeme over 2 KiB, over 256 positions of one
    word, positions past 16383) is left out of its index, not an error; NUL characters too."""
    s = stores.sessions
    await s.started(make_session("t1"))
    long_token = "x" * 3000
    await s.index_text("t1", [
        TextSegment(0.0, "output", f"begin {long_token} end"),
        TextSegment(1.0, "output", "again " * 1000 + "finally"),
        TextSegment(2.0, "output", " ".join(f"w{i}" for i in range(20000)) + " last\x00word"),
        TextSegment(3.0, "output", "ünïcödé Straße ΣΊΣΥΦΟΣ"),
    ])
    assert await ids(stores, text="begin end") == ["t1"]
    assert [h.t for h in await s.text_hits("t1", "again")] == [1.0]
    assert await ids(stores, text="w1 w2 w3") == ["t1"]  # a phrase early in a long segment
    assert await ids(stores, text="ünïcödé") == ["t1"]
    assert await ids(stores, text="straße") == ["t1"]  # lower case matches
    [m] = await s.search(SessionQuery(text="w5"))
    assert m.hits[0].snippet.startswith("w0 w1 w2 w3 w4 w5") and m.hits[0].snippet.endswith("…")
