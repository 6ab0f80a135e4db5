"""A broker started with a low soft open-files limit raises it to the hard limit, so that sessions
are not refused at the soft limit (three descriptors per session: about 330 at the usual 1024)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from tests.conftest import BIN, Demo
from tests.e2e.test_audit_truth import _KbdClient

pytestmark = pytest.mark.e2e

SOFT = 64  # below what the sessions below need (4 connections + 2 x 40 + the broker's own)


def _serve_with_soft_limit(cfg: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``bastion-broker serve`` started with soft RLIMIT_NOFILE = SOFT (hard unchanged)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 200
    start = ("import os, resource, sys; "
             f"resource.setrlimit(resource.RLIMIT_NOFILE, ({SOFT}, {hard})); "
             "os.execv(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", start, str(BIN), "--config", str(cfg),
                             "serve"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    for line in iter(proc.stderr.readline, b""):
        if b'"broker.listening"' in line:
            return proc, int(json.loads(line)["port"])
    proc.kill()
    raise AssertionError("the broker did not start")


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit")


async def test_sessions_beyond_the_inherited_soft_limit(demo: Demo, tmp_path: Path) -> None:
    proc, port = _serve_with_soft_limit(demo.variant_config(tmp_path))
    conns: list[asyncssh.SSHClientConnection] = []
    try:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert _soft_limit(proc.pid) == hard
        procs: list[asyncssh.SSHClientProcess[bytes]] = []
        for _ in range(4):
            user = demo.take_user()
            conn, _client = await asyncssh.create_connection(
                lambda u=user: _KbdClient(demo.info["password"], demo.next_code(u)), "127.0.0.1",
                port, username=f"{user}+web01", known_hosts=str(demo.known_hosts_for(tmp_path,
                                                                                     port)),
                client_keys=None, agent_path=None, config=None,
                preferred_auth=["keyboard-interactive"])
            conns.append(conn)
            for _ in range(10):  # max_sessions_per_connection
                procs.append(await conn.create_process("echo up; exec sleep 60", encoding=None))
        lines = await asyncio.wait_for(
            asyncio.gather(*(p.stdout.readline() for p in procs)), 60)
        assert lines == [b"up\n"] * 40
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert fds > SOFT  # the sessions really needed more than the inherited limit
    finally:
        for c in conns:
            c.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
