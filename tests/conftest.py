"""Shared fixtures: a real demo broker (subprocess) with real sshd targets, and an ssh client helper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import pytest

# moto server, fake AWS credentials and a failure-injecting proxy: for tests/aws and tests/s3
from tests.aws.conftest import fake_aws_env, moto, proxy  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "bastion-broker"

ASKPASS = """#!/bin/sh
case "$1" in
  *Password*) printf '%s\\n' "$BB_PASSWORD";;
  *"new authenticator"*)
    i=0; while [ $i -lt 150 ]; do
      if [ -s "$BB_CODE_FILE" ]; then cat "$BB_CODE_FILE"; exit 0; fi
      sleep 0.1; i=$((i+1)); done; exit 1;;
  *Verification*) printf '%s\\n' "$BB_CODE";;
  *) echo "unexpected prompt: $1" >&2; exit 1;;
esac
"""


@dataclass
class Demo:
    """A running ``bastion-broker demo`` and an OpenSSH client configured for it."""

    state_dir: Path
    info: dict[str, Any]
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    askpass: Path
    known_hosts: Path
    _pool: list[str] = field(default_factory=list)
    _last_step: dict[str, int] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.info["ssh_port"])

    @property
    def config(self) -> str:
        return str(self.info["config"])

    def secret(self, user: str) -> str:
        staff = self.info.get(user)  # the console's demo auditor and approver
        if isinstance(staff, dict) and "totp_secret" in staff:
            return str(staff["totp_secret"])
        return next(u["totp_secret"] for u in self.info["users"] if u["user"] == user)

    def take_user(self) -> str:
        """A demo user no other test has used (each has a read-only grant on the web stack)."""
        return self._pool.pop(0)

    def next_code(self, user: str) -> str:
        """A code for a step this user has not used yet (codes are single-use per user)."""
        # never the previous step: a step boundary between here and the check would make it
        # two steps old; the current and the next step stay valid for the next 30 s
        now_step = int(time.time()) // 30
        step = max(now_step, self._last_step.get(user, -1) + 1)
        while step > int(time.time()) // 30 + 1:
            time.sleep(0.5)
        self._last_step[user] = step
        return str(pyotp.TOTP(self.secret(user)).generate_otp(step))

    def ssh_args(self, login: str, *extra: str, port: int | None = None,
                 known_hosts: Path | None = None) -> list[str]:
        # options given first win in OpenSSH, so ``extra`` can override the defaults below
        return [
            "ssh", *extra, "-F", "/dev/null", "-p", str(port or self.port),
            "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "PreferredAuthentications=keyboard-interactive", "-o", "BatchMode=no",
            "-o", "NumberOfPasswordPrompts=1", "-o", "ConnectTimeout=10",
            f"{login}@127.0.0.1",
        ]

    def env(self, user: str, *, password: str | None = None, code: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SSH_ASKPASS=str(self.askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0",
            BB_PASSWORD=self.info["password"] if password is None else password,
            BB_CODE=self.next_code(user) if code is None else code,
        )
        return env

    def ssh(
        self, user: str, target: str | None, command: str | None = None, *,
        stdin: bytes = b"", password: str | None = None, code: str | None = None,
        extra: tuple[str, ...] = (), timeout: float = 60,
    ) -> subprocess.CompletedProcess[bytes]:
        login = f"{user}+{target}" if target else user
        args = self.ssh_args(login, *extra)
        if command is not None:
            args.append(command)
        return subprocess.run(
            args, input=stdin, capture_output=True, timeout=timeout,
            env=self.env(user, password=password, code=code),
        )

    def cli_args(self, config: Path) -> list[str]:
        return [str(BIN), "--config", str(config)]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(BIN), "--config", self.config, *args],
                           capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"bastion-broker {' '.join(args)} failed: {r.stderr}")
        return r

    def sessions(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("sessions", "list", "--json", "--limit", "1000").stdout))

    def audit_lines(self) -> list[dict[str, Any]]:
        """Every event of the audit log, across its rotated files, in order."""
        from broker.audit.files import iter_lines

        return [json.loads(line) for line in iter_lines(self.state_dir / "audit" / "audit.jsonl")]

    def variant_config(self, tmp: Path, *, ssh: str = "", limits: str = "",
                       inventory: str | None = None, identity: str = "", totp: str = "",
                       users_file: Path | None = None, extra: str = "",
                       listen_port: int = 0) -> Path:
        """A config for a second broker sharing this demo's state (store, CA, keys, audit);
        ``extra`` is appended as is (more sections: ``[recordings]``, ``[diag]``...)."""
        state = self.state_dir
        inv = state / "inventory.toml"
        if inventory is not None:
            inv = tmp / "inventory.toml"
            inv.write_text(inventory)
        cfg = tmp / "broker.toml"
        cfg.write_text(
            f'state_dir = "{state}"\n[ssh]\nlisten_host = "127.0.0.1"\n'
            f"listen_port = {listen_port}\n{ssh}\n"
            f'[upstream]\nadmin_login = "{self.info["admin_login"]}"\n'
            f'read_only_login = "{self.info["read_only_login"]}"\n'
            f'[identity]\nusers_file = "{users_file or state / "users.toml"}"\n'
            f'default_domain = "{self.info["domain"]}"\n{identity}\n'
            f'[inventory]\nfile = "{inv}"\n[limits]\n{limits}\n[totp]\n{totp}\n{extra}'
        )
        return cfg

    def fleet_config(self, tmp: Path, name: str, dsn: str, *, extra: str = "",
                     enforce_interval: float = 2, ssh: str = "", totp: str = "",
                     listen_port: int = 0) -> Path:
        """A config in ``tmp/name`` for one bastion of a fleet on the PostgreSQL at ``dsn``
        (loopback exempt from penalties; the other keywords as in ``variant_config``)."""
        d = tmp / name
        d.mkdir()
        cfg = self.variant_config(d, ssh=ssh, limits="penalty_exempt = ['127.0.0.0/8']",
                                  totp=totp, extra=extra, listen_port=listen_port)
        cfg.write_text(cfg.read_text() + f'[store]\nbackend = "postgres"\ndsn = "{dsn}"\n'
                       f"[grants]\nenforce_interval_seconds = {enforce_interval}\n")
        return cfg

    def known_hosts_for(self, tmp: Path, port: int) -> Path:
        host_pub = (self.state_dir / "ssh_host_ed25519_key.pub").read_text().split()
        path = tmp / f"known_hosts_{port}"
        path.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        return path

    def broker_log(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def start_demo(state_dir: Path, users: int = 300, workers: int = 1,
               env: dict[str, str] | None = None, extra: tuple[str, ...] = (),
               new_session: bool = False) -> Demo:
    """``bastion-broker demo`` in a process of its own (``env``: its environment, default ours;
    ``extra``: more demo options, e.g. ``--rdp``; ``new_session``: in a session of its own, so
    also its own scheduler autogroup, as bench/capacity.py wants)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = state_dir.parent / f"{state_dir.name}.stderr"
    err = open(stderr_path, "wb")
    proc = subprocess.Popen(
        [str(BIN), "demo", "--state-dir", str(state_dir), "--users", str(users),
         "--workers", str(workers), *extra],
        stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=env,
        start_new_session=new_session,
    )
    err.close()
    demo_json = state_dir / "demo.json"
    deadline = time.monotonic() + 60
    while not demo_json.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"demo exited early: {stderr_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("demo did not become ready in 60 s")
        time.sleep(0.05)
    info = json.loads(demo_json.read_text())
    host_pub = (state_dir / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts = state_dir.parent / f"{state_dir.name}.known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{info['ssh_port']} {host_pub[0]} {host_pub[1]}\n")
    askpass = state_dir.parent / f"{state_dir.name}.askpass"
    askpass.write_text(ASKPASS)
    askpass.chmod(0o700)
    demo = Demo(state_dir, info, proc, stderr_path, askpass, known_hosts)
    demo._pool = [u["user"] for u in info["users"] if u["user"] != "alice"]
    return demo


