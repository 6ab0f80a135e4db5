"""``JsonlAuditReader`` against a plain reading of the same log: a real hash-chained audit log of
many blocks, read backwards with byte filters, bisection for cursors and ``until``, and an early
stop at ``since``, must answer every query exactly as filtering every line would."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.audit import reader as R
from broker.audit.jsonl import JsonlAuditLog
from broker.audit.reader import JsonlAuditReader
from broker.ports import AuditQuery

T0 = datetime(2026, 1, 1, tzinfo=UTC)
USERS = ("alice@corp.example.com", "Bob@corp.example.com", "carol@other.example.com")
EVENTS = ("auth.failure", "auth.success", "session.start", "sftp.open", "sftp.close",
          "grant.approved")


class StepClock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> datetime:
        return self.t

    def monotonic(self) -> float:
        return 0.0


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    clock = StepClock()
    audit = JsonlAuditLog(path, clock)
    for i in range(6000):
        clock.t = T0 + timedelta(seconds=37 * i)
        ev = EVENTS[i % len(EVENTS)]
        fields: dict[str, Any] = {"user": USERS[i % 3], "n": i}
        if ev.startswith(("sftp.", "session.")):
            fields["session_id"] = f"s-{i % 7}"
        if ev.startswith("grant."):
            fields["actor"] = USERS[(i + 1) % 3]
            fields["user"] = "dave@corp.example.com"
        if i == 3000:
            fields["blob"] = "x" * (R.MAX_LINE + 10)  # longer than any line the broker writes
        audit.emit(ev, **fields)
    audit.close()
    with open(path, "ab") as f:
        f.write(b'{"seq": damaged\n')  # a torn line at the end is passed over
    return path


def _all(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if len(line) <= R.MAX_LINE:
            out.append(ev)
    return out[::-1]


def _user(value: object, user: str) -> bool:
    if not isinstance(value, str):
        return False
    return value.casefold() == user.casefold() if "@" in user else \
        value.casefold().split("@")[0] == user.casefold()


def _naive(events: list[dict[str, Any]], q: AuditQuery) -> list[dict[str, Any]]:
    def keep(ev: dict[str, Any]) -> bool:
        ts = datetime.fromisoformat(ev["ts"])
        return all((
            q.session_id is None or ev.get("session_id") == q.session_id,
            q.event is None or (ev["event"].startswith(q.event[:-1]) if q.event.endswith("*")
                                else ev["event"] == q.event),
            q.user is None or _user(ev.get("user"), q.user) or _user(ev.get("actor"), q.user),
            q.since is None or ts >= q.since, q.until is None or ts < q.until,
            q.before_seq is None or ev["seq"] < q.before_seq))
    return [ev for ev in events if keep(ev)][:q.limit]


QUERIES = [
    AuditQuery(limit=50),
    AuditQuery(event="auth.failure", limit=30),
    AuditQuery(event="sftp.*", session_id="s-3", limit=1000),
    AuditQuery(user="bob", limit=40),
    AuditQuery(user="ALICE@corp.example.com", event="grant.*", limit=1000),
    AuditQuery(since=T0 + timedelta(hours=40), limit=10_000),
    AuditQuery(since=T0 + timedelta(hours=10), until=T0 + timedelta(hours=11), limit=1000),
    AuditQuery(until=T0 + timedelta(hours=2), event="session.start", limit=5),
    AuditQuery(before_seq=3001, limit=5),
    AuditQuery(before_seq=17, user="carol", limit=100),
    AuditQuery(before_seq=4500, since=T0 + timedelta(hours=30), until=T0 + timedelta(hours=45),
               event="auth.success", limit=1000),
    AuditQuery(session_id="nope", limit=10),
]


@pytest.mark.parametrize("q", QUERIES)
def test_every_query_answers_as_a_full_read_would(log: Path, q: AuditQuery) -> None:
    got = asyncio.run(JsonlAuditReader(log).search(q))
    want = _naive(_all(log), q)
    assert [e["seq"] for e in got] == [e["seq"] for e in want]
    assert got == want


def test_pages_by_seq_cover_the_log_once(log: Path) -> None:
    r = JsonlAuditReader(log)
    seen: list[int] = []
    before = None
    while True:
        page = asyncio.run(r.search(AuditQuery(event="sftp.*", limit=97, before_seq=before)))
        seen += [e["seq"] for e in page]
        if len(page) < 97:
            break
        before = page[-1]["seq"]
    assert seen == [e["seq"] for e in _naive(_all(log), AuditQuery(event="sftp.*",
                                                                    limit=10**6))]


def test_count_and_a_missing_log(log: Path, tmp_path: Path) -> None:
    q = AuditQuery(event="auth.failure", since=T0 + timedelta(hours=24), limit=1)
    assert asyncio.run(JsonlAuditReader(log).count(q)) == len(
        _naive(_all(log), AuditQuery(event="auth.failure", since=q.since, limit=10**6)))
    assert asyncio.run(JsonlAuditReader(tmp_path / "none.jsonl").search(AuditQuery())) == []


def test_since_stops_the_walk(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recent window reads the end of the log, not all of it."""
    parsed = 0
    real = R.json.loads

    def counting(s: Any) -> Any:
        nonlocal parsed
        parsed += 1
        return real(s)

    monkeypatch.setattr(R.json, "loads", counting)
    got = asyncio.run(JsonlAuditReader(log).search(AuditQuery(
        since=T0 + timedelta(seconds=37 * 5900), limit=1000)))
    assert len(got) == 100
    assert parsed < 200
