"""``[ssh] session_idle_timeout_seconds``: a session with no traffic either way ends (recorded,
audited, the user told why); one that keeps printing does not. Real OpenSSH client and sshd."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Demo
from tests.e2e.test_durability import BrokerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def idle_broker(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[BrokerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("idle")
    cfg = demo.variant_config(tmp, ssh="session_idle_timeout_seconds = 2")
    cfg.write_text(cfg.read_text() + "[web]\nenabled = false\n"
                   "[grants]\nenforce_interval_seconds = 0.2\n")
    broker = BrokerProcess(cfg, tmp / "broker.log")
    try:
        yield broker, demo.known_hosts_for(tmp, broker.port)
    finally:
        broker.kill()


def _ssh(demo: Demo, broker: tuple[BrokerProcess, Path], user: str, command: str,
         ) -> subprocess.CompletedProcess[bytes]:
    proc, known_hosts = broker
    args = demo.ssh_args(f"{user}+web01", port=proc.port, known_hosts=known_hosts)
    return subprocess.run([*args, command], capture_output=True, timeout=60,
                          env=demo.env(user), stdin=subprocess.DEVNULL)


def test_a_silent_session_ends_at_the_idle_timeout(
        demo: Demo, idle_broker: tuple[BrokerProcess, Path]) -> None:
    user = demo.take_user()
    started = time.monotonic()
    r = _ssh(demo, idle_broker, user, "echo started; sleep 50; echo never")
    took = time.monotonic() - started
    assert r.returncode == 255, r.stderr
    assert r.stdout == b"started\n"
    assert b"bastion-broker: access ended (idle timeout)" in r.stderr
    assert took < 40  # not the command's own 50 s
    [sess] = [s for s in demo.sessions() if s["user"].startswith(f"{user}@")]
    assert sess["exit_status"] == "terminated:idle timeout"
    [ev] = [a for a in demo.audit_lines() if a.get("event") == "session.terminated"
            and a.get("session_id") == sess["id"]]
    assert ev["reason"] == "idle timeout" and ev["idle_s"] >= 2


def test_a_session_that_keeps_printing_is_not_idle(
        demo: Demo, idle_broker: tuple[BrokerProcess, Path]) -> None:
    user = demo.take_user()
    r = _ssh(demo, idle_broker, user, "for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 0.5; done")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(i).encode() for i in range(1, 9)]
    [sess] = [s for s in demo.sessions() if s["user"].startswith(f"{user}@")]
    assert sess["exit_status"] == "0"
