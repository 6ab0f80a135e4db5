"""TOTP secrets at rest: sealed with AES-GCM bound to the account, key loading order."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from broker.errors import ConfigError, StoreError
from broker.services.totp_secrets import ENV_KEY, EncryptedTotpStore, load_key
from broker.store.sqlite import SqliteDatabase, SqliteTotpStore

KEY = bytes(range(32))


async def test_secret_is_not_stored_in_clear_and_round_trips(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "s.db")
    inner = SqliteTotpStore(db)
    store = EncryptedTotpStore(inner, KEY)
    await store.set_secret("alice@corp", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    raw = await inner.get_secret("alice@corp")
    assert raw is not None
    assert raw.startswith("v1:")
    assert "JBSWY3DP" not in raw
    assert await store.get_secret("alice@corp") == "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    # a row copied onto another account does not decrypt there
    await inner.set_secret("mallory@corp", raw)
    with pytest.raises(StoreError):
        await store.get_secret("mallory@corp")
    # the wrong key fails closed
    with pytest.raises(StoreError):
        await EncryptedTotpStore(inner, bytes(32)).get_secret("alice@corp")


async def test_legacy_plain_rows_are_read(tmp_path: Path) -> None:
    inner = SqliteTotpStore(SqliteDatabase(tmp_path / "s.db"))
    await inner.set_secret("bob@corp", "JBSWY3DPEHPK3PXP")
    assert await EncryptedTotpStore(inner, KEY).get_secret("bob@corp") == "JBSWY3DPEHPK3PXP"


def test_key_is_generated_once_with_mode_0600(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "totp.key"
    k1 = load_key(None, path)
    assert len(k1) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(None, path) == k1


def test_key_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cred = tmp_path / "creds"
    cred.mkdir()
    (cred / "totp-key").write_text(base64.b64encode(b"c" * 32).decode())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(cred))
    monkeypatch.delenv(ENV_KEY, raising=False)
    assert load_key(None, tmp_path / "default") == b"c" * 32
    monkeypatch.setenv(ENV_KEY, base64.b64encode(b"e" * 32).decode())
    assert load_key(None, tmp_path / "default") == b"e" * 32
    monkeypatch.setenv(ENV_KEY, "not base64!")
    with pytest.raises(ConfigError, match="not base64"):
        load_key(None, tmp_path / "default")
    monkeypatch.setenv(ENV_KEY, base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="32 bytes"):
        load_key(None, tmp_path / "default")


def test_missing_configured_key_file_is_an_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="not found"):
        load_key(tmp_path / "missing.key", tmp_path / "default")
