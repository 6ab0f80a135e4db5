"""End to end: the real OpenSSH client, through the broker, to real sshd targets."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from broker.domain import recording as fmt
from broker.domain.audit import verify_chain
from tests.conftest import Demo

pytestmark = pytest.mark.e2e


def _session_for(demo: Demo, user: str, **match: str) -> dict[str, object]:
    rows = [s for s in demo.sessions() if s["user"].startswith(user + "@")]
    rows = [s for s in rows if all(s.get(k) == v for k, v in match.items())]
    assert rows, f"no session recorded for {user} {match}"
    return rows[0]


def _recording(demo: Demo, session: dict[str, object]) -> fmt.ParsedRecording:
    with open(str(session["recording"]), "rb") as f:
        return fmt.parse(f.read())


def test_exec_output_exit_status_and_separate_streams(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "web01", "echo out; echo err >&2; id -un; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"out\n" + demo.info["read_only_login"].encode() + b"\n"
    assert r.stderr == b"err\n"
    s = _session_for(demo, user)
    assert s["exit_status"] == "3"
    assert s["target"] == "i-0web01"
    assert s["level"] == "read-only"
    rec = _recording(demo, s)
    assert fmt.output_bytes(rec.frames) == r.stdout
    assert fmt.output_bytes(rec.frames, frozenset({fmt.ERROR})) == r.stderr
    assert fmt.exit_status(rec.frames) == "3"
    assert rec.meta["grant_id"] == f"g-demo-{user}"


def test_stdin_is_relayed_and_recorded(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "web01", "cat; echo done", stdin=b"hi\nthere\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hi\nthere\ndone\n"
    rec = _recording(demo, _session_for(demo, user))
    # stdin without a pty is not echoed: withheld from the recording, its length kept
    assert fmt.output_bytes(rec.frames, frozenset({fmt.INPUT})) == b""
    assert sum(int(f.data) for f in rec.frames if f.kind == fmt.NOT_ECHOED) == len(b"hi\nthere\n")


def test_large_binary_output_is_byte_exact_in_recording(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "web02", "head -c 3000000 /dev/urandom; printf 'é' | head -c 1")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 3_000_001
    s = _session_for(demo, user)
    assert s["bytes_out"] == 3_000_001
    rec = _recording(demo, s)
    assert not rec.truncated
    assert fmt.output_bytes(rec.frames) == r.stdout


def test_large_upload_backpressure(demo: Demo) -> None:
    user = demo.take_user()
    payload = bytes(range(256)) * 40_000  # ~10 MB
    r = demo.ssh(user, "web01", "sha256sum", stdin=payload)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_data_survives_key_reexchanges_in_both_directions(demo: Demo, tmp_path: Path) -> None:
    """OpenSSH re-keys every 256 KiB (``RekeyLimit``) while 6 MB go up and the same 6 MB come
    back: the broker's one-pass data path hands the client's KEXINIT to asyncssh mid-stream,
    sends nothing of its own across the key change, and continues under the new keys."""
    user = demo.take_user()
    payload = os.urandom(6_000_000)
    log = tmp_path / "ssh.log"
    r = demo.ssh(user, "web01", "tee /dev/stderr | sha256sum", stdin=payload,
                 extra=("-o", "RekeyLimit=256K", "-v", "-E", str(log)))
    assert r.returncode == 0, log.read_text()[-2000:]
    assert log.read_text().count("SSH2_MSG_NEWKEYS received") > 20  # 12 MB at 256 KiB a key
    assert r.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    assert r.stderr == payload  # the echo came back intact, as extended data


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_fast_upload_is_held_in_the_window_while_the_upstream_starts(demo: Demo) -> None:
    """The client's first bytes wait in the SSH window, not in the broker's memory.

    asyncssh resumes reading right after ``session_started``, which undid the relay's "start"
    pause: an OpenSSH client piping /dev/zero pushed 100+ MiB into the broker before the
    upstream was up. Now the broker's resident memory grows by a few MiB at most."""
    import threading

    user = demo.take_user()
    pid = int(demo.info["pid"])
    base = _rss_kib(pid)
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss_kib(pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with subprocess.Popen(["head", "-c", "400000000", "/dev/zero"],
                              stdout=subprocess.PIPE) as head:
            r = subprocess.run([*demo.ssh_args(f"{user}+web01"), "wc -c"], stdin=head.stdout,
                               capture_output=True, timeout=120, env=demo.env(user))
    finally:
        done.set()
        watcher.join()
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"400000000"]
    assert peak[0] - base < 48 * 1024, f"broker memory grew by {(peak[0] - base) >> 10} MiB"


