"""Floods and guessing, with the real OpenSSH client: stalled pre-auth floods, per-source
penalties, account locks shared by two broker processes, and single-use codes across processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from broker.app import Broker
from broker.config import load_config
from tests.conftest import Demo, serve_broker

pytestmark = pytest.mark.e2e


async def _ssh(demo: Demo, user: str, port: int, known: Path, *, password: str | None = None,
               code: str | None = None, source: str | None = None,
               command: str = "echo ok") -> tuple[int, bytes, bytes]:
    extra = ("-b", source) if source else ()
    args = demo.ssh_args(f"{user}+web01", *extra, port=port, known_hosts=known)
    proc = await asyncio.create_subprocess_exec(
        *args, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=demo.env(user, password=password, code=code),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_flood_of_stalled_connections_does_not_lock_out_a_real_login(
    demo: Demo, tmp_path: Path
) -> None:
    broker = Broker(load_config(demo.variant_config(tmp_path)))
    port = await broker.start()
    flood: list[asyncio.StreamWriter] = []
    try:
        refused = 0
        for _ in range(300):  # a flood from one address that never authenticates
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=("127.0.0.2", 0))
            except OSError:
                refused += 1
                continue
            flood.append(writer)
            with contextlib.suppress(TimeoutError, OSError):
                if await asyncio.wait_for(reader.read(1), 0.05) == b"":
                    refused += 1
        assert refused >= 280  # only max_startups_per_source (10) are held open
        user = demo.take_user()
        t0 = time.monotonic()
        rc, out, err = await _ssh(demo, user, port, demo.known_hosts_for(tmp_path, port))
        elapsed = time.monotonic() - t0
        assert rc == 0, err
        assert out == b"ok\n"
        assert elapsed < 2.0
    finally:
        for w in flood:
            w.close()
        await broker.stop()


async def test_source_penalty_after_repeated_failures(demo: Demo, tmp_path: Path) -> None:
    cfg = demo.variant_config(tmp_path, limits="source_penalty_after = 3\n"
                              "source_penalty_seconds = 30\naccount_free_failures = 10")
    broker = Broker(load_config(cfg))
    port = await broker.start()
    known = demo.known_hosts_for(tmp_path, port)
    try:
        user = demo.take_user()
        for _ in range(3):
            rc, _, err = await _ssh(demo, user, port, known, password="wrong", code="000000",
                                    source="127.0.0.3")
            assert rc == 255
            assert b"Permission denied" in err
        # now even the right password from that address is cut before authentication
        rc, _, err = await _ssh(demo, user, port, known, source="127.0.0.3")
        assert rc == 255
        assert b"Permission denied" not in err
        # another address is not affected
        rc, _, err = await _ssh(demo, user, port, known, source="127.0.0.1")
        assert rc == 0, err
        assert any(e["event"] == "source.penalised" and e["peer"] == "127.0.0.3"
                   for e in demo.audit_lines())
    finally:
        await broker.stop()


async def test_account_lock_is_shared_by_two_broker_processes(
    demo: Demo, tmp_path: Path
) -> None:
    cfg = demo.variant_config(tmp_path, limits="account_free_failures = 5\n"
                              "account_lock_after = 3\npenalty_exempt = ['127.0.0.0/8']")
    proc, port = serve_broker(cfg)
    try:
        user = demo.take_user()
        known = demo.known_hosts_for(tmp_path, port)
        for _ in range(3):
            rc, _, _ = await _ssh(demo, user, port, known, password="wrong", code="000000")
            assert rc == 255
        # the demo broker (another process, same store) refuses the right credentials now
        rc, _, err = await _ssh(demo, user, demo.port, demo.known_hosts)
        assert rc == 255
        assert b"Permission denied" in err
        status = json.loads(demo.cli("auth", "status", "--json").stdout)
        mine = [s for s in status if s["account"] == f"{user}@{demo.info['domain']}"]
        assert mine
        assert mine[0]["locked"] is True
        reasons = [e.get("reason") for e in demo.audit_lines()
                   if e["event"] == "auth.failure" and e.get("user", "").startswith(user + "@")]
        # the (account, source) pair's own lock answers first (the account's is for unknown
        # devices; this user never logged in from 127.0.0.1)
        assert reasons[-1] == "locked (source) after 3 failures"
        demo.cli("auth", "unlock", f"CORP\\{user}")
        rc, _, err = await _ssh(demo, user, demo.port, demo.known_hosts)
        assert rc == 0, err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


async def test_same_code_on_two_processes_at_once_is_accepted_once(
    demo: Demo, tmp_path: Path
) -> None:
    cfg = demo.variant_config(tmp_path, limits="penalty_exempt = ['127.0.0.0/8']")
    proc, port = serve_broker(cfg)
    try:
        user = demo.take_user()
        code = demo.next_code(user)
        known = demo.known_hosts_for(tmp_path, port)
        results = await asyncio.gather(
            _ssh(demo, user, port, known, code=code),
            _ssh(demo, user, demo.port, demo.known_hosts, code=code),
        )
        assert sorted(r[0] for r in results) == [0, 255]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
