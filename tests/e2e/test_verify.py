"""Tamper evidence end to end: real sessions through the OpenSSH client are sealed with a signed
manifest, ``bastion-broker verify`` names each corruption (recording and audit log), a broker
killed with SIGKILL leaves a recording that is sealed as interrupted at the next start, and
``play``/``export`` never pass viewer-acting escape sequences to the viewer's terminal."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, Demo
from tests.e2e.test_durability import BrokerProcess, Client, broker_config

pytestmark = pytest.mark.e2e


def verify(config: str | Path, *args: str) -> tuple[int, dict[str, Any]]:
    r = subprocess.run([str(BIN), "--config", str(config), "verify", *args, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stderr
    assert "Traceback" not in r.stderr
    return r.returncode, json.loads(r.stdout)


def findings(result: dict[str, Any]) -> list[str]:
    return [f["code"] for rep in result["reports"] for f in rep["findings"]
            if f["severity"] == "error"]


def session_of(demo: Demo, user: str) -> dict[str, Any]:
    rows = [s for s in demo.sessions() if s["user"].startswith(user + "@")]
    assert len(rows) == 1, rows
    return rows[0]


def wait_sealed(config: str | Path, sid: str, timeout: float = 60) -> dict[str, Any]:
    """The manifest is written as the session finishes, just after the client has gone."""
    deadline = time.monotonic() + timeout
    while True:
        rc, result = verify(config, sid)
        if rc == 0 or time.monotonic() > deadline:
            assert rc == 0, result
            return result
        time.sleep(0.2)


def test_sealed_session_verifies_and_each_corruption_is_named(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "web01", "seq 1 20000")
    assert r.returncode == 0, r.stderr
    row = session_of(demo, user)
    sid = row["id"]
    ok = wait_sealed(demo.config, sid)["reports"][0]
    assert ok["checked"]["user"].startswith(user + "@")
    assert ok["checked"]["exit_status"] == "0" and ok["checked"]["interrupted"] is False
    rec = Path(row["recording"])
    man = rec.with_name(f"{sid}.manifest.json")
    assert man.exists()
    sealed = [e for e in demo.audit_lines()
              if e["event"] == "recording.sealed" and e.get("session_id") == sid]
    assert len(sealed) == 1
    original, original_man = rec.read_bytes(), man.read_bytes()
    # what the client received is exactly what the sealed recording holds
    from broker.domain import recording as fmt

    assert fmt.output_bytes(fmt.parse(original).frames) == r.stdout
    try:
        flipped = bytearray(original)
        flipped[len(original) // 2] ^= 0x20
        rec.write_bytes(bytes(flipped))
        rc, result = verify(demo.config, sid)
        assert rc == 1 and findings(result) == ["file_modified"]
        [f] = result["reports"][0]["findings"]
        lo, hi = f["where"]["ranges"][0]
        assert lo <= len(original) // 2 <= hi

        rec.write_bytes(original[:-100])
        rc, result = verify(demo.config, sid)
        assert rc == 1 and findings(result) == ["file_truncated"]
        assert "100 bytes missing" in result["reports"][0]["findings"][0]["message"]

        rec.write_bytes(original)
        doc = json.loads(original_man)
        doc["manifest"]["user"] = "someone-else@corp.example.com"
        man.write_text(json.dumps(doc))
        rc, result = verify(demo.config, sid)
        assert rc == 1 and findings(result) == ["manifest_bad_signature", "manifest_replaced"]

        man.unlink()
        rc, result = verify(demo.config, sid)
        assert rc == 1 and findings(result) == ["manifest_missing"]

        # plain-text output for people: one line per problem, exit status 1
        t = subprocess.run([str(BIN), "--config", demo.config, "verify", sid],
                           capture_output=True, text=True, timeout=60)
        assert t.returncode == 1
        assert t.stdout.startswith(f"session {sid}: FAILED (1 problem)")
        assert "[manifest_missing]" in t.stdout
    finally:
        rec.write_bytes(original)
        man.write_bytes(original_man)
    assert verify(demo.config, sid)[0] == 0


def test_audit_log_verifies_and_a_corrupted_copy_is_named(demo: Demo, tmp_path: Path) -> None:
    user = demo.take_user()
    assert demo.ssh(user, "web01", "true").returncode == 0
    rc, result = verify(demo.config, "--audit")
    assert rc == 0, result
    assert result["reports"][0]["checked"]["checkpoints"] >= 1

    # a copy of the state to damage: config, audit log and the public key only
    state = tmp_path / "state"
    (state / "audit").mkdir(parents=True)
    pub = demo.state_dir / "integrity_ed25519_key.pub"
    shutil.copy(pub, state / pub.name)
    cfg = tmp_path / "broker.toml"
    cfg.write_text(f'state_dir = "{state}"\n')
    lines = (demo.state_dir / "audit" / "audit.jsonl").read_bytes().splitlines(keepends=True)
    copy = state / "audit" / "audit.jsonl"

    # keep the signed part: everything up to the last checkpoint
    last_cp = max(i for i, x in enumerate(lines) if b'"audit.checkpoint"' in x)
    signed = lines[: last_cp + 1]
    assert len(signed) >= 6
    copy.write_bytes(b"".join(signed))
    rc, result = verify(cfg, "--audit")
    assert rc == 0 and result["reports"][0]["findings"] == []

    removed = signed[:2] + signed[3:]
    copy.write_bytes(b"".join(removed))
    rc, result = verify(cfg, "--audit")
    assert rc == 1 and findings(result) == ["audit_line_removed"]
    assert result["reports"][0]["findings"][0]["where"]["line"] == 3

    swapped = list(signed)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    copy.write_bytes(b"".join(swapped))
    rc, result = verify(cfg, "--audit")
    assert rc == 1 and findings(result) == ["audit_line_moved"]

    edited = list(signed)
    edited[1] = edited[1].replace(b'"seq":1', b'"seq":1,"x":1', 1)
    copy.write_bytes(b"".join(edited))
    rc, result = verify(cfg, "--audit")
    assert rc == 1 and findings(result) == ["audit_line_modified"]
    assert result["reports"][0]["findings"][0]["where"]["line"] == 2

    copy.write_bytes(b"".join(signed)[:-10])
    rc, result = verify(cfg, "--audit")
    assert rc == 1 and "audit_truncated" in findings(result)

    # the wrong public key: every checkpoint names another key
    from broker.integrity.keys import load_or_create_signing_key, public_path

    load_or_create_signing_key(tmp_path / "other_key")
    copy.write_bytes(b"".join(signed))
    rc, result = verify(cfg, "--audit", "--public-key", str(public_path(tmp_path / "other_key")))
    assert rc == 1 and "checkpoint_wrong_key" in findings(result)


def test_replay_and_export_neutralise_viewer_sequences(demo: Demo) -> None:
    user = demo.take_user()
    evil = (r"printf 'safe \033[31mred\033[0m \033]52;c;ZWNobyBwd25lZA==\007"
            r"\033]0;fake title\007\033[6n\033P$qm\033\\end\n'")
    r = demo.ssh(user, "web01", evil)
    assert r.returncode == 0, r.stderr
    assert b"\x1b]52;c;" in r.stdout  # the client got the bytes; the recording keeps them
    sid = session_of(demo, user)["id"]
    wait_sealed(demo.config, sid)

    raw = demo.cli("export", "--raw", sid).stdout
    assert "\\u001b]52;c;" in raw
    cast = demo.cli("export", sid).stdout
    output = "".join(e[2] for e in map(json.loads, cast.splitlines()[1:]) if e[1] == "o")
    assert output == "safe \x1b[31mred\x1b[0m end\n"

    played = subprocess.run([str(BIN), "--config", demo.config, "play", sid, "--speed", "100"],
                            capture_output=True, timeout=60)
    assert played.returncode == 0, played.stderr
    assert played.stdout == b"safe \x1b[31mred\x1b[0m end\n"


def test_recording_of_a_killed_broker_is_sealed_as_interrupted(demo: Demo,
                                                               tmp_path: Path) -> None:
    rec_dir = tmp_path / "rec"
    rec_dir.mkdir()
    cfg = broker_config(demo, tmp_path, f'[recordings]\ndir = "{rec_dir}"\n')
    log = tmp_path / "broker.log"
    log.touch()
    broker = BrokerProcess(cfg, log)
    user = demo.take_user()
    client = Client(demo, user, broker.port, demo.known_hosts_for(tmp_path, broker.port),
                    "echo MARK-$((6*7)); sleep 120", tty=False)
    try:
        client.pump(b"MARK-42")
        broker.proc.send_signal(signal.SIGKILL)
        assert broker.wait(30) == -signal.SIGKILL
        client.finish(60)
    finally:
        broker.kill()
        if client.proc.poll() is None:
            client.proc.kill()
    (rec,) = rec_dir.rglob("*.rec")
    sid = rec.name.removesuffix(".rec")
    assert not rec.with_name(f"{sid}.manifest.json").exists()  # killed before the end
    rc, result = verify(cfg, sid)
    assert rc == 1 and findings(result) == ["manifest_missing"]

    again = BrokerProcess(cfg, log)  # repairs, then seals, before it listens
    try:
        rc, result = verify(cfg, sid)
        assert rc == 0, result
        checked = result["reports"][0]["checked"]
        assert checked["interrupted"] is True and checked["exit_status"] == "interrupted"
        assert checked["user"].startswith(user + "@")
    finally:
        again.proc.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0
    assert "Traceback" not in log.read_text(errors="replace")


def test_bad_verify_input_is_a_clear_error(demo: Demo, tmp_path: Path) -> None:
    cases = [
        ((), "give a SESSION_ID, or --audit"),
        (("00000000-0000-0000-0000-000000000000",), "no recording of session"),
        (("../../etc/passwd",), "a session id is lowercase letters, digits and dashes"),
        (("--audit", "--public-key", str(tmp_path / "none.pub")), "no public signing key"),
    ]
    for args, message in cases:
        r = demo.cli("verify", *args, check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr
