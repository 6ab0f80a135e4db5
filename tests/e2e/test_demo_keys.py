"""``bastion-broker demo --public-keys``: the demo's key is registered for every demo user."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest

from broker import demo
from broker.config import load_config
from broker.stores import open_stores

pytestmark = pytest.mark.e2e


async def test_public_keys_flag_registers_the_demo_key(tmp_path: Path) -> None:
    info = demo.prepare(tmp_path, 0, 2, public_keys=True)
    key = demo.demo_user_key(tmp_path)
    await demo._seed(tmp_path / "broker.toml", info["names"], key)
    config = load_config(tmp_path / "broker.toml")
    assert config.identity.public_keys
    fp = asyncssh.read_private_key(key).get_fingerprint("sha256")
    stores = open_stores(config)
    try:
        for name in info["names"]:
            assert await stores.keys.has(f"{name}@{demo.DOMAIN}", fp)
        assert not await stores.keys.has(f"nobody@{demo.DOMAIN}", fp)
    finally:
        await stores.close()


def test_without_the_flag_keys_stay_off(tmp_path: Path) -> None:
    demo.prepare(tmp_path, 0, 1)
    assert not load_config(tmp_path / "broker.toml").identity.public_keys
