"""The whole path with a real Samba AD DC: OpenSSH client -> broker (AD + TOTP) -> sshd target."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pyotp
import pytest

from broker.app import Broker
from broker.config import load_config
from tests.ad.conftest import BASE_DN, FQDN, NETBIOS, PASSWORD, SVC_PASSWORD, SVC_USER, SambaDC
from tests.conftest import BIN, Demo

pytestmark = [pytest.mark.ad, pytest.mark.e2e]


def _ad_config(demo: Demo, dc: SambaDC, tmp: Path) -> Path:
    identity = (
        'backend = "ad"\n'
        "[identity.ad]\nconnect_timeout_seconds = 5\noperation_timeout_seconds = 10\n"
        "[[identity.ad.domains]]\n"
        f'fqdn = "{FQDN}"\nnetbios = "{NETBIOS}"\nservers = ["ldaps://127.0.0.1:636"]\n'
        f'base_dn = "{BASE_DN}"\nbind_user = "{SVC_USER}@{FQDN}"\n'
        f'bind_password = "{SVC_PASSWORD}"\nca_file = "{dc.ca_file}"\n'
        'required_groups = ["bastion-users"]\n'
    )
    # the [identity] table must come before its sub-tables: splice the AD keys into it
    cfg = demo.variant_config(tmp, limits="penalty_exempt = ['127.0.0.0/8']")
    text = cfg.read_text()
    head, sep, rest = text.partition("[inventory]")
    ident_start = head.index("[identity]")
    head = head[:ident_start] + "[identity]\n" + identity
    cfg.write_text(head + "\n" + sep + rest)
    return cfg


def _enrol(cfg: Path, user: str) -> str:
    r = subprocess.run([str(BIN), "--config", str(cfg), "totp", "enroll", user],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r"secret=([A-Z2-7]+)", r.stdout)
    assert m is not None
    return m.group(1)


async def test_ad_password_and_totp_through_the_broker(
    samba_dc: SambaDC, demo: Demo, tmp_path: Path
) -> None:
    cfg = _ad_config(demo, samba_dc, tmp_path)
    broker = Broker(load_config(cfg))
    port = await broker.start()
    known = demo.known_hosts_for(tmp_path, port)
    try:
        secret = _enrol(cfg, "alice")
        for user in ("alice", "outsider-olga"):
            demo.cli("grant", "add", "--user", user, "--domain", FQDN, "--stack", "stack-web",
                     "--vpc", "vpc-0demo", "--level", "read-only", "--ticket", "INC-1",
                     "--reason", "ad test")

        async def ssh(login: str, password: str, code: str) -> tuple[int, bytes, bytes]:
            env = demo.env("alice", password=password, code=code)
            args = demo.ssh_args(login, port=port, known_hosts=known)
            proc = await asyncio.create_subprocess_exec(
                *args, "id -un", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL, env=env)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode is not None
            return proc.returncode, out, err

        totp = pyotp.TOTP(secret)
        step = int(time.time()) // 30
        rc, out, err = await ssh("alice+web01", PASSWORD, totp.generate_otp(step))
        assert rc == 0, err
        assert out.decode().strip() == demo.info["read_only_login"]
        # down-level form, next code
        rc, out, err = await ssh(f"{NETBIOS}\\alice+web01", PASSWORD, totp.generate_otp(step + 1))
        assert rc == 0, err
        # wrong AD password: refused, with the precise reason only in the audit
        rc, _, err = await ssh("alice+web01", "Wrong-Passw0rd!", "000000")
        assert rc == 255
        assert b"Permission denied" in err
        # not in the required group: refused although the password is right
        rc, _, err = await ssh("outsider-olga+web01", PASSWORD, "000000")
        assert rc == 255
        reasons = {(e.get("user"), e.get("reason")) for e in demo.audit_lines()
                   if e["event"] == "auth.failure"}
        assert (f"alice@{FQDN}", "bad password") in reasons
        assert (f"outsider-olga@{FQDN}", "not in a required group") in reasons
        sessions = [s for s in demo.sessions() if s["user"] == f"alice@{FQDN}"]
        assert len(sessions) >= 2
    finally:
        await broker.stop()
