"""An interactive shell in a real pseudo-terminal: PTY, TERM, window resizes, and the replay."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, Demo

pytestmark = pytest.mark.e2e


class Terminal:
    """The OpenSSH client running in a pty we control, like a person's terminal."""

    def __init__(self, args: list[str], env: dict[str, str], rows: int, cols: int) -> None:
        self.master, slave = pty.openpty()
        self.resize(rows, cols)
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.buf = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, needle: bytes, timeout: float = 15) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timeout waiting for {needle!r}; screen so far: {self.buf!r}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"eof waiting for {needle!r}; screen: {self.buf!r}")
                self.buf += chunk
        i = self.buf.index(needle) + len(needle)
        seen, self.buf = self.buf[:i], self.buf[i:]
        return seen

    def close(self) -> int:
        try:
            return self.proc.wait(15)
        finally:
            os.close(self.master)


def test_interactive_shell_with_pty_resize_and_replay(demo: Demo, tmp_path: Path) -> None:
    user = demo.take_user()
    env = demo.env(user)
    env["TERM"] = "xterm-256color"
    term = Terminal(demo.ssh_args(f"{user}+web01", "-tt"), env, rows=30, cols=100)
    try:
        term.send(b"PS1='RE''ADY> '; export PS1\r")
        term.expect(b"READY> ")
        term.send(b"tty; echo T=$TERM; stty size; echo END\"\"1\r")
        out = term.expect(b"END1\r\n").decode()
        assert "/dev/pts/" in out
        assert "T=xterm-256color" in out
        assert "30 100" in out
        term.resize(40, 132)
        os.kill(term.proc.pid, signal.SIGWINCH)
        time.sleep(0.3)
        term.send(b"stty size; printf '\\303\\251t\\303\\251\\n'; echo END\"\"2\r")
        out = term.expect(b"END2\r\n").decode()
        assert "40 132" in out
        assert "été" in out
        term.send(b"exit 7\r")
        assert term.close() == 7
    finally:
        if term.proc.poll() is None:
            term.proc.kill()

    rows = [s for s in demo.sessions() if s["user"].startswith(user + "@")]
    assert rows
    assert rows[0]["kind"] == "shell"
    assert rows[0]["exit_status"] == "7"
    sid = rows[0]["id"]

    # asciicast v2 export: header, resize event, output, input, exit
    cast = demo.cli("export", "--raw", sid).stdout.splitlines()  # every byte
    header = json.loads(cast[0])
    assert header["version"] == 2
    assert (header["width"], header["height"]) == (100, 30)
    assert header["bastion"]["session_id"] == sid
    assert header["bastion"]["level"] == "read-only"
    assert header["env"]["TERM"] == "xterm-256color"
    events = [json.loads(line) for line in cast[1:]]
    codes = {e[1] for e in events}
    assert {"o", "i", "r", "x"} <= codes
    assert ["r", "132x40"] in [e[1:] for e in events]
    assert events[-1][1:] == ["x", "7"]
    output = "".join(e[2] for e in events if e[1] == "o")
    assert "40 132" in output
    assert "été" in output
    times = [e[0] for e in events]
    assert times == sorted(times)

    # the terminal session also got a .cast file beside its recording (rendered after the end)
    cast_file = Path(rows[0]["recording"]).with_suffix(".cast")
    deadline = time.monotonic() + 10
    while not cast_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # viewer-safe, as `export` without --raw renders it
    assert cast_file.read_text().splitlines() == demo.cli("export", sid).stdout.splitlines()

    # the real asciinema CLI accepts it
    asciinema = Path(BIN).parent / "asciinema"
    r = subprocess.run([str(asciinema), "cat", str(cast_file)], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "40 132" in r.stdout.decode()

    # and our own player replays it
    r2 = demo.cli("play", sid[:8], "--speed", "50", "--idle-limit", "0.05")
    assert "40 132" in r2.stdout
    assert "été" in r2.stdout


def test_cli_errors_are_one_line_without_traceback(demo: Demo, tmp_path: Path) -> None:
    r = demo.cli("play", "no-such-session", check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == "bastion-broker: error: no session no-such-session"
    bad = tmp_path / "bad.toml"
    bad.write_text('state_dir = "."\n[ssh]\nlisten_port = "many"\n')
    r = subprocess.run([str(BIN), "--config", str(bad), "serve"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{bad}: key 'ssh.listen_port'" in r.stderr
    bad.write_text('state_dir = "."\n[ssh]\nlisten_prot = 22\n')
    r = subprocess.run([str(BIN), "--config", str(bad), "serve"], capture_output=True,
                       text=True, timeout=30)
    assert "key 'ssh.listen_prot': Extra inputs are not permitted" in r.stderr
