"""A rolling upgrade with the real previous version: two bastions on one PostgreSQL behind a real
HAProxy whose health checks read ``/readyz``, and the real OpenSSH client.

The previous version is the code as it was just before the newest store migration was added
(extracted from git; while a new migration is still uncommitted, HEAD is that version), run
from the same venv. Old bastion A serves a live shell; new bastion B starts and applies the
pending migration; A goes on with the migrated schema (a new login, its session row and audit);
A is drained: HAProxy takes it out, new logins land on B, the shell goes on until its user ends
it, A exits 0; A starts again on the new code and serves. No session and no recording is lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pyotp
import pytest

from broker.demo_rdp import stop
from broker.domain import recording as fmt
from broker.recordings.local import OPEN_DIR
from tests import haproxy
from tests.conftest import BIN, REPO, Demo
from tests.contract import pgserver
from tests.contract.pgserver import PgServer
from tests.e2e.test_durability import Client

# 23-130 s measured on a shared 2-core machine (130 s at load 11): over pytest-timeout's 120 s
pytestmark = [pytest.mark.postgres, pytest.mark.fleet, pytest.mark.e2e, pytest.mark.timeout(600)]

MIGRATIONS = "broker/store/pg_migrations/__init__.py"

SECTIONS = """frontend ssh
  bind 127.0.0.1:{front}
  default_backend bastions
backend bastions
  balance roundrobin
  option httpchk GET /readyz
  default-server inter 300ms fall 2 rise 2
  server a 127.0.0.1:{a} check port {a_diag}
  server b 127.0.0.1:{b} check port {b_diag}
"""


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with pgserver.running() as server:
        yield server


def _git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        pytest.fail(f"the rolling upgrade test runs the previous version from git history, and "
                    f"`git {' '.join(args)}` failed in {REPO}: {r.stderr.strip()} (a clone with "
                    "its history is needed: not a tarball, not a shallow clone; `git fetch "
                    "--unshallow`)")
    return r.stdout.strip()


def previous_version(dest: Path) -> tuple[str, Path]:
    """The commit before the newest PostgreSQL migration, its ``broker`` tree under ``dest``.
    A migration not committed yet is the newest: HEAD is then the previous version."""
    if _git("status", "--porcelain", "--", MIGRATIONS):
        rev = _git("rev-parse", "HEAD")
    else:
        added = _git("log", "-1", "--format=%H", "--", MIGRATIONS)
        if not added:
            pytest.fail(f"git log finds no commit of {MIGRATIONS}: the history is missing")
        rev = _git("rev-parse", "--verify", f"{added}^")
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "broker"],
                             capture_output=True, timeout=120, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=120)
    return rev, dest


class Version:
    """One version of the broker: the venv's (this tree) or an extracted older ``broker``."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        if root is None:
            self.argv = [str(BIN)]
            self.env = dict(os.environ)
        else:  # `python -m broker` from the old tree: cwd and PYTHONPATH put it first
            self.argv = [sys.executable, "-m", "broker"]
            self.env = {**os.environ, "PYTHONPATH": str(root)}

    def run(self, cfg: Path, *args: str) -> str:
        r = subprocess.run([*self.argv, "--config", str(cfg), *args], capture_output=True,
                           text=True, timeout=60, env=self.env, cwd=self.root)
        assert r.returncode == 0, f"{args}: {r.stderr}"
        return r.stdout

    def python(self, code: str) -> str:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, env=self.env, cwd=self.root or REPO, check=True)
        return r.stdout.strip()


