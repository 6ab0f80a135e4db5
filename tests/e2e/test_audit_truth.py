"""What the audit records must be what happened, through real broker processes: a clean stop
signs the whole audit log (no unsigned tail), and a tail cut after the last signed checkpoint
is reported by ``verify --audit``."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from broker.domain import recording as fmt
from tests.conftest import BIN, Demo
from tests.e2e.test_durability import BrokerProcess, broker_config

pytestmark = pytest.mark.e2e


def verify_audit(cfg: Path) -> tuple[int, dict[str, Any]]:
    r = subprocess.run([str(BIN), "--config", str(cfg), "verify", "--audit", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def codes(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f["severity"], f["code"]) for rep in result["reports"] for f in rep["findings"]]


def run_broker(demo: Demo, tmp_path: Path, cfg: Path, cut: bool = False) -> None:
    """One broker process: a session through it, optionally the audit tail cut while it runs,
    then SIGTERM."""
    log = tmp_path / "broker.log"
    log.touch()
    broker = BrokerProcess(cfg, log)
    audit = tmp_path / "audit.jsonl"
    try:
        kh = demo.known_hosts_for(tmp_path, broker.port)
        user = demo.take_user()
        r = subprocess.run([*demo.ssh_args(f"{user}+web01", port=broker.port, known_hosts=kh),
                            "echo hi"], capture_output=True, timeout=60, env=demo.env(user))
        assert r.returncode == 0 and r.stdout == b"hi\n", r.stderr
        if cut:
            # the session's last event is its seal, written in the background after its end:
            # wait for it, so nothing else is appended while the tail is cut
            deadline = time.monotonic() + 30
            while b'"recording.sealed"' not in audit.read_bytes():
                assert time.monotonic() < deadline, "the session was not sealed"
                time.sleep(0.1)
            lines = audit.read_bytes().splitlines(keepends=True)
            assert [json.loads(x)["event"] for x in lines[-2:]] in (
                ["session.end", "recording.sealed"], ["recording.sealed", "session.end"])
            audit.write_bytes(b"".join(lines[:-2]))
            deadline = time.monotonic() + 30  # the broker's 5 s timer notices
            while b'"audit.cut"' not in audit.read_bytes():
                assert time.monotonic() < deadline, "the cut was not recorded"
                time.sleep(0.2)
        broker.proc.send_signal(signal.SIGTERM)
        assert broker.wait(60) == 0
    finally:
        broker.kill()


def test_a_clean_stop_seals_the_audit_tail_and_a_cut_tail_is_reported(
        demo: Demo, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    cfg = broker_config(demo, tmp_path, f'[audit]\npath = "{audit}"\n')
    run_broker(demo, tmp_path, cfg)
    run_broker(demo, tmp_path, cfg)  # a restart: its own start and stop
    lines = audit.read_bytes().splitlines(keepends=True)
    events = [json.loads(x)["event"] for x in lines]
    assert events.count("session.end") == 2 and events.count("broker.stop") == 2
    assert events[-2:] == ["broker.stop", "audit.checkpoint"]
    rc, result = verify_audit(cfg)
    assert rc == 0 and codes(result) == [], result  # nothing unsigned after a clean stop

    # the closing checkpoint cut off: the events after the previous one are reported, with
    # their number (a warning while they are young, an error once older than 60 s)
    cps = [i for i, e in enumerate(events) if e == "audit.checkpoint"]
    audit.write_bytes(b"".join(lines[:-1]))
    rc, result = verify_audit(cfg)
    assert rc == 0 and codes(result) == [("warning", "unsigned_tail")], result
    (finding,) = result["reports"][0]["findings"]
    assert finding["where"]["events"] == len(lines) - 2 - cps[-2]
    assert f"{finding['where']['events']} events" in finding["message"]


def test_a_cut_while_the_broker_runs_is_recorded_and_reported(demo: Demo,
                                                               tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    cfg = broker_config(demo, tmp_path, f'[audit]\npath = "{audit}"\n')
    run_broker(demo, tmp_path, cfg, cut=True)
    rc, result = verify_audit(cfg)
    assert rc == 1 and codes(result) == [("error", "audit_tail_cut")], result
    cut = [json.loads(x) for x in audit.read_bytes().splitlines()
           if b'"audit.cut"' in x]
    assert len(cut) == 1 and cut[0]["expected_seq"] == cut[0]["found_seq"] + 2


def test_the_cast_of_a_terminal_session_is_sealed_and_checked(demo: Demo) -> None:
    from tests.e2e.test_verify import session_of, verify, wait_sealed

    user = demo.take_user()
    r = demo.ssh(user, "web01", extra=("-tt",), stdin=b"echo CAST-$((6*7))\nexit\n")
    assert r.returncode == 0, r.stderr
    sid = session_of(demo, user)["id"]
    ok = wait_sealed(demo.config, sid)["reports"][0]
    assert [n.rsplit(".", 1)[-1] for n in ok["checked"]["files"]] == ["rec", "cast"]
    (cast,) = demo.state_dir.glob(f"recordings/*/{sid}.cast")
    original = cast.read_bytes()
    assert b"CAST-42" in original
    try:
        cast.write_bytes(original.replace(b"CAST-42", b"CAST-43"))
        rc, result = verify(demo.config, sid)
        assert rc == 1, result
        codes = [(f["code"], f["where"].get("file")) for f in result["reports"][0]["findings"]]
        assert codes == [("file_modified", cast.name)]
        cast.unlink()
        rc, result = verify(demo.config, sid)
        assert rc == 1 and result["reports"][0]["findings"][0]["code"] == "file_missing"
    finally:
        cast.write_bytes(original)
    assert verify(demo.config, sid)[0] == 0


class _KbdClient(asyncssh.SSHClient):
    """Answers the bastion's keyboard-interactive prompts: the password, then the code."""

    def __init__(self, password: str, code: str) -> None:
        self._password, self._code = password, code

    def kbdint_auth_requested(self) -> str:
        return ""

    def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                  prompts: list[tuple[str, bool]]) -> list[str]:
        return [self._password if "assword" in p else self._code for p, _ in prompts]


