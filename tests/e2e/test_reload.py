"""SIGHUP reloads the configuration, through real broker processes and the real OpenSSH client: the
inventory, ``[limits]`` and the static users file change for new logins while a live session goes
on intact; a key that needs a restart is named and keeps its value; an invalid file is refused
(file, key, problem) and the broker keeps serving as before; with two workers each one reloads;
SIGTERM ends the log with ``broker.stopped``. In process: every live setting is swapped, and
signals coalesce (never two reloads at once)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.app import Broker
from broker.config import load_config
from broker.reload import ConfigSource, Reloader
from broker.runtime import free_port
from broker.ssh.tunnel import policy_of
from tests.conftest import Demo, start_demo, stop_demo
from tests.e2e.test_durability import BrokerProcess, Client, wait_for

pytestmark = pytest.mark.e2e

RELOAD_EVENTS = ("config.reloaded", "config.reload_failed")


# -- helpers -------------------------------------------------------------------------------------
def toml_value(v: Any) -> str:
    return json.dumps(v)  # strings, integers and lists of strings: JSON is valid TOML here


def inventory_text(stacks: list[dict[str, Any]]) -> str:
    out = []
    for stack in stacks:
        out.append(f"[[stacks]]\nid = {toml_value(stack['id'])}\nvpc = {toml_value(stack['vpc'])}\n")
        for inst in stack.get("instances", []):
            out.append("[[stacks.instances]]\n" + "".join(
                f"{k} = {toml_value(v)}\n" for k, v in inst.items()))
    return "\n".join(out)


def with_instance(inventory: str, like: str, iid: str, name: str) -> str:
    """The inventory with one more instance, a copy of ``like`` (same sshd) by another name."""
    data = tomllib.loads(inventory)
    for stack in data["stacks"]:
        copies = [{**i, "id": iid, "name": name} for i in stack["instances"] if i["name"] == like]
        stack["instances"] += copies
    return inventory_text(data["stacks"])


def reload_events(demo: Demo, pid: int) -> list[dict[str, Any]]:
    return [e for e in demo.audit_lines() if e["event"] in RELOAD_EVENTS and e.get("pid") == pid]


def hup(demo: Demo, pid: int) -> dict[str, Any]:
    """SIGHUP to ``pid``; its next reload event (audited by that process)."""
    before = len(reload_events(demo, pid))
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: len(reload_events(demo, pid)) > before, "a reload event", 30)
    return reload_events(demo, pid)[before]


def log_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def login(demo: Demo, port: int, known: Path, user: str, target: str | None,
          command: str = "echo ok", *, source: str | None = None, password: str | None = None,
          code: str | None = None) -> subprocess.CompletedProcess[bytes]:
    extra = ("-b", source) if source else ()
    args = demo.ssh_args(f"{user}+{target}" if target else user, *extra, port=port,
                         known_hosts=known)
    return subprocess.run([*args, command], capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL,
                          env=demo.env(user, password=password, code=code))


def failed_login(demo: Demo, port: int, known: Path, source: str, name: str
                 ) -> subprocess.CompletedProcess[bytes]:
    """A wrong password for an account nobody has (no real account collects the failure)."""
    return login(demo, port, known, name, "web01", source=source, password="wrong",
                 code="000000")


@dataclass
class Served:
    """``bastion-broker serve`` on the demo's state, with its own config, inventory and users
    file (all in the test's directory), and a known_hosts file for its port."""

    process: BrokerProcess
    cfg: Path
    known: Path

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def text(self) -> str:
        return self.process.text()


@pytest.fixture
def broker(demo: Demo, tmp_path: Path) -> Iterator[Served]:
    users = tmp_path / "users.toml"
    users.write_text((demo.state_dir / "users.toml").read_text())
    cfg = demo.variant_config(tmp_path, inventory=(demo.state_dir / "inventory.toml").read_text(),
                              users_file=users)
    cfg.write_text(cfg.read_text() + "[web]\nenabled = false\n")
    log = tmp_path / "broker.log"
    log.touch()
    process = BrokerProcess(cfg, log)
    try:
        yield Served(process, cfg, demo.known_hosts_for(tmp_path, process.port))
    finally:
        process.kill()
        assert "Traceback" not in process.text()


# -- single process ------------------------------------------------------------------------------
def test_sighup_changes_inventory_and_limits_while_a_session_runs(
    demo: Demo, broker: Served, tmp_path: Path
) -> None:
    port, known, pid = broker.port, broker.known, broker.pid
    inv = tmp_path / "inventory.toml"
    live = Client(demo, demo.take_user(), port, known, "cat", tty=False)
    try:
        live.send(b"before the reload\n")
        live.pump(b"before the reload\n")
        r = login(demo, port, known, demo.take_user(), "web03")
        assert r.returncode != 0
        assert b"no access to web03" in r.stderr
        # one failure from an address is not penalised yet (source_penalty_after = 10)
        assert failed_login(demo, port, known, "127.0.0.7", "ghost-a").returncode == 255
        r = failed_login(demo, port, known, "127.0.0.7", "ghost-b")
        assert b"Permission denied" in r.stderr

        inv.write_text(with_instance(inv.read_text(), "web02", "i-0web03", "web03"))
        broker.cfg.write_text(broker.cfg.read_text().replace(
            "[limits]\n", "[limits]\nsource_penalty_after = 1\nsource_penalty_seconds = 60\n"))
        event = hup(demo, pid)
        assert event["event"] == "config.reloaded"
        assert event["changed"] == ["limits.source_penalty_after",
                                    "limits.source_penalty_seconds", "inventory.instances"]
        assert event["instances"] == {"added": ["i-0web03"]}
        assert event["needs_restart"] == []

        # new logins see the new instance ...
        r = login(demo, port, known, demo.take_user(), "web03", "echo via-web03")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"via-web03\n"
        # ... and the new limits: one failure now penalises the address
        assert failed_login(demo, port, known, "127.0.0.8", "ghost-c").returncode == 255
        r = failed_login(demo, port, known, "127.0.0.8", "ghost-d")
        assert r.returncode == 255
        assert b"Permission denied" not in r.stderr  # cut before authentication

        # the session that was open all along goes on and ends normally
        live.send(b"after the reload\n")
        live.pump(b"after the reload\n")
        assert live.proc.stdin is not None
        live.proc.stdin.close()
        assert live.finish(60) == 0
        assert live.out == b"before the reload\nafter the reload\n"
    finally:
        if live.proc.poll() is None:
            live.proc.kill()
    logged = log_events(broker.text())
    assert any(e["event"] == "config.reloaded" and "inventory.instances" in e["changed"]
               for e in logged)

    broker.process.proc.send_signal(signal.SIGTERM)
    assert broker.process.wait(60) == 0
    last = log_events(broker.text())[-1]  # after the drain and the stores' close
    assert last["event"] == "broker.stopped"
    assert last["pid"] == pid


def test_keys_that_need_a_restart_are_named_and_keep_their_value(
    demo: Demo, broker: Served
) -> None:
    port, known, pid = broker.port, broker.known, broker.pid
    new_port = free_port()
    text = broker.cfg.read_text()
    assert "listen_port = 0\n" in text
    broker.cfg.write_text(
        text.replace("listen_port = 0\n", f"listen_port = {new_port}\n")
        + '[store]\ndsn = "postgresql://broker:s3cret-pw@db.example:5432/broker"\n'
        + "[grants]\nwarn_before_seconds = 60\n")
    first, second = hup(demo, pid), hup(demo, pid)
    assert first["event"] == second["event"] == "config.reloaded"
    assert first["changed"] == ["grants.warn_before_seconds"]
    assert second["changed"] == []  # applied by the first
    # named again at every reload until a restart
    assert first["needs_restart"] == second["needs_restart"] == ["ssh.listen_port", "store.dsn"]
    warnings = [e for e in log_events(broker.text())
                if e["event"] == "config.reload_needs_restart"]
    assert len(warnings) == 2
    assert all(w["keys"] == ["ssh.listen_port", "store.dsn"] and w["level"] == "warning"
               for w in warnings)
    assert "s3cret-pw" not in broker.text()  # key names only, never values
    assert not any("s3cret-pw" in json.dumps(e) for e in reload_events(demo, pid))

    r = login(demo, port, known, demo.take_user(), "web01")  # the old port keeps working
    assert r.returncode == 0, r.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", new_port)) != 0  # and nothing listens on the new one


def test_an_invalid_file_is_refused_and_the_broker_serves_on_unchanged(
    demo: Demo, broker: Served, tmp_path: Path
) -> None:
    port, known, pid = broker.port, broker.known, broker.pid
    cfg, inv, users = broker.cfg, tmp_path / "inventory.toml", tmp_path / "users.toml"
    good_cfg, good_inv, good_users = cfg.read_text(), inv.read_text(), users.read_text()

    cfg.write_text(good_cfg.replace("[limits]\n", '[limits]\nmax_startups = "many"\n'))
    failed = hup(demo, pid)
    assert failed["event"] == "config.reload_failed"
    assert failed["reason"].startswith(f"{cfg}: key 'limits.max_startups': ")
    logged = [e for e in log_events(broker.text()) if e["event"] == "config.reload_failed"]
    assert logged[-1]["error"] == failed["reason"]
    assert logged[-1]["level"] == "error"

    # a valid change in the config, an invalid inventory: nothing of it applies
    cfg.write_text(good_cfg.replace("[limits]\n", "[limits]\nmax_startups = 50\n"))
    inv.write_text(good_inv.replace("port = ", "port = 7000", 1))
    failed = hup(demo, pid)
    assert failed["event"] == "config.reload_failed"
    assert failed["reason"].startswith(f"{inv}: key 'stacks.0.instances.0.port': ")

    inv.write_text(good_inv)
    users.write_text(good_users.replace('password_hash = "', 'password_hash = "plain', 1))
    failed = hup(demo, pid)
    assert failed["event"] == "config.reload_failed"
    assert failed["reason"].startswith(f"{users}: key 'users.0.password_hash': ")

    # still serving, with the configuration it had
    r = login(demo, port, known, demo.take_user(), "web01")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"ok\n"

    users.write_text(good_users)
    event = hup(demo, pid)
    assert event["event"] == "config.reloaded"
    assert event["changed"] == ["limits.max_startups"]  # the refused attempts applied nothing
    assert broker.process.proc.poll() is None


def test_a_user_added_to_the_users_file_logs_in_after_sighup_and_a_removed_one_cannot(
    demo: Demo, broker: Served, tmp_path: Path
) -> None:
    port, known, pid = broker.port, broker.known, broker.pid
    users = tmp_path / "users.toml"
    newcomer = demo.take_user()  # enrolled and granted in the store
    blocks = users.read_text().split("[[users]]\n")
    (theirs,) = [b for b in blocks if b.startswith(f'name = "{newcomer}"\n')]
    users.write_text("[[users]]\n".join(b for b in blocks if b is not theirs))
    event = hup(demo, pid)
    assert event["event"] == "config.reloaded"
    assert event["users"] == {"removed": [newcomer]}
    r = login(demo, port, known, newcomer, "web01")  # no longer in the users file
    assert r.returncode == 255
    assert b"Permission denied" in r.stderr

    users.write_text(users.read_text() + "[[users]]\n" + theirs)
    event = hup(demo, pid)
    assert event["event"] == "config.reloaded"
    assert event["changed"] == ["identity.users"]
    assert event["users"] == {"added": [newcomer]}
    r = login(demo, port, known, newcomer, "web01", "echo welcome")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"welcome\n"


def test_the_demo_reloads_on_sighup_to_its_pid(demo: Demo) -> None:
    pid = int(demo.info["pid"])
    assert pid == demo.proc.pid  # one process: the demo is the broker
    event = hup(demo, pid)
    assert event["event"] == "config.reloaded"
    assert event["config"] == demo.config
    assert demo.proc.poll() is None


# -- several workers -----------------------------------------------------------------------------
def test_every_worker_reloads_and_the_parent_logs_broker_stopped(tmp_path: Path) -> None:
    d = start_demo(tmp_path / "state", users=7, workers=2)
    try:
        parent = int(d.info["pid"])
        assert parent == d.proc.pid
        inv = d.state_dir / "inventory.toml"
        inv.write_text(with_instance(inv.read_text(), "web01", "i-0web03", "web03"))
        os.kill(parent, signal.SIGHUP)

        def reloaded() -> list[dict[str, Any]]:
            return [e for e in d.audit_lines() if e["event"] == "config.reloaded"]

        wait_for(lambda: len(reloaded()) >= 2, "both workers' reloads", 30)
        events = reloaded()
        assert len(events) == 2
        assert len({e["pid"] for e in events}) == 2
        assert parent not in {e["pid"] for e in events}
        assert all(e["instances"] == {"added": ["i-0web03"]} for e in events)

        users = [u["user"] for u in d.info["users"] if u["user"] != "alice"]
        procs = [subprocess.Popen([*d.ssh_args(f"{u}+web03"), "echo ok"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, env=d.env(u)) for u in users]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert out == b"ok\n"
        starts = [e for e in d.audit_lines() if e["event"] == "session.start"]
        assert {s["target"] for s in starts} == {"i-0web03"}
        assert len(starts) == len(users)
    finally:
        stop_demo(d)
    assert d.proc.returncode == 0
    logged = log_events(d.broker_log())
    assert logged[-1]["event"] == "broker.stopped"
    assert logged[-1]["pid"] == parent
    assert sorted(e["worker"] for e in logged if e["event"] == "worker.stopped") == [0, 1]
    assert "Traceback" not in d.broker_log()


# -- in process: every live setting, and coalescing ----------------------------------------------
async def test_a_reload_swaps_every_live_setting(demo: Demo, tmp_path: Path) -> None:
    cfg = demo.variant_config(tmp_path)
    cfg.write_text(cfg.read_text() + "[web]\nlisten_port = 0\nsecure_cookies = false\n")
    config = load_config(cfg)
    broker = Broker(config, source=ConfigSource(cfg, config))
    await broker.start()
    try:
        assert broker.guard.admit("192.0.2.1", 0.0).allowed
        assert broker.guard.admit("192.0.2.2", 0.0).allowed  # max_startups = 100
        cfg.write_text(cfg.read_text()
                       .replace("[limits]\n", "[limits]\nmax_startups = 2\n"
                                "account_lock_after = 7\n")
                       .replace("[totp]\n", "[totp]\nself_enroll = true\n")
                       .replace("[ssh]\n", "[ssh]\nsession_idle_timeout_seconds = 300\n")
                       .replace("[upstream]\n", "[upstream]\ncert_ttl_seconds = 60\n")
                       + "[forwarding]\nports = { linux = [22, 8080] }\n"
                       + "[grants]\ndefault_hours = 2\nenforce_interval_seconds = 5\n"
                       + "[roles]\napprover_groups = [\"ops\"]\n"
                       + "[shutdown]\ngrace_seconds = 5\n")
        assert await broker.reload()
        new = load_config(cfg)
        # the guard keeps the two connections it counts, and now admits no third
        assert not broker.guard.admit("192.0.2.3", 0.0).allowed
        assert broker.deps.config.forwarding == new.forwarding
        assert policy_of(broker.deps).os_ports["linux"] == frozenset({22, 8080})
        assert broker.deps.config.upstream.cert_ttl_seconds == 60
        assert broker.config.shutdown.grace_seconds == 5
        assert broker.grants.policy.default_duration.total_seconds() == 2 * 3600
        assert broker.authenticator._policy.lock_after == 7
        assert broker.authenticator._totp_policy.self_enroll is True
        assert broker.enforcer._interval == 5
        assert broker.enforcer._idle_timeout == 300
        # the API: the user's group "ops" is an approver group now
        user = demo.take_user()
        async with aiohttp.ClientSession() as http:
            resp = await http.post(f"{broker.web_url}/api/login", json={
                "user": user, "password": demo.info["password"], "code": demo.next_code(user)})
            assert resp.status == 200, await resp.text()
            assert "approver" in (await resp.json())["roles"]
    finally:
        await broker.stop()


async def test_signals_coalesce_and_reloads_never_overlap(demo: Demo, tmp_path: Path) -> None:
    cfg = demo.variant_config(tmp_path)
    cfg.write_text(cfg.read_text() + "[web]\nenabled = false\n")
    config = load_config(cfg)
    broker = Broker(config, source=ConfigSource(cfg, config))
    await broker.start()
    active = peak = 0

    async def watched() -> object:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            return await broker.reload()
        finally:
            active -= 1

    reloader = Reloader()
    before = len(reload_events(demo, os.getpid()))
    try:
        reloader.request()  # before start: held, then run once
        reloader.request()
        reloader.start(watched)
        for _ in range(5):
            reloader.request()
        await _settle(reloader)
        assert reloader.runs == 1
        reloader.request()
        await asyncio.sleep(0)  # that reload is under way (reading the file in a thread)
        for _ in range(5):
            reloader.request()
        await _settle(reloader)
        assert reloader.runs == 3  # the one under way, then exactly one more
        assert peak == 1
        events = reload_events(demo, os.getpid())[before:]
        assert [e["event"] for e in events] == ["config.reloaded"] * 3
    finally:
        await reloader.stop()
        await broker.stop()


async def _settle(reloader: Reloader) -> None:
    for _ in range(500):
        task = reloader._task
        if task is None or task.done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the reload did not finish")

