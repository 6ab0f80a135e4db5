"""``bastion-broker shipping status`` reads the spool without changing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.cli import main
from broker.shipping.spool import Spool


def _config(tmp_path: Path) -> Path:
    p = tmp_path / "broker.toml"
    p.write_text('state_dir = "state"\n[shipping.s3]\nbucket = "corp-recordings"\n'
                 '[shipping.cloudwatch]\nlog_group = "/bastion/audit"\n')
    return p


def test_status_before_the_first_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(_config(tmp_path)), "shipping", "status"]) == 0
    text = capsys.readouterr().out
    assert "s3://corp-recordings/recordings/" in text and "none yet" in text
    assert not (tmp_path / "state" / "shipping").exists()  # nothing created


def test_status_lists_waiting_sessions_and_backlog(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    audit = tmp_path / "state" / "audit" / "audit.jsonl"
    audit.parent.mkdir(parents=True)
    audit.write_bytes(b"x" * 100)
    sp = Spool(tmp_path / "state" / "shipping" / "spool.db")
    sp.enqueue("s-1", 1.0, 1.0)
    sp.failed("s-1", 2.0, "EndpointConnectionError: Could not connect")
    sp.enqueue("s-2", 1.0, 1.0)
    sp.set_state("s-2", "uploaded", 5.0)
    sp.set_offset("cloudwatch", audit.stat().st_ino, 40)
    sp.close()
    assert main(["--config", str(cfg), "shipping", "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["uploads"] == {"pending": 1, "uploaded": 1}
    assert st["waiting"][0]["session_id"] == "s-1" and st["waiting"][0]["attempts"] == 1
    assert "Could not connect" in st["waiting"][0]["last_error"]
    assert st["audit_backlog_bytes"] == {"cloudwatch": 60}
    assert main(["--config", str(cfg), "shipping", "status"]) == 0
    assert "EndpointConnectionError" in capsys.readouterr().out
