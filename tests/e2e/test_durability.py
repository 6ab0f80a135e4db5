"""Durable recordings with the real OpenSSH client and sshd targets: exec without a PTY recorded
byte for byte, no session without a recording, periodic fsync, the disk guard on a small tmpfs
(refuse new sessions; strict and best-effort below the critical threshold), and crash repair
after ``kill -9`` of a real broker process."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from broker.app import Broker
from broker.config import load_config
from broker.domain import recording as fmt
from broker.recordings.local import OPEN_DIR
from tests.conftest import BIN, Demo
from tests.e2e.test_hardening import small_tmpfs  # noqa: F401  (the 1 MiB tmpfs fixture)

pytestmark = pytest.mark.e2e


# -- helpers -------------------------------------------------------------------------------------
def broker_config(demo: Demo, tmp: Path, extra: str) -> Path:
    """A second broker on the demo's state, its own settings appended (web API off)."""
    cfg = demo.variant_config(tmp)
    cfg.write_text(cfg.read_text() + "[web]\nenabled = false\n" + extra)
    return cfg


class BrokerProcess:
    """``bastion-broker serve`` as a child process, its log in a file (never a full pipe)."""

    def __init__(self, cfg: Path, log: Path) -> None:
        self.log = log
        self._log_f = open(log, "ab")  # closed in wait()
        start = log.stat().st_size
        self.proc = subprocess.Popen([str(BIN), "--config", str(cfg), "serve"],
                                     stdout=subprocess.DEVNULL, stderr=self._log_f,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        self.port = 0
        while not self.port:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"broker did not start: {self.text()[-3000:]}")
            with open(log, "rb") as f:
                f.seek(start)
                for line in f:
                    if b'"broker.listening"' in line:
                        self.port = int(json.loads(line)["port"])
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(30)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._log_f.close()
        return code