def test_a_huge_pty_is_clamped_for_the_recording_and_the_target_and_audited_as_sent(
        demo: Demo) -> None:
    user = demo.take_user()
    password, code = demo.info["password"], demo.next_code(user)

    async def run() -> tuple[bytes, int | None]:
        host_key = (demo.state_dir / "ssh_host_ed25519_key.pub").read_text()
        known = asyncssh.import_known_hosts(f"[127.0.0.1]:{demo.port} {host_key}")
        async with asyncssh.connect(
                "127.0.0.1", demo.port, username=f"{user}+web01", known_hosts=known,
                client_factory=lambda: _KbdClient(password, code),
                preferred_auth="keyboard-interactive", config=None) as conn:
            proc = await conn.create_process(
                "stty size; read x; stty size; echo DONE", term_type="xterm",
                term_size=(100000, 100000), encoding=None)
            out = await proc.stdout.readuntil(b"\n")
            proc.change_terminal_size(200000, 7, 99999999, 0)  # a window-change out of range
            await asyncio.sleep(0.5)
            proc.stdin.write(b"go\n")
            out += await proc.stdout.read()
            await proc.wait_closed()
            return out, proc.exit_status

    out, status = asyncio.run(run())
    assert status == 0, out  # the target's pty (rows cols), clamped, then resized clamped
    assert out.replace(b"\r", b"").split(b"\n")[0] == b"4096 4096", out
    assert b"7 4096\n" in out.replace(b"\r", b""), out
    rows = [s for s in demo.sessions() if s["user"].startswith(user + "@")]
    (row,) = rows
    meta = fmt.parse(Path(row["recording"]).read_bytes()).meta
    assert (meta["width"], meta["height"]) == (4096, 4096)
    (start,) = [e for e in demo.audit_lines()
                if e["event"] == "session.start" and e["session_id"] == row["id"]]
    assert start["requested_size"] == [100000, 100000, 0, 0]
    assert (start["width"], start["height"]) == (4096, 4096)
    (resize,) = [e for e in demo.audit_lines()
                 if e["event"] == "session.resize" and e["session_id"] == row["id"]]
    assert resize["requested_size"] == [200000, 7, 99999999, 0]
    assert resize["size"] == [4096, 7, 65535, 0]
    frames = fmt.parse(Path(row["recording"]).read_bytes()).frames
    assert [f.data for f in frames if f.kind == fmt.RESIZE] == [b"4096x7"]


def test_every_ended_session_has_an_outcome(demo: Demo) -> None:
    user = demo.take_user()
    password, code = demo.info["password"], demo.next_code(user)

    async def run() -> None:
        host_key = (demo.state_dir / "ssh_host_ed25519_key.pub").read_text()
        known = asyncssh.import_known_hosts(f"[127.0.0.1]:{demo.port} {host_key}")
        async with asyncssh.connect(
                "127.0.0.1", demo.port, username=f"{user}+web01", known_hosts=known,
                client_factory=lambda: _KbdClient(password, code),
                preferred_auth="keyboard-interactive", config=None) as conn:
            done = await conn.run("echo done; exit 3")
            assert done.exit_status == 3
            proc = await conn.create_process("echo started; sleep 60", encoding=None)
            assert await proc.stdout.readuntil(b"\n") == b"started\n"
            proc.close()  # the client closes the channel: no exit status ever comes
            await proc.wait_closed()
            await asyncio.sleep(0.5)

    asyncio.run(run())
    rows = {r["command"]: r for r in demo.sessions() if r["user"].startswith(user + "@")}
    closed, done = rows["echo started; sleep 60"], rows["echo done; exit 3"]
    assert closed["ended_at"] is not None and closed["outcome"] == "closed by client"
    assert done["outcome"] == "exit 3"
    ends = {e["session_id"]: e for e in demo.audit_lines() if e["event"] == "session.end"}
    assert ends[closed["id"]]["outcome"] == "closed by client"
    assert ends[closed["id"]]["exit_status"] == "closed"
    assert ends[done["id"]]["outcome"] == "exit 3"
    table = demo.cli("sessions", "list", "--user", user).stdout
    line = next(x for x in table.splitlines() if x.startswith(closed["id"][:8]))
    assert "closed by client" in line
