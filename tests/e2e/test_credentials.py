"""The TOTP key as a systemd credential (``LoadCredential=totp-key:...`` in the unit): a broker
started with ``$CREDENTIALS_DIRECTORY/totp-key`` seals and opens TOTP secrets with that key and
never creates a key file of its own in the state directory."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
from pathlib import Path

import pytest

from broker.services.totp_secrets import CREDENTIAL_NAME, ENV_KEY, EncryptedTotpStore
from broker.store.sqlite import SqliteDatabase, SqliteTotpStore
from tests.conftest import start_demo, stop_demo

pytestmark = pytest.mark.e2e


def test_a_broker_uses_the_totp_key_credential(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    key = os.urandom(32)
    (creds / CREDENTIAL_NAME).write_text(base64.b64encode(key).decode() + "\n")
    env = {k: v for k, v in os.environ.items() if k != ENV_KEY}
    env["CREDENTIALS_DIRECTORY"] = str(creds)
    d = start_demo(tmp_path / "state", users=1, env=env)
    try:
        r = subprocess.run([*d.ssh_args("alice+web01"), "echo ok"], capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL, env=d.env("alice"))
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"ok\n"
    finally:
        stop_demo(d)
    assert d.proc.returncode == 0
    assert not (d.state_dir / "totp.key").exists()
    # the secret in the store opens with the credential's key, and with no other
    db = SqliteDatabase(d.state_dir / "broker.db", read_only=True)
    try:
        user = f"alice@{d.info['domain']}"
        sealed = EncryptedTotpStore(SqliteTotpStore(db), key)
        assert asyncio.run(sealed.get_secret(user)) == d.secret("alice")
        stored = asyncio.run(SqliteTotpStore(db).get_secret(user))
        assert stored is not None and stored.startswith("v1:")  # sealed, not plain
    finally:
        db.close()
