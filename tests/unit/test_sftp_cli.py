"""``sessions files``: a session's sftp events picked out of the audit log, damage passed over."""

from __future__ import annotations

import json

from broker.cli.files import file_events


def test_only_this_sessions_sftp_events_in_order() -> None:
    lines = [
        json.dumps({"event": "session.start", "session_id": "s1"}).encode() + b"\n",
        json.dumps({"event": "sftp.open", "session_id": "s1", "path": "/a"}).encode() + b"\n",
        json.dumps({"event": "sftp.open", "session_id": "s2", "path": "/b"}).encode() + b"\n",
        b'{"event":"sftp.close","session_id":"s1", torn line\n',
        b"\xff\xfe not json \"s1\" \"sftp.\n",
        json.dumps({"event": "sftp.close", "session_id": "s1", "path": "/a"}).encode() + b"\n",
        json.dumps(["sftp.x", "s1"]).encode() + b"\n",
    ]
    assert [(e["event"], e["path"]) for e in file_events(lines, "s1")] == [
        ("sftp.open", "/a"), ("sftp.close", "/a")]
    assert file_events(lines, "s3") == []
