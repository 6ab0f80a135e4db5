"""SFTP and scp through the broker with the real OpenSSH clients: files arrive byte-identical and
every file operation is in the audit log with the right size and SHA-256.

Modern ``scp`` speaks SFTP and is audited like ``sftp``; legacy ``scp -O`` is an exec
(``scp -t``/``scp -f``) whose stdin/stdout, and so the file, are in the recording.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.domain import recording as fmt
from tests.conftest import Demo

pytestmark = pytest.mark.e2e


def _opts(demo: Demo) -> list[str]:
    # BatchMode=no must come before sftp's own "-b" (which adds BatchMode=yes): first one wins
    return ["-F", "/dev/null", "-o", f"UserKnownHostsFile={demo.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "PreferredAuthentications=keyboard-interactive",
            "-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1", "-o", "ConnectTimeout=10"]


def _run(demo: Demo, user: str, args: list[str]) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(args, capture_output=True, timeout=120, env=demo.env(user))
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sessions(demo: Demo, user: str) -> list[dict[str, Any]]:
    return [s for s in demo.sessions() if str(s["user"]).startswith(user + "@")]


def _events(demo: Demo, session_id: str) -> list[dict[str, Any]]:
    return [e for e in demo.audit_lines() if e.get("session_id") == session_id]


@pytest.fixture
def home(demo: Demo) -> Iterator[tuple[Path, str]]:
    """A fresh directory name in the read-only login's home on the (local) target; removed after."""
    login = demo.info["read_only_login"]
    home = Path(pwd.getpwnam(login).pw_dir)
    name = f"bb-sftp-{uuid.uuid4().hex[:10]}"
    try:
        yield home, name
    finally:
        for p in home.glob(name + "*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def test_sftp_batch_put_get_rename_chmod_rm_mkdir_rmdir(demo: Demo, tmp_path: Path,
                                                        home: tuple[Path, str]) -> None:
    user = demo.take_user()
    _, d = home
    src = tmp_path / "src.bin"
    data = os.urandom(1024 * 1024 + 123)
    src.write_bytes(data)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    batch = tmp_path / "batch"
    batch.write_text(
        f"mkdir {d}\nput {src} {d}/up.bin\nput {empty} {d}/empty\nget {d}/up.bin {tmp_path}/down.bin\n"
        f"rename {d}/up.bin {d}/moved.bin\nchmod 600 {d}/moved.bin\nrm {d}/moved.bin\n"
        f"rm {d}/empty\nrmdir {d}\n"
    )
    _run(demo, user, ["sftp", *_opts(demo), "-b", str(batch), "-P", str(demo.port),
                      f"{user}+web01@127.0.0.1"])
    assert (tmp_path / "down.bin").read_bytes() == data

    [s] = _sessions(demo, user)
    assert s["kind"] == "subsystem"
    assert s["command"] == "sftp"
    ev = _events(demo, str(s["id"]))
    ops = [e for e in ev if str(e["event"]).startswith("sftp.")]
    names = [e["event"] for e in ops]
    assert names == ["sftp.mkdir", "sftp.open", "sftp.close", "sftp.open", "sftp.close",
                     "sftp.open", "sftp.close", "sftp.rename", "sftp.setstat", "sftp.remove",
                     "sftp.remove", "sftp.rmdir", "sftp.summary"], names
    assert all(e.get("status") == "ok" for e in ops if e["event"] != "sftp.summary")
    assert all(e["user"].startswith(user + "@") and e["target"] == "i-0web01" for e in ops)
    mkdir, open_up, up, _, up_empty, open_down, down, ren, chmod, rm, _, rmdir, summary = ops
    assert mkdir["path"].endswith("/" + d)
    assert open_up["path"].endswith(f"/{d}/up.bin")
    assert open_up["flags"] == ["write", "create", "truncate"]
    assert up["transfer"] == "upload"
    assert up["size"] == up["bytes_written"] == len(data)
    assert up["sha256"] == _sha(data)
    assert up_empty["transfer"] == "upload"
    assert up_empty["size"] == 0
    assert up_empty["sha256"] == _sha(b"")
    assert open_down["flags"] == ["read"]
    assert down["transfer"] == "download"
    assert down["size"] == down["bytes_read"] == len(data)
    assert down["sha256"] == _sha(data)
    assert ren["path"].endswith(f"/{d}/up.bin")
    assert ren["new_path"].endswith(f"/{d}/moved.bin")
    assert chmod["path"].endswith(f"/{d}/moved.bin")
    assert chmod["attrs"]["mode"] == "0600"
    assert rm["path"].endswith(f"/{d}/moved.bin")
    assert rmdir["path"].endswith("/" + d)
    assert summary["uploads"] == 2
    assert summary["downloads"] == 1
    assert summary["bytes_written"] == summary["bytes_read"] == len(data)
    assert summary["malformed"] == 0
    # the session's file operations as the security team lists them
    listed = json.loads(demo.cli("sessions", "files", str(s["id"]), "--json").stdout)
    assert [e["event"] for e in listed] == names
    text = demo.cli("sessions", "files", str(s["id"])).stdout
    assert f"{d}/up.bin -> " in text
    assert _sha(data) in text
    missing = demo.cli("sessions", "files", "no-such-session", check=False)
    assert missing.returncode != 0
    assert "no session" in missing.stderr
    assert "Traceback" not in missing.stderr
    # the summary comes before session.end
    order = [e["event"] for e in ev]
    assert order.index("sftp.summary") < order.index("session.end")
    # the target's half of the SFTP stream is in the recording; the client's half is input
    # the target does not echo, withheld (markers with its length): the file operations above
    # are the audit's, and an uploaded file's bytes are not in the recording
    with open(str(s["recording"]), "rb") as f:
        rec = fmt.parse(f.read())
    assert fmt.output_bytes(rec.frames, frozenset({fmt.INPUT})) == b""
    assert sum(int(f.data) for f in rec.frames if f.kind == fmt.NOT_ECHOED) == s["bytes_in"]


