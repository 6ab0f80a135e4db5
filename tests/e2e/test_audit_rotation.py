"""Audit rotation on a running bastion: a second broker (two worker processes) on the demo's
state rotates the shared audit log at 20 kB while real ssh sessions (two ControlMasters'
channels and an sftp download) run through it, and the demo's broker and the CLI, which do not
rotate, keep writing the same log.
Then ``verify --audit`` checks every file, and ``sessions files`` and the console's audit search
find a session whose events are in a rotated file."""

from __future__ import annotations

import http.cookiejar
import json
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.audit.files import Snapshot
from tests.conftest import BIN, Demo, serve_broker, start_demo, stop_demo

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_demo(tmp_path: Path) -> Iterator[Demo]:
    """A demo of its own: rotating the shared demo's log would be a surprise to other tests."""
    d = start_demo(tmp_path / "state", users=3)
    try:
        yield d
    finally:
        stop_demo(d)
        assert "Traceback" not in d.broker_log()


def _rotated(demo: Demo) -> list[Path]:
    with Snapshot(demo.state_dir / "audit" / "audit.jsonl") as snap:
        return [f.path for f in snap.rotated]


def test_a_rotating_broker_keeps_one_verifiable_log_that_readers_read_whole(
        own_demo: Demo, tmp_path: Path) -> None:
    demo = own_demo
    cfg = demo.variant_config(tmp_path, ssh="workers = 2", extra=(
        "[web]\nenabled = false\n[audit]\nrotate_bytes = 20000\n"))
    broker, port = serve_broker(cfg)
    known = demo.known_hosts_for(tmp_path, port)
    users = [demo.take_user(), demo.take_user()]
    masters: list[subprocess.Popen[bytes]] = []
    try:
        for i, user in enumerate(users):  # two connections: the kernel may give each a worker
            ctl, err = tmp_path / f"ctl{i}", tmp_path / f"master{i}.err"
            with err.open("wb") as err_f:
                masters.append(subprocess.Popen(
                    demo.ssh_args(f"{user}+web01", "-M", "-S", str(ctl), "-N", "-o",
                                  "ControlPersist=no", port=port, known_hosts=known),
                    env=demo.env(user), stdin=subprocess.DEVNULL, stderr=err_f))
            deadline = time.monotonic() + 30
            while not ctl.exists():
                assert masters[-1].poll() is None, err.read_text(errors="replace")
                assert time.monotonic() < deadline, "no control socket after 30 s"
                time.sleep(0.05)
        muxes = [["-F", "/dev/null", "-o", f"ControlPath={tmp_path / f'ctl{i}'}", "-o",
                  "ControlMaster=no"] for i in range(2)]
        mux = muxes[0]
        # an sftp download first: its file events end up in a rotated file
        r = subprocess.run(["sftp", *mux, "-b", "-", "x"], input=b"get /etc/hostname /dev/null\n",
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 15
        while not (opened := [e for e in demo.audit_lines() if e["event"] == "sftp.open"
                              and e.get("path") == "/etc/hostname"]):
            assert time.monotonic() < deadline, "no sftp.open in the audit log"
            time.sleep(0.1)
        sftp_sid = opened[-1]["session_id"]
        pad = "x" * 1500  # the command is audited: a few sessions fill a file
        started = time.monotonic()
        n = 0
        while len(_rotated(demo)) < 4:
            assert time.monotonic() - started < 180, f"{len(_rotated(demo))} rotations"
            r = subprocess.run(["ssh", *muxes[n % 2], "x", f"echo {n} # {pad}"],
                               capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=60)
            assert r.returncode == 0 and r.stdout == f"{n}\n".encode(), r.stderr
            if n % 5 == 0:  # another writer meanwhile: the CLI (it never rotates here)
                demo.cli("grant", "add", "--user", users[0], "--domain", demo.info["domain"],
                         "--stack", "stack-web", "--vpc", "vpc-0demo", "--level", "read-only",
                         "--ticket", f"CHG-{n}", "--reason", "rotation test")
            n += 1
        for m in muxes:
            subprocess.run(["ssh", *m, "-O", "exit", "x"], capture_output=True, timeout=30)
    finally:
        for master in masters:
            try:
                master.wait(10)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(10)
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)

    rotated = _rotated(demo)
    assert any(sftp_sid.encode() in f.read_bytes() for f in rotated)  # the readers must look
    evs = demo.audit_lines()
    assert [e["seq"] for e in evs] == list(range(len(evs)))  # one chain, nothing lost
    assert not any(e["event"] == "audit.cut" for e in evs)
    for f in rotated:  # each closed file ends signed: nothing was written to it after rotation
        assert json.loads(f.read_bytes().splitlines()[-1])["event"] == "audit.checkpoint"
    assert sum(e["event"] == "session.end" for e in evs) >= n

    r = subprocess.run([str(BIN), "--config", str(cfg), "verify", "--audit", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    [report] = json.loads(r.stdout)["reports"]
    assert report["ok"] and report["checked"]["files"][-1] == "audit.jsonl"
    assert [*report["checked"]["files"][:-1]] == [f.name for f in rotated]
    assert not [f for f in report["findings"] if f["severity"] == "error"]

    files = json.loads(demo.cli("sessions", "files", sftp_sid, "--json").stdout)
    assert [(e["event"], e.get("path")) for e in files][:1] == [("sftp.open", "/etc/hostname")]

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login = json.dumps({"user": "auditor", "password": demo.info["password"],
                        "code": demo.next_code("auditor")}).encode()
    opener.open(urllib.request.Request(demo.info["web_url"] + "/api/login", data=login,  # noqa: S310
                                       headers={"Content-Type": "application/json"}))
    query = urllib.parse.urlencode({"session": sftp_sid, "limit": "100"})
    found = json.loads(opener.open(demo.info["web_url"] + f"/api/audit?{query}").read())
    names = {e["event"] for e in found["items"]}
    assert {"sftp.open", "session.start", "session.end"} <= names, names
