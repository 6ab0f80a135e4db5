"""Signed audit checkpoints and ``verify --audit``: each kind of damage is named, with its line."""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from broker.audit.checkpoint import CHECKPOINT
from broker.audit.jsonl import JsonlAuditLog
from broker.domain.audit import encode_event, line_hash
from broker.integrity.keys import SigningKey, load_or_create_signing_key
from broker.integrity.verify import Report, verify_audit, verify_audit_lines
from tests.unit.test_audit_chain import FakeClock


class Mono:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return load_or_create_signing_key(tmp_path / "key")


@pytest.fixture
def other_key(tmp_path: Path) -> SigningKey:
    return load_or_create_signing_key(tmp_path / "other")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


def open_log(path: Path, key: SigningKey, mono: Mono | None = None,
             lines: int = 4, seconds: float = 30.0) -> JsonlAuditLog:
    return JsonlAuditLog(path, FakeClock(), signer=key, checkpoint_lines=lines,
                         checkpoint_seconds=seconds, monotonic=mono or Mono())


@pytest.fixture
def written(path: Path, key: SigningKey) -> Path:
    """10 events, checkpoints after every 4 (lines 5 and 10) and at close (line 13)."""
    log = open_log(path, key)
    for i in range(10):
        log.emit("test.event", n=i)
    log.close()
    return path


