"""``sessions list|show|files``, ``play``, ``export`` and ``verify`` against real sessions of the
OpenSSH client through the demo broker: every filter of ``sessions list``, times in UTC (``+00:00``
in JSON, ``Z`` in tables), text search with its hits, ``sessions show`` with the grant and the
integrity check, one id-prefix rule for every command (an ambiguous prefix names its
candidates), and ``play`` of an sftp session as its file operations."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Demo
from tests.e2e.test_sftp import _opts
from tests.e2e.test_tunnel_lab import wait_for

pytestmark = pytest.mark.e2e

TABLE_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ")


def _list(demo: Demo, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(demo.cli("sessions", "list", "--json", *args).stdout))


def _mine(demo: Demo, user: str, *args: str) -> list[dict[str, Any]]:
    return _list(demo, "--user", user, *args)


def _ended(demo: Demo, user: str, count: int) -> list[dict[str, Any]]:
    def done() -> bool:
        rows = _mine(demo, user)
        return len(rows) == count and all(r["ended_at"] for r in rows)

    wait_for(done, f"{count} ended sessions of {user}")
    return _mine(demo, user)


def _error(demo: Demo, *args: str) -> str:
    r = demo.cli(*args, check=False)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith("bastion-broker: error: "), r.stderr
    return r.stderr


def test_list_filters_times_and_outcomes(demo: Demo) -> None:
    user = demo.take_user()
    assert demo.ssh(user, "web01", "echo fine").returncode == 0
    assert demo.ssh(user, "web02", "echo broken; exit 3").returncode == 3
    failed, ok = _ended(demo, user, 2)  # newest first
    assert (ok["command"], failed["command"]) == ("echo fine", "echo broken; exit 3")
    for row in (ok, failed):
        assert row["started_at"].endswith("+00:00") and row["ended_at"].endswith("+00:00")
        took = datetime.fromisoformat(row["ended_at"]) - datetime.fromisoformat(row["started_at"])
        assert abs(row["duration_s"] - took.total_seconds()) < 0.002
        assert row["bytes_out"] > 0 and row["bytes_in"] == 0 and row["parent_id"] is None
        assert row["stack"] == "stack-web" and row["target_name"] in ("web01", "web02")
    assert (ok["status"], ok["outcome"]) == ("ok", "exit 0")
    assert (failed["status"], failed["outcome"]) == ("failed", "exit 3")

    def ids(*args: str) -> list[str]:
        return [r["id"] for r in _mine(demo, user, *args)]

    assert ids("--status", "failed") == [failed["id"]]
    assert ids("--status", "ok") == [ok["id"]]
    assert ids("--target", "web02") == [failed["id"]]
    assert ids("--kind", "exec") == [failed["id"], ok["id"]] and ids("--kind", "shell") == []
    assert ids("--stack", "stack-web", "--grant", ok["grant_id"]) == [failed["id"], ok["id"]]
    assert ids("--ticket", "DEMO-1", "--trigger", "incident") == [failed["id"], ok["id"]]
    assert ids("--since", "1h") == [failed["id"], ok["id"]]
    before = datetime.fromisoformat(ok["started_at"]) - timedelta(minutes=2)
    assert ids("--until", before.strftime("%Y-%m-%d %H:%M:%SZ")) == []
    assert ids("--since", before.date().isoformat()) == [failed["id"], ok["id"]]
    assert ids("--limit", "1") == [failed["id"]]

    table = demo.cli("sessions", "list", "--user", user).stdout.splitlines()
    assert table[0].split() == ["ID", "STARTED", "USER", "TARGET", "WHAT", "STATUS", "DURATION",
                                "IN", "OUT"]
    assert [line[:8] for line in table[1:]] == [failed["id"][:8], ok["id"][:8]]
    assert all(TABLE_TIME.search(line) for line in table[1:])
    assert "exit 3" in table[1] and "web02" in table[1]
    one = demo.cli("sessions", "list", "--user", user, "--limit", "1").stdout.splitlines()
    assert len(one) == 3 and one[2].startswith("(the newest 1 connections")


def test_bad_list_options_are_one_line_errors(demo: Demo) -> None:
    cases = [
        (("--since", "soon"), "--since: cannot read 'soon'; give an ISO date or time"),
        (("--until", "2026-13-01"), "--until: cannot read '2026-13-01'"),
        (("--since", "1d", "--until", "2d"), "must be after --since"),
        (("--limit", "0"), "--limit must be between 1 and 10000"),
        (("--search", " "), "--search: give the text to look for"),
    ]
    for args, message in cases:
        err = _error(demo, "sessions", "list", *args)
        assert message in err and err.count("\n") == 1, err
    r = demo.cli("sessions", "list", "--status", "weird", check=False)
    assert r.returncode == 2 and "invalid choice: 'weird'" in r.stderr


def test_search_finds_words_with_their_hits(demo: Demo) -> None:
    user = demo.take_user()
    word = f"zq{uuid.uuid4().hex[:12]}"
    assert demo.ssh(user, "web01", f"echo first {word}-$((6*7)) done").returncode == 0
    [row] = _ended(demo, user, 1)

    def found() -> list[dict[str, Any]]:
        return _list(demo, "--search", word)

    wait_for(found, "the session's text in the index")
    [match] = found()
    assert match["id"] == row["id"]
    outputs = [h for h in match["hits"] if h["source"] == "output"]
    assert outputs and f"{word}-42" in outputs[0]["snippet"]
    assert outputs[0]["at"].endswith("+00:00") and outputs[0]["t"] >= 0
    assert _list(demo, "--search", f"{word} nowhere-else-{uuid.uuid4().hex}") == []

    table = demo.cli("sessions", "list", "--search", word).stdout.splitlines()
    assert table[0].split()[-1] == "VIA"  # a search lists sessions flat
    assert table[1].startswith(row["id"][:8])
    assert any(line.startswith("    +0:") and f"output: first {word}-42 done" in line
               for line in table[2:]), table

    shown = demo.cli("sessions", "show", row["id"][:8], "--search", word).stdout
    assert re.search(rf"hits \(\d+\):\n(  .*\n)*  \+0:\d\d  {TABLE_TIME.pattern}  output: "
                     rf"first {word}-42 done", shown), shown
    doc = json.loads(demo.cli("sessions", "show", row["id"], "--search", word, "--json").stdout)
    assert any(f"{word}-42" in h["snippet"] for h in doc["hits"])


def test_show_tells_everything_about_a_session(demo: Demo) -> None:
    user = demo.take_user()
    assert demo.ssh(user, "web01", "echo shown; exit 4").returncode == 4
    [row] = _ended(demo, user, 1)

    def sealed() -> dict[str, Any] | None:
        doc = json.loads(demo.cli("sessions", "show", row["id"][:10], "--json").stdout)
        return doc if doc["integrity"]["status"] == "ok" else None

    wait_for(sealed, "the recording's seal")
    doc = sealed()
    assert doc is not None
    assert doc["session"] == row
    assert doc["grant"]["id"] == row["grant_id"] and doc["grant"]["ticket"] == "DEMO-1"
    assert doc["grant"]["state"] == "approved" and doc["grant"]["expires_at"].endswith("+00:00")
    assert doc["integrity"]["report"]["checked"]["exit_status"] == "4"
    assert doc["files"] == [] and doc["sessions"] == [] and doc["parent"] is None
    text = demo.cli("sessions", "show", row["id"][:10]).stdout
    assert text.startswith(f"session {row['id']}\n")
    for expected in (f"  user       {row['user']}", "  target     web01 (i-0web01), stack "
                     "stack-web", "  command    echo shown; exit 4", "  status     exit 4 "
                     "(failed)", f"grant {row['grant_id']}: approved, read-only",
                     "ticket DEMO-1, trigger incident", "integrity: OK (signed manifest"):
        assert expected in text, (expected, text)
    assert re.search(rf"  started    {TABLE_TIME.pattern}\n  ended      {TABLE_TIME.pattern} "
                     r"\(\d+\.\ds\)", text), text


def _shared_prefix(ids: list[str]) -> str:
    """The longest prefix that at least two of ``ids`` start with ('' if none)."""
    best = ""
    ordered = sorted(ids)  # the longest shared prefix is shared by neighbours
    for a, b in itertools.pairwise(ordered):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                 min(len(a), len(b)))
        if n > len(best):
            best = a[:n]
    return best


def test_one_id_prefix_rule_for_every_command(demo: Demo) -> None:
    user = demo.take_user()
    assert demo.ssh(user, "web01", "echo prefixed").returncode == 0
    [row] = _ended(demo, user, 1)
    sid = row["id"]
    wait_for(lambda: demo.cli("verify", sid, check=False).returncode == 0, "the seal")

    # a unique prefix is the session, for every command
    assert demo.cli("sessions", "show", sid[:7]).stdout.startswith(f"session {sid}\n")
    assert demo.cli("sessions", "files", sid[:7]).stdout.strip() == "(none)"
    assert "prefixed" in demo.cli("play", sid[:7], "--speed", "100").stdout
    assert "prefixed" in demo.cli("export", sid[:7]).stdout
    assert demo.cli("verify", sid[:7]).stdout.startswith(f"session {sid}: OK")
    assert demo.cli("sessions", "show", sid.upper()[:9]).stdout.startswith(f"session {sid}\n")

    # a prefix two sessions share names them all, for every command
    while not (prefix := _shared_prefix([r["id"] for r in _list(demo, "--all",
                                                                 "--limit", "10000")])):
        other = demo.take_user()
        assert demo.ssh(other, "web01", "true").returncode == 0
    everyone = [r for r in _list(demo, "--all", "--limit", "10000") if r["id"].startswith(prefix)]
    assert len(everyone) >= 2
    for cmd in (("sessions", "show"), ("sessions", "files"), ("play",), ("export",),
                ("verify",)):
        err = _error(demo, *cmd, prefix)
        lines = err.splitlines()
        assert lines[0] == (f"bastion-broker: error: session id {prefix} is ambiguous: it "
                            f"starts {len(everyone)} sessions; give more of it:"), (cmd, err)
        for r in everyone[:10]:
            assert any(line.split()[:3] == [r["id"], r["user"], r["target_name"]]
                       for line in lines[1:]), (cmd, r["id"], err)

    # no session by that id or prefix
    missing = "ffffffff-ffff"
    assert not any(r["id"].startswith(missing) for r in _list(demo, "--all", "--limit", "10000"))
    for cmd in (("sessions", "show"), ("sessions", "files"), ("play",), ("export",)):
        assert _error(demo, *cmd, missing).strip() == f"bastion-broker: error: no session {missing}"
    assert "no recording of session" in _error(demo, "verify", missing)  # nor its files


def test_sftp_session_files_and_play_by_prefix(demo: Demo, tmp_path: Path) -> None:
    """``sessions files`` and ``play`` with an 8-character prefix (``files`` once printed
    "(none)" for a prefix), ``play`` as the file operations, not the SFTP bytes."""
    user = demo.take_user()
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(300_000))
    remote = f"/tmp/bb-cli-{uuid.uuid4().hex[:10]}.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} {remote}\nrename {remote} {remote}.2\nrm {remote}.2\n")
    try:
        r = subprocess.run(["sftp", *_opts(demo), "-P", str(demo.port), "-b", str(batch),
                            f"{user}+web01@127.0.0.1"], capture_output=True, timeout=120,
                           env=demo.env(user))
        assert r.returncode == 0, r.stderr
    finally:
        Path(remote).unlink(missing_ok=True)
        Path(remote + ".2").unlink(missing_ok=True)
    [row] = _ended(demo, user, 1)
    assert row["kind"] == "subsystem"
    prefix = row["id"][:8]

    files = demo.cli("sessions", "files", prefix).stdout.splitlines()
    assert files[0].split() == ["TIME", "OPERATION", "STATUS", "PATH", "TRANSFER", "SIZE",
                                "SHA256"]
    [close] = [x for x in files if " close " in x]
    assert remote in close and "upload" in close and str(300_000) in close
    assert TABLE_TIME.match(close)
    assert any(" rename " in x and f"{remote} -> {remote}.2" in x for x in files)

    played = demo.cli("play", prefix).stdout
    lines = played.splitlines()
    assert lines[0].startswith(f"session {row['id']}: {row['user']} on web01 (i-0web01), "
                               "subsystem sftp;")
    assert re.fullmatch(rf"\+0:\d\d {TABLE_TIME.pattern}  open {remote} \(write\|create\|"
                        r"truncate\)", lines[1]), lines
    assert any(f"close {remote} upload 293.0K sha256 " in x for x in lines)
    assert lines[-1].startswith("+0:") and "totals: opens 1, uploads 1" in lines[-1]
    assert "\x00" not in played and "\\x" not in played  # no SFTP packet bytes

    shown = demo.cli("sessions", "show", prefix).stdout
    assert "file operations (4):" in shown and f"rename ok {remote} -> {remote}.2" in shown
