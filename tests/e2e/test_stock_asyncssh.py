"""The broker on stock asyncssh (the patch gate closed, as on an untested asyncssh release): one
warning at start, then shell, exec and a recorded ProxyJump still work with the real OpenSSH
client, bytes intact, every session recorded; only slower.

The client's debug log shows which path ran: asyncssh sends an SSH_MSG_IGNORE ahead of every
packet, which the patched broker drops under AES-GCM; so the stock broker's sessions show them
and the demo's (patched) do not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from broker.ssh.patches import STOCK_ENV
from tests.conftest import Demo
from tests.e2e.test_durability import BrokerProcess
from tests.e2e.test_tunnel_lab import wait_for

pytestmark = pytest.mark.e2e

IGNORE = b"Received SSH2_MSG_IGNORE"  # OpenSSH at -vvv, once per IGNORE packet


@dataclass
class Stock:
    broker: BrokerProcess
    known_hosts: Path
    tmp: Path


@pytest.fixture(scope="module")
def stock(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stock]:
    tmp = tmp_path_factory.mktemp("stock")
    cfg = demo.variant_config(tmp)
    cfg.write_text(cfg.read_text() + "[web]\nenabled = false\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(STOCK_ENV, "1")  # the child inherits it; this process keeps its patches
        broker = BrokerProcess(cfg, tmp / "broker.log")
    try:
        yield Stock(broker, demo.known_hosts_for(tmp, broker.port), tmp)
    finally:
        if broker.proc.poll() is None:
            broker.proc.send_signal(signal.SIGTERM)
        try:
            broker.wait(30)
        except subprocess.TimeoutExpired:
            broker.kill()
        assert "Traceback" not in broker.text(), broker.text()[-4000:]


def _sessions(demo: Demo, user: str) -> list[dict[str, Any]]:
    return [s for s in demo.sessions() if s["user"].startswith(user + "@")]


def _recorded(demo: Demo, user: str, kind: str) -> dict[str, Any]:
    wait_for(lambda: any(s["kind"] == kind and s["ended_at"] for s in _sessions(demo, user)),
             f"the recorded {kind} session")
    return next(s for s in _sessions(demo, user) if s["kind"] == kind)


def test_the_stock_broker_logs_one_warning(stock: Stock) -> None:
    lines = [json.loads(line) for line in stock.broker.text().splitlines()
             if '"asyncssh.patches_disabled"' in line]
    assert len(lines) == 1, lines
    assert lines[0]["level"] == "warning"
    assert lines[0]["version"] == asyncssh.__version__
    assert STOCK_ENV in lines[0]["reason"]


def test_exec_is_byte_exact_and_recorded(demo: Demo, stock: Stock) -> None:
    user = demo.take_user()
    payload = os.urandom((2 << 20) + 7)
    args = demo.ssh_args(f"{user}+web01", "-vvv", port=stock.broker.port,
                         known_hosts=stock.known_hosts)
    r = subprocess.run([*args, "echo stock-$((6*7)); cat"], input=payload, capture_output=True,
                       timeout=90, env=demo.env(user))
    assert r.returncode == 0, r.stderr[-3000:].decode(errors="replace")
    assert r.stdout == b"stock-42\n" + payload
    assert IGNORE in r.stderr  # asyncssh's own packet path served this session
    ex = _recorded(demo, user, "exec")
    assert ex["target"] == "i-0web01" and ex["exit_status"] == "0"
    assert ex["bytes_in"] >= len(payload) and ex["bytes_out"] >= len(payload)
    with open(ex["recording"], "rb") as f:
        assert b"stock-42" in f.read()


def test_shell_works(demo: Demo, stock: Stock) -> None:
    user = demo.take_user()
    args = demo.ssh_args(f"{user}+web01", "-tt", port=stock.broker.port,
                         known_hosts=stock.known_hosts)
    r = subprocess.run(args, input=b"echo shell-$((2+3))\nexit 3\n", capture_output=True,
                       timeout=60, env=demo.env(user))
    assert r.returncode == 3, r.stderr.decode(errors="replace")
    assert b"shell-5" in r.stdout
    sh = _recorded(demo, user, "shell")
    with open(sh["recording"], "rb") as f:
        assert b"shell-5" in f.read()


def test_proxyjump_is_byte_exact_and_recorded(demo: Demo, stock: Stock) -> None:
    user = demo.take_user()
    kh = stock.tmp / f"known_hosts_targets_{user}"
    kh.write_text(demo.cli("ca", "known-hosts").stdout)
    cfg = stock.tmp / f"ssh_config_{user}"
    # ``ProxyJump bastion`` runs ``ssh -W '[%h]:%p' bastion`` (with the client's -v flags);
    # spelled out here without them, so that the debug log is the inner connection's alone
    cfg.write_text(
        f"Host bastion\n  HostName 127.0.0.1\n  Port {stock.broker.port}\n  User {user}\n"
        f"  UserKnownHostsFile {stock.known_hosts}\n  StrictHostKeyChecking yes\n"
        "  PreferredAuthentications keyboard-interactive\n  BatchMode no\n"
        "  NumberOfPasswordPrompts 1\n  RekeyLimit 256K\n"
        f"Host web01\n  ProxyCommand ssh -F {cfg} -W '[%h]:%p' bastion\n  User ec2-user\n"
        f"  RekeyLimit 256K\n  UserKnownHostsFile {kh}\n  StrictHostKeyChecking yes\n"
        "  BatchMode no\n  ConnectTimeout 20\n")
    payload = os.urandom((2 << 20) + 11)
    r = subprocess.run(["ssh", "-vvv", "-F", str(cfg), "web01", "echo jumped-$((6*7)); cat"],
                       input=payload, capture_output=True, timeout=90, env=demo.env(user))
    assert r.returncode == 0, r.stderr[-3000:].decode(errors="replace")
    assert r.stdout == b"jumped-42\n" + payload
    assert b"Server host certificate: ssh-ed25519-cert-v01@openssh.com" in r.stderr  # the jump's
    assert IGNORE in r.stderr  # the inner server ran on asyncssh's own packet path
    ex = _recorded(demo, user, "exec")
    assert ex["target"] == "i-0web01" and ex["exit_status"] == "0"
    assert ex["bytes_in"] >= len(payload) and ex["bytes_out"] >= len(payload)
    with open(ex["recording"], "rb") as f:
        assert b"jumped-42" in f.read()
    [jump] = [s for s in _sessions(demo, user) if s["kind"] == "jump"]
    assert jump["command"].startswith("forward web01:22 -> i-0web01 127.0.0.1:")


def test_the_patched_demo_sends_no_ignore_packets(demo: Demo) -> None:
    """The contrast that makes the checks above mean something."""
    user = demo.take_user()
    r = subprocess.run([*demo.ssh_args(f"{user}+web01", "-vvv"), "echo patched"],
                       capture_output=True, timeout=60, env=demo.env(user),
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:].decode(errors="replace")
    assert r.stdout == b"patched\n"
    assert IGNORE not in r.stderr
