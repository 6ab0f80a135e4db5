"""Two bastions sharing PostgreSQL, with the real OpenSSH client: a lock made through one ends
the session the other holds (the user reads why) and refuses the user's logins on both."""

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


def test_a_lock_made_through_one_bastion_ends_the_session_on_the_other(
    demo: Demo, pg: PgServer, tmp_path: Path
) -> None:
    a_cfg, b_cfg = (demo.fleet_config(tmp_path, name, pg.dsn(), extra="[web]\nenabled = false\n")
                    for name in ("a", "b"))
    procs = []
    try:
        (pa, port_a), (pb, port_b) = serve_broker(a_cfg), serve_broker(b_cfg)
        procs = [pa, pb]
        user = demo.take_user()
        secret = re.search(r"secret=([A-Z2-7]+)", broker_cli(a_cfg, "totp", "enroll", user))
        assert secret is not None
        totp = pyotp.TOTP(secret.group(1))
        step = int(time.time()) // 30
        broker_cli(a_cfg, "grant", "add", "--user", user, "--domain", demo.info["domain"], "--stack",
             "stack-web", "--vpc", "vpc-0demo", "--level", "read-only", "--ticket", "INC-8",
             "--reason", "fleet lock", "--json")

        def ssh(port: int, code: str, command: str) -> subprocess.Popen[bytes]:
            known = demo.known_hosts_for(tmp_path, port)
            return subprocess.Popen(
                [*demo.ssh_args(f"{user}+web01", port=port, known_hosts=known), command],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=demo.env(user, code=code))

        p = ssh(port_b, totp.generate_otp(step), "echo on-b; sleep 60; echo never")
        assert p.stdout is not None
        assert p.stdout.readline() == b"on-b\n"
        t0 = time.monotonic()
        lock = json.loads(broker_cli(a_cfg, "lock", "--user", user, "--reason", "account takeover",
                               "--json"))
        out, err = p.communicate(timeout=20)
        assert time.monotonic() - t0 < 10  # B checks every 2 s
        assert p.returncode == 255 and b"never" not in out
        assert (f"locked by the security team: account takeover (lock {lock['id']})"
                .encode()) in err
        # B lists the lock A made, and A refuses the user's next login
        assert lock["id"] in broker_cli(b_cfg, "lock", "list")
        q = ssh(port_a, totp.generate_otp(step + 1), "true")
        _, qerr = q.communicate(timeout=30)
        assert q.returncode == 255 and b"Permission denied" in qerr
        broker_cli(b_cfg, "lock", "remove", lock["id"])
        assert lock["id"] not in broker_cli(a_cfg, "lock", "list")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
