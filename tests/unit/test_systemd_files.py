"""The files in systemd/, checked by systemd's own tools: the unit passes ``systemd-analyze
verify`` and keeps its hardening, reloads with SIGHUP and passes the TOTP key as the credential the
broker reads; sysusers.d and tmpfiles.d, applied to an empty root, make the account the unit names
and its directories with the modes the unit expects."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from broker.services.totp_secrets import CREDENTIAL_NAME

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "bastion-broker.service"
SYSUSERS = SYSTEMD / "bastion-broker.sysusers"
TMPFILES = SYSTEMD / "bastion-broker.tmpfiles"
BIN = Path(sys.executable).parent / "bastion-broker"
EXEC_START = "/opt/bastion-broker/bin/bastion-broker"


def directives(section: str) -> list[tuple[str, str]]:
    """``(key, value)`` of one section of the unit, in order (keys may repeat)."""
    found: list[tuple[str, str]] = []
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            found.append((key, value))
    return found


def service(key: str) -> list[str]:
    return [v for k, v in directives("Service") if k == key]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants ExecStart's binary to exist: the same unit, run from this venv
    assert service("ExecStart")[0].startswith(EXEC_START + " ")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(EXEC_START, str(BIN)))
    r = subprocess.run([tool("systemd-analyze"), "verify", "--man=no", str(unit)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout + r.stderr == ""  # an unknown or misspelt key is only a warning there


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(EXEC_START, str(BIN))
                    .replace("ExecReload=", "ExecRelaod="))
    r = subprocess.run([tool("systemd-analyze"), "verify", "--man=no", str(unit)],
                       capture_output=True, text=True, timeout=60)
    assert "ExecRelaod" in r.stdout + r.stderr


def test_the_unit_reloads_with_sighup_and_keeps_its_hardening() -> None:
    assert service("Type") == ["notify"]
    assert service("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    hardening = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet":
        "CAP_NET_BIND_SERVICE", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "RestrictSUIDSGID": "yes", "MemoryDenyWriteExecute": "yes", "UMask": "0077",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "LockPersonality": "yes",
        "SystemCallArchitectures": "native", "StateDirectoryMode": "0700",
    }
    for key, value in hardening.items():
        assert service(key) == [value], key
    assert "@system-service" in service("SystemCallFilter")


def test_the_credential_is_the_one_the_broker_reads() -> None:
    (load,) = service("LoadCredential")
    name, _, path = load.partition(":")
    assert name == CREDENTIAL_NAME == "totp-key"
    assert path == "/etc/bastion-broker/totp.key"
    # tmpfiles keeps that file root's alone (systemd, as root, reads it for the broker)
    assert f"z {path} 0600 root root -" in TMPFILES.read_text().splitlines()


def _passwd(root: Path, name: str) -> list[str]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        if line.split(":")[0] == name:
            return line.split(":")
    raise AssertionError(f"no {name} in {root}/etc/passwd")


def _group_id(root: Path, name: str) -> int:
    for line in (root / "etc" / "group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"no group {name} in {root}/etc/group")


def _mode_owner(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def test_sysusers_and_tmpfiles_make_the_account_and_directories(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles sets owners: root only")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = subprocess.run([tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (user,) = service("User")
    (group,) = service("Group")
    assert user == group == "bastion-broker"
    entry = _passwd(root, user)
    uid, gid = int(entry[2]), int(entry[3])
    assert 0 < uid < 1000  # a system account
    assert gid == _group_id(root, group)
    assert entry[6] == "/usr/sbin/nologin"

    # a key already there, too open: tmpfiles closes it, and fixes the directory it is in
    conf = root / "etc" / "bastion-broker"
    conf.mkdir(mode=0o755)
    key = conf / "totp.key"
    key.write_text("not read by this test\n")
    key.chmod(0o644)
    r = subprocess.run([tool("systemd-tmpfiles"), f"--root={root}", "--create", str(TMPFILES)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _mode_owner(conf) == (0o750, 0, gid)  # root writes, the broker's group reads
    assert _mode_owner(key) == (0o600, 0, 0)
    state = root / "var" / "lib" / "bastion-broker"
    assert _mode_owner(state) == (int(service("StateDirectoryMode")[0], 8), uid, gid)
    assert int(service("ConfigurationDirectoryMode")[0], 8) == 0o750  # the unit agrees
