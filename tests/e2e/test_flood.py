"""A flood does not starve real logins: stalled connections before key exchange make way for
new ones and have a short limit of their own ([ssh] kex_grace_seconds), and one connection or
one user cannot open sessions without bound ([limits] max_sessions_per_connection, _per_user).
Real sockets from several loopback addresses, the real OpenSSH client, ControlMaster."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import Demo, serve_broker

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def _broker(demo: Demo, tmp_path: Path, *, ssh: str = "", limits: str = "",
            extra: str = "") -> Iterator[int]:
    proc, port = serve_broker(demo.variant_config(tmp_path, ssh=ssh, limits=limits, extra=extra))
    try:
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _silent(port: int, source: str, *, banner: bool = False) -> socket.socket:
    """A connection that reads the server's version line and then sends nothing (``banner``:
    only its own version line, never a KEXINIT)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    if banner:
        s.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    return s


def _login(demo: Demo, tmp_path: Path, user: str, port: int) -> subprocess.CompletedProcess[bytes]:
    args = demo.ssh_args(f"{user}+web01", port=port, known_hosts=demo.known_hosts_for(tmp_path, port))
    return subprocess.run([*args, "echo ok"], input=b"", capture_output=True, timeout=30,
                          env=demo.env(user))


def _first_line(s: socket.socket) -> bytes:
    """The server's version line, or b"" if it closed the connection first."""
    data = b""
    with contextlib.suppress(OSError):
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    return data


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _is_closed(s: socket.socket) -> bool:
    """Whether the server has closed ``s`` (whatever it sent before is read and dropped)."""
    s.setblocking(False)
    try:
        while s.recv(4096):
            pass
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def _closed_after(s: socket.socket, limit: float) -> float | None:
    """Seconds until the server closes ``s`` (None: still open after ``limit``)."""
    t0 = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - t0


def test_a_real_login_gets_in_while_stalled_connections_fill_max_startups(
    demo: Demo, tmp_path: Path
) -> None:
    flood: list[socket.socket] = []
    # a kex grace longer than the test: only making way lets the login in
    with _broker(demo, tmp_path, ssh="kex_grace_seconds = 120",
                 limits="max_startups = 100") as port:
        try:
            started = time.monotonic()
            since = _now_iso()
            # 120 connections from 12 addresses, 10 each (max_startups_per_source): every one
            # is admitted, the oldest make way; none of them ever starts a key exchange
            for i in range(120):
                s = _silent(port, f"127.0.0.{10 + i // 10}", banner=i % 2 == 1)
                assert _first_line(s).startswith(b"SSH-2.0-bastion-broker")
                flood.append(s)
            user = demo.take_user()
            t0 = time.monotonic()
            r = _login(demo, tmp_path, user, port)
            elapsed = time.monotonic() - t0
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"ok\n"
            assert elapsed < 3.0, elapsed
            # the stalest pre-kex connections made way; the newest are still open
            closed = [i for i, s in enumerate(flood) if _is_closed(s)]
            assert closed == list(range(21)), (closed, elapsed, time.monotonic() - started)
            # each is in the audit (at a bounded rate: 21 is within the burst)
            made_way = [e for e in demo.audit_lines() if e["event"] == "connection.dropped"
                        and "replaced by a newer connection" in e["reason"]
                        and e["peer"].startswith("127.0.0.1") and e["ts"] >= since]
            assert len(made_way) >= 21, made_way
        finally:
            for s in flood:
                s.close()


def test_a_connection_without_key_exchange_is_closed_after_kex_grace(
    demo: Demo, tmp_path: Path
) -> None:
    with _broker(demo, tmp_path, ssh="kex_grace_seconds = 1.5") as port:
        silent = _silent(port, "127.0.0.40")
        talker = _silent(port, "127.0.0.41", banner=True)  # its version line, then nothing
        try:
            assert _first_line(silent).startswith(b"SSH-2.0-")
            assert _first_line(talker).startswith(b"SSH-2.0-")
            for s in (silent, talker):
                after = _closed_after(s, 5.0)
                assert after is not None, "still open 5 s after a 1.5 s kex grace"
                assert after < 3.0
            dropped = {e["peer"].rpartition(":")[0] for e in demo.audit_lines()
                       if e["event"] == "connection.dropped"
                       and e["reason"] == "no key exchange within kex_grace_seconds"}
            assert {"127.0.0.40", "127.0.0.41"} <= dropped, dropped
            # the login grace still covers authentication: a real login takes longer than 1.5 s
            # from connect to logged in here only if the machine is slow, and is not cut anyway
            user = demo.take_user()
            r = _login(demo, tmp_path, user, port)
            assert r.returncode == 0, r.stderr
        finally:
            silent.close()
            talker.close()


