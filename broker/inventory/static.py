"""A static inventory in TOML: stacks, each in one VPC, holding instances.

Example::

    [[stacks]]
    id = "stack-0a1b"
    vpc = "vpc-0c2d"

    [[stacks.instances]]
    id = "i-0abc123"
    name = "web01"
    address = "10.0.1.12"
    port = 22
    os = "linux"
    host_keys = ["ssh-ed25519 AAAA..."]     # or host_ca_keys = ["ssh-ed25519 AAAA..."]
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import asyncssh
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.domain.models import Instance
from broker.errors import ConfigError


def _check_keys(v: list[str]) -> list[str]:
    for k in v:
        try:
            asyncssh.import_public_key(k)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ValueError(f"not an SSH public key: {exc}") from None
    return v


class InstanceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    address: str
    port: int = Field(default=22, ge=1, le=65535)
    os: Literal["linux", "windows"] = "linux"
    host_keys: list[str] = Field(default_factory=list)
    host_ca_keys: list[str] = Field(default_factory=list)
    admin_login: str | None = None
    read_only_login: str | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            if not v or len(v) > 253 or any(c.isspace() for c in v):
                raise ValueError("must be an IP address or a host name") from None
        return v

    _hk = field_validator("host_keys", "host_ca_keys")(_check_keys)


class StackEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    vpc: str = Field(min_length=1)
    instances: list[InstanceEntry] = Field(default_factory=list)


class InventoryFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stacks: list[StackEntry] = Field(default_factory=list)


class StaticInventory:
    """``Inventory`` over a TOML file, looked up by instance id or name, case-insensitively."""

    def __init__(self, data: InventoryFile, source: str = "inventory") -> None:
        self._all: list[Instance] = []
        self._by_key: dict[str, Instance] = {}
        for stack in data.stacks:
            for e in stack.instances:
                inst = Instance(
                    id=e.id, name=e.name, stack_id=stack.id, vpc_id=stack.vpc,
                    address=e.address, port=e.port, os=e.os,
                    host_keys=tuple(e.host_keys), host_ca_keys=tuple(e.host_ca_keys),
                    admin_login=e.admin_login, read_only_login=e.read_only_login,
                )
                self._all.append(inst)
                for key in (e.id.casefold(), e.name.casefold()):
                    if key in self._by_key and self._by_key[key] != inst:
                        raise ConfigError(f"{source}: instance id or name '{key}' is not unique")
                    self._by_key[key] = inst

    @classmethod
    def from_file(cls, path: Path) -> StaticInventory:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
            return cls(InventoryFile.model_validate(raw), str(path))
        except FileNotFoundError:
            raise ConfigError(f"{path}: inventory file not found") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read inventory: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except ValidationError as exc:
            msgs = [
                f"{path}: key '{'.'.join(str(x) for x in e['loc'])}': {e['msg']}"
                for e in exc.errors()
            ]
            raise ConfigError("\n".join(msgs)) from None

    async def resolve(self, name: str) -> Instance | None:
        return self._by_key.get(name.casefold())

    async def instances(self) -> Sequence[Instance]:
        return list(self._all)
