"""Live enforcement with the real OpenSSH client: revoke and expiry end sessions within seconds,
users are warned before expiry, and an extension keeps sessions going without reconnecting."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest

from broker.config import load_config
from broker.domain.workflow import Actor, Role
from broker.services.grants import GrantService
from broker.services.roles import grant_policy
from broker.stores import open_stores
from tests.conftest import Demo
from tests.e2e.test_terminal import Terminal

pytestmark = pytest.mark.e2e


def _short_grant(demo: Demo, user: str, hours: float) -> str:
    out = demo.cli("grant", "add", "--user", user, "--domain", demo.info["domain"],
                   "--stack", "stack-db", "--vpc", "vpc-0demo", "--level", "read-only",
                   "--hours", str(hours), "--ticket", "INC-9", "--reason", "enforcement",
                   "--json").stdout
    return str(json.loads(out)["id"])


def test_revoke_ends_a_live_shell_within_5_seconds(demo: Demo) -> None:
    user = demo.take_user()
    term = Terminal(demo.ssh_args(f"{user}+web01", "-tt"), demo.env(user), rows=24, cols=80)
    try:
        term.send(b"echo READY\"\"1\r")
        term.expect(b"READY1\r\n")
        demo.cli("grant", "revoke", f"g-demo-{user}")
        t0 = time.monotonic()  # from the revocation being stored, not from the CLI's start
        term.expect(b"access ended (grant revoked)", timeout=10)
        assert term.close() == 255
        assert time.monotonic() - t0 < 5
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    s = next(s for s in demo.sessions() if s["user"].startswith(user + "@"))
    assert s["exit_status"] == "terminated:grant revoked"
    with open(s["recording"], "rb") as f:
        assert b"access ended (grant revoked)" in f.read()
    events = [e for e in demo.audit_lines() if e.get("session_id") == s["id"]
              and e["event"] != "recording.sealed"]  # the seal follows in the background
    assert [e["event"] for e in events][-2:] == ["session.terminated", "session.end"]


def test_expiry_warns_then_ends_an_exec_session(demo: Demo) -> None:
    user = demo.take_user()
    _short_grant(demo, user, hours=8 / 3600)  # 8 seconds
    t0 = time.monotonic()
    r = demo.ssh(user, "db01", "echo started; sleep 60; echo never", timeout=40)
    elapsed = time.monotonic() - t0
    assert r.returncode == 255
    assert r.stdout == b"started\n"  # notices go to stderr: stdout stays clean
    assert b"ends at" in r.stderr  # the warning (warn_before is 5 min > 8 s)
    assert b"access ended (grant expired)" in r.stderr
    assert elapsed < 8 + 5


async def test_extension_moves_the_deadline_of_live_sessions(demo: Demo, tmp_path: Path) -> None:
    user = demo.take_user()
    grant_id = _short_grant(demo, user, hours=6 / 3600)  # 6 seconds
    proc = await asyncio.create_subprocess_exec(
        *demo.ssh_args(f"{user}+db01"), "echo started; sleep 12; echo finished",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=demo.env(user))
    try:
        await asyncio.sleep(2)
        # an approver extends the grant through the workflow service on the shared store
        config = load_config(Path(demo.config))
        stores = open_stores(config)
        service = GrantService(stores.grants, stores.audit, stores.clock,
                               grant_policy(config.grants))
        approver = Actor("approver@corp.example.com", frozenset({Role.APPROVER}))
        g = await service.load(approver, grant_id)
        await service.extend(approver, grant_id, g.expires_at + timedelta(minutes=30),
                             "needs longer")
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        assert out == b"started\nfinished\n"
        moved = [e for e in demo.audit_lines() if e["event"] == "session.deadline_moved"
                 and e["grant_id"] == grant_id]
        assert moved
    finally:
        if proc.returncode is None:
            proc.kill()
