"""Kill and lock with the real OpenSSH client through the demo broker: ``sessions kill`` ends one
live session and its user reads why; ``lock --user`` ends a user's sessions and refuses their
logins until removed; ``lock --target`` ends the sessions on a target and refuses new ones.
Every step is in the audit log with who and why, and each refusal names the lock."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Demo, serve_broker
from tests.e2e.test_terminal import Terminal

pytestmark = pytest.mark.e2e


def _live_session(demo: Demo, user: str, target: str) -> dict[str, Any]:
    return next(s for s in demo.sessions() if s["user"].startswith(user + "@")
                and s["status"] == "live" and s["target_name"] == target)


def _events(demo: Demo, name: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in demo.audit_lines() if e["event"] == name
            and all(e.get(k) == v for k, v in match.items())]


def _started(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([*args, "echo started; sleep 60; echo never"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert p.stdout is not None
    assert p.stdout.readline() == b"started\n"
    return p


def test_kill_ends_one_live_shell_and_the_user_reads_why(demo: Demo) -> None:
    user = demo.take_user()
    term = Terminal(demo.ssh_args(f"{user}+web01", "-tt"), demo.env(user), rows=24, cols=200)
    other: subprocess.Popen[bytes] | None = None
    try:
        term.send(b"echo READY\"\"1\r")
        term.expect(b"READY1\r\n")
        # the same user's other session (logged in after the first: codes only move forward)
        other = _started(demo.ssh_args(f"{user}+web01"), demo.env(user))
        shell = next(s for s in demo.sessions() if s["user"].startswith(user + "@")
                     and s["status"] == "live" and s["kind"] == "shell")
        r = demo.cli("sessions", "kill", shell["id"][:10], "--reason", "copying the customer DB")
        t0 = time.monotonic()  # from the stored request: the CLI's own start is not the broker's
        term.expect(b"access ended (ended by the security team: copying the customer DB)",
                    timeout=10)
        assert term.close() == 255
        assert time.monotonic() - t0 < 5  # the demo checks every second
        assert f"session {shell['id']}" in r.stdout and "terminated:" in r.stdout
        assert other.poll() is None  # only the session named ends
    finally:
        for p in (term.proc, other):
            if p is not None and p.poll() is None:
                p.kill()
    ended = next(s for s in demo.sessions() if s["id"] == shell["id"])
    assert ended["exit_status"] == ("terminated:ended by the security team: copying the "
                                    "customer DB")
    [asked] = _events(demo, "session.kill_requested", session_id=shell["id"])
    assert asked["user"].startswith("operator:") and asked["reason"] == "copying the customer DB"
    [killed] = _events(demo, "session.killed", session_id=shell["id"])
    assert (killed["by"], killed["reason"], killed["kill_id"]) == (
        asked["user"], "copying the customer DB", asked["kill_id"])
    with open(ended["recording"], "rb") as f:  # what the user read is in the recording too
        assert b"ended by the security team: copying the customer DB" in f.read()
    # a session that has ended cannot be killed again: a one-line error, nothing requested
    r = demo.cli("sessions", "kill", shell["id"], "--reason", "again", check=False)
    assert r.returncode == 2 and "already ended" in r.stderr and "Traceback" not in r.stderr
    assert len(_events(demo, "session.kill_requested", session_id=shell["id"])) == 1


def test_a_user_lock_ends_their_sessions_and_refuses_logins_until_removed(demo: Demo) -> None:
    user = demo.take_user()
    p = _started(demo.ssh_args(f"{user}+web01"), demo.env(user))
    try:
        lock = json.loads(demo.cli("lock", "--user", user, "--ttl", "1h", "--reason",
                                   "stolen laptop", "--json").stdout)
        t0 = time.monotonic()  # from the stored lock: the CLI's own start is not the broker's
        out, err = p.communicate(timeout=20)
        assert time.monotonic() - t0 < 5
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 255 and b"never" not in out
    assert (f"access ended (locked by the security team: stolen laptop (lock {lock['id']}))"
            .encode()) in err
    assert (lock["kind"], lock["state"]) == ("user", "active")
    assert lock["value"] == f"{user}@{demo.info['domain']}".casefold()
    try:
        # a new login is refused as any failed login; the audit names the lock
        r = demo.ssh(user, "web01", "echo in", timeout=30)
        assert r.returncode == 255 and b"in\n" not in r.stdout
        assert b"Permission denied" in r.stderr and b"lock" not in r.stderr
        refused = _events(demo, "auth.failure", reason=f"locked: lock {lock['id']}")
        assert [e["user"] for e in refused] == [lock["value"]]
        [ended] = _events(demo, "session.terminated", lock_id=lock["id"])
        assert ended["user"].startswith(user + "@") and ended["lock_reason"] == "stolen laptop"
        listed = json.loads(demo.cli("lock", "list", "--json").stdout)
        assert lock["id"] in [x["id"] for x in listed]
    finally:
        demo.cli("lock", "remove", lock["id"])
    r = demo.ssh(user, "web01", "echo in", timeout=30)
    assert r.returncode == 0 and r.stdout == b"in\n", r.stderr
    assert lock["id"] not in demo.cli("lock", "list").stdout
    every = json.loads(demo.cli("lock", "list", "--all", "--json").stdout)
    [gone] = [x for x in every if x["id"] == lock["id"]]
    assert gone["state"] == "removed" and gone["removed_by"].startswith("operator:")
    [created] = _events(demo, "lock.created", lock_id=lock["id"])
    assert (created["kind"], created["reason"]) == ("user", "stolen laptop")
    assert _events(demo, "lock.removed", lock_id=lock["id"])


def _inventory_with(demo: Demo, name: str) -> str:
    """The demo's inventory plus ``name``: web01's host under another id and name in its
    stack, so a lock on it touches no other test's target."""
    text = (demo.state_dir / "inventory.toml").read_text()
    data = tomllib.loads(text)
    stack = next(s for s in data["stacks"] if s["id"] == "stack-web")
    web = next(i for i in stack["instances"] if i["name"] == "web01")
    header = f'[[stacks]]\nid = "stack-web"\nvpc = "{stack["vpc"]}"\n'
    assert header in text
    extra = (f'[[stacks.instances]]\nid = "i-0{name}"\nname = "{name}"\n'
             f'address = "{web["address"]}"\nport = {web["port"]}\nos = "linux"\n'
             f"host_keys = {json.dumps(web['host_keys'])}\n")
    return text.replace(header, header + extra)