def broker_cli(cfg: Path, *args: str) -> str:
    """``bastion-broker --config CFG ARGS...``; its stdout (a failure fails the test)."""
    r = subprocess.run([str(BIN), "--config", str(cfg), *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def serve_broker(cfg: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``bastion-broker serve`` as a second broker process; its port is read from its log."""
    proc = subprocess.Popen([str(BIN), "--config", str(cfg), "serve"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if b'"broker.listening"' in line:
            return proc, int(json.loads(line)["port"])
    proc.kill()
    raise RuntimeError("second broker did not start")


def stop_demo(demo: Demo) -> None:
    if demo.proc.poll() is None:
        demo.proc.send_signal(signal.SIGTERM)
        try:
            demo.proc.wait(20)
        except subprocess.TimeoutExpired:
            demo.proc.kill()
            demo.proc.wait()


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = start_demo(tmp_path_factory.mktemp("demo") / "state")
    try:
        yield d
    finally:
        stop_demo(d)
        log = d.broker_log()
        assert "Traceback" not in log, f"the broker logged a traceback:\n{log[-4000:]}"


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under scripts/test a skipped test is a failure: a missing component is an install bug."""
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller sees its reports and says it once
    if _skipped and os.environ.get("BASTION_TEST_NO_SKIP"):
        sys.stderr.write("\nskipped tests are not allowed here:\n  " + "\n  ".join(_skipped) + "\n")
        session.exitstatus = 1


# scripts/test runs the suite on pytest-xdist workers with --dist loadfile: each file's tests go
# to one worker, in their order as in one process, and its module fixtures (a broker, Chromium,
# an RDP target) start once, not on every worker. Each worker has its own session fixtures (its
# own demo, PostgreSQL, moto) under its own basetemp, on free ports.
AD_TESTS = "tests/ad/"


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """loadfile, with all of tests/ad as one file: Samba binds the fixed LDAP ports, so one DC
    (one worker's session fixture) serves every ``ad`` test."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ADTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return AD_TESTS if nodeid.startswith(AD_TESTS) else super()._split_scope(nodeid)

    return ADTogether(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """An ``ad`` test outside tests/ad would start a second Samba on another worker."""
    stray = [i.nodeid for i in items if i.get_closest_marker("ad") and not i.nodeid.startswith(AD_TESTS)]
    if stray:
        raise pytest.UsageError(f"ad tests belong in {AD_TESTS} (one Samba DC): {stray}")
