"""An engineer's first ``ssh -J``, and a refused forward through a ControlMaster, with the real
OpenSSH client against the demo.

``bastion-broker known-hosts --api URL`` (no login, no state directory) writes a file that is
all OpenSSH needs with ``StrictHostKeyChecking yes``: the bastion's host key and the host CA's
``@cert-authority`` line. A forward the broker refuses reaches the user with its reason as the
SSH channel open-failure text, which a ControlMaster (the connection sharing the README
recommends) prints as ``channel N: open failed: administratively prohibited: REASON``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from broker.runtime import free_port
from tests.conftest import BIN, Demo

pytestmark = pytest.mark.e2e


def _fetch(demo: Demo, dest: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BASTION_BROKER_API", "BASTION_BROKER_CONFIG")}
    return subprocess.run([str(BIN), "known-hosts", "--api", demo.info["web_url"], "--output",
                           str(dest)], capture_output=True, text=True, timeout=60, env=env)


def _jump_config(demo: Demo, tmp: Path, user: str, known_hosts: Path) -> Path:
    cfg = tmp / f"ssh_config_{user}"
    cfg.write_text(
        f"Host bastion\n  HostName 127.0.0.1\n  Port {demo.port}\n  User {user}\n"
        f"  UserKnownHostsFile {known_hosts}\n  StrictHostKeyChecking yes\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  PreferredAuthentications keyboard-interactive\n  BatchMode no\n"
        "  NumberOfPasswordPrompts 1\n"
        f"Host web01\n  ProxyJump bastion\n  User ec2-user\n"
        f"  UserKnownHostsFile {known_hosts}\n  StrictHostKeyChecking yes\n"
        "  GlobalKnownHostsFile /dev/null\n  BatchMode no\n  ConnectTimeout 20\n")
    return cfg


def test_the_fetched_file_alone_carries_a_strict_ssh_j(demo: Demo, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts_bastion"
    r = _fetch(demo, kh)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr
    bastion, ca = kh.read_text().splitlines()
    # the bastion as this API was reached (127.0.0.1) on its SSH port, with its host key
    assert bastion.split()[:3] == demo.known_hosts.read_text().split()[:3]
    # the same line the operator's `ca known-hosts` prints from the state directory
    assert ca == demo.cli("ca", "known-hosts").stdout.strip()

    user = demo.take_user()
    cfg = _jump_config(demo, tmp_path, user, kh)
    r2 = subprocess.run(["ssh", "-F", str(cfg), "web01", "echo fetched-$((6*7))"],
                        capture_output=True, timeout=90, env=demo.env(user))
    assert r2.returncode == 0, r2.stderr.decode(errors="replace")
    assert r2.stdout == b"fetched-42\n"


def test_without_the_file_strict_checking_stops_before_any_code(demo: Demo,
                                                                 tmp_path: Path) -> None:
    """The control: the same config with an empty file fails on the bastion's host key, so
    the success above is the fetched lines' doing."""
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    user = demo.take_user()
    cfg = _jump_config(demo, tmp_path, user, empty)
    r = subprocess.run(["ssh", "-F", str(cfg), "web01", "echo never"],
                       capture_output=True, timeout=90, env=demo.env(user))
    assert r.returncode == 255
    assert b"Host key verification failed" in r.stderr and b"never" not in r.stdout


def _wait(cond: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not callable(cond) or not cond():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _master(demo: Demo, user: str, ctl: Path, log: Path) -> None:
    """A persistent master, as ``ControlPersist`` starts one, logging to ``log``."""
    master = subprocess.run(
        demo.ssh_args(user, "-M", "-S", str(ctl), "-N", "-o", "ControlPersist=60",
                      "-E", str(log)),
        env=demo.env(user), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    # ControlPersist: the master logs in, goes to the background and this process returns
    assert master.returncode == 0, log.read_text(errors="replace") if log.exists() else master
    _wait(ctl.exists, "control socket")


def _exit(ctl: Path) -> None:
    subprocess.run(["ssh", "-S", str(ctl), "-F", "/dev/null", "-O", "exit", "bastion"],
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


def _logged(log: Path, text: str) -> str:
    _wait(lambda: text in log.read_text(errors="replace"), "refusal in the log")
    return next(x for x in log.read_text(errors="replace").splitlines() if text in x)


@pytest.mark.parametrize(("dest", "reason"), [
    ("db01:22", "no live grant covers this destination"),  # known, not granted to demo users
    ("web01:8080", "port 8080 is not open for forwarding to web01"),
])
def test_a_refused_forward_through_a_control_master_says_why(
        demo: Demo, tmp_path: Path, dest: str, reason: str) -> None:
    """``ssh -O forward -L`` on a persistent master, then a connection to the forwarded port:
    the master prints the broker's reason (``-E FILE``: where a backgrounded master logs)."""
    user = demo.take_user()
    ctl, log = tmp_path / "ctl", tmp_path / "master.log"
    _master(demo, user, ctl, log)
    try:
        port = free_port()
        fwd = subprocess.run(["ssh", "-S", str(ctl), "-F", "/dev/null", "-O", "forward",
                              "-L", f"127.0.0.1:{port}:{dest}", "bastion"],
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        assert fwd.returncode == 0, fwd.stderr  # the listener is the master's: it is set up
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.settimeout(20)
            assert s.recv(1024) == b""  # the refused channel: the master closes the socket
        line = _logged(log, f": open failed: administratively prohibited: {reason}")
        assert line.startswith("channel "), line
    finally:
        _exit(ctl)
    denied = [e for e in demo.audit_lines() if e["event"] == "tunnel.denied"
              and e.get("user", "").startswith(user + "@")]
    assert [e["destination"] for e in denied] == [dest]


def test_a_refused_stdio_forward_through_a_master_is_in_the_masters_log(
        demo: Demo, tmp_path: Path) -> None:
    """``ssh -W`` (what ``ssh -J`` runs) over a master: OpenSSH's mux client reports only
    "Session open refused by peer"; the broker's reason is in the master's log."""
    user = demo.take_user()
    ctl, log = tmp_path / "ctl", tmp_path / "master.log"
    _master(demo, user, ctl, log)
    try:
        r = subprocess.run(["ssh", "-S", str(ctl), "-F", "/dev/null", "-W", "db01:22",
                            "bastion"], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=30)
        assert r.returncode == 255 and b"Session open refused by peer" in r.stderr
        _logged(log, "open failed: administratively prohibited: no live grant covers this "
                     "destination")
    finally:
        _exit(ctl)
