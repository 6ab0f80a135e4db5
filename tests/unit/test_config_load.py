"""load_config: defaults under state_dir, relative paths, and errors naming file, key, problem."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from broker.config import DEFAULT_CIPHERS, DEFAULT_KEX, load_config
from broker.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "broker.toml") -> Path:
    d = tmp_path / "etc"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(text, encoding="utf-8")
    return p


def test_minimal_config_defaults_under_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = load_config(write(tmp_path, f'state_dir = "{state}"\n'))
    assert cfg.state_dir == state
    assert cfg.host_key_path == state / "ssh_host_ed25519_key"
    assert cfg.ca_key_path == state / "ca" / "user_ca"
    assert cfg.db_path == state / "broker.db"
    assert cfg.recordings_dir == state / "recordings"
    assert cfg.audit_path == state / "audit" / "audit.jsonl"
    assert cfg.log_level == "info"
    assert cfg.node_name == socket.gethostname()  # sessions name the bastion that relays them
    assert cfg.ssh.listen_host == "127.0.0.1"
    assert cfg.ssh.listen_port == 2222
    assert cfg.ssh.kex_algs == DEFAULT_KEX
    assert cfg.ssh.ciphers == DEFAULT_CIPHERS
    assert cfg.upstream.cert_ttl_seconds == 120
    assert cfg.recordings.enabled is True
    assert cfg.recordings.allow_unrecorded is False
    # files that describe the site default to the config file's directory
    assert cfg.identity.users_file == tmp_path / "etc" / "users.toml"
    assert cfg.inventory.file == tmp_path / "etc" / "inventory.toml"


def test_relative_paths_resolve_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    etc = tmp_path / "etc"
    p = write(
        tmp_path,
        """
state_dir = "../var/state"
[ssh]
host_key = "keys/host"
[upstream]
ca_key = "ca/user_ca"
[identity]
users_file = "people.toml"
[inventory]
file = "../inv/hosts.toml"
[store]
path = "db/broker.db"
[recordings]
dir = "rec"
[audit]
path = "audit/a.jsonl"
""",
    )
    cfg = load_config(p)
    assert cfg.state_dir == tmp_path / "var" / "state"
    assert cfg.host_key_path == etc / "keys" / "host"
    assert cfg.ca_key_path == etc / "ca" / "user_ca"
    assert cfg.identity.users_file == etc / "people.toml"
    assert cfg.inventory.file == tmp_path / "inv" / "hosts.toml"
    assert cfg.db_path == etc / "db" / "broker.db"
    assert cfg.recordings_dir == etc / "rec"
    assert cfg.audit_path == etc / "audit" / "a.jsonl"


def test_relative_config_path_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, 'state_dir = "state"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("etc/broker.toml"))
    assert cfg.state_dir == tmp_path / "etc" / "state"
    assert cfg.state_dir.is_absolute()


def test_absolute_paths_kept(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, 'state_dir = "/srv/bb"\n[audit]\npath = "/var/log/a.jsonl"\n'))
    assert cfg.state_dir == Path("/srv/bb")
    assert cfg.audit_path == Path("/var/log/a.jsonl")
    assert cfg.db_path == Path("/srv/bb/broker.db")


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, 'state_dir = "s"\n'))
    with pytest.raises(ValueError, match="frozen"):
        cfg.log_level = "debug"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    p = write(tmp_path, 'state_dir = "s"\nlisten_port = 22\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: key 'listen_port': ")
    assert "Extra inputs are not permitted" in msg
    assert ei.value.user_message == msg


def test_unknown_nested_key(tmp_path: Path) -> None:
    p = write(tmp_path, 'state_dir = "s"\n[ssh]\nlisten_prot = 22\n')
    with pytest.raises(ConfigError, match=r"key 'ssh\.listen_prot': Extra inputs") as ei:
        load_config(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        ('[ssh]\nlisten_port = "ssh"', "ssh.listen_port", "valid integer"),
        ("[ssh]\nlisten_port = 70000", "ssh.listen_port", "less than or equal to 65535"),
        ("[ssh]\nlogin_grace_seconds = 0", "ssh.login_grace_seconds", "greater than 0"),
        ('log_level = "verbose"', "log_level", "'debug', 'info', 'warning' or 'error'"),
        ("[upstream]\ncert_ttl_seconds = 5", "upstream.cert_ttl_seconds", "greater than or"),
        ('[store]\nbackend = "mysql"', "store.backend", "'sqlite'"),
        ('[recordings]\nenabled = "maybe"', "recordings.enabled", "valid boolean"),
        ('ssh = "yes"', "ssh", "valid dictionary"),
        ('node_name = "east 2"', "node_name", "should match pattern"),
        ('node_name = ""', "node_name", "at least 1 character"),
    ],
)
def test_wrong_type_or_value_names_key(tmp_path: Path, body: str, key: str, problem: str) -> None:
    p = write(tmp_path, f'state_dir = "s"\n{body}\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: key '{key}': ")
    assert problem in msg


def test_several_errors_each_on_own_line(tmp_path: Path) -> None:
    p = write(tmp_path, 'state_dir = "s"\nbogus = 1\n[ssh]\nlisten_port = -1\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    lines = str(ei.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{p}: key '") for line in lines)
    assert {line.split("'")[1] for line in lines} == {"bogus", "ssh.listen_port"}


def test_missing_state_dir(tmp_path: Path) -> None:
    p = write(tmp_path, "")
    with pytest.raises(ConfigError, match="key 'state_dir': Field required"):
        load_config(p)


def test_bad_toml_names_file(tmp_path: Path) -> None:
    p = write(tmp_path, 'state_dir = "s\n[ssh\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value).startswith(f"{p}: not valid TOML: ")
    assert "line 1" in str(ei.value)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="config file not found") as ei:
        load_config(p)
    assert str(ei.value) == f"{p}: config file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file") as ei:
        load_config(tmp_path)
    assert str(ei.value).startswith(f"{tmp_path}: ")


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'state_dir = "\xe9t\xe9"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == f"{p}: not UTF-8 text"
