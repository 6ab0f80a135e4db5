"""Two bastions sharing PostgreSQL, with the real OpenSSH client: a grant approved through one
admits a session on the other, a code used on one is spent on both, and a revoke through one
ends the session on the other within 10 s."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest

from tests.conftest import Demo, broker_cli, serve_broker
from tests.contract import pgserver
from tests.contract.pgserver import PgServer

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with pgserver.running() as server:
        yield server


def test_two_bastions_share_grants_codes_and_revocations(
    demo: Demo, pg: PgServer, tmp_path: Path
) -> None:
    a_cfg, b_cfg = (demo.fleet_config(tmp_path, name, pg.dsn()) for name in ("a", "b"))
    procs = []
    try:
        (pa, port_a), (pb, port_b) = serve_broker(a_cfg), serve_broker(b_cfg)
        procs = [pa, pb]
        user = demo.take_user()
        secret = re.search(r"secret=([A-Z2-7]+)", broker_cli(a_cfg, "totp", "enroll", user))
        assert secret is not None
        totp = pyotp.TOTP(secret.group(1))
        step = int(time.time()) // 30
        known_b = demo.known_hosts_for(tmp_path, port_b)
        known_a = demo.known_hosts_for(tmp_path, port_a)

        def ssh(port: int, known: Path, code: str, command: str,
                **kw: object) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [*demo.ssh_args(f"{user}+web01", port=port, known_hosts=known), command],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=demo.env(user, code=code))

        # no grant in PostgreSQL yet: B refuses (steps step and step + 1 stay valid for 30 s)
        p = ssh(port_b, known_b, totp.generate_otp(step), "true")
        _, err = p.communicate(timeout=30)
        assert p.returncode == 255
        assert b"no access to web01" in err
        # a grant approved through A admits a session on B
        grant = json.loads(broker_cli(a_cfg, "grant", "add", "--user", user, "--domain",
                                demo.info["domain"], "--stack", "stack-web", "--vpc",
                                "vpc-0demo", "--level", "read-only", "--ticket", "CHG-7",
                                "--reason", "fleet", "--json"))
        code = totp.generate_otp(step + 1)
        p = ssh(port_b, known_b, code, "echo on-b; sleep 60; echo never")
        assert p.stdout is not None
        assert p.stdout.readline() == b"on-b\n"
        # the code B accepted is spent on A too
        q = ssh(port_a, known_a, code, "true")
        _, qerr = q.communicate(timeout=30)
        assert q.returncode == 255
        assert b"Permission denied" in qerr
        # a revoke through A ends the session on B within 10 s
        t0 = time.monotonic()
        broker_cli(a_cfg, "grant", "revoke", grant["id"])
        out, err = p.communicate(timeout=20)
        assert time.monotonic() - t0 < 10
        assert p.returncode == 255
        assert b"access ended (grant revoked)" in err
        assert b"never" not in out
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
