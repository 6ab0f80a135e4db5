"""Recorded ProxyJump with the real OpenSSH client: ``ssh -J`` exec and shell, ``scp -J`` and
``sftp -J`` both ways (byte-identical), each recorded like a direct session; the broker's host
certificate is accepted with the ``@cert-authority`` line and refused without it; forwards inside
the jump reach the target's own loopback only (VS Code Remote-SSH). Both the outer
and the inner connection re-key every 256 KiB (``RekeyLimit``), so the copies cross many key
changes on both."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from broker.demo import free_port
from tests.conftest import Demo
from tests.e2e.test_tunnel_lab import _recv_exact, port_of, socks5_connect, tcp_server, wait_for

pytestmark = pytest.mark.e2e


def _config(demo: Demo, tmp: Path, user: str, *, trust: bool) -> Path:
    """An ssh_config: the bastion (keyboard-interactive) and web01 reached through it."""
    kh = tmp / f"known_hosts_targets_{user}"
    kh.write_text(demo.cli("ca", "known-hosts").stdout if trust else "")
    cfg = tmp / f"ssh_config_{user}"
    cfg.write_text(
        f"Host bastion\n  HostName 127.0.0.1\n  Port {demo.port}\n  User {user}\n"
        f"  UserKnownHostsFile {demo.known_hosts}\n  StrictHostKeyChecking yes\n"
        "  PreferredAuthentications keyboard-interactive\n  BatchMode no\n"
        "  NumberOfPasswordPrompts 1\n  RekeyLimit 256K\n"
        f"Host web01 i-0web01\n  ProxyJump bastion\n  User ec2-user\n  RekeyLimit 256K\n"
        f"  UserKnownHostsFile {kh}\n  StrictHostKeyChecking yes\n  BatchMode no\n"
        "  ConnectTimeout 20\n")
    return cfg


def _run(demo: Demo, user: str, args: list[str], stdin: bytes = b"",
         ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=90,
                          env=demo.env(user))


def _sessions(demo: Demo, user: str) -> list[dict[str, Any]]:
    return [s for s in demo.sessions() if s["user"].startswith(user + "@")]


def test_ssh_j_exec_is_recorded(demo: Demo, tmp_path: Path) -> None:
    user = demo.take_user()
    cfg = _config(demo, tmp_path, user, trust=True)
    r = _run(demo, user, ["ssh", "-F", str(cfg), "web01", "echo jumped-$((6*7)); id -un"])
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stdout.decode().splitlines() == ["jumped-42", demo.info["read_only_login"]]
    wait_for(lambda: any(s["kind"] == "exec" and s["ended_at"] for s in _sessions(demo, user)),
             "the recorded exec session")
    ex = next(s for s in _sessions(demo, user) if s["kind"] == "exec")
    assert ex["target"] == "i-0web01"
    assert ex["command"] == "echo jumped-$((6*7)); id -un"
    assert ex["exit_status"] == "0"
    with open(ex["recording"], "rb") as f:
        assert b"jumped-42" in f.read()
    jumps = [s for s in _sessions(demo, user) if s["kind"] == "jump"]
    assert len(jumps) == 1
    assert jumps[0]["command"].startswith("forward web01:22 -> i-0web01 127.0.0.1:")


def test_ssh_j_shell_is_recorded(demo: Demo, tmp_path: Path) -> None:
    user = demo.take_user()
    cfg = _config(demo, tmp_path, user, trust=True)
    r = _run(demo, user, ["ssh", "-F", str(cfg), "-tt", "web01"],
             stdin=b"echo shell-$((2+3))\nexit 3\n")
    assert r.returncode == 3, r.stderr.decode(errors="replace")
    assert b"shell-5" in r.stdout
    wait_for(lambda: any(s["kind"] == "shell" and s["ended_at"] for s in _sessions(demo, user)),
             "the recorded shell session")
    sh = next(s for s in _sessions(demo, user) if s["kind"] == "shell")
    with open(sh["recording"], "rb") as f:
        assert b"shell-5" in f.read()


def test_host_certificate_refused_without_the_ca_line(demo: Demo, tmp_path: Path) -> None:
    user = demo.take_user()
    cfg = _config(demo, tmp_path, user, trust=False)
    r = _run(demo, user, ["ssh", "-F", str(cfg), "web01", "echo never"])
    assert r.returncode == 255
    assert b"Host key verification failed" in r.stderr
    assert b"never" not in r.stdout
    assert not [s for s in _sessions(demo, user) if s["kind"] in ("exec", "shell")]


def test_known_hosts_line_names_the_inventory(demo: Demo) -> None:
    line = demo.cli("ca", "known-hosts").stdout.strip()
    marker, patterns, keytype, _key = line.split()[:4]
    assert marker == "@cert-authority"
    assert set(patterns.split(",")) >= {"web01", "i-0web01", "db01", "i-0db01"}
    assert keytype == "ssh-ed25519"
    assert demo.cli("ca", "known-hosts", "--pattern", "*.corp").stdout.split()[1] == "*.corp"


@pytest.mark.parametrize("tool", ["scp", "sftp"])
def test_file_copy_both_ways_is_byte_identical(demo: Demo, tmp_path: Path, tool: str) -> None:
    user = demo.take_user()
    cfg = _config(demo, tmp_path, user, trust=True)
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    remote = f"/tmp/bb-jump-{user}-{tool}.bin"
    back = tmp_path / "down.bin"
    try:
        _copy(demo, tmp_path, user, cfg, tool, src, remote, back)
    finally:
        Path(remote).unlink(missing_ok=True)  # the demo targets run on this machine
    assert back.read_bytes() == src.read_bytes()
    wait_for(lambda: any(s["kind"] == "subsystem" and s["ended_at"]
                         for s in _sessions(demo, user)), "the recorded sftp session")
    sub = next(s for s in _sessions(demo, user) if s["kind"] == "subsystem")
    assert sub["target"] == "i-0web01"
    assert sub["bytes_in"] > len(src.read_bytes())


def _copy(demo: Demo, tmp_path: Path, user: str, cfg: Path, tool: str, src: Path, remote: str,
          back: Path) -> None:
    if tool == "scp":
        up = _run(demo, user, ["scp", "-F", str(cfg), str(src), f"web01:{remote}"])
        assert up.returncode == 0, up.stderr.decode(errors="replace")
        user2 = demo.take_user()  # a second login needs a fresh code: use another user
        cfg2 = _config(demo, tmp_path, user2, trust=True)
        down = _run(demo, user2, ["scp", "-F", str(cfg2), f"web01:{remote}", str(back)])
    else:
        batch = tmp_path / "batch"
        batch.write_text(f"put {src} {remote}\nget {remote} {back}\nrm {remote}\n")
        down = _run(demo, user, ["sftp", "-F", str(cfg), "-b", str(batch), "web01"])
    assert down.returncode == 0, down.stderr.decode(errors="replace")


def _jump_socks(demo: Demo, cfg: Path, user: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``ssh -N -D`` to web01 through the bastion: what VS Code Remote-SSH runs."""
    lp = free_port()
    log = tmp / f"socks-{user}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            ["ssh", "-F", str(cfg), "-N", "-v", "-o", "ExitOnForwardFailure=yes",
             "-D", f"127.0.0.1:{lp}", "web01"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f, env=demo.env(user))
    wait_for(lambda: "forwarding listening on 127.0.0.1 port" in log.read_text(errors="replace")
             or proc.poll() is not None, "the SOCKS forwarder")
    assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
    return proc, lp


