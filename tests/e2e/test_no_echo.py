"""Secrets typed at no-echo prompts never reach a reviewer (real OpenSSH client in a pty, the
broker, real sshd and bash on the target).

The recording file, ``export`` (safe and raw) and the rendered ``.cast`` hold a marker
``[input not echoed: N bytes]`` where the secret was typed, while echoed commands stay as typed.
In sealed mode the bytes are in ``SESSION_ID.sealed``, encrypted to a break-glass key: only
``sessions unseal`` with its private key shows them, and that is audited.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from broker.domain import recording as fmt
from tests.conftest import BIN, Demo, serve_broker
from tests.e2e.test_terminal import Terminal

pytestmark = pytest.mark.e2e

SECRET_READ = b"hunter2-Zq81"  # at bash's read -s
SECRET_GETPASS = b"vis-Kp42x"  # at Python's getpass; the output after it starts the same way
SECRET_SUDO_LIKE = b"visible"  # typed at read -s; the next output is "visible-word"


def _type(term: Terminal, text: bytes) -> None:
    """One key at a time, as a person types (each key its own frame)."""
    for b in text:
        term.send(bytes([b]))
        time.sleep(0.01)


def _shell(demo: Demo, user: str, port: int | None = None,
           known_hosts: Path | None = None) -> Terminal:
    env = demo.env(user)
    env["TERM"] = "xterm"
    term = Terminal(demo.ssh_args(f"{user}+web01", "-tt", port=port, known_hosts=known_hosts),
                    env, rows=30, cols=120)
    term.expect(b"$ ")  # typed before the first prompt, it would be type-ahead: withheld
    term.send(b"PS1='RE''ADY> '; export PS1\r")
    term.expect(b"READY> ")
    return term


def _secret_session(term: Terminal) -> None:
    """Echoed commands, then secrets at three kinds of no-echo prompt, then exit."""
    _type(term, b"echo visible-word\r")
    term.expect(b"visible-word\r\n")
    term.expect(b"READY> ")
    # the prompts are split in the command lines, so that only the prompt itself matches
    term.send(b"read -s -p 'Sec''ret: ' X; echo; echo got=${#X}\r")
    term.expect(b"Secret: ")
    _type(term, SECRET_READ)
    term.send(b"\r")
    term.expect(b"got=%d\r\n" % len(SECRET_READ))
    term.expect(b"READY> ")
    term.send(b"python3 -c 'import getpass; p = getpass.getpass(\"P\" \"w: \"); "
              b"print(\"vis-\" + str(len(p)))'\r")
    term.expect(b"Pw: ")
    _type(term, SECRET_GETPASS)
    term.send(b"\r")
    term.expect(b"vis-%d\r\n" % len(SECRET_GETPASS))
    term.expect(b"READY> ")
    # the output right after Enter starts with the secret's letters (no newline between)
    term.send(b"read -s Y; echo visible-word\r")
    term.expect(b"visible-word\r\n")  # the echo of the command line itself
    time.sleep(0.3)  # read -s has turned echo off (no prompt to wait for)
    _type(term, SECRET_SUDO_LIKE)
    term.send(b"\r")
    term.expect(b"visible-word\r\n")
    term.expect(b"READY> ")
    term.send(b"exit 0\r")
    assert term.close() == 0


def _session(demo: Demo, user: str) -> dict[str, Any]:
    rows = [s for s in demo.sessions() if s["user"].startswith(user + "@")]
    assert len(rows) == 1, rows
    return rows[0]


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} was not written"
        time.sleep(0.1)


def _markers(frames: list[fmt.Frame]) -> list[int]:
    return [int(f.data) for f in frames if f.kind == fmt.NOT_ECHOED]


def _check_recording(demo: Demo, row: dict[str, Any]) -> list[fmt.Frame]:
    rec_path = Path(str(row["recording"]))
    raw = rec_path.read_bytes()
    for secret in (SECRET_READ, SECRET_GETPASS):
        assert secret not in raw
    parsed = fmt.parse(raw)
    typed = fmt.output_bytes(parsed.frames, frozenset({fmt.INPUT}))
    assert b"echo visible-word\r" in typed  # echoed: kept as typed
    assert b"read -s -p 'Sec''ret: ' X" in typed
    # each secret is one marker with its length, in time order with the rest
    assert _markers(parsed.frames) == [len(SECRET_READ), len(SECRET_GETPASS),
                                       len(SECRET_SUDO_LIKE)]
    times = [f.t_us for f in parsed.frames]
    assert times == sorted(times)
    for args in (("export", row["id"]), ("export", "--raw", row["id"])):
        cast = demo.cli(*args).stdout
        for secret in (SECRET_READ, SECRET_GETPASS):
            assert secret.decode() not in cast
        events = [json.loads(line) for line in cast.splitlines()[1:]]
        shown = [e[2] for e in events if e[1] == "i"]
        assert f"[input not echoed: {len(SECRET_READ)} bytes]" in shown
        assert f"[input not echoed: {len(SECRET_GETPASS)} bytes]" in shown
        assert f"[input not echoed: {len(SECRET_SUDO_LIKE)} bytes]" in shown
        assert "echo visible-word\r" in "".join(shown)
        assert [e[0] for e in events] == sorted(e[0] for e in events)
    cast_file = rec_path.with_suffix(".cast")
    _wait_for(cast_file)
    text = cast_file.read_text()
    assert SECRET_READ.decode() not in text and SECRET_GETPASS.decode() not in text
    assert f"[input not echoed: {len(SECRET_READ)} bytes]" in text
    return parsed.frames


def test_secrets_at_no_echo_prompts_are_withheld(demo: Demo) -> None:
    user = demo.take_user()
    term = _shell(demo, user)
    try:
        _secret_session(term)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    row = _session(demo, user)
    _check_recording(demo, row)
    rec_path = Path(str(row["recording"]))
    assert not rec_path.with_suffix(".sealed").exists()  # redact mode keeps no bytes at all
    # the index counts what was typed, withheld or not
    assert int(row["bytes_in"]) >= len(SECRET_READ) + len(SECRET_GETPASS)
    unseal = demo.cli("sessions", "unseal", str(row["id"]), "--key", "/dev/null",
                      "--reason", "x", check=False)
    assert unseal.returncode == 2 and "Traceback" not in unseal.stderr


def test_input_waiting_for_an_echo_is_withheld_on_disk_within_seconds(demo: Demo) -> None:
    """No echo within 2 s: the marker is written (and synced) while the prompt still waits."""
    user = demo.take_user()
    term = _shell(demo, user)
    try:
        term.send(b"read -s -p 'Sec''ret: ' X; echo; echo got=${#X}\r")
        term.expect(b"Secret: ")
        _type(term, SECRET_READ)
        rec_path = Path(str(_session(demo, user)["recording"]))
        deadline = time.monotonic() + 10
        while True:
            frames = fmt.parse(rec_path.read_bytes()).frames
            if _markers(frames):
                break
            assert time.monotonic() < deadline, "no marker on disk while the prompt waited"
            time.sleep(0.2)
        assert _markers(frames) == [len(SECRET_READ)]
        assert SECRET_READ not in rec_path.read_bytes()
        term.send(b"\r")
        term.expect(b"got=%d\r\n" % len(SECRET_READ))
        term.send(b"exit 0\r")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    frames = fmt.parse(rec_path.read_bytes()).frames
    assert _markers(frames) == [len(SECRET_READ)]


def test_exec_stdin_without_a_pty_is_withheld(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "web01", "cat > /dev/null; echo done", stdin=b"token=s3cr3t-Xy\n")
    assert r.returncode == 0 and r.stdout == b"done\n", r.stderr
    row = _session(demo, user)
    raw = Path(str(row["recording"])).read_bytes()
    assert b"s3cr3t-Xy" not in raw
    parsed = fmt.parse(raw)
    assert fmt.output_bytes(parsed.frames, frozenset({fmt.INPUT})) == b""
    assert sum(_markers(parsed.frames)) == len(b"token=s3cr3t-Xy\n")
    assert fmt.output_bytes(parsed.frames) == b"done\n"


# -- sealed mode: a second broker on the demo's state, sealing to a break-glass key ------------
def _keypair(tmp: Path) -> tuple[Path, Path]:
    priv, pub = tmp / "breakglass.pem", tmp / "breakglass.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "X25519", "-out", str(priv)], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True)
    return priv, pub


def test_sealed_input_opens_only_with_the_break_glass_key_and_is_audited(
        demo: Demo, tmp_path: Path) -> None:
    priv, pub = _keypair(tmp_path)
    (tmp_path / "other").mkdir()
    other, _ = _keypair(tmp_path / "other")
    cfg = demo.variant_config(
        tmp_path, extra=f'[recordings]\ninput = "sealed"\ninput_seal_key = "{pub}"\n'
                        f'[audit]\npath = "{tmp_path / "audit.jsonl"}"\n')
    proc, port = serve_broker(cfg)
    try:
        user = demo.take_user()
        term = _shell(demo, user, port=port, known_hosts=demo.known_hosts_for(tmp_path, port))
        try:
            _secret_session(term)
        finally:
            if term.proc.poll() is None:
                term.proc.kill()
        row = _session(demo, user)
        _check_recording(demo, row)
        rec_path = Path(str(row["recording"]))
        sealed_file = rec_path.with_suffix(".sealed")
        manifest = rec_path.with_name(rec_path.name.split(".", 1)[0] + ".manifest.json")
        _wait_for(manifest)
        blob = sealed_file.read_bytes()
        assert SECRET_READ not in blob and SECRET_GETPASS not in blob
        assert oct(sealed_file.stat().st_mode & 0o777) == "0o600"
        # the signed manifest covers the sealed file, and verify checks it
        listed = [f["name"] for f in json.loads(manifest.read_text())["manifest"]["files"]]
        assert sealed_file.name in listed
        check = demo.cli("verify", str(row["id"]), "--json", check=False)
        assert check.returncode == 0, check.stdout + check.stderr

        base = [str(BIN), "--config", str(cfg), "sessions", "unseal", str(row["id"])]
        wrong = subprocess.run([*base, "--key", str(other), "--reason", "INC-7 check"],
                               capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 2 and "sealed to another key" in wrong.stderr
        assert "Traceback" not in wrong.stderr and SECRET_READ.decode() not in wrong.stdout
        no_reason = subprocess.run([*base, "--key", str(priv), "--reason", " "],
                                   capture_output=True, text=True, timeout=60)
        assert no_reason.returncode == 2 and SECRET_READ.decode() not in no_reason.stdout
        before = (tmp_path / "audit.jsonl").read_text().count('"recording.unsealed"')
        assert before == 0
        ok = subprocess.run([*base, "--key", str(priv), "--reason", "INC-7 check"],
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert ok.stderr == ""
        assert SECRET_READ.decode() in ok.stdout and SECRET_GETPASS.decode() in ok.stdout
        assert SECRET_SUDO_LIKE.decode() in ok.stdout
        events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        unsealed = [e for e in events if e["event"] == "recording.unsealed"]
        assert len(unsealed) == 1
        assert unsealed[0]["session_id"] == row["id"]
        assert unsealed[0]["reason"] == "INC-7 check"
        assert unsealed[0]["user"].startswith("operator:")
        assert unsealed[0]["complete"] is True
        assert SECRET_READ.decode() not in json.dumps(unsealed[0])
    finally:
        proc.terminate()
        proc.wait(20)


SECRET_SUDO = b"Sudo-pw-77xq"


def test_a_password_typed_at_sudo_is_withheld(demo: Demo) -> None:
    """sudo's own prompt (PAM, echo off on the target's terminal): the password the user types
    there is a marker in the recording and the export; sudo's answer stays as it printed it."""
    user = demo.take_user()
    term = _shell(demo, user)
    # the prompt is split in the command line, so that only sudo's own prompt matches
    term.send(b"sudo -k; sudo -p 'SU''DO-PW: ' true; echo sudo-rc=$?\r")
    term.expect(b"SUDO-PW: ")
    _type(term, SECRET_SUDO)
    term.send(b"\r")
    term.expect(b"SUDO-PW: ")  # the target login has no valid password: asked again
    term.send(b"\x03")  # Ctrl-C ends sudo
    term.expect(b"sudo-rc=")
    term.expect(b"READY> ")
    term.send(b"exit 0\r")
    assert term.close() == 0
    row = _session(demo, user)
    rec_path = Path(str(row["recording"]))
    raw = rec_path.read_bytes()
    assert SECRET_SUDO not in raw
    parsed = fmt.parse(raw)
    assert len(SECRET_SUDO) in _markers(parsed.frames)
    assert b"sudo -k; sudo -p" in fmt.output_bytes(parsed.frames, frozenset({fmt.INPUT}))
    cast = demo.cli("export", row["id"]).stdout
    assert SECRET_SUDO.decode() not in cast
    assert f"[input not echoed: {len(SECRET_SUDO)} bytes]" in cast
