"""The broker's CA keys and the per-session certificates it issues."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncssh

from broker.ssh.ca import UserCA
from broker.ssh.keys import CA_KEY_ALG, load_or_create_key

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _issue(ca: UserCA, *, not_after: datetime = NOW + timedelta(hours=8),
           pty: bool = True) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
    return ca.issue(login="bb-admin", key_id="user=alice grant=g1 session=s1", now=NOW,
                    ttl=timedelta(minutes=5), not_after=not_after, permit_pty=pty)


def _shown(cert: asyncssh.SSHCertificate, path: Path) -> str:
    """``ssh-keygen -L``: OpenSSH's own reading of the certificate (times in UTC)."""
    cert.write_certificate(path)
    return subprocess.run(["ssh-keygen", "-L", "-f", str(path)], check=True, capture_output=True,
                          text=True, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"}).stdout


def _valid(shown: str) -> str:
    return next(line.strip() for line in shown.splitlines() if line.strip().startswith("Valid:"))


def test_a_new_ca_is_p256_and_an_existing_one_keeps_its_type(tmp_path: Path) -> None:
    new = load_or_create_key(tmp_path / "ca" / "user_ca", "test CA", CA_KEY_ALG)
    assert new.algorithm == b"ecdsa-sha2-nistp256"
    assert (tmp_path / "ca" / "user_ca").stat().st_mode & 0o777 == 0o600
    again = load_or_create_key(tmp_path / "ca" / "user_ca", "test CA", CA_KEY_ALG)
    assert again.export_public_key() == new.export_public_key()

    old = tmp_path / "old_ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(old)], check=True)
    kept = load_or_create_key(old, "test CA", CA_KEY_ALG)
    assert kept.algorithm == b"ssh-ed25519"
    # an upgraded install keeps offering its targets the key type they already accept
    key, cert = _issue(UserCA(kept))
    assert key.algorithm == b"ssh-ed25519"
    shown = _shown(cert, tmp_path / "e-cert.pub")
    assert "ED25519-CERT" in shown and "(using ssh-ed25519)" in shown


def test_a_session_certificate_permits_only_the_login_and_a_pty(tmp_path: Path) -> None:
    ca_key = load_or_create_key(tmp_path / "user_ca", "test CA", CA_KEY_ALG)
    key, cert = _issue(UserCA(ca_key))
    assert key.algorithm == b"ecdsa-sha2-nistp256"
    assert cert.key.export_public_key() == key.export_public_key()
    assert cert.signing_key.export_public_key() == ca_key.export_public_key()
    assert cert.principals == ["bb-admin"]
    shown = _shown(cert, tmp_path / "k-cert.pub")
    assert "ECDSA-CERT" in shown and "(using ecdsa-sha2-nistp256)" in shown
    assert 'Key ID: "user=alice grant=g1 session=s1"' in shown
    assert _valid(shown) == "Valid: from 2026-11-28T11:59:00 to 2026-11-28T12:05:00"
    critical, _, extensions = shown.partition("Extensions:")
    assert extensions.split() == ["permit-pty"]
    assert "Critical Options: (none)" in critical

    _, no_pty = _issue(UserCA(ca_key), pty=False)
    assert _shown(no_pty, tmp_path / "n-cert.pub").partition("Extensions:")[2].split() == [
        "(none)"]


def test_a_certificate_never_outlives_its_grant(tmp_path: Path) -> None:
    ca = UserCA(load_or_create_key(tmp_path / "user_ca", "test CA", CA_KEY_ALG))
    _, cert = _issue(ca, not_after=NOW + timedelta(seconds=90))
    assert _valid(_shown(cert, tmp_path / "c-cert.pub")).endswith(" to 2026-11-28T12:01:30")
