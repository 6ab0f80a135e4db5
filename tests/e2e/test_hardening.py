"""Protocol hardening with the real OpenSSH client: algorithms, strict kex, forwarding refused,
login grace timeout, target host key verification, systemd readiness, clean demo shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.app import Broker
from broker.config import load_config
from tests.conftest import BIN, Demo, start_demo, stop_demo

pytestmark = pytest.mark.e2e


def test_strict_kex_and_modern_algorithms(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "web01", "true", extra=("-vvv",))
    assert r.returncode == 0
    log = r.stderr.decode()
    assert "will use strict KEX ordering" in log  # Terrapin countermeasure negotiated
    assert "cipher: aes128-gcm@openssh.com" in log
    for opt in ("Ciphers=aes128-ctr", "Ciphers=aes256-cbc", "MACs=hmac-sha1",
                "KexAlgorithms=diffie-hellman-group14-sha1"):
        extra = ("-o", opt) if "MACs" not in opt else ("-o", opt, "-o", "Ciphers=aes128-ctr")
        r = demo.ssh(user, "web01", "true", extra=extra, code="000000")
        assert r.returncode == 255
        assert b"no matching" in r.stderr, (opt, r.stderr)


def test_agent_x11_and_port_forwarding_are_refused(demo: Demo) -> None:
    user = demo.take_user()
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, timeout=10)
    env_lines = dict(
        part.split("=", 1) for part in agent.stdout.replace(";", "\n").split()
        if "=" in part
    )
    try:
        env = demo.env(user)
        env["SSH_AUTH_SOCK"] = env_lines["SSH_AUTH_SOCK"]
        r = subprocess.run(
            [*demo.ssh_args(f"{user}+web01", "-A", "-X"),
             'echo "A=${SSH_AUTH_SOCK:-none} X=${DISPLAY:-none}"'],
            capture_output=True, timeout=30, env=env,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"A=none X=none\n"
    finally:
        os.kill(int(env_lines["SSH_AGENT_PID"]), signal.SIGTERM)
    # -W (direct-tcpip) to the target's sshd port: refused by the broker, not relayed
    port = demo.info["target_ports"]["web01"]
    r = demo.ssh(user, "web01", None, extra=("-W", f"127.0.0.1:{port}"))
    assert r.returncode == 255
    assert b"administratively prohibited" in r.stderr or b"open failed" in r.stderr


async def test_login_grace_timeout_closes_idle_unauthenticated_connections(
    demo: Demo, tmp_path: Path
) -> None:
    cfg = load_config(demo.variant_config(tmp_path, ssh="login_grace_seconds = 1"))
    broker = Broker(cfg)
    port = await broker.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        banner = await reader.readline()
        assert banner.startswith(b"SSH-2.0-bastion-broker")
        t0 = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), timeout=10)  # until the broker closes
        assert time.monotonic() - t0 < 5
        del rest
        writer.close()
    finally:
        await broker.stop()


async def test_target_host_key_mismatch_refuses_the_session(demo: Demo, tmp_path: Path) -> None:
    import asyncssh

    wrong = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    inv_text = (demo.state_dir / "inventory.toml").read_text()
    lines = inv_text.splitlines()
    # replace the host key of the first instance (web01) with an unrelated key
    idx = next(i for i, line in enumerate(lines) if line.startswith("host_keys"))
    lines[idx] = f"host_keys = [{json.dumps(wrong)}]"
    cfg = load_config(demo.variant_config(tmp_path, inventory="\n".join(lines) + "\n"))
    broker = Broker(cfg)
    port = await broker.start()
    try:
        user = demo.take_user()
        known = demo.known_hosts_for(tmp_path, port)
        args = demo.ssh_args(f"{user}+web01", port=port, known_hosts=known)
        proc = await asyncio.create_subprocess_exec(
            *args, "echo reached", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=demo.env(user),
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 255
        assert out == b""
        assert b"target unavailable" in err
    finally:
        await broker.stop()


def test_serve_notifies_systemd_and_stops_on_sigterm(demo: Demo, tmp_path: Path) -> None:
    cfg = demo.variant_config(tmp_path)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    proc = subprocess.Popen([str(BIN), "--config", str(cfg), "serve"],
                            env={**os.environ, "NOTIFY_SOCKET": sock_path},
                            stderr=subprocess.PIPE)
    try:
        assert sock.recv(1024) == b"READY=1"
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(1024) == b"STOPPING=1"
        assert proc.wait(20) == 0
        assert b"Traceback" not in (proc.stderr.read() if proc.stderr else b"")
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_demo_stops_everything_it_started(tmp_path: Path) -> None:
    d = start_demo(tmp_path / "state", users=1)
    ports = [d.port, *d.info["target_ports"].values()]
    for p in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) == 0
    stop_demo(d)
    assert d.proc.returncode == 0
    for p in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0, f"port {p} still open"
    assert not (d.state_dir / "demo.json").exists()


def test_totp_enroll_and_user_add(demo: Demo, tmp_path: Path) -> None:
    r = demo.cli("totp", "enroll", "newbie")
    assert "otpauth://totp/bastion-broker:newbie%40corp.example.com?secret=" in r.stdout
    assert "█" in r.stdout or "▀" in r.stdout  # the QR code
    cfg = demo.variant_config(tmp_path)
    users = tmp_path / "users.toml"
    users.write_text((demo.state_dir / "users.toml").read_text())
    cfg.write_text(cfg.read_text().replace(str(demo.state_dir / "users.toml"), str(users)))
    add = subprocess.run([str(BIN), "--config", str(cfg), "user", "add", "newbie",
                          "--password-stdin"], input="a-long-password\n", capture_output=True,
                         text=True, timeout=30)
    assert add.returncode == 0, add.stderr
    assert 'name = "newbie"' in users.read_text() and "$argon2id$" in users.read_text()
    dup = subprocess.run([str(BIN), "--config", str(cfg), "user", "add", "NEWBIE",
                          "--password-stdin"], input="a-long-password\n", capture_output=True,
                         text=True, timeout=30)
    assert dup.returncode == 2
    assert "already exists" in dup.stderr


def test_worker_processes_share_port_store_and_audit_chain(tmp_path: Path) -> None:
    from broker.domain.audit import verify_chain

    d = start_demo(tmp_path / "state", users=8, workers=2)
    try:
        users = [u["user"] for u in d.info["users"] if u["user"] != "alice"]
        procs = [subprocess.Popen([*d.ssh_args(f"{u}+web01"), "echo $PPID"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, env=d.env(u)) for u in users]
        for p in procs:
            _out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        starts = [e for e in d.audit_lines() if e["event"] == "session.start"]
        assert len(starts) == len(users)
        raw = (d.state_dir / "audit" / "audit.jsonl").read_bytes().splitlines(keepends=True)
        assert verify_chain(raw) == []
    finally:
        stop_demo(d)
    assert d.proc.returncode == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", d.port)) != 0


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, so that a recording fills it within the first megabyte."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], check=True,
                   timeout=30)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False, timeout=30)


async def test_full_recording_disk_ends_the_session_and_nothing_unrecorded_leaks(
    demo: Demo, tmp_path: Path, small_tmpfs: Path
) -> None:
    from broker.domain import recording as fmt

    rec_dir = small_tmpfs
    cfg = demo.variant_config(tmp_path)
    cfg.write_text(cfg.read_text() + f'[recordings]\ndir = "{rec_dir}"\n[web]\nenabled = false\n')
    broker = Broker(load_config(cfg))
    port = await broker.start()
    try:
        user = demo.take_user()
        proc = await asyncio.create_subprocess_exec(
            *demo.ssh_args(f"{user}+web01", port=port,
                           known_hosts=demo.known_hosts_for(tmp_path, port)),
            "head -c 4000000 /dev/urandom; sleep 5", stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=demo.env(user))
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 255
        assert b"access ended (recording unavailable)" in err
        assert len(out) < 1_100_000
        files = list(rec_dir.rglob("*.rec"))
        assert len(files) == 1
        parsed = fmt.parse(files[0].read_bytes())
        recorded = fmt.output_bytes(parsed.frames)
        assert recorded[: len(out)] == out  # everything the client got is in the recording
        events = [e["event"] for e in demo.audit_lines()]
        assert "session.recording_failed" in events
    finally:
        await broker.stop()
