"""Nobody keeps a user out by failing on purpose, with the real OpenSSH client: failures from
one address lock the account for unknown addresses only, never for one it logged in from."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

from broker.app import Broker
from broker.config import load_config
from tests.conftest import Demo

pytestmark = pytest.mark.e2e


async def _ssh(demo: Demo, user: str, port: int, known: Path, source: str, *,
               password: str | None = None, code: str | None = None) -> tuple[int, bytes, float]:
    args = demo.ssh_args(f"{user}+web01", "-b", source, port=port, known_hosts=known)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *args, "echo ok", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=demo.env(user, password=password, code=code),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out + err, time.monotonic() - started


async def test_failures_from_one_address_do_not_keep_a_user_out_of_her_known_address(
    demo: Demo, tmp_path: Path
) -> None:
    # no penalty_exempt here (the demo's exempts 127.0.0.0/8): every address is limited
    cfg = demo.variant_config(tmp_path, limits="account_free_failures = 10\n"
                              "account_lock_after = 5\nknown_source_days = 30")
    broker = Broker(load_config(cfg))
    port = await broker.start()
    known = demo.known_hosts_for(tmp_path, port)
    user = demo.take_user()
    account = f"{user}@{demo.info['domain']}"
    try:
        rc, output, _ = await _ssh(demo, user, port, known, "127.0.0.2")
        assert rc == 0, output  # 127.0.0.2 is now a known address of the account
        for _ in range(6):  # the attacker, as this user, from 127.0.0.3
            rc, output, _ = await _ssh(demo, user, port, known, "127.0.0.3",
                                       password="wrong", code="000000")
            assert rc == 255
            assert b"Permission denied" in output
        # the user, at once, from her known address
        rc, output, elapsed = await _ssh(demo, user, port, known, "127.0.0.2")
        assert rc == 0, output
        assert output.startswith(b"ok\n")
        assert elapsed < 5
        # a new address for the account is refused by the account's rule (right password),
        # and the attacker's address by its own, with the same answer as a wrong password
        for source in ("127.0.0.4", "127.0.0.3"):
            rc, output, _ = await _ssh(demo, user, port, known, source, code="000000")
            assert rc == 255
            assert b"Permission denied" in output
        reasons = [(e["peer"].rsplit(":", 1)[0], e["reason"]) for e in demo.audit_lines()
                   if e["event"] == "auth.failure" and e.get("user") == account]
        assert reasons[-2:] == [("127.0.0.4", "locked (account, unknown source) after 5 failures"),
                                ("127.0.0.3", "locked (source) after 5 failures")]
        assert ("127.0.0.2", "locked (account, unknown source) after 5 failures") not in reasons
        status = json.loads(demo.cli("auth", "status", "--json").stdout)
        mine = {(s["source"], s["failures"], s["locked"], s["known_device"])
                for s in status if s["account"] == account}
        assert mine == {("*", 5, True, None), ("127.0.0.3", 5, True, False)}
        text = demo.cli("auth", "status").stdout
        assert any(line.split()[:2] == [account, "127.0.0.3"] for line in text.splitlines())
    finally:
        await broker.stop()
