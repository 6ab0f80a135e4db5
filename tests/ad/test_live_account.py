"""Live SSH sessions end when the directory says so, on a real Samba AD DC, with the real OpenSSH
client: a user disabled in AD, and one removed from the required group, each mid-session, have
their sessions ended within ``[web] recheck_seconds`` plus the one-second check."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pyotp
import pytest

from broker.app import Broker
from broker.config import load_config
from tests.ad.conftest import BASE_DN, FQDN, NETBIOS, PASSWORD, SVC_PASSWORD, SVC_USER, SambaDC
from tests.ad.test_ssh_login import _enrol
from tests.conftest import Demo

pytestmark = [pytest.mark.ad, pytest.mark.e2e, pytest.mark.timeout(180)]
RECHECK = 2


def _config(demo: Demo, dc: SambaDC, tmp: Path) -> Path:
    identity = (
        'backend = "ad"\n'
        "[identity.ad]\nconnect_timeout_seconds = 5\noperation_timeout_seconds = 10\n"
        "[[identity.ad.domains]]\n"
        f'fqdn = "{FQDN}"\nnetbios = "{NETBIOS}"\nservers = ["ldaps://127.0.0.1:636"]\n'
        f'base_dn = "{BASE_DN}"\nbind_user = "{SVC_USER}@{FQDN}"\n'
        f'bind_password = "{SVC_PASSWORD}"\nca_file = "{dc.ca_file}"\n'
        'required_groups = ["bastion-users"]\n'
    )
    cfg = demo.variant_config(tmp, limits="penalty_exempt = ['127.0.0.0/8']",
                              extra=f"[web]\nenabled = false\nrecheck_seconds = {RECHECK}\n")
    text = cfg.read_text()
    head, sep, rest = text.partition("[inventory]")
    ident_start = head.index("[identity]")
    head = head[:ident_start] + "[identity]\n" + identity
    cfg.write_text(head + "\n" + sep + rest)
    return cfg


def _disable(dc: SambaDC, name: str) -> None:
    import ldap3  # type: ignore[import-untyped]

    conn = dc.admin()
    try:
        assert conn.modify(dc.users[name], {"userAccountControl": [(ldap3.MODIFY_REPLACE,
                                                                     [514])]})
    finally:
        conn.unbind()


def _leave_group(dc: SambaDC, name: str, group: str) -> None:
    import ldap3

    conn = dc.admin()
    try:
        assert conn.modify(dc.groups[group], {"member": [(ldap3.MODIFY_DELETE,
                                                          [dc.users[name]])]})
    finally:
        conn.unbind()


async def test_disabled_or_removed_users_lose_their_live_sessions(
    samba_dc: SambaDC, demo: Demo, tmp_path: Path
) -> None:
    users = ("live-lena", "live-gus", "live-kim")  # disabled, removed from the group, untouched
    samba_dc.add_users(list(users), ["bastion-users"])
    cfg = _config(demo, samba_dc, tmp_path)
    broker = Broker(load_config(cfg))
    port = await broker.start()
    known = demo.known_hosts_for(tmp_path, port)
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        secrets = {u: _enrol(cfg, u) for u in users}
        for u in users:
            demo.cli("grant", "add", "--user", u, "--domain", FQDN, "--stack", "stack-web",
                     "--vpc", "vpc-0demo", "--level", "read-only", "--ticket", "INC-9",
                     "--reason", "live account test")
        step = int(time.time()) // 30
        for u in users:
            env = demo.env(u, password=PASSWORD, code=pyotp.TOTP(secrets[u]).generate_otp(step))
            procs[u] = await asyncio.create_subprocess_exec(
                *demo.ssh_args(f"{u}+web01", port=port, known_hosts=known),
                "echo started; sleep 120", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL, env=env)
        for u, p in procs.items():
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 60)
            assert line == b"started\n", (u, line, p.returncode)

        _disable(samba_dc, "live-lena")
        _leave_group(samba_dc, "live-gus", "bastion-users")
        changed = time.monotonic()
        ended: dict[str, float] = {}
        for u in ("live-lena", "live-gus"):
            await asyncio.wait_for(procs[u].wait(), RECHECK + 15)
            ended[u] = time.monotonic() - changed
        # within the recheck interval plus the one-second pass (and the lookup's own time)
        assert max(ended.values()) < RECHECK + 1 + 3, ended
        assert procs["live-kim"].returncode is None  # an account still admitted keeps going

        reasons = {e["user"]: e["reason"] for e in demo.audit_lines()
                   if e["event"] == "session.terminated"
                   and e.get("user", "").startswith("live-")}
        assert reasons == {
            f"live-lena@{FQDN}": "account no longer allowed: account disabled",
            f"live-gus@{FQDN}": "account no longer allowed: not in a required group",
        }
        ends = {e["user"] for e in demo.audit_lines() if e["event"] == "session.end"}
        assert {f"live-lena@{FQDN}", f"live-gus@{FQDN}"} <= ends
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()
        await broker.stop()
