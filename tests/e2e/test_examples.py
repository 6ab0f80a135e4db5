"""The shipped example files are valid: a user copying them gets a working start."""

from __future__ import annotations

from pathlib import Path

from broker.config import load_config
from broker.identity.static import StaticDirectory
from broker.inventory.static import StaticInventory

CONFIG = Path(__file__).resolve().parents[2] / "config"


async def test_example_files_validate() -> None:
    cfg = load_config(CONFIG / "broker.example.toml")
    assert cfg.ssh.listen_port == 22
    assert cfg.db_path == Path("/var/lib/bastion-broker/broker.db")
    inv = StaticInventory.from_file(CONFIG / "inventory.example.toml")
    web02 = await inv.resolve("WEB02")
    assert web02 is not None
    assert web02.host_ca_keys
    assert web02.read_only_login == "webops"
    d = StaticDirectory.from_file(CONFIG / "users.example.toml", "corp.example.com", {})
    assert (await d.authenticate("alice", None, "change-me-now")).ok
