"""What ``sessions list`` reads from its options (times, ages, filters) and how the session
commands show times, durations, sizes, outcomes and an ambiguous id: pure functions."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from broker.cli import resolve, when
from broker.cli.parser import build_parser
from broker.cli.sessions import build_query, flat_listing, render, session_json
from broker.config import load_config
from broker.domain.outcome import CLOSED, status_of
from broker.errors import NotFoundError, UsageError
from broker.play import connection_summary, file_timeline
from broker.ports import SessionMatch, SessionRecord, TextHit

NOW = datetime(2026, 12, 7, 14, 30, 5, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("2h", NOW - timedelta(hours=2)),
    ("90m", NOW - timedelta(minutes=90)),
    ("1d", NOW - timedelta(days=1)),
    ("2W", NOW - timedelta(weeks=2)),
    ("45s", NOW - timedelta(seconds=45)),
    ("now", NOW),
    ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
    ("2026-12-01T08:15", datetime(2026, 12, 1, 8, 15, tzinfo=UTC)),  # no zone: UTC
    ("2026-12-01 08:15:30Z", datetime(2026, 12, 1, 8, 15, 30, tzinfo=UTC)),
    ("2026-12-01T09:15:30+01:00", datetime(2026, 12, 1, 8, 15, 30, tzinfo=UTC)),
    (" 2026-12-01T08:15:30.250000+00:00 ", datetime(2026, 12, 1, 8, 15, 30, 250000, tzinfo=UTC)),
])
def test_when_accepts_iso_and_ages(text: str, expected: datetime) -> None:
    got = when.parse_when("--since", text, NOW)
    assert got == expected and got.tzinfo is not None and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["", "yesterday", "2h ago", "-2h", "2x", "2026-13-01",
                                  "2026-12-01T25:00", "1234567d", "12/01/2026",
                                  "999999w"])
def test_when_refuses_anything_else_with_the_forms_it_takes(text: str) -> None:
    with pytest.raises(UsageError) as err:
        when.parse_when("--until", text, NOW)
    msg = err.value.user_message
    assert msg.startswith("--until: ")
    assert ("ISO date or time" in msg and "2h" in msg) or "before year 1" in msg


def test_times_are_utc_in_json_and_with_z_in_tables() -> None:
    paris = timezone(timedelta(hours=1))
    t = datetime(2026, 12, 7, 15, 30, 5, 120000, tzinfo=paris)
    assert when.iso(t) == "2026-12-07T14:30:05.120000+00:00"
    assert when.show(t) == "2026-12-07 14:30:05Z"
    naive = datetime(2026, 12, 7, 14, 30, 5)  # noqa: DTZ001 - an older row: taken as UTC
    assert when.show(naive) == "2026-12-07 14:30:05Z"
    assert when.iso(None) is None and when.show(None) == ""


def test_durations_offsets_sizes() -> None:
    assert [when.duration(s) for s in (0.04, 9.94, 12, 185, 7380, 93600)] == [
        "0.0s", "9.9s", "12s", "3m05s", "2h03m", "1d02h"]
    assert [when.offset(s) for s in (0.4, 7, 750, 3723)] == ["+0:00", "+0:07", "+12:30",
                                                              "+1:02:03"]
    assert [when.size(n) for n in (0, 1023, 1536, 3 * 1024 ** 2, 5 * 1024 ** 5)] == [
        "0", "1023", "1.5K", "3.0M", "5120.0T"]


def test_status_classes() -> None:
    assert status_of("0") == "ok" and status_of(CLOSED) == "ok"
    assert status_of("1") == "failed" and status_of("signal:KILL") == "failed"
    assert status_of("terminated:grant revoked") == "failed" and status_of(None) == "failed"
    assert status_of(None, ended=False) == "live"


def _config(tmp_path: Path) -> argparse.Namespace:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[identity]\ndefault_domain = "corp.example.com"\n'
                   'domain_aliases = { CORP = "corp.example.com" }\n')
    return argparse.Namespace(config=str(cfg))


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["sessions", "list", *argv])


def test_options_become_one_query(tmp_path: Path) -> None:
    config = load_config(Path(_config(tmp_path).config))
    q = build_query(_args("--user", "Alice", "--target", "web01", "--stack", "stack-web",
                          "--grant", "g-1", "--ticket", "INC-4711", "--trigger", "incident",
                          "--kind", "exec", "--status", "failed", "--since", "1d",
                          "--until", "2026-12-07", "--search", "  rm   -rf ", "--limit", "7"),
                    config, NOW)
    assert (q.user, q.target, q.stack, q.grant_id, q.ticket, q.trigger, q.kind, q.status) == (
        "alice", "web01", "stack-web", "g-1", "INC-4711", "incident", "exec", "failed")
    assert q.since == NOW - timedelta(days=1) and q.until == datetime(2026, 12, 7, tzinfo=UTC)
    assert q.text == "rm -rf" and q.limit == 7 and not q.top_level and q.parent_id is None
    assert build_query(_args("--user", "CORP\\Bob"), config, NOW).user == "bob@corp.example.com"
    assert flat_listing(q, all_sessions=False)  # kind/status/text pick sessions: flat
    plain = build_query(_args("--user", "alice"), config, NOW)
    assert not flat_listing(plain, all_sessions=False) and flat_listing(plain, True)


@pytest.mark.parametrize(("argv", "message"), [
    (("--since", "1d", "--until", "2d"), "--until (2026-12-05 14:30:05Z) must be after --since"),
    (("--since", "soon"), "--since: cannot read 'soon'"),
    (("--limit", "0"), "--limit must be between 1 and"),
    (("--search", "   "), "--search: give the text"),
    (("--user", " "), "--user: empty"),
])
def test_bad_options_are_one_clear_error(tmp_path: Path, argv: tuple[str, ...],
                                         message: str) -> None:
    config = load_config(Path(_config(tmp_path).config))
    with pytest.raises(UsageError) as err:
        build_query(_args(*argv), config, NOW)
    assert message in err.value.user_message


def _rec(sid: str, **kw: object) -> SessionRecord:
    base: dict[str, object] = dict(
        id=sid, user="alice@corp.example.com", target="i-0web01", login="bb-readonly",
        grant_id="g-1", level="read-only", kind="exec", command="uname -a", peer="10.0.0.1:5",
        started_at=NOW, ended_at=NOW + timedelta(seconds=3), exit_status="0", bytes_in=10,
        bytes_out=2048, recording="2026-12-07/x.rec", target_name="web01", stack="stack-web")
    base.update(kw)
    return SessionRecord(**base)  # type: ignore[arg-type]


def test_ambiguous_prefix_names_every_candidate() -> None:
    rows = [_rec("7ce830fe-0000-4000-8000-000000000001"),
            _rec("7ce830fe-0000-4000-8000-000000000002", user="bob@corp.example.com",
                 target_name="web02", started_at=NOW - timedelta(hours=1))]
    msg = resolve.ambiguous_message("7ce830fe", rows, more=False)
    lines = msg.splitlines()
    assert lines[0] == ("session id 7ce830fe is ambiguous: it starts 2 sessions; give more "
                        "of it:")
    assert lines[1].split() == ["7ce830fe-0000-4000-8000-000000000001",
                                "alice@corp.example.com", "web01", "2026-12-07", "14:30:05Z"]
    assert lines[2].split()[1:3] == ["bob@corp.example.com", "web02"]
    assert "2 or more" in resolve.ambiguous_message("7c", rows, more=True)


def test_an_id_that_cannot_be_one_is_not_found_without_a_lookup() -> None:
    with pytest.raises(NotFoundError, match="no session no-such-session"):
        resolve.check_id("no-such-session")
    with pytest.raises(NotFoundError, match=r"no session \\x1b\[2J"):
        resolve.check_id("\x1b[2J")  # escaped, never sent to the terminal
    with pytest.raises(UsageError, match="give a session id"):
        resolve.check_id("")
    assert resolve.check_id("7CE830FE") == "7ce830fe"


def test_json_row_and_table_with_hits_and_the_jump_tree() -> None:
    jump = _rec("aaaaaaaa-0000-4000-8000-000000000000", kind="jump", login="",
                command="forward web01:22 -> i-0web01 127.0.0.1:22", exit_status=CLOSED)
    inner = _rec("bbbbbbbb-0000-4000-8000-000000000000", parent_id=jump.id,
                 command="grep -r secret /etc")
    row = session_json(inner, [TextHit(t=1.5, source="output", snippet="a secret\nline")])
    assert row["started_at"] == "2026-12-07T14:30:05+00:00"
    assert row["ended_at"] == "2026-12-07T14:30:08+00:00" and row["duration_s"] == 3.0
    assert row["parent_id"] == jump.id and row["status"] == "ok" and row["outcome"] == "exit 0"
    assert row["hits"] == [{"t": 1.5, "at": "2026-12-07T14:30:06.500000+00:00",
                            "source": "output", "snippet": "a secret\nline"}]
    entries = [(SessionMatch(jump), 0),
               (SessionMatch(inner, (TextHit(1.5, "output", "a secret\nline"),)), 1)]
    lines = render(entries, ["id", "started", "what", "status", "duration", "in", "out"], NOW)
    assert lines[0].split() == ["ID", "STARTED", "WHAT", "STATUS", "DURATION", "IN", "OUT"]
    assert lines[1].startswith("aaaaaaaa    2026-12-07 14:30:05Z  forward web01:22")
    assert "closed by client" in lines[1]
    assert lines[2].startswith("└ bbbbbbbb  2026-12-07 14:30:05Z  grep -r secret /etc")
    assert lines[2].split()[-3:] == ["3.0s", "10", "2.0K"]
    assert lines[3] == "    +0:01  2026-12-07 14:30:06Z  output: a secret line"
    assert render([], ["id"], NOW) == ["(none)"]


def test_play_shows_file_operations_and_connections() -> None:
    sftp = _rec("cccccccc-0000-4000-8000-000000000000", kind="subsystem", command="sftp")
    events = [
        {"event": "sftp.open", "ts": "2026-12-07T14:30:06+00:00", "path": "/tmp/a",
         "flags": ["write", "create"], "status": "ok", "session_id": sftp.id},
        {"event": "sftp.close", "ts": "2026-12-07T14:30:07.5+00:00", "path": "/tmp/a",
         "transfer": "upload", "size": 3 * 1024 * 1024, "sha256": "ab" * 32, "status": "ok"},
        {"event": "sftp.remove", "ts": "2026-12-07T14:31:07+00:00", "path": "/etc/x",
         "status": "permission denied", "message": "Permission denied"},
    ]
    lines = file_timeline(sftp, events)
    assert lines[0].startswith(f"session {sftp.id}: alice@corp.example.com on web01")
    assert lines[1] == "+0:01 2026-12-07 14:30:06Z  open /tmp/a (write|create)"
    assert lines[2] == f"+0:02 2026-12-07 14:30:07Z  close /tmp/a upload 3.0M sha256 {'ab' * 32}"
    assert lines[3] == ("+1:02 2026-12-07 14:31:07Z  remove /etc/x "
                        "[permission denied: Permission denied]")
    assert file_timeline(sftp, [])[1] == "no file operations in the audit log"

    jump = _rec("aaaaaaaa-0000-4000-8000-000000000000", kind="jump", login="",
                command="forward web01:22 -> i-0web01 127.0.0.1:22", exit_status=CLOSED)
    inner = _rec("bbbbbbbb-0000-4000-8000-000000000000", parent_id=jump.id)
    text = "\n".join(connection_summary(jump, [inner]))
    assert "forward web01:22 -> i-0web01" in text and "closed by client" in text
    assert "sessions in this connection (1):" in text
    assert "bbbbbbbb  2026-12-07 14:30:05Z  uname -a  exit 0" in text
    tunnel = _rec("dddddddd-0000-4000-8000-000000000000", kind="tunnel", login="",
                  command="forward db:5432", exit_status=CLOSED)
    text = "\n".join(connection_summary(tunnel, []))
    assert "payload of a tunnel is not recorded" in text and "closed" in text
    assert "sessions in this connection" not in text
