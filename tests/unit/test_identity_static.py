"""StaticDirectory over a users TOML file, and the password hash helpers."""

from __future__ import annotations

from pathlib import Path

import bcrypt
import pytest

from broker.domain.models import Principal
from broker.errors import ConfigError
from broker.identity import passwords
from broker.identity.static import StaticDirectory, load_users

PW = "s3cret pass"
ARGON = passwords.hash_password(PW)
BCRYPT = bcrypt.hashpw(b"bcrypt-pw", bcrypt.gensalt(rounds=4)).decode()

USERS = f"""
[[users]]
name = "alice"
password_hash = "{ARGON}"
groups = ["ops", "dba"]

[[users]]
name = "Bob"
password_hash = "{BCRYPT}"

[[users]]
name = "carol"
password_hash = "{ARGON}"
disabled = true
"""


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    p = tmp_path / "users.toml"
    p.write_text(USERS, encoding="utf-8")
    return p


@pytest.fixture
def directory(users_file: Path) -> StaticDirectory:
    return StaticDirectory.from_file(
        users_file, "corp.example.com", {"CORP": "corp.example.com", "OTHER": "other.example"}
    )


async def test_correct_password(directory: StaticDirectory) -> None:
    out = await directory.authenticate("alice", None, PW)
    assert out.ok is True
    assert out.reason == "password ok"
    assert out.principal == Principal("corp.example.com", "alice", frozenset({"ops", "dba"}))


async def test_username_case_insensitive_principal_keeps_file_spelling(
    directory: StaticDirectory,
) -> None:
    out = await directory.authenticate("ALICE", "Corp.Example.Com", PW)
    assert out.principal is not None
    assert out.principal.username == "alice"
    assert out.principal.domain == "corp.example.com"


async def test_bcrypt_hash_accepted(directory: StaticDirectory) -> None:
    out = await directory.authenticate("bob", None, "bcrypt-pw")
    assert out.principal == Principal("corp.example.com", "Bob", frozenset())
    assert (await directory.authenticate("bob", None, "wrong")).reason == "bad password"


async def test_wrong_password(directory: StaticDirectory) -> None:
    out = await directory.authenticate("alice", None, PW + "x")
    assert out.principal is None
    assert out.reason == "bad password"
    assert out.ok is False


async def test_unknown_user(directory: StaticDirectory) -> None:
    out = await directory.authenticate("mallory", None, PW)
    assert out.principal is None
    assert out.reason == "unknown user"


@pytest.mark.parametrize("pw", ["", " ", "\t\n", "pass\x00word", "\x00", PW + "\x00"])
async def test_empty_whitespace_or_nul_password_refused(directory: StaticDirectory, pw: str) -> None:
    out = await directory.authenticate("alice", None, pw)
    assert out.principal is None
    assert out.reason == "empty or invalid password"


async def test_untrusted_domain_refused(directory: StaticDirectory) -> None:
    out = await directory.authenticate("alice", "evil.example", PW)
    assert out.principal is None
    assert out.reason == "untrusted domain"


async def test_alias_to_another_domain_is_untrusted(directory: StaticDirectory) -> None:
    out = await directory.authenticate("alice", "OTHER", PW)
    assert out.principal is None
    assert out.reason == "untrusted domain"


@pytest.mark.parametrize("alias", ["CORP", "corp", "Corp"])
async def test_netbios_alias_accepted(directory: StaticDirectory, alias: str) -> None:
    out = await directory.authenticate("alice", alias, PW)
    assert out.principal is not None
    assert out.principal.domain == "corp.example.com"


def test_canonical_domain(directory: StaticDirectory) -> None:
    assert directory.canonical_domain(None) == "corp.example.com"
    assert directory.canonical_domain("CORP.EXAMPLE.COM") == "corp.example.com"
    assert directory.canonical_domain("corp") == "corp.example.com"
    assert directory.canonical_domain("OTHER") is None
    assert directory.canonical_domain("example.com") is None


async def test_disabled_user_refused(directory: StaticDirectory) -> None:
    out = await directory.authenticate("carol", None, PW)
    assert out.principal is None
    assert out.reason == "account disabled"
    # a wrong password for a disabled user still says "bad password", not that it exists
    assert (await directory.authenticate("carol", None, "nope")).reason == "bad password"


def test_non_hash_password_hash_is_config_error(tmp_path: Path) -> None:
    p = tmp_path / "users.toml"
    p.write_text('[[users]]\nname = "alice"\npassword_hash = "hunter2"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_users(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: key 'users.0.password_hash': ")
    assert "must be an argon2 or bcrypt hash" in msg


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (f'[[users]]\nname = ""\npassword_hash = "{ARGON}"\n', "users.0.name"),
        (f'[[users]]\nname = "a"\npassword_hash = "{ARGON}"\nadmin = true\n', "users.0.admin"),
        ('[[users]]\nname = "a"\n', "users.0.password_hash"),
        (f'[[users]]\nname = "a"\npassword_hash = "{ARGON}"\ngroups = "ops"\n', "users.0.groups"),
    ],
)
def test_users_file_errors_name_key(tmp_path: Path, body: str, key: str) -> None:
    p = tmp_path / "users.toml"
    p.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_users(p)
    assert str(ei.value).startswith(f"{p}: key '{key}': ")


def test_users_file_missing_and_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "users.toml"
    with pytest.raises(ConfigError) as ei:
        load_users(p)
    assert str(ei.value) == f"{p}: users file not found"
    p.write_text("[[users]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML") as ei:
        load_users(p)
    assert str(ei.value).startswith(f"{p}: ")


def test_users_file_not_utf8_is_config_error(tmp_path: Path) -> None:
    p = tmp_path / "users.toml"
    p.write_bytes(b'[[users]]\nname = "\xe9lise"\n')
    with pytest.raises(ConfigError, match=str(p)):
        load_users(p)


def test_empty_users_file_is_valid(tmp_path: Path) -> None:
    p = tmp_path / "users.toml"
    p.write_text("", encoding="utf-8")
    assert load_users(p).users == []


# --- password helpers ---------------------------------------------------------------------------


def test_hash_password_is_argon2id_and_salted() -> None:
    h = passwords.hash_password("x")
    assert h.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert h != passwords.hash_password("x")


def test_verify_password_sync() -> None:
    assert passwords.verify_password_sync(ARGON, PW) is True
    assert passwords.verify_password_sync(ARGON, PW + " ") is False
    assert passwords.verify_password_sync(BCRYPT, "bcrypt-pw") is True
    assert passwords.verify_password_sync(BCRYPT, "bcrypt-pw!") is False
    assert passwords.verify_password_sync(None, PW) is False
    assert passwords.verify_password_sync(None, "bastion-broker-timing-equaliser") is False
    assert passwords.verify_password_sync("plaintext", "plaintext") is False
    assert passwords.verify_password_sync("$argon2id$garbage", "x") is False
    assert passwords.verify_password_sync("$2b$garbage", "x") is False


def test_is_supported_hash() -> None:
    assert passwords.is_supported_hash(ARGON)
    assert passwords.is_supported_hash(BCRYPT)
    assert passwords.is_supported_hash("$2y$04$abc")
    assert not passwords.is_supported_hash("$argon2d$v=19$...")
    assert not passwords.is_supported_hash("$1$md5crypt")
    assert not passwords.is_supported_hash("hunter2")