def test_forward_to_the_target_loopback_is_a_recorded_tunnel(demo: Demo, tmp_path: Path) -> None:
    """``ssh -J -W`` and ``ssh -J -D`` (VS Code Remote-SSH) to a port on the target's own
    loopback: opened from the target, byte-identical, recorded as tunnel sessions."""
    user = demo.take_user()
    cfg = _config(demo, tmp_path, user, trust=True)
    payload = os.urandom(200_000)
    with tcp_server("echo") as echo:
        port = port_of(echo)
        r = _run(demo, user, ["ssh", "-F", str(cfg), "-W", f"localhost:{port}", "web01"],
                 stdin=payload)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        assert r.stdout == payload
        proc, lp = _jump_socks(demo, cfg, user, tmp_path)
        try:
            with socks5_connect(lp, "127.0.0.1", port) as s:
                assert s.recv(10)[:2] == b"\x05\x00"
                s.sendall(b"vscode-server-hello")
                assert _recv_exact(s, 19) == b"vscode-server-hello"
        finally:
            proc.terminate()
            proc.wait(10)
    wait_for(lambda: sum(1 for s in _sessions(demo, user)
                         if s["kind"] == "tunnel" and s["ended_at"]) == 2, "two tunnel sessions")
    tunnels = sorted((s for s in _sessions(demo, user) if s["kind"] == "tunnel"),
                     key=lambda s: s["started_at"])
    assert tunnels[0]["command"] == (f"forward localhost:{port} -> i-0web01 (from the target) "
                                     f"localhost:{port}")
    assert tunnels[0]["bytes_in"] == tunnels[0]["bytes_out"] == len(payload)
    assert tunnels[1]["command"].startswith(f"forward 127.0.0.1:{port} -> i-0web01 (from")
    assert tunnels[1]["bytes_in"] == tunnels[1]["bytes_out"] == 19
    assert all(t["target"] == "i-0web01" for t in tunnels)


def test_forward_from_the_target_elsewhere_is_refused(demo: Demo, tmp_path: Path) -> None:
    """No pivoting: from inside a jump to web01, neither another instance (db01 is granted to
    nobody here, web01's own name is not its loopback) nor any other address is reachable."""
    user = demo.take_user()
    cfg = _config(demo, tmp_path, user, trust=True)
    for dest in ("10.255.255.1:80", "db01:22", "web01:22", "169.254.169.254:80"):
        r = _run(demo, user, ["ssh", "-F", str(cfg), "-W", dest, "web01"])
        assert r.returncode == 255, (dest, r.stdout)
        assert b"only the target's own loopback" in r.stderr, (dest, r.stderr)
    denied = [e for e in demo.audit_lines()
              if e.get("event") == "tunnel.denied" and e.get("user", "").startswith(user + "@")]
    assert len(denied) == 4
    assert all("is not the target's loopback" in e["reason"] for e in denied)
    assert not [s for s in _sessions(demo, user) if s["kind"] == "tunnel"]
