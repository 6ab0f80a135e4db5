"""Opt-in login features with the real OpenSSH client: a registered key instead of the password
(never instead of the code), the re-authentication window, and TOTP self-enrolment."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pyotp
import pytest

from broker.app import Broker
from broker.config import load_config
from tests.conftest import Demo

pytestmark = pytest.mark.e2e


async def _ssh(demo: Demo, login: str, port: int, known: Path, env: dict[str, str],
               *extra: str) -> tuple[int, bytes, bytes]:
    args = demo.ssh_args(login, *extra, port=port, known_hosts=known)
    proc = await asyncio.create_subprocess_exec(
        *args, "id -un", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out, err


def _keypair(tmp: Path, name: str) -> Path:
    path = tmp / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   timeout=30)
    return path


async def test_registered_key_replaces_the_password_but_not_the_code(
    demo: Demo, tmp_path: Path
) -> None:
    broker = Broker(load_config(demo.variant_config(tmp_path, identity="public_keys = true")))
    port = await broker.start()
    known = demo.known_hosts_for(tmp_path, port)
    try:
        user = demo.take_user()
        key = _keypair(tmp_path, "id_good")
        other = _keypair(tmp_path, "id_other")
        demo.cli("key", "add", user, (key.with_suffix(".pub")).read_text().strip(),
                 "--comment", "laptop")
        key_opts = ("-o", "PreferredAuthentications=publickey,keyboard-interactive",
                    "-o", "IdentitiesOnly=yes", "-o", "NumberOfPasswordPrompts=1")
        # registered key + code: no password prompt (a wrong password would be answered)
        rc, out, err = await _ssh(demo, f"{user}+web01", port, known,
                                  demo.env(user, password="not-the-password"),
                                  "-i", str(key), *key_opts)
        assert rc == 0, err
        assert out.decode().strip() == demo.info["read_only_login"]
        # registered key + wrong code: refused
        rc, _, err = await _ssh(demo, f"{user}+web01", port, known,
                                demo.env(user, password="not-the-password", code="000000"),
                                "-i", str(key), *key_opts)
        assert rc == 255
        assert b"Permission denied" in err
        # an unregistered key falls back to password + code
        rc, _, err = await _ssh(demo, f"{user}+web01", port, known, demo.env(user),
                                "-i", str(other), *key_opts)
        assert rc == 0, err
        methods = [e["method"] for e in demo.audit_lines()
                   if e["event"] == "auth.success" and e["user"].startswith(user + "@")]
        assert methods[-2:] == ["publickey+totp", "password+totp"]
        listed = demo.cli("key", "list", user, "--json").stdout
        assert "laptop" in listed
        bad = demo.cli("key", "add", user, "ssh-ed25519 AAAAnotakey", check=False)
        assert bad.returncode == 2
        assert "not an SSH public key" in bad.stderr
    finally:
        await broker.stop()


async def test_reauth_window_skips_the_code_for_the_same_address_only(
    demo: Demo, tmp_path: Path
) -> None:
    cfg = demo.variant_config(tmp_path, totp="reauth_window_seconds = 60",
                              limits="penalty_exempt = ['127.0.0.0/8']")
    broker = Broker(load_config(cfg))
    port = await broker.start()
    known = demo.known_hosts_for(tmp_path, port)
    try:
        user = demo.take_user()
        rc, _, err = await _ssh(demo, f"{user}+web01", port, known, demo.env(user),
                                "-b", "127.0.0.1")
        assert rc == 0, err
        # same address, no code available: the window lets the password alone in
        rc, _, err = await _ssh(demo, f"{user}+web01", port, known, demo.env(user, code=""),
                                "-b", "127.0.0.1")
        assert rc == 0, err
        # another address gets the full login
        rc, _, err = await _ssh(demo, f"{user}+web01", port, known, demo.env(user, code=""),
                                "-b", "127.0.0.4")
        assert rc == 255
        # the wrong password is still refused inside the window
        rc, _, err = await _ssh(demo, f"{user}+web01", port, known,
                                demo.env(user, password="wrong", code=""), "-b", "127.0.0.1")
        assert rc == 255
        methods = [e["method"] for e in demo.audit_lines()
                   if e["event"] == "auth.success" and e["user"].startswith(user + "@")]
        assert methods[-2:] == ["password+totp", "password+reauth-window"]
    finally:
        await broker.stop()


async def test_self_enrolment_after_a_correct_password(demo: Demo, tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    users.write_text((demo.state_dir / "users.toml").read_text())
    cfg = demo.variant_config(tmp_path, totp="self_enroll = true", users_file=users)
    add = subprocess.run(  # noqa: ASYNC221 - set-up before the broker starts
        [*demo.cli_args(cfg), "user", "add", "newcomer", "--password-stdin"],
                         input=demo.info["password"] + "\n", capture_output=True, text=True,
                         timeout=30)
    assert add.returncode == 0, add.stderr
    demo.cli("grant", "add", "--user", "newcomer", "--domain", demo.info["domain"],
             "--stack", "stack-web", "--vpc", "vpc-0demo", "--level", "read-only",
             "--ticket", "T-1", "--reason", "enrolment test")
    broker = Broker(load_config(cfg))
    port = await broker.start()
    known = demo.known_hosts_for(tmp_path, port)
    code_file = tmp_path / "code"
    try:
        env = demo.env("alice", code="000000")
        env["BB_CODE_FILE"] = str(code_file)
        args = demo.ssh_args("newcomer+web01", port=port, known_hosts=known)
        proc = await asyncio.create_subprocess_exec(
            *args, "id -un", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, env=env)
        assert proc.stderr is not None
        seen = b""
        while b"otpauth://" not in seen or not seen.endswith(b"\n"):
            try:
                chunk = await asyncio.wait_for(proc.stderr.readline(), 15)
            except TimeoutError:
                proc.kill()
                raise AssertionError(f"no enrolment text; stderr so far: {seen!r}") from None
            assert chunk, seen
            seen += chunk
        secret = re.search(rb"secret=([A-Z2-7]+)", seen)
        assert secret is not None
        code_file.write_text(pyotp.TOTP(secret.group(1).decode()).now() + "\n")
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, seen + err
        assert out.decode().strip() == demo.info["read_only_login"]
        events = [e["event"] for e in demo.audit_lines() if "newcomer" in str(e.get("user"))]
        assert "totp.self_enrolled" in events
        # from now on the new authenticator is required: the old code path is closed
        rc, _, _ = await _ssh(demo, "newcomer+web01", port, known, env)
        assert rc == 255
    finally:
        await broker.stop()
