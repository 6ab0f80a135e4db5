"""FleetWatch on a real SQLite store with an injected clock: a bastion silent for
``lost_after`` has its open sessions closed as lost, once, audited by the closer; a failed audit
line opens the row again for the next round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.audit.jsonl import JsonlAuditLog
from broker.domain.outcome import LOST
from broker.errors import AuditError
from broker.services.fleet import FleetWatch
from broker.store.sqlite import SqliteDatabase, SqliteSessionIndex
from broker.store.sqlite_fleet import SqliteFleetStore
from tests.contract.test_store_contract import make_session
from tests.unit.test_notify_dispatch import Clock


class FailingAudit:
    """An audit sink whose disk is full."""

    def emit(self, event: str, **fields: Any) -> None:
        raise AuditError("audit log: No space left on device")


def watch(db: SqliteDatabase, audit: Any, clock: Clock, name: str) -> FleetWatch:
    return FleetWatch(SqliteFleetStore(db), audit, clock, name, heartbeat=lambda: 10,
                      lost_after=lambda: 120)


def ends(path: Path) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, path.read_text().splitlines())
            if e["event"] == "session.end"]


async def test_a_silent_bastions_sessions_are_closed_once(tmp_path: Path) -> None:
    db, clock = SqliteDatabase(tmp_path / "broker.db"), Clock()
    index = SqliteSessionIndex(db)
    audits = {n: JsonlAuditLog(tmp_path / f"{n}.jsonl", clock) for n in "abc"}
    a, b, c = (watch(db, audits[n], clock, n) for n in "abc")
    try:
        started = clock.now()
        for w in (a, b, c):
            assert await w.tick() == 0
        await index.started(make_session("s-b", started=started, bastion="b"))
        await index.started(make_session("s-a", started=started, bastion="a"))
        clock.advance(60)
        assert await a.tick() == 0 and await c.tick() == 0  # b is late, not lost
        clock.advance(61)  # b last beat 121 s ago
        assert await a.tick() == 1
        assert await c.tick() == 0  # a closed it first: c audits nothing
        rec = await index.get("s-b")
        assert rec is not None and rec.exit_status == LOST and rec.ended_at == started
        [end] = ends(tmp_path / "a.jsonl")
        assert (end["session_id"], end["reason"], end["bastion"], end["closed_by"],
                end["synthesized"]) == ("s-b", "bastion lost", "b", "a", True)
        assert not (tmp_path / "c.jsonl").exists() or ends(tmp_path / "c.jsonl") == []
        live = await index.get("s-a")
        assert live is not None and live.ended_at is None  # a beats: its own stay open
    finally:
        for log in audits.values():
            log.close()
        db.close()


async def test_a_failed_audit_line_reopens_the_row(tmp_path: Path) -> None:
    db, clock = SqliteDatabase(tmp_path / "broker.db"), Clock()
    index = SqliteSessionIndex(db)
    good = JsonlAuditLog(tmp_path / "a.jsonl", clock)
    try:
        await watch(db, good, clock, "b").tick()
        await index.started(make_session("s-b", started=clock.now(), bastion="b"))
        clock.advance(300)
        with pytest.raises(AuditError):
            await watch(db, FailingAudit(), clock, "a").tick()
        rec = await index.get("s-b")
        assert rec is not None and rec.ended_at is None  # not closed without its audit line
        assert await watch(db, good, clock, "a").tick() == 1
        assert [e["session_id"] for e in ends(tmp_path / "a.jsonl")] == ["s-b"]
    finally:
        good.close()
        db.close()


def test_lost_after_must_span_three_heartbeats(tmp_path: Path) -> None:
    from broker.config import load_config
    from broker.errors import ConfigError

    cfg = tmp_path / "broker.toml"
    cfg.write_text('state_dir = "s"\n[fleet]\nheartbeat_seconds = 10\nlost_after_seconds = 25\n')
    with pytest.raises(ConfigError, match=r"lost_after_seconds \(25\) must be at least 3 "
                                          r"heartbeats \(30\)"):
        load_config(cfg)
