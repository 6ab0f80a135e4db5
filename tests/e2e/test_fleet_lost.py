"""A bastion that dies and does not come back: two brokers on one PostgreSQL, the real OpenSSH
client. After ``kill -9`` of one, the other closes its open session as ``lost`` once the dead
one has been silent for ``[fleet] lost_after_seconds``, and audits it; when the dead one starts
again after all, its repair gives the recording its end and audits nothing twice."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pyotp
import pytest

from broker.domain import recording as fmt
from broker.recordings.local import OPEN_DIR
from tests.conftest import Demo, broker_cli
from tests.contract import pgserver
from tests.e2e.test_durability import BrokerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.fleet, pytest.mark.postgres]

LOST_AFTER = 3.0


def audit(path: Path, event: str, sid: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = (json.loads(x) for x in path.read_text().splitlines() if x)
    return [e for e in lines if e["event"] == event and e.get("session_id") == sid]


def row(cfg: Path, sid: str) -> dict[str, Any]:
    (r,) = [r for r in json.loads(broker_cli(cfg, "sessions", "list", "--json", "--limit", "500"))
            if r["id"] == sid]
    return r  # type: ignore[no-any-return]


def bastions(cfg: Path) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in json.loads(broker_cli(cfg, "bastions", "--json"))}


def poll(what: str, ok: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := ok()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return got


def test_a_dead_bastions_session_is_closed_as_lost_by_another(demo: Demo, tmp_path: Path) -> None:
    with pgserver.running() as pg:
        cfg: dict[str, Path] = {}
        for name in ("east-1", "east-2"):
            d = tmp_path / name
            c = demo.fleet_config(tmp_path, name, pg.dsn(), extra=(
                f'[web]\nenabled = false\n[recordings]\ndir = "{d / "rec"}"\n'
                f'[audit]\npath = "{d / "audit.jsonl"}"\n'
                f"[fleet]\nheartbeat_seconds = 0.5\nlost_after_seconds = {LOST_AFTER}\n"))
            c.write_text(f'node_name = "{name}"\n' + c.read_text())  # top level: first
            cfg[name] = c
        a = BrokerProcess(cfg["east-1"], tmp_path / "east-1.log")
        b = BrokerProcess(cfg["east-2"], tmp_path / "east-2.log")
        client = None
        try:
            user = demo.take_user()
            secret = re.search(r"secret=([A-Z2-7]+)",
                               broker_cli(cfg["east-1"], "totp", "enroll", user))
            assert secret is not None
            broker_cli(cfg["east-1"], "grant", "add", "--user", user, "--domain",
                       demo.info["domain"], "--stack", "stack-web", "--vpc", "vpc-0demo",
                       "--level", "read-only", "--ticket", "CHG-21", "--reason", "lost")
            client = subprocess.Popen(
                [*demo.ssh_args(f"{user}+web01", "-tt", port=b.port,
                                known_hosts=demo.known_hosts_for(tmp_path, b.port)),
                 "echo READY-$((40+2)); sleep 600"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=demo.env(user, code=pyotp.TOTP(secret.group(1)).now()))
            assert client.stdout is not None
            poll("the session's output", lambda: b"READY-42" in client.stdout.readline())
            (marker,) = (tmp_path / "east-2" / "rec" / OPEN_DIR).iterdir()
            sid = marker.name
            r = row(cfg["east-1"], sid)
            assert (r["bastion"], r["ended_at"]) == ("east-2", None)
            fleet = bastions(cfg["east-1"])
            assert {n: (b["state"], b["live_sessions"], b["this"]) for n, b in fleet.items()} == {
                "east-1": ("alive", 0, True), "east-2": ("alive", 1, False)}

            b.proc.send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            b.wait(30)
            poll("the row closed as lost", lambda: row(cfg["east-1"], sid)["ended_at"])
            # not before east-2 was silent for lost_after (its last beat <= 0.5 s before the kill)
            assert time.monotonic() - t_kill >= LOST_AFTER - 0.5 - 0.1
            r = row(cfg["east-1"], sid)
            assert r["exit_status"] == "lost"
            assert r["outcome"] == "ended: lost (its bastion went silent)"
            (end,) = audit(tmp_path / "east-1" / "audit.jsonl", "session.end", sid)
            assert (end["reason"], end["bastion"], end["closed_by"], end["synthesized"]) == (
                "bastion lost", "east-2", "east-1", True)
            fleet = bastions(cfg["east-1"])
            assert (fleet["east-2"]["state"], fleet["east-2"]["live_sessions"]) == ("lost", 0)
            assert fleet["east-2"]["silent_s"] >= LOST_AFTER
            text = broker_cli(cfg["east-1"], "bastions").splitlines()
            assert text[0].split() == ["NAME", "STATE", "SEEN", "UP", "SINCE", "LIVE"]
            assert text[1].startswith("east-1 (this)") and text[2].split()[:2] == [
                "east-2", "lost"]

            # east-2 comes back after all: its repair ends the recording, and audits nothing
            b = BrokerProcess(cfg["east-2"], tmp_path / "east-2.log")
            assert not (tmp_path / "east-2" / "rec" / OPEN_DIR / sid).exists()
            (path,) = (tmp_path / "east-2" / "rec").glob(f"*/{sid}.rec")
            last = fmt.parse(path.read_bytes()).frames[-1]
            assert (last.kind, last.data) == (fmt.EXIT, b"interrupted")
            assert audit(tmp_path / "east-2" / "audit.jsonl", "session.end", sid) == []
            assert len(audit(tmp_path / "east-1" / "audit.jsonl", "session.end", sid)) == 1
            assert row(cfg["east-1"], sid)["exit_status"] == "lost"
        finally:
            if client is not None and client.poll() is None:
                client.kill()
                client.wait()
            for p in (a, b):
                if p.proc.poll() is None:
                    p.proc.send_signal(signal.SIGTERM)
                    p.wait(40)
            for name in cfg:
                log = (tmp_path / f"{name}.log").read_text(errors="replace")
                assert "Traceback" not in log, log[-3000:]
