"""Drain (SIGQUIT, ``bastion-broker drain``) with a real broker process and the real OpenSSH
client: ``/readyz`` fails at once with ``draining``; a connection made in the accept window is
served; after it the listener refuses; a live shell goes on and its user keeps typing; the
broker exits 0 when the last session ends, every recording complete. Past ``drain_seconds`` the
SIGTERM path ends what is left, with the drain's reason. With ``[ssh] workers`` the parent
passes the signal on. The command's own errors are one line."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from broker.domain import recording as fmt
from broker.recordings.local import OPEN_DIR
from tests.conftest import BIN, Demo
from tests.e2e.test_durability import BrokerProcess, Client, audit_for, wait_for

pytestmark = pytest.mark.e2e


def readyz(diag_url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(diag_url + "/readyz", timeout=10) as r:  # noqa: S310
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def diag_url(broker: BrokerProcess) -> str:
    for line in broker.text().splitlines():
        if '"diag.listening"' in line:
            return str(json.loads(line)["url"])
    raise AssertionError("the broker logged no diag.listening")


def drain_config(demo: Demo, tmp: Path, shutdown: str, ssh: str = "") -> Path:
    """A broker on the demo's state (its pid file STATE_DIR/broker.pid; tests run one at a
    time), recordings of its own, diagnostics on."""
    cfg = demo.variant_config(tmp, ssh=ssh, extra=(
        f'[web]\nenabled = false\n[recordings]\ndir = "{tmp / "rec"}"\n'
        f"[diag]\nenabled = true\nlisten_port = 0\n[shutdown]\n{shutdown}\n"))
    return cfg


def ssh_once(demo: Demo, user: str, port: int, known_hosts: Path,
             command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*demo.ssh_args(f"{user}+web01", port=port, known_hosts=known_hosts),
                           command], capture_output=True, env=demo.env(user), timeout=60)


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), "--config", str(cfg), *args], capture_output=True,
                          text=True, timeout=60)


def test_drain_serves_the_window_then_refuses_and_exits_when_the_last_session_ends(
    demo: Demo, tmp_path: Path
) -> None:
    cfg = drain_config(demo, tmp_path, "drain_accept_seconds = 8\ndrain_seconds = 300\n")
    log = tmp_path / "broker.log"
    log.touch()
    broker = BrokerProcess(cfg, log)
    kh = demo.known_hosts_for(tmp_path, broker.port)
    pid_file = demo.state_dir / "broker.pid"
    audit_from = len(demo.audit_lines())
    clients: list[Client] = []
    waiter: subprocess.Popen[str] | None = None
    try:
        url = diag_url(broker)
        status, body = readyz(url)
        assert status == 200, body
        assert pid_file.read_text().strip() == str(broker.proc.pid)
        shell = Client(demo, demo.take_user(), broker.port, kh, None, tty=True)
        clients.append(shell)
        shell.send(b"echo READY-$((40+2))\n")
        shell.pump(b"READY-42")
        window_user, late_user = demo.take_user(), demo.take_user()
        window_env = demo.env(window_user)  # its code taken before the clock starts

        waiter = subprocess.Popen([str(BIN), "--config", str(cfg), "drain", "--wait"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert waiter.stdout is not None
        assert waiter.stdout.readline().startswith(f"drain requested: broker {broker.proc.pid} ")
        # the balancer's next health check takes it out: as soon as the broker has the signal
        wait_for(lambda: readyz(url)[0] == 503, "/readyz to fail", timeout=30)
        status, body = readyz(url)
        assert body["failing"] == ["draining"]
        assert body["status"] == "not ready"
        assert "draining since " in next(c["detail"] for c in body["checks"]
                                         if c["name"] == "draining")
        # sent before the balancer noticed: accepted and served, although the drain has begun
        in_window = subprocess.run(
            [*demo.ssh_args(f"{window_user}+web01", port=broker.port, known_hosts=kh),
             "sleep 5; echo served-in-window"],
            capture_output=True, env=window_env, timeout=60)
        assert in_window.returncode == 0, in_window.stderr
        assert in_window.stdout == b"served-in-window\n"

        wait_for(lambda: "broker.drain_closed" in broker.text(), "the listener to close")
        late = ssh_once(demo, late_user, broker.port, kh, "echo never")
        assert late.returncode == 255
        assert b"Connection refused" in late.stderr
        # the live shell is untouched: its user keeps typing, output keeps coming
        shell.send(b"echo STILL-$((6*7))\n")
        shell.pump(b"STILL-42")
        status, body = readyz(url)
        assert (status, body["failing"]) == (503, ["draining"])
        assert broker.proc.poll() is None
        assert waiter.poll() is None
        assert b"shutting down" not in shell.out + shell.err  # nothing said to those it keeps

        shell.send(b"exit 7\n")
        assert shell.finish(60) == 7
        assert broker.wait(60) == 0
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        assert out.strip() == f"broker {broker.proc.pid} has exited"
    finally:
        broker.kill()
        for c in clients:
            if c.proc.poll() is None:
                c.proc.kill()
        if waiter is not None and waiter.poll() is None:
            waiter.kill()

    assert not pid_file.exists()
    rec_dir = tmp_path / "rec"
    assert not any((rec_dir / OPEN_DIR).iterdir())  # nothing left for a crash repair
    text = broker.text()
    sids = [json.loads(line)["session_id"] for line in text.splitlines()
            if '"session.start"' in line]
    assert len(sids) == 2
    rows = {r["id"]: r for r in demo.sessions() if r["id"] in sids}
    assert sorted(str(r["exit_status"]) for r in rows.values()) == ["0", "7"]
    for sid, row in rows.items():
        parsed = fmt.parse(Path(str(row["recording"])).read_bytes())
        assert not parsed.truncated
        assert fmt.exit_status(parsed.frames) == row["exit_status"]
        (end,) = [e for e in audit_for(demo, sid) if e["event"] == "session.end"]
        assert end["exit_status"] == row["exit_status"]
        if row["kind"] == "shell":
            assert b"STILL-42" in fmt.output_bytes(parsed.frames)
            assert Path(str(row["recording"])).with_suffix(".cast").exists()
    events = [e["event"] for e in demo.audit_lines()[audit_from:]
              if e.get("pid") == broker.proc.pid or e.get("session_id") in sids]
    drain_at = events.index("broker.drain")
    # the window's session began after the drain; the drain ended after both sessions
    assert events[drain_at:].count("session.start") == 1
    assert events.index("broker.drained") > max(i for i, e in enumerate(events)
                                                if e == "session.end")
    assert "broker.drain_deadline" not in events and "broker.draining" not in events
    assert "Traceback" not in text


def test_past_the_deadline_the_rest_is_ended_with_the_drain_as_reason(
    demo: Demo, tmp_path: Path
) -> None:
    cfg = drain_config(demo, tmp_path, "drain_accept_seconds = 0\ndrain_seconds = 2\n"
                       "grace_seconds = 3\n")
    log = tmp_path / "broker.log"
    log.touch()
    broker = BrokerProcess(cfg, log)
    kh = demo.known_hosts_for(tmp_path, broker.port)
    shell = Client(demo, demo.take_user(), broker.port, kh, None, tty=True)
    try:
        shell.send(b"echo READY-$((40+2))\n")
        shell.pump(b"READY-42")
        r = cli(cfg, "drain", "--pid", str(broker.proc.pid))
        assert r.returncode == 0, r.stderr
        shell.pump(b"the bastion is shutting down; this session ends within 3 s")
        assert shell.finish(60) == 255
        assert b"access ended (bastion shutting down: drain deadline passed)" in (
            shell.out + shell.err)
        assert broker.wait(60) == 0
    finally:
        broker.kill()
        if shell.proc.poll() is None:
            shell.proc.kill()
    text = broker.text()
    (sid,) = [json.loads(line)["session_id"] for line in text.splitlines()
              if '"session.start"' in line]
    row = next(r for r in demo.sessions() if r["id"] == sid)
    assert row["exit_status"] == "terminated:bastion shutting down: drain deadline passed"
    parsed = fmt.parse(Path(str(row["recording"])).read_bytes())
    assert not parsed.truncated
    assert fmt.exit_status(parsed.frames) == row["exit_status"]
    assert not any((tmp_path / "rec" / OPEN_DIR).iterdir())
    events = [e["event"] for e in demo.audit_lines() if e.get("pid") == broker.proc.pid
              or e.get("session_id") == sid]
    assert events.index("broker.drain") < events.index("broker.drain_deadline") < events.index(
        "session.end")
    assert "broker.drained" not in events
    assert "Traceback" not in text


def test_sigterm_during_a_drain_stops_at_once_as_a_stop_does(demo: Demo, tmp_path: Path) -> None:
    cfg = drain_config(demo, tmp_path, "drain_accept_seconds = 60\ndrain_seconds = 300\n"
                       "grace_seconds = 3\n")
    log = tmp_path / "broker.log"
    log.touch()
    broker = BrokerProcess(cfg, log)
    kh = demo.known_hosts_for(tmp_path, broker.port)
    shell = Client(demo, demo.take_user(), broker.port, kh, None, tty=True)
    try:
        shell.send(b"echo READY-$((40+2))\n")
        shell.pump(b"READY-42")
        r = cli(cfg, "drain")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: '"broker.drain"' in broker.text(), "the drain to begin")
        broker.proc.terminate()  # long before the window's end or the deadline
        shell.pump(b"the bastion is shutting down; this session ends within 3 s")
        assert shell.finish(60) == 255
        assert b"access ended (bastion shutting down)" in shell.out + shell.err
        assert broker.wait(60) == 0
    finally:
        broker.kill()
        if shell.proc.poll() is None:
            shell.proc.kill()
    text = broker.text()
    (sid,) = [json.loads(line)["session_id"] for line in text.splitlines()
              if '"session.start"' in line]
    row = next(r for r in demo.sessions() if r["id"] == sid)
    assert row["exit_status"] == "terminated:bastion shutting down"
    assert not fmt.parse(Path(str(row["recording"])).read_bytes()).truncated
    assert not any((tmp_path / "rec" / OPEN_DIR).iterdir())
    assert "broker.drain_closed" not in text and "broker.drain_deadline" not in text
    assert "Traceback" not in text


def test_with_workers_the_parent_passes_the_drain_on(demo: Demo, tmp_path: Path) -> None:
    cfg = drain_config(demo, tmp_path, "drain_accept_seconds = 1\ndrain_seconds = 300\n",
                       ssh="workers = 2")
    log = tmp_path / "broker.log"
    log.touch()
    broker = BrokerProcess(cfg, log)
    kh = demo.known_hosts_for(tmp_path, broker.port)
    job = Client(demo, demo.take_user(), broker.port, kh,
                 "echo started; read -r line; echo got-$line", tty=False)
    try:
        job.pump(b"started\n")
        wait_for(lambda: broker.text().count('"broker.listening"') == 2, "both workers")
        assert (demo.state_dir / "broker.pid").read_text().strip() == str(broker.proc.pid)
        r = cli(cfg, "drain")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: broker.text().count('"broker.drain_closed"') == 2,
                 "both workers to close their listeners")
        late = ssh_once(demo, demo.take_user(), broker.port, kh, "echo never")
        assert late.returncode == 255
        assert b"Connection refused" in late.stderr
        wait_for(lambda: '"broker.drained"' in broker.text(), "the idle worker to finish")
        assert broker.proc.poll() is None  # the other still holds the session
        job.send(b"drained\n")
        assert job.finish(60) == 0
        assert job.out == b"started\ngot-drained\n"
        assert broker.wait(60) == 0
    finally:
        broker.kill()
        if job.proc.poll() is None:
            job.proc.kill()
    text = broker.text()
    assert text.count('"broker.drained"') == 2
    assert '"worker.died"' not in text  # none restarted
    assert not (demo.state_dir / "broker.pid").exists()
    assert not any((tmp_path / "rec" / OPEN_DIR).iterdir())
    assert "Traceback" not in text


def test_drain_says_in_one_line_what_it_cannot_do(tmp_path: Path) -> None:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n')
    pid_file = tmp_path / "broker.pid"
    r = cli(cfg, "drain")
    assert r.returncode == 2
    assert r.stderr.startswith("bastion-broker: error: no broker is running on this state "
                               f"directory ({pid_file} does not exist")
    pid_file.write_text("not a pid\n")
    r = cli(cfg, "drain")
    assert r.returncode == 2 and "cannot read the broker's pid from" in r.stderr
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file.write_text(f"{other.pid}\n")
        r = cli(cfg, "drain")  # a pid the system gave to another program since: left alone
        assert r.returncode == 2
        assert f"pid {other.pid} is not a bastion-broker process" in r.stderr
        time.sleep(0.5)
        assert other.poll() is None  # SIGQUIT would have ended it
    finally:
        other.kill()
        other.wait()
    r = cli(cfg, "drain")  # that pid is gone now
    assert r.returncode == 2 and f"no broker runs as pid {other.pid} (stale pid file)" in r.stderr
    r = cli(cfg, "drain", "--wait", "--timeout", "0")
    assert r.returncode == 2 and "--timeout must be a positive number" in r.stderr
    assert all(line.startswith("bastion-broker: error: ") for line in r.stderr.splitlines())
