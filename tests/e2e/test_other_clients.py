"""SSH clients beyond OpenSSH: paramiko (Ansible, Fabric, many IDEs and scripts) and PuTTY's
plink and pscp, through login (password + code), exec, a PTY shell and file copy.

paramiko sends a service request before every authentication method it tries; asyncssh alone
disconnects the second one (``broker/ssh/patches/service.py``), so the "none" probe followed by
keyboard-interactive, or a retry after a mistyped password, failed before the broker accepted it.
"""

from __future__ import annotations

import os
import pty
import secrets
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest

from tests.conftest import Demo

pytestmark = pytest.mark.e2e


def _transport(demo: Demo, login: str) -> paramiko.Transport:
    t = paramiko.Transport(("127.0.0.1", demo.port))
    t.start_client(timeout=10)
    host = paramiko.Ed25519Key.from_private_key_file(str(demo.state_dir / "ssh_host_ed25519_key"))
    assert t.get_remote_server_key() == host  # the broker's own host key, nothing in between
    return t


def _answers(password: str, code: str) -> Callable[[str, str, list[tuple[str, bool]]], list[str]]:
    def handler(_title: str, _instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
        return [password if "Password" in text else code for text, _echo in prompts]
    return handler


def _login(demo: Demo, user: str, *, typo_first: bool = False) -> paramiko.Transport:
    t = _transport(demo, f"{user}+web01")
    with pytest.raises(paramiko.BadAuthenticationType) as probe:
        t.auth_none(f"{user}+web01")  # what SSHClient.connect() does first
    assert probe.value.allowed_types == ["keyboard-interactive"]
    if typo_first:
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_interactive(f"{user}+web01", _answers("not-the-password", "000000"))
        assert t.is_active(), "a failed try must leave the connection up for the next one"
    assert t.auth_interactive(f"{user}+web01",
                              _answers(demo.info["password"], demo.next_code(user))) == []
    assert t.is_authenticated()
    return t


def test_paramiko_probes_then_logs_in_and_runs_a_command(demo: Demo) -> None:
    user = demo.take_user()
    t = _login(demo, user)
    try:
        ch = t.open_session()
        ch.exec_command("echo from-paramiko; exit 3")
        out = ch.makefile("rb").read()
        assert out == b"from-paramiko\n"
        assert ch.recv_exit_status() == 3
    finally:
        t.close()


def test_paramiko_retries_after_a_typo_and_gets_a_pty_shell(demo: Demo) -> None:
    user = demo.take_user()
    t = _login(demo, user, typo_first=True)
    try:
        ch = t.open_session()
        ch.get_pty("xterm", 80, 24)
        ch.invoke_shell()
        ch.sendall(b"echo shell-$((6*7))\nexit 0\n")
        out = b""
        deadline = time.monotonic() + 20
        while not ch.exit_status_ready() and time.monotonic() < deadline:
            if ch.recv_ready():
                out += ch.recv(4096)
            time.sleep(0.02)
        while ch.recv_ready():
            out += ch.recv(4096)
        assert b"shell-42" in out
        assert ch.recv_exit_status() == 0
    finally:
        t.close()


def test_paramiko_sftp_copies_both_ways_and_is_audited(demo: Demo, tmp_path: Path) -> None:
    user = demo.take_user()
    data = secrets.token_bytes(300_000)
    remote = f"/tmp/bb-paramiko-{secrets.token_hex(4)}"
    t = _login(demo, user)
    try:
        sftp = paramiko.SFTPClient.from_transport(t)
        assert sftp is not None
        (tmp_path / "up").write_bytes(data)
        sftp.put(str(tmp_path / "up"), remote)
        sftp.get(remote, str(tmp_path / "down"))
        sftp.remove(remote)
        sftp.close()
    finally:
        t.close()
    assert (tmp_path / "down").read_bytes() == data
    sid = next(s["id"] for s in demo.sessions() if s["user"].startswith(user))
    files = demo.cli("sessions", "files", sid, "--json").stdout
    assert remote in files, files


def _drive(args: list[str], password: str, code: str, timeout: float = 30,
           shell_input: bytes = b"") -> tuple[int, bytes]:
    """Run a PuTTY tool on a pseudo-terminal (it reads keyboard-interactive answers from the
    terminal), answer the broker's two prompts, then type ``shell_input`` at the shell's
    first prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execvp(args[0], args)  # noqa: S606 - a fixed PuTTY tool, arguments as given
    out, answered, after_login = b"", set(), 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if b"Password:" in out and "password" not in answered:
                os.write(fd, password.encode() + b"\r")
                answered.add("password")
            if b"Verification code:" in out and "code" not in answered:
                os.write(fd, code.encode() + b"\r")
                answered.add("code")
                after_login = len(out)
            if shell_input and "code" in answered and "shell" not in answered \
                    and (b"$ " in out[after_login:] or b"# " in out[after_login:]):
                os.write(fd, shell_input)
                answered.add("shell")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


def _host_key_fingerprint(demo: Demo) -> str:
    r = subprocess.run(["ssh-keygen", "-lf", str(demo.state_dir / "ssh_host_ed25519_key.pub")],
                       capture_output=True, text=True, check=True)
    return r.stdout.split()[1]


def test_plink_runs_a_command_with_its_exit_status(demo: Demo) -> None:
    user = demo.take_user()
    status, out = _drive(
        ["plink", "-ssh", "-no-antispoof", "-P", str(demo.port), "-hostkey", _host_key_fingerprint(demo),
         f"{user}+web01@127.0.0.1", "echo from-plink; exit 4"],
        demo.info["password"], demo.next_code(user))
    assert b"from-plink" in out, out
    assert status == 4


def test_plink_gets_a_pty_shell(demo: Demo) -> None:
    user = demo.take_user()
    status, out = _drive(
        ["plink", "-ssh", "-t", "-no-antispoof", "-P", str(demo.port), "-hostkey",
         _host_key_fingerprint(demo), f"{user}+web01@127.0.0.1"],
        demo.info["password"], demo.next_code(user),
        shell_input=b"tty; echo shell-$((6*7)); exit 5\r")
    assert b"shell-42" in out and b"/dev/pts/" in out, out
    assert status == 5


@pytest.mark.parametrize("mode", ["-sftp", "-scp"])
def test_pscp_copies_a_file_up_and_back(demo: Demo, tmp_path: Path, mode: str) -> None:
    data = secrets.token_bytes(200_000)
    (tmp_path / "up").write_bytes(data)
    remote = f"/tmp/bb-pscp-{secrets.token_hex(4)}"
    base = ["pscp", mode, "-P", str(demo.port), "-hostkey", _host_key_fingerprint(demo)]
    for args in ([*base, str(tmp_path / "up"), "{u}+web01@127.0.0.1:" + remote],
                 [*base, "{u}+web01@127.0.0.1:" + remote, str(tmp_path / "down")]):
        user = demo.take_user()
        status, out = _drive([a.replace("{u}", user) for a in args], demo.info["password"],
                             demo.next_code(user))
        assert status == 0, out
    assert (tmp_path / "down").read_bytes() == data
