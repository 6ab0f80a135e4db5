"""The CLI prints only what was asked for, and commands that look never write.

Every command that succeeds against the demo leaves stderr empty: a dependency's warning (say,
a deprecation at import) goes through logging, not onto the operator's terminal. Read-only
commands run against a copy of a state directory change no file in it, even when its keys are
missing: only ``serve``/``demo`` create keys.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, Demo

pytestmark = pytest.mark.e2e


def _run(args: list[str], stdin: str = "", env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=env)


def _session_with_a_file(demo: Demo) -> str:
    """One recorded exec session (its id), made for this test."""
    user = demo.take_user()
    r = demo.ssh(user, "web01", "echo quiet-cli-check")
    assert r.returncode == 0, r.stderr
    rows = [s for s in demo.sessions() if s["user"].startswith(user)]
    assert rows, "the session is not listed"
    return str(rows[0]["id"])


def test_every_successful_command_leaves_stderr_empty(demo: Demo, tmp_path: Path) -> None:
    sid = _session_with_a_file(demo)
    cfg = ["--config", demo.config]
    pub = (tmp_path / "k.pub")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    key_line = pub.read_text().strip()
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
    grant = json.loads(_run([*cfg, "grant", "add", "--user", "quietcheck", "--domain",
                             demo.info["domain"], "--stack", "stack-web", "--vpc", "vpc-0demo",
                             "--level", "read-only", "--ticket", "T-1", "--reason", "check",
                             "--json"]).stdout)
    commands: list[tuple[list[str], str]] = [
        (["--version"], ""),
        (["totp", "code", "--secret", demo.secret("alice")], ""),
        ([*cfg, "sessions", "list"], ""),
        ([*cfg, "sessions", "list", "--json"], ""),
        ([*cfg, "sessions", "files", sid], ""),
        ([*cfg, "play", sid, "--speed", "1000"], ""),
        ([*cfg, "export", sid], ""),
        ([*cfg, "export", sid, "-o", str(tmp_path / "s.cast")], ""),
        ([*cfg, "verify", sid], ""),
        ([*cfg, "verify", "--audit"], ""),
        ([*cfg, "grant", "list"], ""),
        ([*cfg, "grant", "show", grant["id"]], ""),
        ([*cfg, "grant", "revoke", grant["id"], "--comment", "done"], ""),
        ([*cfg, "auth", "status"], ""),
        ([*cfg, "key", "add", "quietcheck", "-"], key_line + "\n"),
        ([*cfg, "key", "list"], ""),
        ([*cfg, "key", "remove", "quietcheck", fingerprint], ""),
        ([*cfg, "totp", "enroll", "quietcheck"], ""),
        ([*cfg, "totp", "reset", "quietcheck"], ""),
        ([*cfg, "ca", "known-hosts"], ""),
        ([*cfg, "shipping", "status"], ""),
        ([*cfg, "config", "check"], ""),
        (["sessions", "list", *cfg], ""),  # the global option after the command works too
    ]
    for args, stdin in commands:
        r = _run(args, stdin)
        assert r.returncode == 0, f"{args}: {r.stderr}"
        assert r.stderr == "", f"bastion-broker {' '.join(args)} wrote to stderr:\n{r.stderr}"


def test_api_login_works_before_and_after_the_command(demo: Demo, tmp_path: Path) -> None:
    """``bastion-broker --api URL login`` (what the demo banner prints) and ``login --api URL``."""
    import os

    user = demo.take_user()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("BASTION_BROKER_CONFIG", None)
    for args in (["--api", demo.info["web_url"], "login", "--user", user, "--password-stdin"],
                 ["login", "--api", demo.info["web_url"], "--user", user, "--password-stdin"]):
        r = _run(args, f"{demo.info['password']}\n{demo.next_code(user)}\n", env)
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        assert f"logged in to {demo.info['web_url']}" in r.stdout
        r = _run(["--api", demo.info["web_url"], "grant", "list", "--json"], env=env)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        r = _run(["logout"], env=env)
        assert r.returncode == 0 and r.stderr == "", r.stderr


def test_user_add_without_a_terminal_is_one_line(demo: Demo, tmp_path: Path) -> None:
    for stdin in ("", "secret-password\nsecret-password\n"):
        r = subprocess.run([str(BIN), "--config", demo.config, "user", "add", "nobody-here"],
                           input=stdin, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2
        assert r.stderr == ("bastion-broker: error: standard input is not a terminal: give the "
                            "password with --password-stdin\n")


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash, but SQLite's WAL index and an empty WAL:
    a read-only reader of a WAL database makes those two if they are missing (they exist
    anyway while the broker runs) and keeps read marks in the index."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith("-shm")
            and not (p.name.endswith("-wal") and p.stat().st_size == 0)}


def _copy_state(demo: Demo, dest: Path) -> Path:
    shutil.copytree(demo.state_dir, dest, ignore=shutil.ignore_patterns(
        "broker.db*", "*.sock", "sshd*", "demo.json"))
    src = sqlite3.connect(demo.state_dir / "broker.db")
    dst = sqlite3.connect(dest / "broker.db")
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    return dest / "broker.toml"


def test_read_only_commands_write_nothing_even_without_keys(demo: Demo, tmp_path: Path) -> None:
    sid = _session_with_a_file(demo)
    cfg_path = _copy_state(demo, tmp_path / "state")
    state = cfg_path.parent
    (state / "integrity_ed25519_key").unlink()  # the private half; .pub stays for verify
    (state / "totp.key").unlink()
    before = _snapshot(state)
    cfg = ["--config", str(cfg_path)]
    for args in ([*cfg, "sessions", "list"], [*cfg, "sessions", "files", sid],
                 [*cfg, "play", sid, "--speed", "1000"], [*cfg, "export", sid],
                 [*cfg, "verify", sid], [*cfg, "verify", "--audit"], [*cfg, "grant", "list"],
                 [*cfg, "ca", "known-hosts"], [*cfg, "auth", "status"], [*cfg, "key", "list"],
                 [*cfg, "shipping", "status"]):
        r = _run(args)
        assert r.returncode in (0, 1), f"{args}: {r.stderr}"  # verify may report problems
        assert "Traceback" not in r.stderr
    assert _snapshot(state) == before
    assert not (state / "integrity_ed25519_key").exists()
    assert not (state / "totp.key").exists()


def test_writing_commands_never_mint_a_missing_key(demo: Demo, tmp_path: Path) -> None:
    cfg_path = _copy_state(demo, tmp_path / "state")
    state = cfg_path.parent
    (state / "integrity_ed25519_key").unlink()
    r = _run(["--config", str(cfg_path), "totp", "enroll", "someone"])
    assert r.returncode == 2
    assert r.stderr.startswith("bastion-broker: error: ")
    assert "no signing key" in r.stderr and "run serve once" in r.stderr
    assert not (state / "integrity_ed25519_key").exists()


def test_config_check_names_the_file_key_and_problem(demo: Demo, tmp_path: Path) -> None:
    r = _run(["--config", demo.config, "config", "check"])
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(f"{demo.config}: OK (identity: static, store: sqlite, "
                               "inventory: static (")
    bad_inventory = tmp_path / "inventory.toml"
    bad_inventory.write_text("[[stacks]]\nid = 'stack-x'\n[[stacks.instances]]\nid = 3\n")
    cfg = demo.variant_config(tmp_path, inventory=bad_inventory.read_text())
    r = _run(["--config", str(cfg), "config", "check"])
    assert r.returncode == 2, r.stdout
    lines = r.stderr.removeprefix("bastion-broker: error: ").splitlines()
    assert lines and all(line.startswith(f"{bad_inventory}: key 'stacks.0.") for line in lines), \
        r.stderr  # one line per problem, each with the file and the key
    (tmp_path / "b").mkdir()
    cfg = demo.variant_config(tmp_path / "b", limits="max_startups = 'many'")
    r = _run(["--config", str(cfg), "config", "check"])
    assert r.returncode == 2
    assert r.stderr.startswith(f"bastion-broker: error: {cfg}: key 'limits.max_startups': ")
    assert r.stderr.count("\n") == 1


def test_config_check_reads_the_notification_secret_files(demo: Demo, tmp_path: Path) -> None:
    """A missing or empty secret file would stop the broker at start: the check says so first."""
    secret, ca = tmp_path / "hook.secret", tmp_path / "smtp-ca.pem"
    cfg = demo.variant_config(tmp_path, extra=(
        '[[notify.webhooks]]\nname = "siem"\nurl = "https://siem.example.com/hook"\n'
        f'secret_file = "{secret}"\n'
        '[[notify.email]]\nname = "sec"\nsmtp_host = "mail.example.com"\n'
        f'from_addr = "bastion@example.com"\nto = ["sec@example.com"]\nca_file = "{ca}"\n'))
    r = _run(["--config", str(cfg), "config", "check"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == (f"bastion-broker: error: [[notify.webhooks]] siem secret_file: cannot "
                        f"read {secret}: No such file or directory\n")
    secret.write_text("\n")
    r = _run(["--config", str(cfg), "config", "check"])
    assert r.returncode == 2 and f"siem secret_file: {secret} is empty" in r.stderr
    secret.write_text("s3cret\n")
    ca.write_text("not a certificate\n")
    r = _run(["--config", str(cfg), "config", "check"])
    assert r.returncode == 2 and f"sec ca_file: cannot load {ca}" in r.stderr, r.stderr
    ca.write_text(_a_pem(tmp_path))
    r = _run(["--config", str(cfg), "config", "check"])
    assert r.returncode == 0, r.stderr
    assert "notify: 2 channels" in r.stdout and "s3cret" not in r.stdout + r.stderr


def _a_pem(tmp: Path) -> str:
    """A self-signed certificate (PEM) made with openssl."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ed25519", "-nodes", "-subj", "/CN=ca",
                    "-keyout", str(tmp / "k.pem"), "-out", str(tmp / "c.pem"), "-days", "1"],
                   check=True, capture_output=True)
    return (tmp / "c.pem").read_text()


def test_the_daemon_log_is_json_lines_only(demo: Demo) -> None:
    """Dependency warnings at start (asyncssh's DSA import under recent cryptography, say) and
    libraries' own logging come out as JSON events, never as raw text in the log."""
    _session_with_a_file(demo)
    lines = demo.broker_log().splitlines()
    assert lines
    for line in lines:
        event = json.loads(line)  # raises on raw text
        assert isinstance(event, dict) and "event" in event, line
