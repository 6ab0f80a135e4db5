"""SIGTERM with live sessions, through a real broker process and the real OpenSSH client: users get
a notice, a command that ends within the grace period ends normally, a live shell is ended, every
recording is closed with its exit frame and every session has its ``session.end``."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from broker.domain import recording as fmt
from broker.recordings.local import OPEN_DIR
from tests.conftest import Demo
from tests.e2e.test_durability import BrokerProcess, Client, audit_for, broker_config, session_row

pytestmark = pytest.mark.e2e

NOTICE = b"bastion-broker: the bastion is shutting down; this session ends within 20 s"


def test_sigterm_notifies_drains_and_closes_recordings(demo: Demo, tmp_path: Path) -> None:
    rec_dir = tmp_path / "rec"
    cfg = broker_config(demo, tmp_path, f'[recordings]\ndir = "{rec_dir}"\n'
                        "[shutdown]\ngrace_seconds = 20\n")
    log = tmp_path / "broker.log"
    log.touch()
    broker = BrokerProcess(cfg, log)
    kh = demo.known_hosts_for(tmp_path, broker.port)
    shell_user, exec_user = demo.take_user(), demo.take_user()
    shell = Client(demo, shell_user, broker.port, kh, None, tty=True)
    # a command that waits for the shutdown, then needs a moment to finish: it drains
    job = Client(demo, exec_user, broker.port, kh,
                 "echo started; read -r _; sleep 1; echo finished cleanly", tty=False)
    try:
        shell.send(b"echo READY-$((40+2))\n")
        shell.pump(b"READY-42")
        job.pump(b"started\n")
        markers = sorted(p.name for p in (rec_dir / OPEN_DIR).iterdir())
        assert len(markers) == 2

        broker.proc.send_signal(signal.SIGTERM)
        job.pump(NOTICE)  # on stderr: a command's stdout stays clean
        job.send(b"go\n")  # the job finishes by itself within the grace period
        assert job.finish(60) == 0
        assert job.out == b"started\nfinished cleanly\n"
        shell.pump(NOTICE)  # on the terminal
        assert shell.finish(60) == 255
        assert b"access ended (bastion shutting down)" in shell.out + shell.err
        assert broker.wait(60) == 0
    finally:
        broker.kill()
        for c in (shell, job):
            if c.proc.poll() is None:
                c.proc.kill()

    assert not any((rec_dir / OPEN_DIR).iterdir())  # nothing left for a crash repair
    statuses = {}
    for sid in markers:
        row = session_row(demo, sid)
        assert row["ended_at"] is not None
        rec = Path(str(row["recording"]))
        parsed = fmt.parse(rec.read_bytes())
        assert not parsed.truncated
        statuses[row["kind"]] = (row["exit_status"], fmt.exit_status(parsed.frames))
        (end,) = [e for e in audit_for(demo, sid) if e["event"] == "session.end"]
        assert end["exit_status"] == row["exit_status"]
        if row["kind"] == "shell":
            assert NOTICE in fmt.output_bytes(parsed.frames)  # the notice is recorded too
            assert rec.with_suffix(".cast").exists()
    assert statuses == {"exec": ("0", "0"),
                        "shell": ("terminated:bastion shutting down",) * 2}
    events = [e["event"] for e in demo.audit_lines()]
    assert "broker.draining" in events
    assert "Traceback" not in log.read_text(errors="replace")