class Client:
    """The OpenSSH client in a live session; collects what it receives without blocking."""

    def __init__(self, demo: Demo, user: str, port: int, known_hosts: Path, command: str | None,
                 *, tty: bool) -> None:
        args = demo.ssh_args(f"{user}+web01", *(("-tt",) if tty else ()), port=port,
                             known_hosts=known_hosts)
        if command is not None:
            args.append(command)
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=demo.env(user))
        self.out = b""
        self.err = b""

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def pump(self, until: bytes | None = None, timeout: float = 60) -> None:
        """Read until ``until`` shows up in stdout+stderr (or EOF if None), within ``timeout``."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        streams = {self.proc.stdout.fileno(): "out", self.proc.stderr.fileno(): "err"}
        deadline = time.monotonic() + timeout
        while streams:
            if until is not None and until in self.out + self.err:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"waited for {until!r}; got out={self.out[-500:]!r} "
                                     f"err={self.err[-500:]!r}")
            ready, _, _ = select.select(list(streams), [], [], min(left, 1.0))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del streams[fd]
                elif streams[fd] == "out":
                    self.out += chunk
                else:
                    self.err += chunk
        if until is not None and until not in self.out + self.err:
            raise AssertionError(f"EOF before {until!r}: out={self.out[-500:]!r} "
                                 f"err={self.err[-500:]!r}")

    def finish(self, timeout: float = 60) -> int:
        self.pump(None, timeout)
        return self.proc.wait(timeout)


def audit_for(demo: Demo, sid: str) -> list[dict[str, object]]:
    return [e for e in demo.audit_lines() if e.get("session_id") == sid]


def session_row(demo: Demo, sid: str) -> dict[str, object]:
    return next(s for s in demo.sessions() if s["id"] == sid)


def wait_for(pred: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- complete: exec without a PTY, fail closed ------------------------------------------------
def test_exec_without_pty_records_stdin_stdout_stderr_and_exit_status(demo: Demo) -> None:
    user = demo.take_user()
    stdin = b"input line\n\x00\xff binary \x1b[31m\n" * 50
    r = demo.ssh(user, "web01", "cat; printf 'to stderr\\n' >&2; head -c 300000 /dev/urandom; "
                 "exit 3", stdin=stdin)
    assert r.returncode == 3, r.stderr
    rows = [s for s in demo.sessions() if s["user"].startswith(user + "@")]
    assert len(rows) == 1
    row = rows[0]
    assert row["kind"] == "exec" and row["exit_status"] == "3"
    parsed = fmt.parse(Path(str(row["recording"])).read_bytes())
    assert not parsed.truncated
    # stdin without a pty is input the target does not echo: withheld, its length recorded
    assert fmt.output_bytes(parsed.frames, frozenset({fmt.INPUT})) == b""
    assert sum(int(f.data) for f in parsed.frames if f.kind == fmt.NOT_ECHOED) == len(stdin)
    assert fmt.output_bytes(parsed.frames) == r.stdout  # byte-exact, 300 kB of binary included
    assert r.stdout.startswith(stdin) and len(r.stdout) == len(stdin) + 300000
    assert fmt.output_bytes(parsed.frames, frozenset({fmt.ERROR})) == b"to stderr\n"
    assert b"to stderr\n" in r.stderr
    assert fmt.exit_status(parsed.frames) == "3"
    assert not (Path(str(row["recording"])).parent.parent / OPEN_DIR / str(row["id"])).exists()


async def _start_ssh(demo: Demo, tmp_path: Path, port: int, user: str,
                     command: str) -> asyncio.subprocess.Process:
    """The real OpenSSH client running ``command`` on web01 through the broker on ``port``."""
    return await asyncio.create_subprocess_exec(
        *demo.ssh_args(f"{user}+web01", port=port,
                       known_hosts=demo.known_hosts_for(tmp_path, port)),
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env=demo.env(user))


async def test_a_session_whose_recording_cannot_start_does_not_start(
    demo: Demo, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the recordings directory should be\n")
    cfg = broker_config(demo, tmp_path, f'[recordings]\ndir = "{blocker}"\n')
    broker = Broker(load_config(cfg))
    port = await broker.start()
    witness = Path(tempfile.gettempdir()) / f"bb-unrecorded-{uuid.uuid4().hex}"
    try:
        user = demo.take_user()
        proc = await _start_ssh(demo, tmp_path, port, user, f"touch {witness}")
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 255
        assert b"session recording unavailable; access refused" in err
        assert not witness.exists()  # the command never ran on the target
        assert not [s for s in demo.sessions() if s["user"].startswith(user + "@")]
    finally:
        await broker.stop()
        witness.unlink(missing_ok=True)


async def test_live_recordings_are_flushed_to_disk_periodically(
    demo: Demo, tmp_path: Path
) -> None:
    cfg = broker_config(demo, tmp_path, f'[recordings]\ndir = "{tmp_path / "rec"}"\n'
                        "sync_interval_seconds = 0.5\n")
    broker = Broker(load_config(cfg))
    port = await broker.start()
    try:
        user = demo.take_user()
        proc = await _start_ssh(demo, tmp_path, port, user, "echo first; sleep 60")
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line == b"first\n"
        (live,) = broker.sessions.live.values()
        writer = live.writer
        assert writer.bytes > 0  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while writer.dirty:  # type: ignore[attr-defined]  # only the periodic task syncs
            assert time.monotonic() < deadline, "the live recording was never flushed"
            await asyncio.sleep(0.05)
        proc.kill()
        await proc.wait()
    finally:
        await broker.stop()


# -- the disk guard on a 1 MiB tmpfs ----------------------------------------------------------
async def test_below_min_free_no_new_session_starts(
    demo: Demo, tmp_path: Path, small_tmpfs: Path  # noqa: F811
) -> None:
    cfg = broker_config(demo, tmp_path, f'[recordings]\ndir = "{small_tmpfs}"\n'
                        f"min_free_bytes = {2 * 1024 * 1024}\ncritical_free_bytes = 4096\n")
    broker = Broker(load_config(cfg))
    port = await broker.start()
    witness = Path(tempfile.gettempdir()) / f"bb-disk-low-{uuid.uuid4().hex}"
    try:
        user = demo.take_user()
        proc = await _start_ssh(demo, tmp_path, port, user, f"touch {witness}")
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 255
        assert b"recording storage on this bastion is almost full" in err
        assert b"no new sessions can start" in err
        assert not witness.exists()
        assert not any(small_tmpfs.rglob("*.rec"))  # noqa: ASYNC240 - a tiny tmpfs
        refused = [e for e in demo.audit_lines() if e["event"] == "session.refused"
                   and str(e.get("user", "")).startswith(user + "@")]
        assert len(refused) == 1 and refused[0]["reason"] == "recording_disk_low"
    finally:
        await broker.stop()
        witness.unlink(missing_ok=True)


# ~130 kB/s of base64 for up to 30 s: crosses the critical threshold long before the disk is full
SLOW_OUTPUT = ("i=0; while [ $i -lt 300 ]; do head -c 10000 /dev/urandom | base64; sleep 0.1; "
               "i=$((i+1)); done")


async def _disk_session(demo: Demo, tmp_path: Path, rec_dir: Path, policy: str,
                        command: str) -> tuple[Broker, str, bytes, bytes, int]:
    cfg = broker_config(demo, tmp_path, f'[recordings]\ndir = "{rec_dir}"\n'
                        f'disk_policy = "{policy}"\nmin_free_bytes = {700 * 1024}\n'
                        f"critical_free_bytes = {600 * 1024}\n"
                        "disk_check_interval_seconds = 0.2\n")
    broker = Broker(load_config(cfg))
    port = await broker.start()
    user = demo.take_user()
    proc = await _start_ssh(demo, tmp_path, port, user, command)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return broker, user, out, err, proc.returncode


def _recording(rec_dir: Path) -> fmt.ParsedRecording:
    files = list(rec_dir.rglob("*.rec"))
    assert len(files) == 1
    return fmt.parse(files[0].read_bytes())


async def test_below_critical_strict_ends_live_sessions(
    demo: Demo, tmp_path: Path, small_tmpfs: Path  # noqa: F811
) -> None:
    broker, user, out, err, code = await _disk_session(demo, tmp_path, small_tmpfs, "strict",
                                                       SLOW_OUTPUT)
    try:
        assert code == 255
        assert b"bastion-broker: recording storage is full" in err
        assert b"access ended (recording unavailable)" in err
        assert 0 < len(out) < 1024 * 1024
        recorded = fmt.output_bytes(_recording(small_tmpfs).frames)
        assert recorded[: len(out)] == out  # nothing reached the client unrecorded
        row = next(s for s in demo.sessions() if s["user"].startswith(user + "@"))
        events = audit_for(demo, str(row["id"]))
        failed = [e for e in events if e["event"] == "session.recording_failed"]
        assert failed and failed[0]["error"] == "recording storage is full"
        assert [e for e in events if e["event"] == "session.end"]
    finally:
        await broker.stop()


async def test_below_critical_best_effort_goes_on_unrecorded_and_says_so(
    demo: Demo, tmp_path: Path, small_tmpfs: Path  # noqa: F811
) -> None:
    command = "head -c 1500000 /dev/urandom | base64; echo END-OF-OUTPUT"
    broker, user, out, err, code = await _disk_session(demo, tmp_path, small_tmpfs,
                                                       "best-effort", command)
    try:
        assert code == 0, err
        assert out.endswith(b"END-OF-OUTPUT\n") and len(out) > 2_000_000  # all of it
        assert b"this session continues unrecorded" in err
        recorded = fmt.output_bytes(_recording(small_tmpfs).frames)
        assert 0 < len(recorded) < len(out) and out.startswith(recorded)
        row = next(s for s in demo.sessions() if s["user"].startswith(user + "@"))
        events = audit_for(demo, str(row["id"]))
        suspended = [e for e in events if e["event"] == "session.recording_suspended"]
        assert len(suspended) == 1 and suspended[0]["policy"] == "best-effort"
        (end,) = [e for e in events if e["event"] == "session.end"]
        assert end["recording_suspended"] and end["exit_status"] == "0"
    finally:
        await broker.stop()


# -- SIGKILL: repaired at the next start --------------------------------------------------------
@pytest.fixture
def rec_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rec"
    d.mkdir()
    return d


def test_kill_9_mid_session_is_repaired_at_the_next_start(
    demo: Demo, tmp_path: Path, rec_dir: Path
) -> None:
    cfg = broker_config(demo, tmp_path, f'[recordings]\ndir = "{rec_dir}"\n')
    log = tmp_path / "broker.log"
    log.touch()
    broker = BrokerProcess(cfg, log)
    user = demo.take_user()
    client = Client(demo, user, broker.port, demo.known_hosts_for(tmp_path, broker.port), None,
                    tty=True)
    try:
        client.send(b"echo MARK-$((6*7))\n")
        client.pump(b"MARK-42")
        client.send(b"seq 1 2000\n")
        client.pump(b"2000\r\n")
        (marker,) = (rec_dir / OPEN_DIR).iterdir()
        sid = marker.name
        assert session_row(demo, sid)["ended_at"] is None
        broker.proc.send_signal(signal.SIGKILL)
        assert broker.wait(30) == -signal.SIGKILL
        client.finish(60)  # the client sees the connection drop
    finally:
        broker.kill()
        if client.proc.poll() is None:
            client.proc.kill()
    (rec,) = rec_dir.rglob("*.rec")
    with open(rec, "ab") as f:  # what a power loss mid-write leaves: a torn last frame
        f.write(fmt.frame_header(1, fmt.OUTPUT, 4096) + b"torn")
    assert marker.exists()

    again = BrokerProcess(cfg, log)  # the restart repairs before it listens
    try:
        assert "recording.repaired" in again.text()
        parsed = fmt.parse(rec.read_bytes())
        assert not parsed.truncated  # cut to the last complete frame
        assert fmt.exit_status(parsed.frames) == "interrupted"
        recorded = fmt.output_bytes(parsed.frames)
        assert recorded.startswith(client.out)  # all the client received is in the recording
        assert b"MARK-42" in recorded and b"2000\r\n" in recorded
        assert rec.with_suffix(".cast").exists()
        assert not marker.exists()
        row = session_row(demo, sid)
        assert row["exit_status"] == "interrupted" and row["ended_at"] is not None
        ends = [e for e in audit_for(demo, sid) if e["event"] == "session.end"]
        assert len(ends) == 1
        assert ends[0]["reason"] == "interrupted" and ends[0]["synthesized"] is True
        assert ends[0]["cut_bytes"] == fmt.FRAME.size + 4
    finally:
        again.proc.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0
    assert "Traceback" not in log.read_text(errors="replace")