def test_sftp_failed_operations_are_audited_with_their_status(demo: Demo, tmp_path: Path,
                                                              home: tuple[Path, str]) -> None:
    user = demo.take_user()
    _, d = home
    batch = tmp_path / "batch"
    # "-" before a command: sftp carries on after it fails
    batch.write_text(f"-rm {d}/missing\n-get {d}/missing {tmp_path}/x\n-rename {d}/a {d}/b\n"
                     "-mkdir /proc/nope\n")
    _run(demo, user, ["sftp", *_opts(demo), "-b", str(batch), "-P", str(demo.port),
                      f"{user}+web01@127.0.0.1"])
    [s] = _sessions(demo, user)
    ops = [e for e in _events(demo, str(s["id"])) if str(e["event"]).startswith("sftp.")]
    by = {e["event"]: e for e in ops}
    assert by["sftp.remove"]["status"] == "no_such_file"
    assert by["sftp.rename"]["status"] == "no_such_file"
    assert by["sftp.mkdir"]["status"] in ("permission_denied", "failure", "no_such_file")
    assert not (tmp_path / "x").exists()


def test_scp_uses_sftp_both_ways_and_is_audited(demo: Demo, tmp_path: Path,
                                                 home: tuple[Path, str]) -> None:
    user = demo.take_user()
    homedir, name = home
    data = os.urandom(3 * 1024 * 1024 + 7)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    remote = f"{user}+web01@127.0.0.1:{name}.bin"
    _run(demo, user, ["scp", *_opts(demo), "-P", str(demo.port), str(src), remote])
    assert (homedir / f"{name}.bin").read_bytes() == data
    _run(demo, user, ["scp", *_opts(demo), "-P", str(demo.port), remote, str(tmp_path / "back")])
    assert (tmp_path / "back").read_bytes() == data

    up_s, down_s = sorted(_sessions(demo, user), key=lambda s: str(s["started_at"]))
    for s, transfer in ((up_s, "upload"), (down_s, "download")):
        assert s["kind"] == "subsystem"
        closes = [e for e in _events(demo, str(s["id"])) if e["event"] == "sftp.close"]
        assert len(closes) == 1, closes
        c = closes[0]
        assert c["transfer"] == transfer
        assert c["path"].rsplit("/", 1)[-1] == f"{name}.bin"  # scp sends it as given
        assert c["size"] == len(data)
        assert c["sha256"] == _sha(data)