def test_signal_exit_is_relayed(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "web01", "kill -TERM $$")
    assert r.returncode == 255  # OpenSSH reports a remote signal death as 255
    s = _session_for(demo, user)
    assert s["exit_status"] == "signal:TERM"


def test_menu_lists_reachable_targets_only(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, None)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "web01" in out
    assert "web02" in out
    assert demo.info["denied_target"] not in out
    assert "read-only" in out


def test_denied_target_opens_no_upstream_connection(demo: Demo) -> None:
    user = demo.take_user()
    denied = demo.info["denied_target"]
    log_path = Path(demo.info["target_logs"][denied])
    before = log_path.stat().st_size  # other tests grant db01 to their own users
    r = demo.ssh(user, denied, "true")
    assert r.returncode == 255
    assert f"no access to {denied}".encode() in r.stderr
    assert b"Traceback" not in r.stderr
    time.sleep(0.2)
    log = log_path.read_bytes()[before:].decode()
    assert "Connection from" not in log
    assert "Accepted" not in log
    events = [e for e in demo.audit_lines() if e["event"] == "access.denied"]
    assert any(e["user"].startswith(user + "@") and e["target"] == denied for e in events)


def test_unknown_target_gets_the_same_refusal(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "no-such-host", "true")
    assert r.returncode == 255
    assert b"no access to no-such-host" in r.stderr
    events = [e for e in demo.audit_lines() if e["event"] == "access.denied"]
    assert any(e["target"] == "no-such-host" and e["reason"] == "unknown target" for e in events)


def test_wrong_password_is_refused_without_detail(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "web01", "true", password="wrong-password")
    assert r.returncode == 255
    assert b"Permission denied" in r.stderr
    fails = [e for e in demo.audit_lines() if e["event"] == "auth.failure"]
    assert any(e.get("user") == f"{user}@{demo.info['domain']}" and e["reason"] == "bad password"
               for e in fails)


def test_unknown_user_is_refused_like_a_wrong_password(demo: Demo) -> None:
    r = demo.ssh("alice", "web01", "true", password="x")  # alice exists: baseline
    r2 = subprocess.run(
        [*demo.ssh_args("mallory+web01"), "true"], capture_output=True, timeout=30,
        env=demo.env("alice", password="x", code="000000"),
    )
    assert r.returncode == r2.returncode == 255
    assert r.stderr.replace(b"alice", b"X") == r2.stderr.replace(b"mallory", b"X")


def test_wrong_and_reused_totp_codes_are_refused(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "web01", "true", code="000000")
    assert r.returncode == 255
    assert b"Permission denied" in r.stderr
    code = demo.next_code(user)
    ok = demo.ssh(user, "web01", "true", code=code)
    assert ok.returncode == 0, ok.stderr
    replay = demo.ssh(user, "web01", "true", code=code)
    assert replay.returncode == 255
    assert b"Permission denied" in replay.stderr
    reasons = [e["reason"] for e in demo.audit_lines()
               if e["event"] == "auth.failure" and e.get("user", "").startswith(user + "@")]
    assert "bad TOTP code" in reasons
    assert "TOTP code reused" in reasons


def test_malformed_user_names_are_refused(demo: Demo) -> None:
    for login in ("+web01", "alice+", "a*b+web01"):
        r = subprocess.run(
            [*demo.ssh_args(login), "true"], capture_output=True, timeout=30,
            env=demo.env("alice", code="000000"),
        )
        assert r.returncode == 255
        assert b"Permission denied" in r.stderr
        assert b"Traceback" not in r.stderr