class Shell(Client):
    """``Client`` for a user whose code comes from PostgreSQL's secret, not the demo's."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.out = b""
        self.err = b""


class Served:
    """``serve`` of one version in a process of its own, its log in a file."""

    def __init__(self, version: Version, cfg: Path, log: Path) -> None:
        self.log = log
        start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as f:
            self.proc = subprocess.Popen([*version.argv, "--config", str(cfg), "serve"],
                                         stdout=subprocess.DEVNULL, stderr=f,
                                         stdin=subprocess.DEVNULL, env=version.env,
                                         cwd=version.root)
        deadline = time.monotonic() + 60
        while b'"broker.listening"' not in log.read_bytes()[start:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"broker did not start: {self.text()[-3000:]}")
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc, 60)


def schema_version(dsn: str) -> int:
    async def get() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval("SELECT max(version) FROM schema_migrations"))
        finally:
            await conn.close()
    return asyncio.run(get())


def bastion_config(demo: Demo, tmp: Path, name: str, dsn: str, port: int, diag: int) -> Path:
    """Keys only every version knows (an older one refuses a key it does not)."""
    cfg = demo.fleet_config(tmp, name, dsn, extra=(
        f'[web]\nenabled = false\n[recordings]\ndir = "{tmp / name / "rec"}"\n'
        f'[diag]\nenabled = true\nlisten_host = "127.0.0.1"\nlisten_port = {diag}\n'))
    text = cfg.read_text()
    assert "\nlisten_port = 0\n" in text
    cfg.write_text(text.replace("\nlisten_port = 0\n", f"\nlisten_port = {port}\n", 1))
    return cfg


def test_rolling_upgrade_from_the_previous_version(demo: Demo, pg: PgServer,
                                                   tmp_path: Path) -> None:
    rev, old_root = previous_version(tmp_path / "previous")
    old, new = Version(old_root), Version(None)
    old_file = old.python("import broker; print(broker.__file__)")
    assert old_file == str(old_root / "broker" / "__init__.py"), old_file
    count = "from broker.store import pg_migrations as m; print(len(m.MIGRATIONS))"
    old_n, new_n = int(old.python(count)), int(new.python(count))
    assert new_n > old_n, (f"no pending migration: the previous version {rev[:12]} has "
                           f"{old_n} PostgreSQL migrations, this tree {new_n}")
    assert (old_root / "broker" / "cli" / "drain.py").exists(), (
        f"the previous version {rev[:12]} has no drain; this test starts from one that has")

    ports = {k: haproxy.free_port() for k in ("front", "a", "a_diag", "b", "b_diag")}
    a_cfg = bastion_config(demo, tmp_path, "a", pg.dsn(), ports["a"], ports["a_diag"])
    b_cfg = bastion_config(demo, tmp_path, "b", pg.dsn(), ports["b"], ports["b_diag"])
    known = {p: demo.known_hosts_for(tmp_path, ports[p]) for p in ("front", "a")}
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    served: list[Served] = []
    clients: list[Shell] = []
    try:
        a_old = Served(old, a_cfg, a_log)
        served.append(a_old)
        assert schema_version(pg.dsn()) == old_n
        # users in PostgreSQL, enrolled and granted through the old version's CLI
        totp: dict[str, pyotp.TOTP] = {}
        for _ in range(4):
            user = demo.take_user()
            m = re.search(r"secret=([A-Z2-7]+)", old.run(a_cfg, "totp", "enroll", user))
            assert m is not None
            totp[user] = pyotp.TOTP(m.group(1))
            old.run(a_cfg, "grant", "add", "--user", user, "--domain", demo.info["domain"],
                    "--stack", "stack-web", "--vpc", "vpc-0demo", "--level", "read-only",
                    "--ticket", "CHG-20", "--reason", "rolling upgrade", "--json")
        u_shell, u_on_a, u_during, u_after = totp

        def env(user: str) -> dict[str, str]:
            return demo.env(user, code=totp[user].now())

        def ssh(user: str, port_key: str, command: str) -> subprocess.CompletedProcess[bytes]:
            port = ports[port_key]
            kh = known.get(port_key) or demo.known_hosts_for(tmp_path, port)
            return subprocess.run([*demo.ssh_args(f"{user}+web01", port=port, known_hosts=kh),
                                   command], capture_output=True, env=env(user), timeout=60)

        with haproxy.running(tmp_path, SECTIONS.format(**ports), [ports["front"]]) as lb:
            lb.wait_states("bastions", {"a": "UP", "b": "DOWN"})  # b: not started yet
            # a live shell through the balancer: on A, the only bastion up
            shell = Shell(demo.ssh_args(f"{u_shell}+web01", "-tt", port=ports["front"],
                                        known_hosts=known["front"]), env(u_shell))
            clients.append(shell)
            shell.send(b"echo BEFORE-$((40+2))\n")
            shell.pump(b"BEFORE-42")
            assert '"session.start"' in a_old.text()

            # B, on this tree, applies the pending migration while A serves
            b = Served(new, b_cfg, b_log)
            served.append(b)
            assert schema_version(pg.dsn()) == new_n
            lb.wait_states("bastions", {"a": "UP", "b": "UP"})
            # A goes on with the migrated schema: a new login, its row and audit
            r = ssh(u_on_a, "a", "echo old-on-new-schema")
            assert (r.returncode, r.stdout) == (0, b"old-on-new-schema\n"), r.stderr
            shell.send(b"echo AFTER-MIGRATION\n")
            shell.pump(b"AFTER-MIGRATION")

            # drain A with its own (old) command: the balancer takes it out at once
            old.run(a_cfg, "drain", "--pid", str(a_old.proc.pid))
            lb.wait_states("bastions", {"a": "DOWN", "b": "UP"})
            r = ssh(u_during, "front", "echo landed")
            assert (r.returncode, r.stdout) == (0, b"landed\n"), r.stderr
            assert u_during in b.text()  # B logged that session
            assert u_during not in a_old.text()
            # the shell on A is untouched; A leaves once its user does
            shell.send(b"echo STILL-ON-A\n")
            shell.pump(b"STILL-ON-A")
            assert a_old.proc.poll() is None
            shell.send(b"exit 3\n")
            assert shell.finish(60) == 3
            assert a_old.proc.wait(60) == 0

            # A again, on this tree; the balancer takes it back
            a_new = Served(new, a_cfg, a_log)
            served.append(a_new)
            lb.wait_states("bastions", {"a": "UP", "b": "UP"})
            r = ssh(u_after, "a", "echo upgraded")
            assert (r.returncode, r.stdout) == (0, b"upgraded\n"), r.stderr
    finally:
        for c in clients:
            if c.proc.poll() is None:
                c.proc.kill()
        for s in served:
            s.stop()

    # nothing lost: every session of these users ended, recorded whole, sealed, audited
    rows = [s for s in json.loads(new.run(b_cfg, "sessions", "list", "--json", "--all",
                                          "--limit", "1000"))
            if s["user"].split("@")[0] in totp]
    assert sorted((s["user"].split("@")[0], s["exit_status"]) for s in rows) == sorted(
        [(u_shell, "3"), (u_on_a, "0"), (u_during, "0"), (u_after, "0")])
    audit = demo.audit_lines()
    for s in rows:
        assert s["ended_at"] is not None
        rec = Path(str(s["recording"]))
        parsed = fmt.parse(rec.read_bytes())
        assert not parsed.truncated
        assert fmt.exit_status(parsed.frames) == s["exit_status"]
        assert [e for e in audit if e.get("session_id") == s["id"] and e["event"] == "session.end"]
        # the signed manifest covers the whole recording (on the bastion that holds it)
        new.run(a_cfg if rec.is_relative_to(tmp_path / "a") else b_cfg, "verify", s["id"])
    shell_row = next(s for s in rows if s["user"].startswith(u_shell + "@"))
    out = fmt.output_bytes(fmt.parse(Path(str(shell_row["recording"])).read_bytes()).frames)
    assert b"AFTER-MIGRATION" in out and b"STILL-ON-A" in out
    for name in ("a", "b"):
        assert not any((tmp_path / name / "rec" / OPEN_DIR).iterdir())
    events = [e["event"] for e in audit]
    assert "broker.drain" in events and "broker.drained" in events
    for log in (a_log, b_log):
        assert "Traceback" not in log.read_text(errors="replace")