def test_a_target_lock_ends_live_sessions_and_refuses_new_ones(demo: Demo,
                                                                tmp_path: Path) -> None:
    name = "lockweb"
    cfg = demo.variant_config(tmp_path, inventory=_inventory_with(demo, name),
                              limits="penalty_exempt = ['127.0.0.0/8']",
                              extra="[web]\nenabled = false\n")
    proc, port = serve_broker(cfg)
    known = demo.known_hosts_for(tmp_path, port)
    user = demo.take_user()
    lock_id = ""
    try:
        p = _started(demo.ssh_args(f"{user}+{name}", port=port, known_hosts=known),
                     demo.env(user))
        try:
            lock_id = json.loads(demo.cli("lock", "--target", name, "--reason",
                                          "host compromised", "--json").stdout)["id"]
            t0 = time.monotonic()  # from the stored lock (not from the CLI's start)
            out, err = p.communicate(timeout=20)
            assert time.monotonic() - t0 < 5
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 255 and b"never" not in out
        assert (f"access ended (locked by the security team: host compromised (lock {lock_id}))"
                .encode()) in err
        # a new session to it is refused (the login itself is fine: the user is not locked)
        r = subprocess.run([*demo.ssh_args(f"{user}+{name}", port=port, known_hosts=known),
                            "echo in"], capture_output=True, timeout=30, env=demo.env(user))
        assert r.returncode == 255 and f"no access to {name}".encode() in r.stderr
        denied = _events(demo, "access.denied", reason=f"locked: lock {lock_id}")
        assert [e["target"] for e in denied] == [name]
        # the user's other targets are not locked
        r = subprocess.run([*demo.ssh_args(f"{user}+web01", port=port, known_hosts=known),
                            "echo in"], capture_output=True, timeout=30, env=demo.env(user))
        assert r.returncode == 0 and r.stdout == b"in\n", r.stderr
        [ended] = _events(demo, "session.terminated", lock_id=lock_id)
        assert ended["target"] == f"i-0{name}"
    finally:
        if lock_id:
            demo.cli("lock", "remove", lock_id)
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