def events(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def check(path: Path, key: SigningKey) -> Report:
    return verify_audit(path, key.public)


def codes(report: Report) -> list[tuple[str, object]]:
    return [(f.code, f.where.get("line", f.where.get("lines"))) for f in report.findings]


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# -- writing checkpoints -------------------------------------------------------------------------
def test_checkpoints_every_n_lines_and_at_close(written: Path, key: SigningKey) -> None:
    ev = events(written)
    assert [e["event"] for e in ev].count(CHECKPOINT) == 3
    assert [i + 1 for i, e in enumerate(ev) if e["event"] == CHECKPOINT] == [5, 10, 13]
    cp = ev[4]
    assert cp["covers_seq"] == 3 and cp["key_id"] == key.key_id and cp["seq"] == 4
    assert cp["prev"] == line_hash(lines_of(written)[3])
    r = check(written, key)
    assert r.ok and r.findings == []
    assert r.checked["checkpoints"] == 3 and r.checked["signed_through_line"] == 13


def test_checkpoint_after_time_passes_and_periodic_call(path: Path, key: SigningKey) -> None:
    mono = Mono()
    log = open_log(path, key, mono, lines=1000, seconds=30)
    log.emit("a")
    log.checkpoint_if_due()  # not due yet
    assert [e["event"] for e in events(path)] == ["a"]
    mono.t += 31
    log.checkpoint_if_due()  # an event has waited 31 s: signed now
    assert [e["event"] for e in events(path)] == ["a", CHECKPOINT]
    log.checkpoint_if_due()  # nothing new: no empty checkpoint
    log.emit("b")
    mono.t += 31
    log.emit("c")  # the first event after the interval is signed at once
    assert [e["event"] for e in events(path)] == ["a", CHECKPOINT, "b", "c", CHECKPOINT]
    log.close()  # nothing unsigned: no extra checkpoint
    assert len(events(path)) == 5
    assert check(path, key).findings == []


def test_periodic_call_signs_what_other_processes_left_unsigned(path: Path,
                                                                key: SigningKey) -> None:
    mono = Mono()
    broker = open_log(path, key, mono, lines=1000, seconds=30)
    broker.emit("broker.start")
    broker.checkpoint()
    cli = JsonlAuditLog(path, FakeClock())  # a process that exits without signing
    cli.emit("grant.approved")
    cli.close()
    broker.checkpoint_if_due()
    assert events(path)[-1]["event"] == "grant.approved"  # not yet: 30 s not passed
    mono.t += 31
    broker.checkpoint_if_due()
    assert [e["event"] for e in events(path)] == [
        "broker.start", CHECKPOINT, "grant.approved", CHECKPOINT]
    mono.t += 31
    broker.checkpoint_if_due()  # nothing new since: no second checkpoint
    broker.close()
    assert len(events(path)) == 4
    assert check(path, key).findings == []


def test_a_signed_process_that_exits_without_close_signs_at_exit(tmp_path: Path,
                                                                 key: SigningKey) -> None:
    import subprocess
    import sys

    log = tmp_path / "audit.jsonl"
    code = ("from pathlib import Path\n"
            "from broker.audit.jsonl import JsonlAuditLog\n"
            "from broker.integrity.keys import load_or_create_signing_key\n"
            "from broker.services.clock import SystemClock\n"
            f"k = load_or_create_signing_key(Path({str(tmp_path / 'key')!r}))\n"
            f"JsonlAuditLog(Path({str(log)!r}), SystemClock(), signer=k).emit('cli.event')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert [e["event"] for e in events(log)] == ["cli.event", CHECKPOINT]
    assert check(log, key).findings == []


def test_no_signer_writes_no_checkpoints(path: Path) -> None:
    log = JsonlAuditLog(path, FakeClock())
    log.emit("a")
    log.checkpoint()
    log.close()
    assert [e["event"] for e in events(path)] == ["a"]


def test_two_writers_keep_one_chain_with_checkpoints(path: Path, key: SigningKey) -> None:
    a, b = open_log(path, key, lines=3), open_log(path, key, lines=3)
    for i in range(6):
        (a if i % 2 else b).emit("e", n=i)
    a.close()
    b.close()
    assert check(path, key).findings == []


# -- verify: corruption cases --------------------------------------------------------------------
def test_flipped_byte_in_a_line(written: Path, key: SigningKey) -> None:
    lines = lines_of(written)
    lines[2] = lines[2].replace(b'"n":2', b'"n":3')
    rewrite(written, lines)
    r = check(written, key)
    assert codes(r) == [("audit_line_modified", 3)]
    assert "line 3 (seq 2) was modified" in r.findings[0].message


def test_flipped_byte_that_breaks_json(written: Path, key: SigningKey) -> None:
    lines = lines_of(written)
    lines[6] = lines[6].replace(b"{", b"[", 1)
    rewrite(written, lines)
    assert codes(check(written, key)) == [("audit_line_damaged", 7)]


def test_flipped_byte_in_a_checkpoint(written: Path, key: SigningKey) -> None:
    lines = lines_of(written)
    lines[12] = lines[12].replace(b"2025", b"2026", 1)  # the closing checkpoint's timestamp
    rewrite(written, lines)
    r = check(written, key)  # the lines are old: the unsigned tail is an error too
    assert codes(r) == [("checkpoint_bad_signature", 13), ("unsigned_tail_stale", [11, 13])]
    assert [f.severity for f in r.findings] == ["error", "error"]


def test_truncated_mid_line(written: Path, key: SigningKey) -> None:
    data = written.read_bytes()
    written.write_bytes(data[:-40])
    r = check(written, key)
    assert ("audit_truncated", 13) in codes(r)
    assert not r.ok


def test_truncated_newline_only(written: Path, key: SigningKey) -> None:
    written.write_bytes(written.read_bytes()[:-1])
    assert codes(check(written, key)) == [("audit_truncated", 13)]


def test_truncated_at_a_line_boundary_leaves_an_old_unsigned_tail(written: Path,
                                                                  key: SigningKey) -> None:
    rewrite(written, lines_of(written)[:8])  # the last checkpoints cut off
    r = check(written, key)
    assert not r.ok
    assert codes(r) == [("unsigned_tail_stale", [6, 8])]
    (f,) = r.findings
    assert f.where["events"] == 3 and f.where["age_seconds"] > 60
    assert "3 events (lines 6-8)" in f.message


def test_a_young_unsigned_tail_is_a_warning_an_old_one_an_error(written: Path,
                                                                key: SigningKey) -> None:
    lines = lines_of(written)[:8]
    rewrite(written, lines)
    oldest = datetime.fromisoformat(json.loads(lines[5])["ts"])
    young = verify_audit(written, key.public, now=oldest + timedelta(seconds=20))
    assert young.ok and codes(young) == [("unsigned_tail", [6, 8])]
    assert young.findings[0].where == {"lines": [6, 8], "events": 3, "age_seconds": 20.0}
    old = verify_audit(written, key.public, now=oldest + timedelta(seconds=61))
    assert not old.ok and codes(old) == [("unsigned_tail_stale", [6, 8])]


def test_a_running_writer_records_a_cut_of_its_unsigned_tail(path: Path,
                                                             key: SigningKey) -> None:
    mono = Mono()
    log = open_log(path, key, mono, lines=1000)
    for i in range(3):
        log.emit("e", n=i)
    log.checkpoint()
    for i in range(3):
        log.emit("f", n=i)  # seq 4-6, not signed yet
    cut_to = lines_of(path)[:5]
    rewrite(path, cut_to)  # someone removes them before the next checkpoint
    mono.t += 31
    log.checkpoint_if_due()  # the broker's timer finds the file shorter than it left it
    ev = events(path)
    assert [e["event"] for e in ev][5:] == ["audit.cut", CHECKPOINT]
    assert ev[5]["expected_seq"] == 7 and ev[5]["found_seq"] == 5 and ev[5]["seq"] == 5
    log.emit("g")
    log.close()
    r = check(path, key)
    assert codes(r) == [("audit_tail_cut", 6)]
    assert "seq 7 was next" in r.findings[0].message


def test_a_cut_found_by_the_next_event_is_recorded_before_it(path: Path,
                                                             key: SigningKey) -> None:
    log = open_log(path, key, lines=1000)
    log.emit("e")
    log.checkpoint()
    log.emit("f")
    rewrite(path, lines_of(path)[:2])
    log.emit("g")
    log.close()
    assert [e["event"] for e in events(path)] == ["e", CHECKPOINT, "audit.cut", "g", CHECKPOINT]
    assert codes(check(path, key)) == [("audit_tail_cut", 3)]


def test_removed_line(written: Path, key: SigningKey) -> None:
    lines = lines_of(written)
    del lines[2]
    rewrite(written, lines)
    r = check(written, key)
    assert codes(r) == [("audit_line_removed", 3)]
    assert "seq 2 missing between line 2 and line 3 (1 line removed)" in r.findings[0].message


def test_removed_lines_at_the_start(written: Path, key: SigningKey) -> None:
    rewrite(written, lines_of(written)[2:])
    r = check(written, key)
    assert codes(r) == [("audit_line_removed", 1)]
    assert "seq 0-1 missing before line 1" in r.findings[0].message


def test_reordered_lines(written: Path, key: SigningKey) -> None:
    lines = lines_of(written)
    lines[5], lines[6] = lines[6], lines[5]
    rewrite(written, lines)
    r = check(written, key)
    assert codes(r) == [("audit_line_moved", 7)]
    assert "line 7 (seq 5) is out of order: it comes after seq 6" in r.findings[0].message


def test_duplicated_line(written: Path, key: SigningKey) -> None:
    lines = lines_of(written)
    lines.insert(3, lines[2])
    rewrite(written, lines)
    assert codes(check(written, key)) == [("audit_line_duplicated", 4)]


def test_rewritten_chain_is_caught_by_the_next_checkpoint(written: Path, key: SigningKey) -> None:
    """Remove a line and recompute every hash and seq after it: only the signature can tell."""
    old = [json.loads(x) for x in lines_of(written)]
    del old[1]
    prev, out = "0" * 64, []
    for seq, obj in enumerate(old):
        fields = {k: v for k, v in obj.items() if k not in ("seq", "prev", "ts", "event")}
        line = encode_event(seq, prev, str(obj["event"]), datetime.fromisoformat(str(obj["ts"])),
                            fields)
        out.append(line)
        prev = line_hash(line)
    rewrite(written, out)
    r = check(written, key)
    assert codes(r) == [("checkpoint_bad_signature", 4), ("checkpoint_bad_signature", 9),
                        ("checkpoint_bad_signature", 12), ("no_valid_checkpoint", None)]


def test_checkpoint_without_signature(written: Path, key: SigningKey) -> None:
    lines = lines_of(written)
    obj = json.loads(lines[4])
    del obj["sig"]
    lines[4] = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    rewrite(written, lines)
    r = check(written, key)
    # the line changed, so line 6 also records another hash for it
    assert codes(r) == [("checkpoint_unsigned", 5), ("audit_line_modified", 5)]


def test_checkpoint_signed_by_another_key(written: Path, key: SigningKey,
                                          other_key: SigningKey) -> None:
    r = verify_audit(written, other_key.public)
    assert codes(r) == [("checkpoint_wrong_key", n) for n in (5, 10, 13)] + [
        ("no_valid_checkpoint", None)]
    assert other_key.key_id in r.findings[0].message


def test_forged_signature_under_our_key_id(written: Path, key: SigningKey,
                                           other_key: SigningKey) -> None:
    lines = lines_of(written)
    obj = json.loads(lines[12])
    obj["sig"] = base64.b64encode(other_key.sign(b"x")).decode()
    lines[12] = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    rewrite(written, lines)
    assert codes(check(written, key))[0] == ("checkpoint_bad_signature", 13)


def test_log_without_any_checkpoint(path: Path, key: SigningKey) -> None:
    log = JsonlAuditLog(path, FakeClock())
    log.emit("a")
    log.close()
    assert codes(check(path, key)) == [("no_valid_checkpoint", None)]


def test_empty_log_is_ok(key: SigningKey) -> None:
    r = Report("x")
    verify_audit_lines([], key.public, r)
    assert r.ok and r.findings == []


def test_a_line_torn_by_a_crash_is_the_only_finding(path: Path, key: SigningKey) -> None:
    log = open_log(path, key, lines=1000)
    for i in range(3):
        log.emit("e", n=i)
    log.checkpoint()
    log.emit("half written")
    log._fd, fd = -1, log._fd  # the process dies here: no close, no checkpoint
    os.close(fd)
    with open(path, "r+b") as f:  # power loss mid-write: the last line torn
        f.truncate(path.stat().st_size - 10)
    again = open_log(path, key, lines=1000)  # the next start appends on
    again.emit("broker.start")
    again.close()
    ev = path.read_bytes().splitlines()
    assert json.loads(ev[5])["seq"] == 5  # counted on, as if the torn line kept seq 4
    r = check(path, key)
    assert codes(r) == [("audit_line_damaged", 5)]


def test_damaged_lines_at_the_start(written: Path, key: SigningKey) -> None:
    lines = lines_of(written)
    lines[0] = b"garbage\n"
    rewrite(written, lines)
    assert codes(check(written, key))[0] == ("audit_line_damaged", 1)
    assert "audit_line_removed" not in [c for c, _ in codes(check(written, key))]