def test_legacy_scp_is_a_recorded_exec_both_ways(demo: Demo, tmp_path: Path,
                                                  home: tuple[Path, str]) -> None:
    user = demo.take_user()
    homedir, name = home
    data = os.urandom(512 * 1024 + 3)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    remote = f"{user}+web01@127.0.0.1:{name}.bin"
    _run(demo, user, ["scp", "-O", *_opts(demo), "-P", str(demo.port), str(src), remote])
    assert (homedir / f"{name}.bin").read_bytes() == data
    _run(demo, user, ["scp", "-O", *_opts(demo), "-P", str(demo.port), remote,
                      str(tmp_path / "back")])
    assert (tmp_path / "back").read_bytes() == data

    up_s, down_s = sorted(_sessions(demo, user), key=lambda s: str(s["started_at"]))
    assert up_s["kind"] == down_s["kind"] == "exec"
    assert str(up_s["command"]).startswith("scp -t ")
    assert str(down_s["command"]).startswith("scp -f ")
    assert up_s["exit_status"] == down_s["exit_status"] == "0"
    with open(str(up_s["recording"]), "rb") as f:
        up = fmt.parse(f.read())
    with open(str(down_s["recording"]), "rb") as f:
        down = fmt.parse(f.read())
    # a download's bytes are in the recording (target output); an upload's are input the
    # target does not echo: withheld, as markers with their length
    assert fmt.output_bytes(up.frames, frozenset({fmt.INPUT})) == b""
    assert sum(int(f.data) for f in up.frames if f.kind == fmt.NOT_ECHOED) == up_s["bytes_in"]
    assert data in fmt.output_bytes(down.frames)
    for s in (up_s, down_s):
        starts = [e for e in _events(demo, str(s["id"])) if e["event"] == "session.start"]
        assert starts[0]["command"] == s["command"]


def test_killed_client_mid_download_leaves_an_unfinished_close_event(
        demo: Demo, tmp_path: Path, home: tuple[Path, str]) -> None:
    user = demo.take_user()
    homedir, name = home
    remote_file = homedir / f"{name}.big"
    with open(remote_file, "wb") as f:
        f.write(os.urandom(1 << 20) * 20)
    remote_file.chmod(0o644)
    local = tmp_path / "partial"
    batch = tmp_path / "batch"
    batch.write_text(f"get {name}.big {local}\n")
    # -l 800: 100 KB/s, so the 20 MiB download is still running when the client dies
    proc = subprocess.Popen(["sftp", *_opts(demo), "-l", "800", "-b", str(batch), "-P",
                             str(demo.port), f"{user}+web01@127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=demo.env(user))
    try:
        deadline = time.monotonic() + 60
        while not (local.exists() and local.stat().st_size > 0):
            assert proc.poll() is None, "sftp ended before the download started"
            assert time.monotonic() < deadline, "the download did not start"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while True:
        rows = [s for s in _sessions(demo, user) if s["ended_at"]]
        if rows:
            break
        assert time.monotonic() < deadline, "the session did not end after the client died"
        time.sleep(0.2)
    ev = _events(demo, str(rows[0]["id"]))
    [c] = [e for e in ev if e["event"] == "sftp.close"]
    assert c["status"] == "not_closed"
    assert c["path"].rsplit("/", 1)[-1] == f"{name}.big"
    assert 0 < c["bytes_read"] < 20 << 20
    assert "sha256" not in c  # not a whole file
    [summary] = [e for e in ev if e["event"] == "sftp.summary"]
    assert summary["downloads"] == 0
    assert summary["bytes_read"] == c["bytes_read"]


def test_sftp_through_proxyjump_is_audited(demo: Demo, tmp_path: Path,
                                           home: tuple[Path, str]) -> None:
    from tests.e2e.test_jump import _config

    user = demo.take_user()
    homedir, name = home
    cfg = _config(demo, tmp_path, user, trust=True)
    data = os.urandom(2 * 1024 * 1024 + 5)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} {name}.bin\n")
    r = subprocess.run(["sftp", "-F", str(cfg), "-b", str(batch), "web01"], capture_output=True,
                       timeout=120, env=demo.env(user))
    assert r.returncode == 0, r.stderr
    assert (homedir / f"{name}.bin").read_bytes() == data
    deadline = time.monotonic() + 60
    while not (rows := [s for s in _sessions(demo, user)
                        if s["kind"] == "subsystem" and s["ended_at"]]):
        assert time.monotonic() < deadline, "the sftp session through the jump did not end"
        time.sleep(0.2)
    [c] = [e for e in _events(demo, str(rows[0]["id"])) if e["event"] == "sftp.close"]
    assert (c["transfer"], c["size"], c["sha256"]) == ("upload", len(data), _sha(data))