@contextlib.contextmanager
def _master(demo: Demo, tmp_path: Path, user: str, port: int, name: str) -> Iterator[Path]:
    ctl = tmp_path / name
    err = tmp_path / f"{name}.err"
    known = demo.known_hosts_for(tmp_path, port)
    with err.open("wb") as err_f:
        master = subprocess.Popen(
            demo.ssh_args(f"{user}+web01", "-M", "-S", str(ctl), "-N", "-o", "ControlPersist=no",
                          port=port, known_hosts=known),
            env=demo.env(user), stdin=subprocess.DEVNULL, stderr=err_f)
    try:
        deadline = time.monotonic() + 30
        while not ctl.exists():
            assert master.poll() is None, err.read_text(errors="replace")
            assert time.monotonic() < deadline, "no control socket after 30 s"
            time.sleep(0.05)
        yield ctl
    finally:
        subprocess.run(["ssh", "-S", str(ctl), "-F", "/dev/null", "-O", "exit", "x"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        try:
            master.wait(10)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait(10)


Started = list[tuple[subprocess.Popen[bytes], bytes]]


def _sessions(ctl: Path, n: int) -> Started:
    """``n`` exec sessions at once over one shared connection, each open until ``_results``;
    returns once each is running on the target (or was refused)."""
    procs = [subprocess.Popen(["ssh", "-S", str(ctl), "-F", "/dev/null", "x",
                               "echo started; read line; echo ok"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(n)]
    started = []
    for p in procs:
        assert p.stdout is not None
        started.append((p, p.stdout.readline()))  # "started", or b"" when refused
    return started


def _results(started: Started) -> list[tuple[int, bytes, bytes]]:
    out = []
    for p, first in started:
        o, e = p.communicate(b"\n", timeout=30)  # the line each session waits for
        out.append((p.returncode, first + o, e))
    return out


def test_one_connection_opens_at_most_max_sessions_per_connection(
    demo: Demo, tmp_path: Path
) -> None:
    with _broker(demo, tmp_path) as port:  # the default: 10, as OpenSSH's MaxSessions
        user = demo.take_user()
        with _master(demo, tmp_path, user, port, "ctl") as ctl:
            results = _results(_sessions(ctl, 12))
            ok = [r for r in results if r[0] == 0]
            refused = [r for r in results if r[0] != 0]
            assert len(ok) == 10, [r[2] for r in refused]
            assert all(r[1] == b"started\nok\n" for r in ok)
            assert len(refused) == 2
            for _, _, err in refused:
                assert b"Session open refused by peer" in err, err
            # places are given back when sessions end
            r = subprocess.run(["ssh", "-S", str(ctl), "-F", "/dev/null", "x", "echo again"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            assert r.returncode == 0, r.stderr
    # the master (the connection's own client) prints why, as for a refused forward
    master_err = (tmp_path / "ctl.err").read_text()
    assert master_err.count("open failed: administratively prohibited: too many sessions on "
                            "this connection (at most 10)") == 2, master_err
    refusals = [e for e in demo.audit_lines()
                if e["event"] == "session.refused" and e["user"].startswith(f"{user}@")]
    assert len(refusals) == 2
    assert refusals[0]["reason"] == "too many sessions on this connection (at most 10)"


def test_one_user_opens_at_most_max_sessions_per_user(demo: Demo, tmp_path: Path) -> None:
    with _broker(demo, tmp_path, limits="max_sessions_per_user = 3") as port:
        user = demo.take_user()
        with _master(demo, tmp_path, user, port, "ctl1") as ctl1, \
                _master(demo, tmp_path, user, port, "ctl2") as ctl2:
            first = _sessions(ctl1, 2)
            # 4 of this user's sessions at once (in that order): one too many
            second = _sessions(ctl2, 1) + _sessions(ctl2, 1)
            results = _results(first) + _results(second)
    assert [r[0] for r in results[:3]] == [0, 0, 0], [r[2] for r in results]
    assert results[3][0] != 0
    assert b"Session open refused by peer" in results[3][2], results[3][2]
    assert (f"open failed: administratively prohibited: too many sessions of "
            f"{user}@{demo.info['domain']} at once (at most 3)") in (tmp_path / "ctl2.err").read_text()
    assert any(e["event"] == "session.refused" and e["user"].startswith(f"{user}@")
               for e in demo.audit_lines())


def test_the_web_listener_times_out_half_headers_and_caps_connections(
    demo: Demo, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        web_port = probe.getsockname()[1]
    extra = (f'[web]\nlisten_host = "127.0.0.1"\nlisten_port = {web_port}\n'
             "secure_cookies = false\nheader_timeout_seconds = 1.5\nmax_connections = 20\n"
             "max_connections_per_source = 5\n")
    url = f"http://127.0.0.1:{web_port}/api/openapi.json"
    half: list[socket.socket] = []
    with _broker(demo, tmp_path, extra=extra):
        try:
            started = time.monotonic()
            for i in range(25):  # 5 addresses, 5 each: 5 more than max_connections
                s = socket.create_connection(("127.0.0.1", web_port), timeout=10,
                                             source_address=(f"127.0.0.{60 + i // 5}", 0))
                s.sendall(b"GET /api/openapi.json HTTP/1.1\r\nHost: x\r\n")  # half a header
                half.append(s)
            over = socket.create_connection(("127.0.0.1", web_port), timeout=10,
                                            source_address=("127.0.0.64", 0))
            with over:  # a sixth from one address: refused at once
                assert over.recv(4096).startswith(b"HTTP/1.1 503 ")
            t0 = time.monotonic()
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200
            assert time.monotonic() - t0 < 1.0
            # the half headers are cut after the header timeout: the 5 that made way at once,
            # the others 1.5 s after they connected
            for s in half:
                after = _closed_after(s, 5.0)
                assert after is not None
            assert 1.0 < time.monotonic() - started < 4.0
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200
        finally:
            for s in half:
                s.close()


def test_sessions_inside_a_proxyjump_count_towards_the_user_s_limit(
    demo: Demo, tmp_path: Path
) -> None:
    with _broker(demo, tmp_path, limits="max_sessions_per_user = 1") as port:
        user = demo.take_user()
        targets_kh = tmp_path / "known_hosts_targets"
        targets_kh.write_text(demo.cli("ca", "known-hosts").stdout)
        cfg = tmp_path / "ssh_config"
        cfg.write_text(
            f"Host bastion\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
            f"  UserKnownHostsFile {demo.known_hosts_for(tmp_path, port)}\n"
            "  StrictHostKeyChecking yes\n  PreferredAuthentications keyboard-interactive\n"
            "  BatchMode no\n  NumberOfPasswordPrompts 1\n"
            f"Host web01\n  ProxyJump bastion\n  User ec2-user\n  UserKnownHostsFile {targets_kh}\n"
            "  StrictHostKeyChecking yes\n  BatchMode no\n  ConnectTimeout 20\n")
        with _master(demo, tmp_path, user, port, "ctl") as ctl:
            held = _sessions(ctl, 1)  # the user's one session
            r = subprocess.run(["ssh", "-F", str(cfg), "web01", "echo jumped"],
                               capture_output=True, timeout=60, env=demo.env(user))
            assert r.returncode != 0
            # the inner connection's client is this ssh itself: it prints why
            assert (f"administratively prohibited: too many sessions of {user}@"
                    f"{demo.info['domain']} at once (at most 1)").encode() in r.stderr, r.stderr
            assert _results(held)[0][:2] == (0, b"started\nok\n")
            r = subprocess.run(["ssh", "-F", str(cfg), "web01", "echo jumped"],
                               capture_output=True, timeout=60, env=demo.env(user))
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"jumped\n"