def test_admin_grant_maps_to_admin_login_and_revoke_takes_effect(demo: Demo) -> None:
    user = demo.take_user()
    out = demo.cli("grant", "add", "--user", user, "--domain", demo.info["domain"],
                   "--stack", "stack-db", "--vpc", "vpc-0demo", "--level", "admin",
                   "--ticket", "CHG-1", "--reason", "test", "--json").stdout
    import json

    grant = json.loads(out)
    r = demo.ssh(user, "db01", "id -un")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == demo.info["admin_login"]
    demo.cli("grant", "revoke", grant["id"])
    r = demo.ssh(user, "db01", "id -un")
    assert r.returncode == 255
    assert b"no access to db01" in r.stderr
    listed = json.loads(demo.cli("grant", "list", "--user", user, "--json").stdout)
    assert {g["id"]: g["state"] for g in listed}[grant["id"]] == "revoked"


def test_upstream_certificate_is_short_lived_and_names_the_session(demo: Demo) -> None:
    user = demo.take_user()
    r = demo.ssh(user, "web02", "true")
    assert r.returncode == 0, r.stderr
    s = _session_for(demo, user)
    log = open(demo.info["target_logs"]["web02"]).read()
    m = re.findall(r'ID user=(\S+) grant=(\S+) session=([0-9a-f-]+)', log)
    assert (f"{user}@{demo.info['domain']}", f"g-demo-{user}", s["id"]) in m


def test_audit_trail_is_hash_chained(demo: Demo) -> None:
    user = demo.take_user()
    assert demo.ssh(user, "web01", "true").returncode == 0
    raw = (demo.state_dir / "audit" / "audit.jsonl").read_bytes().splitlines(keepends=True)
    assert verify_chain(raw) == []
    events = [e["event"] for e in demo.audit_lines()
              if str(e.get("user", "")).startswith(user)]
    assert events[-3:] == ["auth.success", "session.start", "session.end"]


@pytest.mark.parametrize("form", ["upn", "netbios"])
def test_upn_and_down_level_user_names(demo: Demo, form: str) -> None:
    user = demo.take_user()
    login = (f"{user}@{demo.info['domain']}+web01" if form == "upn" else f"CORP\\{user}+web01")
    r = subprocess.run([*demo.ssh_args("x", "-l", login)[:-1], "127.0.0.1", "id -un"],
                       capture_output=True, timeout=30, env=demo.env(user))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == demo.info["read_only_login"]
    assert _session_for(demo, user)["user"] == f"{user}@{demo.info['domain']}"


def test_connection_sharing_keeps_exit_status_and_needs_one_code(
    demo: Demo, tmp_path: Path
) -> None:
    """OpenSSH ControlMaster: one login, many sessions; each session's exit status arrives."""
    user = demo.take_user()
    ctl = tmp_path / "ctl"
    err = tmp_path / "master.err"
    with err.open("wb") as err_f:  # a file, not a pipe nobody reads
        master = subprocess.Popen(
            demo.ssh_args(f"{user}+web01", "-M", "-S", str(ctl), "-N", "-o",
                          "ControlPersist=no"),
            env=demo.env(user), stdin=subprocess.DEVNULL, stderr=err_f)
    try:
        deadline = time.monotonic() + 30  # a loaded machine may take seconds to log in
        while not ctl.exists():
            assert master.poll() is None, err.read_text(errors="replace")
            assert time.monotonic() < deadline, "no control socket after 30 s"
            time.sleep(0.05)
        for status in (3, 0, 7):
            r = subprocess.run(["ssh", "-S", str(ctl), "-F", "/dev/null", "x",
                                f"echo s{status}; exit {status}"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            assert r.returncode == status, r.stderr
            assert r.stdout == f"s{status}\n".encode()
    finally:
        # ask the master to exit over its socket (what a user does), then make sure it has
        subprocess.run(["ssh", "-S", str(ctl), "-F", "/dev/null", "-O", "exit", "x"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        try:
            master.wait(10)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait(10)
