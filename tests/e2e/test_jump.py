"""Recorded ProxyJump with the real OpenSSH client: ``ssh -J`` exec and shell, ``scp -J``,
``sftp -J`` and ``rsync`` both ways (byte-identical), each recorded like a direct session; the
broker's host certificate is accepted with the ``@cert-authority`` line and refused without it;
forwards inside the jump reach the target's own loopback only (VS Code Remote-SSH). Both the
outer and the inner connection re-key every 256 KiB (``RekeyLimit``), so the copies cross many
key changes on both."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from broker.runtime import free_port
from tests.conftest import Demo
from tests.e2e.test_tunnel_lab import (
    Forwarder,
    _recv_exact,
    closed_by_peer,
    port_of,
    socks5_connect,
    tcp_server,
    wait_for,
)

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


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_rsync_over_the_jump_both_ways(demo: Demo, tmp_path: Path) -> None:
    """``rsync -e ssh`` through the recorded jump: a tree up and back, identical; each run is
    the recorded exec of ``rsync --server`` on the target."""
    src = tmp_path / "tree"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(1_500_000))
    (src / "sub" / "b.txt").write_text("hello rsync\n" * 1000)
    (src / "sub" / "deeper" / "empty").write_bytes(b"")
    users = [demo.take_user(), demo.take_user()]  # one login each: a fresh TOTP code
    remote = f"/tmp/bb-jump-rsync-{users[0]}"
    back = tmp_path / "back"
    try:
        for user, (frm, to) in zip(users, [(f"{src}/", f"web01:{remote}/"),
                                           (f"web01:{remote}/", f"{back}/")], strict=True):
            cfg = _config(demo, tmp_path, user, trust=True)
            r = _run(demo, user, ["rsync", "-a", "-e", f"ssh -F {cfg}", frm, to])
            assert r.returncode == 0, r.stderr.decode(errors="replace")
    finally:
        subprocess.run(["rm", "-rf", remote], check=False)  # the demo targets run here
    assert _tree(back) == _tree(src)
    for user in users:
        wait_for(lambda u=user: any(s["kind"] == "exec" and s["ended_at"]
                                    for s in _sessions(demo, u)), "the recorded rsync")
        [ex] = [s for s in _sessions(demo, user) if s["kind"] == "exec"]
        assert ex["command"].startswith("rsync --server")
        assert ex["exit_status"] == "0"
        assert ex["target"] == "i-0web01"
    up = next(s for s in _sessions(demo, users[0]) if s["kind"] == "exec")
    assert up["bytes_in"] > 1_500_000  # the file went through the recorded session


def test_a_jump_is_one_story(demo: Demo, tmp_path: Path) -> None:
    """Each ``ssh -J`` connection is a ``jump`` session that the sessions run through it name as
    their parent; closed by the client, it reads "closed by client" (never "target error", which
    a reset of the broker's own inner server used to cause now and then); ``sessions list`` shows
    it with its sessions below it, ``--all`` flat with VIA, ``sessions files`` and ``play`` on the
    jump tell what went through it."""
    runs: list[tuple[str, str]] = []  # (user, what ran)
    src = tmp_path / "story.bin"
    src.write_bytes(os.urandom(70_000))
    remote = f"/tmp/bb-jump-story-{os.getpid()}.bin"
    try:
        for i in range(8):
            user = demo.take_user()  # one login each: a fresh TOTP code
            cfg = _config(demo, tmp_path, user, trust=True)
            if i == 0:
                batch = tmp_path / "batch"
                batch.write_text(f"put {src} {remote}\nrm {remote}\n")
                r = _run(demo, user, ["sftp", "-F", str(cfg), "-b", str(batch), "web01"])
                runs.append((user, "sftp"))
            elif i % 2:
                r = _run(demo, user, ["ssh", "-F", str(cfg), "-tt", "web01"],
                         stdin=f"echo story-{i}\nexit\n".encode())
                runs.append((user, "shell"))
            else:
                r = _run(demo, user, ["ssh", "-F", str(cfg), "web01", f"echo story-{i}"])
                runs.append((user, f"echo story-{i}"))
            assert r.returncode == 0, r.stderr.decode(errors="replace")
    finally:
        Path(remote).unlink(missing_ok=True)

    def by_user() -> dict[str, list[dict[str, Any]]]:
        rows = demo.sessions()
        return {u: [s for s in rows if s["user"].startswith(u + "@")] for u, _ in runs}

    def all_ended() -> bool:
        return all(len(v) == 2 and all(s["ended_at"] for s in v) for v in by_user().values())

    wait_for(all_ended, "every jump and its session to end")
    sessions = by_user()
    for user, what in runs:
        rows = sessions[user]
        [jump] = [s for s in rows if s["kind"] == "jump"]
        [inner] = [s for s in rows if s["kind"] != "jump"]
        assert jump["parent_id"] is None and inner["parent_id"] == jump["id"]
        assert (inner["command"] or inner["kind"]) == what
        assert jump["exit_status"] == "closed" and jump["outcome"] == "closed by client", jump
        assert jump["status"] == "ok"
        assert [s["id"] for s in rows] == [jump["id"], inner["id"]]  # the jump, then its own

    for user, _ in runs[:2]:  # sftp, shell
        jump, inner = sessions[user]
        table = demo.cli("sessions", "list", "--user", user).stdout.splitlines()
        assert table[1].split()[0] == jump["id"][:8], table
        assert table[2].split()[:2] == ["└", inner["id"][:8]], table
        flat = demo.cli("sessions", "list", "--user", user, "--all").stdout.splitlines()
        assert flat[0].split()[-1] == "VIA"
        [inner_line] = [x for x in flat if x.startswith(inner["id"][:8])]
        assert inner_line.split()[-1] == jump["id"][:8]
        played = demo.cli("play", jump["id"][:8]).stdout
        assert "closed by client" in played and "sessions in this connection (1):" in played
        assert inner["id"][:8] in played

    jump = sessions[runs[0][0]][0]
    files = demo.cli("sessions", "files", jump["id"][:8]).stdout  # the jump's: its sftp's
    [close] = [x for x in files.splitlines() if " close " in x]
    assert remote in close and "upload" in close and str(len(src.read_bytes())) in close


# What VS Code Remote-SSH pipes into ``ssh -T -D PORT host bash``: start its server on the
# target's loopback and print the port; VS Code then connects through the SOCKS forward.
_SERVER = (b"exec python3 -c 'import socket\n"
           b"s = socket.create_server((\"127.0.0.1\", 0))\n"
           b"print(\"listeningOn==%d==\" % s.getsockname()[1], flush=True)\n"
           b"for _ in range(2):\n"
           b"    c, _ = s.accept()\n    c.sendall(c.recv(64).upper())\n    c.close()'\n")


def test_forward_to_the_target_loopback_is_a_recorded_tunnel(demo: Demo, tmp_path: Path) -> None:
    """``ssh -J -W`` and VS Code Remote-SSH's way (``ssh -T -D PORT web01 bash``, its server
    started on the target's loopback, reached through SOCKS) to the target's own loopback:
    opened from the target, byte-identical, each recorded as a tunnel session."""
    user = demo.take_user()
    cfg = _config(demo, tmp_path, user, trust=True)
    payload = os.urandom(200_000)
    with tcp_server("echo") as echo:
        port = port_of(echo)
        r = _run(demo, user, ["ssh", "-F", str(cfg), "-W", f"localhost:{port}", "web01"],
                 stdin=payload)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stdout == payload
    lp = free_port()
    vs_user = demo.take_user()  # a second login of one user would wait for the next TOTP step
    vs_cfg = _config(demo, tmp_path, vs_user, trust=True)
    vscode = subprocess.Popen(["ssh", "-F", str(vs_cfg), "-T", "-D", f"127.0.0.1:{lp}", "web01",
                               "bash"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=demo.env(vs_user))
    try:
        assert vscode.stdin is not None and vscode.stdout is not None
        vscode.stdin.write(_SERVER)
        vscode.stdin.close()
        line = vscode.stdout.readline().decode()
        assert line.startswith("listeningOn=="), line
        server_port = int(line.split("==")[1])
        for word in (b"vscode", b"second"):  # VS Code opens several: one handshake for all
            with socks5_connect(lp, "127.0.0.1", server_port) as s:
                assert s.recv(10)[:2] == b"\x05\x00"
                s.sendall(word)
                assert _recv_exact(s, 6) == word.upper()
        assert vscode.wait(30) == 0
    finally:
        if vscode.poll() is None:
            vscode.kill()
            vscode.wait()
    def tunnels() -> list[dict[str, Any]]:
        return sorted((s for u in (user, vs_user) for s in _sessions(demo, u)
                       if s["kind"] == "tunnel" and s["ended_at"]), key=lambda s: s["started_at"])

    wait_for(lambda: len(tunnels()) == 3, "three tunnel sessions")
    w, vs, vs2 = tunnels()
    for tunnel, owner in ((w, user), (vs, vs_user), (vs2, vs_user)):  # carried by their jump
        [jump] = [s for s in _sessions(demo, owner) if s["kind"] == "jump"]
        assert tunnel["parent_id"] == jump["id"]
    assert w["command"] == f"forward localhost:{port} -> i-0web01 (from the target) localhost:{port}"
    assert w["bytes_in"] == w["bytes_out"] == len(payload)
    assert w["user"].startswith(user + "@")
    assert vs["command"] == (f"forward 127.0.0.1:{server_port} -> i-0web01 (from the target) "
                             f"127.0.0.1:{server_port}")
    assert vs["bytes_in"] == vs["bytes_out"] == vs2["bytes_in"] == vs2["bytes_out"] == 6
    assert w["target"] == vs["target"] == vs2["target"] == "i-0web01"
    # the two SOCKS connections shared one forwarding connection to web01 (one login there)
    logins = [line for line in Path(demo.info["target_logs"]["web01"]).read_text().splitlines()
              if "Accepted publickey" in line and f"user={vs_user}@" in line]
    [fwd_login] = [line for line in logins if " forwards" in line]
    # ... which ended with the client's connection
    port = fwd_login.split(" port ")[1].split()[0]
    wait_for(lambda: f"Disconnected from user {demo.info['read_only_login']} 127.0.0.1 port {port}"
             in Path(demo.info["target_logs"]["web01"]).read_text(), "the link to end")
    # the script VS Code sent is in the recording of the exec session that ran it
    wait_for(lambda: any(s["kind"] == "exec" and s["ended_at"] for s in _sessions(demo, vs_user)),
             "the recorded exec session")
    ex = next(s for s in _sessions(demo, vs_user) if s["kind"] == "exec")
    with open(ex["recording"], "rb") as f:
        assert b"listeningOn" in f.read()


def test_forward_after_a_target_login_starts_from_the_target(demo: Demo) -> None:
    """Logged in as ``user+web01`` (no jump), ``localhost`` is web01's too, as with ssh straight
    to web01; with the menu login (no target) it stays the bastion's own, refused."""
    user = demo.take_user()
    payload = os.urandom(50_000)
    with tcp_server("echo") as echo:
        port = port_of(echo)
        r = subprocess.run(demo.ssh_args(f"{user}+web01", "-W", f"localhost:{port}"),
                           input=payload, capture_output=True, timeout=60, env=demo.env(user))
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        assert r.stdout == payload
        menu = demo.take_user()
        r = subprocess.run(demo.ssh_args(menu, "-W", f"localhost:{port}"), capture_output=True,
                           timeout=60, env=demo.env(menu), stdin=subprocess.DEVNULL)
        assert r.returncode == 255
        assert b"the bastion itself is not a forwarding destination" in r.stderr
    wait_for(lambda: any(s["kind"] == "tunnel" and s["ended_at"] for s in _sessions(demo, user)),
             "the tunnel session")
    [t] = [s for s in _sessions(demo, user) if s["kind"] == "tunnel"]
    assert t["command"] == f"forward localhost:{port} -> i-0web01 (from the target) localhost:{port}"
    assert t["bytes_in"] == t["bytes_out"] == len(payload)


def test_forward_from_the_target_elsewhere_is_refused(demo: Demo, tmp_path: Path) -> None:
    """No pivoting: from inside a jump to web01, neither another instance nor web01's own name
    (not its loopback) nor any other address is reachable, nor web01's own SSH port (a nested
    SSH session would go unrecorded); each refusal says why."""
    user = demo.take_user()
    cfg = _config(demo, tmp_path, user, trust=True)
    web01 = demo.info["target_ports"]["web01"]
    dests = ["10.255.255.1:80", "db01:22", "web01:22", "169.254.169.254:80",
             f"localhost:{web01}", "127.0.0.1:22"]
    ports = [free_port() for _ in dests]
    log = tmp_path / "refused.log"
    with open(log, "wb") as f:  # one login, one -L per destination
        fw = subprocess.Popen(
            ["ssh", "-F", str(cfg), "-N", "-v",
             *[a for lp, d in zip(ports, dests, strict=True) for a in ("-L", f"127.0.0.1:{lp}:{d}")],
             "web01"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f,
            env=demo.env(user))
    try:
        wait_for(lambda: log.read_text(errors="replace").count("forwarding listening on 127.0.0.1")
                 == len(dests) or fw.poll() is not None, "the forwards")
        for lp in ports:
            with socket.create_connection(("127.0.0.1", lp), timeout=20) as s:
                assert closed_by_peer(s)
        wait_for(lambda: log.read_text(errors="replace").count("open failed") == len(dests),
                 "the refusals")
        text = log.read_text(errors="replace")
        assert text.count("only the target's own loopback") == 4
        assert text.count("the target's SSH port is reached through the recorded jump") == 2
    finally:
        Forwarder(fw, log).stop()  # SIGTERM, then SIGKILL if ssh does not exit within 10 s
    denied = [e for e in demo.audit_lines()
              if e.get("event") == "tunnel.denied" and e.get("user", "").startswith(user + "@")]
    assert sorted(e["destination"] for e in denied) == sorted(dests)
    assert sum("is not the target's loopback" in e["reason"] for e in denied) == 4
    assert sum("is its SSH port" in e["reason"] for e in denied) == 2
    assert not [s for s in _sessions(demo, user) if s["kind"] == "tunnel"]


def test_remote_forwarding_inside_the_jump_is_refused_and_audited(demo: Demo,
                                                                  tmp_path: Path) -> None:
    user = demo.take_user()
    cfg = _config(demo, tmp_path, user, trust=True)
    r = _run(demo, user, ["ssh", "-F", str(cfg), "-N", "-o", "ExitOnForwardFailure=yes",
                          "-R", "0:127.0.0.1:9", "web01"])
    assert r.returncode == 255
    assert b"remote port forwarding failed" in r.stderr
    assert any(e["event"] == "tunnel.denied" and e.get("kind") == "remote"
               and e.get("target") == "i-0web01" and e["user"].startswith(user + "@")
               for e in demo.audit_lines())
