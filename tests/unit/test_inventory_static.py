"""StaticInventory: lookup by id or name, case-insensitive; config errors name file and key."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest

from broker.domain.models import Instance
from broker.errors import ConfigError
from broker.inventory.static import InventoryFile, StaticInventory

HOST_KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()

INVENTORY = f"""
[[stacks]]
id = "stack-0a1b"
vpc = "vpc-0c2d"

[[stacks.instances]]
id = "i-0abc123"
name = "Web01"
address = "10.0.1.12"
host_keys = ["{HOST_KEY}"]

[[stacks.instances]]
id = "i-0abc124"
name = "db01.prod"
address = "db01.internal.example.com"
port = 2222
admin_login = "root"
read_only_login = "viewer"

[[stacks]]
id = "stack-win"
vpc = "vpc-9"

[[stacks.instances]]
id = "i-0ffff"
name = "dc01"
address = "fd00::5"
os = "windows"
host_ca_keys = ["{HOST_KEY}"]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "inventory.toml"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture
def inv(tmp_path: Path) -> StaticInventory:
    return StaticInventory.from_file(write(tmp_path, INVENTORY))


WEB01 = Instance(
    id="i-0abc123",
    name="Web01",
    stack_id="stack-0a1b",
    vpc_id="vpc-0c2d",
    address="10.0.1.12",
    host_keys=(HOST_KEY,),
)


async def test_resolve_by_id_and_name_case_insensitive(inv: StaticInventory) -> None:
    for key in ("i-0abc123", "I-0ABC123", "Web01", "web01", "WEB01"):
        assert await inv.resolve(key) == WEB01


async def test_resolve_fields(inv: StaticInventory) -> None:
    db = await inv.resolve("DB01.PROD")
    assert db == Instance(
        id="i-0abc124",
        name="db01.prod",
        stack_id="stack-0a1b",
        vpc_id="vpc-0c2d",
        address="db01.internal.example.com",
        port=2222,
        admin_login="root",
        read_only_login="viewer",
    )
    dc = await inv.resolve("dc01")
    assert dc is not None
    assert (dc.os, dc.port, dc.stack_id, dc.vpc_id, dc.host_ca_keys, dc.host_keys) == (
        "windows",
        22,
        "stack-win",
        "vpc-9",
        (HOST_KEY,),
        (),
    )


async def test_resolve_unknown(inv: StaticInventory) -> None:
    assert await inv.resolve("web02") is None
    assert await inv.resolve("") is None
    assert await inv.resolve("web0") is None


async def test_instances_in_file_order(inv: StaticInventory) -> None:
    assert [i.id for i in await inv.instances()] == ["i-0abc123", "i-0abc124", "i-0ffff"]
    # a copy: callers cannot alter the inventory
    lst = await inv.instances()
    assert isinstance(lst, list)
    lst.clear()
    assert len(await inv.instances()) == 3


def _two(name_a: str, name_b: str, id_b: str = "i-2") -> str:
    return f"""
[[stacks]]
id = "s1"
vpc = "v1"
[[stacks.instances]]
id = "i-1"
name = "{name_a}"
address = "10.0.0.1"
[[stacks]]
id = "s2"
vpc = "v2"
[[stacks.instances]]
id = "{id_b}"
name = "{name_b}"
address = "10.0.0.2"
"""


@pytest.mark.parametrize(
    ("text", "dup"),
    [
        (_two("web01", "web01"), "web01"),
        (_two("web01", "WEB01"), "web01"),
        (_two("web01", "i-1"), "i-1"),  # a name equal to another instance's id
        (_two("web01", "web02", id_b="I-1"), "i-1"),
    ],
)
def test_duplicate_names_are_config_error(tmp_path: Path, text: str, dup: str) -> None:
    with pytest.raises(ConfigError, match=f"'{dup}' is not unique"):
        StaticInventory.from_file(write(tmp_path, text))


def test_duplicate_name_error_names_file(tmp_path: Path) -> None:
    p = write(tmp_path, _two("web01", "web01"))
    with pytest.raises(ConfigError, match=str(p)):
        StaticInventory.from_file(p)


async def test_id_equal_to_own_name_is_fine() -> None:
    data = InventoryFile.model_validate(
        {
            "stacks": [
                {
                    "id": "s",
                    "vpc": "v",
                    "instances": [{"id": "web01", "name": "WEB01", "address": "10.0.0.1"}],
                }
            ]
        }
    )
    inv = StaticInventory(data)
    assert len(await inv.instances()) == 1
    assert await inv.resolve("web01") == await inv.resolve("WEB01")


def _one(extra: str) -> str:
    return f"""
[[stacks]]
id = "s1"
vpc = "v1"
[[stacks.instances]]
id = "i-1"
name = "web01"
address = "10.0.0.1"
{extra}
"""


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        (
            'host_keys = ["ssh-ed25519 AAAAnotakey"]',
            "stacks.0.instances.0.host_keys",
            "not an SSH public key",
        ),
        ('host_keys = ["hello"]', "stacks.0.instances.0.host_keys", "not an SSH public key"),
        ('host_ca_keys = ["ssh-rsa !!!"]', "stacks.0.instances.0.host_ca_keys", "not an SSH public key"),
        ("port = 0", "stacks.0.instances.0.port", "greater than or equal to 1"),
        ('os = "plan9"', "stacks.0.instances.0.os", "'linux' or 'windows'"),
        ("colour = 1", "stacks.0.instances.0.colour", "Extra inputs"),
    ],
)
def test_bad_instance_fields_name_file_and_key(
    tmp_path: Path, extra: str, key: str, problem: str
) -> None:
    p = write(tmp_path, _one(extra))
    with pytest.raises(ConfigError) as ei:
        StaticInventory.from_file(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: key '{key}': ")
    assert problem in msg


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("address", "web 01", "stacks.0.instances.0.address"),
        ("address", "", "stacks.0.instances.0.address"),
        ("name", "-web", "stacks.0.instances.0.name"),
        ("id", "i 1", "stacks.0.instances.0.id"),
    ],
)
def test_bad_names_and_addresses(tmp_path: Path, field: str, value: str, key: str) -> None:
    text = _one("").replace(
        {"address": 'address = "10.0.0.1"', "name": 'name = "web01"', "id": 'id = "i-1"'}[field],
        f'{field} = "{value}"',
    )
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        StaticInventory.from_file(p)


def test_missing_and_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as ei:
        StaticInventory.from_file(p)
    assert str(ei.value) == f"{p}: inventory file not found"
    p = write(tmp_path, "[[stacks]\n")
    with pytest.raises(ConfigError) as ei:
        StaticInventory.from_file(p)
    assert str(ei.value).startswith(f"{p}: not valid TOML")
