"""A static directory: users and password hashes in a TOML file, for small installs and the demo.

File format::

    [[users]]
    name = "alice"
    password_hash = "$argon2id$v=19$..."
    groups = ["ops"]          # optional
    disabled = false          # optional
"""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.domain.models import Principal
from broker.errors import ConfigError
from broker.identity.passwords import is_supported_hash, verify_password
from broker.ports import AuthOutcome


class StaticUser(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    password_hash: str
    groups: list[str] = Field(default_factory=list)
    disabled: bool = False

    @field_validator("password_hash")
    @classmethod
    def _known_hash(cls, v: str) -> str:
        if not is_supported_hash(v):
            raise ValueError("must be an argon2 or bcrypt hash (see 'bastion-broker user add')")
        return v


class UsersFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    users: list[StaticUser] = Field(default_factory=list)

    @field_validator("users")
    @classmethod
    def _unique(cls, v: list[StaticUser]) -> list[StaticUser]:
        seen: set[str] = set()
        for u in v:
            if u.name.casefold() in seen:
                raise ValueError(f"user '{u.name}' appears twice (names are case-insensitive)")
            seen.add(u.name.casefold())
        return v


def load_users(path: Path) -> UsersFile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        return UsersFile.model_validate(raw)
    except FileNotFoundError:
        raise ConfigError(f"{path}: users file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read users file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        msgs = [
            f"{path}: key '{'.'.join(str(x) for x in e['loc'])}': {e['msg']}" for e in exc.errors()
        ]
        raise ConfigError("\n".join(msgs)) from None


def _readable(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read users file: {exc.strerror}") from None


class StaticDirectory:
    """``Directory`` over a users file; one domain (plus NetBIOS aliases) as in a single AD forest."""

    def __init__(self, users: UsersFile, domain: str, aliases: dict[str, str], *,
                 path: Path | None = None) -> None:
        self._path = path  # the users file, if read from one (readiness reads it again)
        self._file = users
        self._users = {u.name.casefold(): u for u in users.users}
        self._domain = domain
        self._aliases = {k.casefold(): v for k, v in aliases.items()}

    @classmethod
    def from_file(cls, path: Path, domain: str, aliases: dict[str, str]) -> StaticDirectory:
        return cls(load_users(path), domain, aliases, path=path)

    async def ping(self) -> None:
        """Readiness: the users file can still be read (an operator may have broken its
        permissions). Raises ConfigError naming the file."""
        if self._path is not None:
            await asyncio.to_thread(_readable, self._path)

    @property
    def users_file(self) -> UsersFile:
        """The users file this directory was built from (a reload compares it)."""
        return self._file

    def canonical_domain(self, domain: str | None) -> str | None:
        if domain is None or domain.casefold() == self._domain.casefold():
            return self._domain
        alias = self._aliases.get(domain.casefold())
        if alias and alias.casefold() == self._domain.casefold():
            return self._domain
        return None

    async def lookup(self, username: str, domain: str | None) -> AuthOutcome:
        fqdn = self.canonical_domain(domain)
        user = self._users.get(username.casefold()) if fqdn else None
        if user is None or fqdn is None:
            return AuthOutcome(None, "unknown user" if fqdn else "untrusted domain")
        if user.disabled:
            return AuthOutcome(None, "account disabled")
        return AuthOutcome(Principal(fqdn, user.name, frozenset(user.groups)), "account ok")

    async def authenticate(self, username: str, domain: str | None, password: str) -> AuthOutcome:
        fqdn = self.canonical_domain(domain)
        user = self._users.get(username.casefold()) if fqdn else None
        if not password.strip() or "\x00" in password:
            # Same cost as a real check, so an empty password is not a faster "no".
            await verify_password(None, password)
            return AuthOutcome(None, "empty or invalid password")
        ok = await verify_password(user.password_hash if user else None, password)
        if user is None or fqdn is None:
            return AuthOutcome(None, "unknown user" if fqdn else "untrusted domain")
        if not ok:
            return AuthOutcome(None, "bad password")
        if user.disabled:
            return AuthOutcome(None, "account disabled")
        return AuthOutcome(Principal(fqdn, user.name, frozenset(user.groups)), "password ok")
