"""Hash-chained audit lines (domain) and the JsonlAuditLog file appender."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.audit.jsonl import JsonlAuditLog
from broker.domain.audit import GENESIS, ChainProblem, encode_event, line_hash, verify_chain
from broker.errors import AuditError

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


@pytest.fixture
def log(log_path: Path) -> Iterator[JsonlAuditLog]:
    a = JsonlAuditLog(log_path, FakeClock())
    yield a
    a.close()


def write_five(log: JsonlAuditLog) -> None:
    for i in range(5):
        log.emit("test.event", n=i, user="alice")


# --- domain -------------------------------------------------------------------------------------


def test_encode_event_exact_bytes() -> None:
    line = encode_event(3, GENESIS, "auth.success", T0, {"user": "alice", "peer": None, "z": 1})
    assert line == (
        b'{"event":"auth.success","prev":"' + GENESIS.encode() + b'","seq":3,'
        b'"ts":"2025-03-01T12:00:00.000000+00:00","user":"alice","z":1}\n'
    )


def test_encode_event_reserved_fields_cannot_be_overridden() -> None:
    line = encode_event(
        0, "p" * 64, "real", T0, {"seq": 99, "prev": "x", "event": "fake", "ts": "never"}
    )
    obj = json.loads(line)
    assert (obj["seq"], obj["prev"], obj["event"]) == (0, "p" * 64, "real")
    assert obj["ts"] == "2025-03-01T12:00:00.000000+00:00"


def test_line_hash_ignores_trailing_newline() -> None:
    assert line_hash(b"abc\n") == line_hash(b"abc") == hashlib.sha256(b"abc").hexdigest()


def build_chain(n: int) -> list[bytes]:
    out: list[bytes] = []
    prev = GENESIS
    for i in range(n):
        line = encode_event(i, prev, "e", T0, {"n": i})
        out.append(line)
        prev = line_hash(line)
    return out


def test_verify_chain_empty_and_intact() -> None:
    assert verify_chain([]) == []
    assert verify_chain(build_chain(6)) == []


def test_verify_chain_first_line_must_follow_genesis() -> None:
    lines = build_chain(3)
    assert verify_chain(lines[1:]) == [
        ChainProblem(1, "hash chain broken (line edited, removed or moved)"),
    ]


# --- JsonlAuditLog ------------------------------------------------------------------------------


def test_emits_seq_and_prev_chain(log: JsonlAuditLog, log_path: Path) -> None:
    write_five(log)
    lines = lines_of(log_path)
    assert len(lines) == 5
    prev = GENESIS
    for i, raw in enumerate(lines):
        obj = json.loads(raw)
        assert obj == {
            "seq": i,
            "prev": prev,
            "event": "test.event",
            "n": i,
            "user": "alice",
            "ts": (T0 + timedelta(seconds=i + 1)).isoformat(timespec="microseconds"),
        }
        prev = hashlib.sha256(raw.rstrip(b"\n")).hexdigest()
    assert verify_chain(lines) == []
    assert log.path == log_path


def test_file_mode_is_0600(log: JsonlAuditLog, log_path: Path) -> None:
    log.emit("x")
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600


def test_none_fields_are_dropped(log: JsonlAuditLog, log_path: Path) -> None:
    log.emit("auth.failure", user="bob", domain=None)
    obj = json.loads(lines_of(log_path)[0])
    assert "domain" not in obj
    assert obj["user"] == "bob"


def test_detects_edited_line(log: JsonlAuditLog, log_path: Path) -> None:
    write_five(log)
    lines = lines_of(log_path)
    lines[2] = lines[2].replace(b'"user":"alice"', b'"user":"mallory"')
    assert verify_chain(lines) == [
        ChainProblem(4, "hash chain broken (line edited, removed or moved)"),
    ]


def test_detects_removed_line(log: JsonlAuditLog, log_path: Path) -> None:
    write_five(log)
    lines = lines_of(log_path)
    del lines[1]
    assert verify_chain(lines) == [
        ChainProblem(2, "hash chain broken (line edited, removed or moved)"),
        ChainProblem(2, "sequence 2 where 1 was expected"),
    ]


def test_detects_reordered_lines(log: JsonlAuditLog, log_path: Path) -> None:
    write_five(log)
    lines = lines_of(log_path)
    lines[1], lines[2] = lines[2], lines[1]
    problems = verify_chain(lines)
    assert [p.line_no for p in problems if "hash chain" in p.problem] == [2, 3, 4]
    assert ChainProblem(2, "sequence 2 where 1 was expected") in problems


def test_detects_truncated_last_line(log: JsonlAuditLog, log_path: Path) -> None:
    write_five(log)
    data = log_path.read_bytes()
    lines = data[:-10].splitlines(keepends=True)
    assert verify_chain(lines) == [
        ChainProblem(5, "incomplete last line"),
        ChainProblem(5, "not JSON"),
    ]
    # only the newline lost: still reported
    assert verify_chain(data[:-1].splitlines(keepends=True)) == [
        ChainProblem(5, "incomplete last line"),
    ]


def test_reopen_continues_chain(log_path: Path) -> None:
    a = JsonlAuditLog(log_path, FakeClock())
    a.emit("one")
    a.close()
    b = JsonlAuditLog(log_path, FakeClock())
    b.emit("two")
    b.close()
    lines = lines_of(log_path)
    assert [json.loads(x)["seq"] for x in lines] == [0, 1]
    assert verify_chain(lines) == []


def test_two_writers_alternating_keep_one_chain(log_path: Path) -> None:
    a = JsonlAuditLog(log_path, FakeClock())
    b = JsonlAuditLog(log_path, FakeClock())
    try:
        for i in range(6):
            (a if i % 2 == 0 else b).emit("alt", i=i)
        a.emit("a-again")
        a.emit("a-twice")
        b.emit("b-last")
    finally:
        a.close()
        b.close()
    lines = lines_of(log_path)
    assert [json.loads(x)["seq"] for x in lines] == list(range(9))
    assert [json.loads(x)["event"] for x in lines][-3:] == ["a-again", "a-twice", "b-last"]
    assert verify_chain(lines) == []


def test_two_writers_in_two_processes(log_path: Path) -> None:
    a = JsonlAuditLog(log_path, FakeClock())
    a.emit("parent.first")
    pid = os.fork()
    if pid == 0:  # child: its own instance, appending between the parent's events
        try:
            c = JsonlAuditLog(log_path, FakeClock())
            for i in range(20):
                c.emit("child", i=i)
            c.close()
        finally:
            os._exit(0)
    for i in range(20):
        a.emit("parent", i=i)
    _, status = os.waitpid(pid, 0)
    a.close()
    assert status == 0
    lines = lines_of(log_path)
    assert len(lines) == 41
    assert verify_chain(lines) == []


def test_unopenable_path_raises_audit_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AuditError, match="cannot open audit log"):
        JsonlAuditLog(blocker / "audit.jsonl", FakeClock())


def test_long_last_line_over_64k_then_new_writer(log_path: Path) -> None:
    a = JsonlAuditLog(log_path, FakeClock())
    a.emit("session.start", command="x" * 70_000)
    a.close()
    b = JsonlAuditLog(log_path, FakeClock())
    b.emit("after")
    b.close()
    lines = lines_of(log_path)
    assert json.loads(lines[1])["seq"] == 1
    assert verify_chain(lines) == []


def test_torn_last_line_then_new_writer_starts_a_new_line(log_path: Path) -> None:
    a = JsonlAuditLog(log_path, FakeClock())
    write_five(a)
    a.close()
    with open(log_path, "r+b") as f:  # crash mid-write: last line torn
        f.truncate(log_path.stat().st_size - 10)
    b = JsonlAuditLog(log_path, FakeClock())
    b.emit("broker.start")
    b.close()
    lines = lines_of(log_path)
    assert len(lines) == 6
    new = json.loads(lines[5])
    assert new["event"] == "broker.start"
    # the chain continues from the torn line, so only the torn line is reported as damaged
    assert new["prev"] == line_hash(lines[4])
    problems = verify_chain(lines)
    assert ChainProblem(5, "not JSON") in problems
    assert not [p for p in problems if p.line_no == 6 and "hash chain" in p.problem]
